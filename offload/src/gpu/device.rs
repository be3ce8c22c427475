//! [`GpuDevice`]: one CUDA context with a few streams, and the raw operations the GPU tier,
//! the pinned host arenas and the benchmarks need.
//!
//! cudarc's safe `CudaSlice` ties each allocation to borrow lifetimes, which cannot express an
//! arena whose disjoint slots are written from many threads at once; so arenas are plain device
//! addresses from `cuMemAlloc` and copies go through cudarc's `result` layer, each `unsafe`
//! block stating why it is sound. Every operation binds the context to the calling thread first
//! (callers are arbitrary blocking threads).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::{CudaContext, CudaStream, result, sys};
use parking_lot::Mutex;

use super::{GpuError, GpuInfo, guarded, is_driver_present};

/// Streams per device: concurrent puts and gets from different threads overlap on them.
const STREAMS: usize = 4;
/// Most pinned staging memory kept for reuse after the last view of a buffer drops.
const PINNED_POOL_BYTES: usize = 256 << 20;

/// One GPU, opened through the driver loaded at run time.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    streams: Vec<Arc<CudaStream>>,
    next: AtomicUsize,
    ordinal: usize,
    pool: Arc<PinnedPool>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuDevice({})", self.ordinal)
    }
}

impl GpuDevice {
    /// Opens device `ordinal`. [`GpuError::NoDriver`] when `libcuda` is absent (checked before
    /// any context is created, which would panic), [`GpuError::NoDevice`] when it has no such
    /// device; a panic inside the bindings becomes [`GpuError::Panicked`].
    pub fn open(ordinal: usize) -> Result<Arc<Self>, GpuError> {
        if !is_driver_present() {
            return Err(GpuError::NoDriver);
        }
        guarded("opening the device", || {
            result::init().map_err(|e| GpuError::driver("cuInit", e))?;
            let count = result::device::get_count()
                .map_err(|e| GpuError::driver("counting devices", e))?
                as usize;
            if ordinal >= count {
                return Err(GpuError::NoDevice { ordinal, count });
            }
            let ctx =
                CudaContext::new(ordinal).map_err(|e| GpuError::driver("creating a context", e))?;
            let streams = (0..STREAMS)
                .map(|_| ctx.new_stream())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| GpuError::driver("creating streams", e))?;
            let pool = Arc::new(PinnedPool {
                ctx: ctx.clone(),
                free: Mutex::new((HashMap::new(), 0)),
            });
            Ok(Arc::new(GpuDevice {
                ctx,
                streams,
                next: AtomicUsize::new(0),
                ordinal,
                pool,
            }))
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context", e))
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.streams[self.next.fetch_add(1, Ordering::Relaxed) % self.streams.len()]
    }

    /// Name, memory and compute capability of the device.
    pub fn info(&self) -> Result<GpuInfo, GpuError> {
        self.bind()?;
        let name = self
            .ctx
            .name()
            .map_err(|e| GpuError::driver("reading the name", e))?;
        let (free, total) = self.mem_info()?;
        let cc = self
            .ctx
            .compute_capability()
            .map_err(|e| GpuError::driver("reading the compute capability", e))?;
        Ok(GpuInfo {
            ordinal: self.ordinal,
            name,
            total_bytes: total,
            free_bytes: free,
            compute_capability: cc,
        })
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), GpuError> {
        self.bind()?;
        let (free, total) =
            result::mem_get_info().map_err(|e| GpuError::driver("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }

    /// `len` bytes of device memory (one `cuMemAlloc`); free with [`GpuDevice::free`].
    pub fn alloc(&self, len: u64) -> Result<u64, GpuError> {
        self.bind()?;
        // SAFETY: allocation has no preconditions beyond a current context (bound above).
        unsafe { result::malloc_sync(len as usize) }
            .map_err(|e| GpuError::driver(&format!("allocating {len} device bytes"), e))
    }

    /// Frees memory from [`GpuDevice::alloc`].
    ///
    /// # Safety
    /// `ptr` came from `alloc` on this device, is freed once, and no copy still uses it.
    pub unsafe fn free(&self, ptr: u64) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { result::free_sync(ptr) }.map_err(|e| GpuError::driver("freeing device memory", e))
    }

    /// Copies `src` to device address `dst` and waits for it.
    ///
    /// # Safety
    /// `dst..dst+src.len()` lies inside one live device allocation that no other copy writes
    /// or reads concurrently.
    pub unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<(), GpuError> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream();
        // SAFETY: the caller guarantees the destination range; `src` outlives the copy because
        // we synchronise the stream before returning.
        unsafe {
            result::memcpy_htod_async(dst, src, s.cu_stream())
                .and_then(|_| result::stream::synchronize(s.cu_stream()))
        }
        .map_err(|e| GpuError::driver("copying host to device", e))
    }

    /// Copies device address `src` into `dst` and waits for it.
    ///
    /// # Safety
    /// `src..src+dst.len()` lies inside one live device allocation not written concurrently.
    pub unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), GpuError> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream();
        // SAFETY: as in `htod`; `dst` is exclusively borrowed until the stream is synchronised.
        unsafe {
            result::memcpy_dtoh_async(dst, src, s.cu_stream())
                .and_then(|_| result::stream::synchronize(s.cu_stream()))
        }
        .map_err(|e| GpuError::driver("copying device to host", e))
    }

    /// The context, for kernels and streams of callers (benchmarks, the gather kernel).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A pinned host buffer of at least `len` bytes from the reuse pool (`cuMemHostAlloc`).
    pub fn pinned(&self, len: usize) -> Result<PinnedBuf, GpuError> {
        self.pool.take(len)
    }

    /// Page-locks `len` bytes at `ptr` with the driver (`cuMemHostRegister`, portable).
    ///
    /// # Safety
    /// The range is live host memory that stays mapped until [`GpuDevice::host_unregister`]
    /// or process exit.
    pub unsafe fn host_register(&self, ptr: *mut u8, len: usize) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE).result()
        }
        .map_err(|e| GpuError::driver(&format!("page-locking {len} host bytes"), e))
    }

    /// Undoes [`GpuDevice::host_register`].
    ///
    /// # Safety
    /// `ptr` was registered and no copy is using it.
    pub unsafe fn host_unregister(&self, ptr: *mut u8) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { sys::cuMemHostUnregister(ptr.cast()).result() }
            .map_err(|e| GpuError::driver("unregistering host memory", e))
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, owned exclusively by one [`PinnedBuf`].
struct PinnedRaw {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the allocation is owned by exactly one value at a time and is plain host memory.
unsafe impl Send for PinnedRaw {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for PinnedRaw {}

struct PinnedPool {
    ctx: Arc<CudaContext>,
    /// Free buffers by capacity, and their total bytes.
    free: Mutex<(HashMap<usize, Vec<PinnedRaw>>, usize)>,
}

impl PinnedPool {
    fn take(self: &Arc<Self>, len: usize) -> Result<PinnedBuf, GpuError> {
        let cap = kvtier_cache::host::slot_size_for(len);
        let reused = {
            let mut g = self.free.lock();
            let raw = g.0.get_mut(&cap).and_then(Vec::pop);
            if raw.is_some() {
                g.1 -= cap;
            }
            raw
        };
        let raw = match reused {
            Some(r) => r,
            None => {
                self.ctx
                    .bind_to_thread()
                    .map_err(|e| GpuError::driver("binding the context", e))?;
                // SAFETY: plain page-locked allocation; portable so any context may copy from it.
                let ptr = unsafe { result::malloc_host(cap, sys::CU_MEMHOSTALLOC_PORTABLE) }
                    .map_err(|e| GpuError::driver(&format!("allocating {cap} pinned bytes"), e))?;
                // SAFETY: `ptr` points to `cap` writable bytes just allocated; zeroing them once
                // means a buffer never exposes memory this process did not write.
                unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, cap) };
                PinnedRaw {
                    ptr: ptr.cast(),
                    cap,
                }
            }
        };
        Ok(PinnedBuf {
            raw: Some(raw),
            len,
            pool: self.clone(),
        })
    }

    fn give_back(&self, raw: PinnedRaw) {
        let mut g = self.free.lock();
        if g.1 + raw.cap <= PINNED_POOL_BYTES {
            g.1 += raw.cap;
            g.0.entry(raw.cap).or_default().push(raw);
            return;
        }
        drop(g);
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `raw` came from cuMemHostAlloc and nothing else refers to it any more.
            let _ = unsafe { result::free_host(raw.ptr.cast()) };
        }
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for (_, list) in self.free.get_mut().0.drain() {
            for raw in list {
                // SAFETY: pooled buffers are owned by the pool alone.
                let _ = unsafe { result::free_host(raw.ptr.cast()) };
            }
        }
    }
}

/// A pinned host buffer of `len` bytes; returns to its device's pool on drop. Turn it into
/// `Bytes` with `Bytes::from_owner` to hand it out without a copy.
pub struct PinnedBuf {
    raw: Option<PinnedRaw>,
    len: usize,
    pool: Arc<PinnedPool>,
}

impl std::ops::Deref for PinnedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.raw {
            // SAFETY: `ptr` is a live allocation of `cap >= len` initialised bytes (zeroed when
            // allocated) owned by this buffer.
            Some(r) => unsafe { std::slice::from_raw_parts(r.ptr, self.len) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for PinnedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.raw {
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            Some(r) => unsafe { std::slice::from_raw_parts_mut(r.ptr, self.len) },
            None => &mut [],
        }
    }
}

impl AsRef<[u8]> for PinnedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.pool.give_back(raw);
        }
    }
}

/// Piece size of pipelined copies and parallel checksums: small enough that the last piece's
/// checksum adds little after the copy ends, large enough that per-piece overhead is noise.
pub const PIECE_BYTES: usize = 2 << 20;

impl GpuDevice {
    /// Enqueues `src` → device `dst`, runs `while_copying` (a checksum, say) during the copy,
    /// then waits for the copy.
    ///
    /// # Safety
    /// As [`GpuDevice::htod`].
    pub unsafe fn htod_overlapped<R>(
        &self,
        dst: u64,
        src: &[u8],
        while_copying: impl FnOnce() -> R,
    ) -> Result<R, GpuError> {
        if src.is_empty() {
            return Ok(while_copying());
        }
        self.bind()?;
        let s = self.stream();
        // SAFETY: the caller guarantees the destination; `src` is borrowed for this whole call
        // and the stream is synchronised before it returns, also when the closure runs long.
        unsafe { result::memcpy_htod_async(dst, src, s.cu_stream()) }
            .map_err(|e| GpuError::driver("copying host to device", e))?;
        let r = while_copying();
        // SAFETY: a stream of this context.
        unsafe { result::stream::synchronize(s.cu_stream()) }
            .map_err(|e| GpuError::driver("waiting for a host to device copy", e))?;
        Ok(r)
    }

    /// Copies device `src` into `dst` in pieces of [`PIECE_BYTES`], calling `on_piece(i, bytes)`
    /// on rayon's pool for each piece as soon as it has landed, while later pieces are still
    /// being copied. Returns when every copy and every call is done.
    ///
    /// # Safety
    /// As [`GpuDevice::dtoh`].
    pub unsafe fn dtoh_pipelined(
        &self,
        dst: &mut [u8],
        src: u64,
        on_piece: &(dyn Fn(usize, &[u8]) + Sync),
    ) -> Result<(), GpuError> {
        self.bind()?;
        let s = self.stream();
        let len = dst.len();
        let base = dst.as_mut_ptr();
        let n = len.div_ceil(PIECE_BYTES);
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            let off = i * PIECE_BYTES;
            let plen = PIECE_BYTES.min(len - off);
            // SAFETY: `off + plen <= len`, so the piece lies inside `dst`, which this call
            // borrows exclusively until every copy has been waited for below.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.add(off), plen) };
            // SAFETY: the caller guarantees the device range; pieces are disjoint.
            unsafe { result::memcpy_dtoh_async(piece, src + off as u64, s.cu_stream()) }
                .map_err(|e| GpuError::driver("copying device to host", e))?;
            let ev = self
                .ctx
                .new_event(None)
                .map_err(|e| GpuError::driver("creating an event", e))?;
            ev.record(s)
                .map_err(|e| GpuError::driver("recording an event", e))?;
            events.push(ev);
        }
        let mut failed = None;
        // The pieces are read on pool threads; the address travels as an integer because raw
        // pointers are not `Send` (each piece is rebuilt as a shared slice once it has landed).
        let base_addr = base as usize;
        rayon::scope(|scope| {
            for (i, ev) in events.iter().enumerate() {
                if let Err(e) = ev.synchronize() {
                    failed = Some(GpuError::driver("waiting for a device to host copy", e));
                    break;
                }
                let off = i * PIECE_BYTES;
                let plen = PIECE_BYTES.min(len - off);
                // SAFETY: piece `i` has landed (its event completed) and no copy writes it
                // any more; only shared views of it exist from here on.
                let piece: &[u8] =
                    unsafe { std::slice::from_raw_parts((base_addr + off) as *const u8, plen) };
                scope.spawn(move |_| on_piece(i, piece));
            }
        });
        if failed.is_some() {
            // Do not return while copies into `dst` may still be in flight.
            // SAFETY: a stream of this context.
            let _ = unsafe { result::stream::synchronize(s.cu_stream()) };
        }
        failed.map_or(Ok(()), Err)
    }
}

impl GpuDevice {
    /// Copies piece `i` (`piece` bytes at device `srcs[i]`) to `dst[i * piece..]`, one
    /// `cuMemcpyDtoHAsync` per piece (as paged engines do), then waits once.
    ///
    /// # Safety
    /// Every source range lies in live device memory not written during the call.
    pub unsafe fn dtoh_each(
        &self,
        dst: &mut [u8],
        srcs: &[u64],
        piece: usize,
    ) -> Result<(), GpuError> {
        if dst.len() != srcs.len() * piece {
            return Err(GpuError::Config(format!(
                "{} bytes for {} pieces of {piece}",
                dst.len(),
                srcs.len()
            )));
        }
        self.bind()?;
        let s = self.stream();
        for (d, &src) in dst.chunks_exact_mut(piece.max(1)).zip(srcs) {
            // SAFETY: the caller vouches for the source; `d` is borrowed until the sync below.
            if let Err(e) = unsafe { result::memcpy_dtoh_async(d, src, s.cu_stream()) } {
                // SAFETY: a stream of this context; drain it before `dst` is released.
                let _ = unsafe { result::stream::synchronize(s.cu_stream()) };
                return Err(GpuError::driver("copying a piece device to host", e));
            }
        }
        // SAFETY: a stream of this context.
        unsafe { result::stream::synchronize(s.cu_stream()) }
            .map_err(|e| GpuError::driver("waiting for piece copies", e))
    }

    /// Copies `src[i * piece..]` to device `dsts[i]`, one `cuMemcpyHtoDAsync` per piece, then
    /// waits once.
    ///
    /// # Safety
    /// Every destination range lies in live device memory nothing else touches meanwhile, and
    /// the ranges do not overlap.
    pub unsafe fn htod_each(&self, dsts: &[u64], src: &[u8], piece: usize) -> Result<(), GpuError> {
        if src.len() != dsts.len() * piece {
            return Err(GpuError::Config(format!(
                "{} bytes for {} pieces of {piece}",
                src.len(),
                dsts.len()
            )));
        }
        self.bind()?;
        let s = self.stream();
        for (p, &dst) in src.chunks_exact(piece.max(1)).zip(dsts) {
            // SAFETY: the caller vouches for the destination; `src` outlives the sync below.
            if let Err(e) = unsafe { result::memcpy_htod_async(dst, p, s.cu_stream()) } {
                // SAFETY: a stream of this context.
                let _ = unsafe { result::stream::synchronize(s.cu_stream()) };
                return Err(GpuError::driver("copying a piece host to device", e));
            }
        }
        // SAFETY: a stream of this context.
        unsafe { result::stream::synchronize(s.cu_stream()) }
            .map_err(|e| GpuError::driver("waiting for piece copies", e))
    }
}

/// CRC32C of `data`, pieces of [`PIECE_BYTES`] in parallel on rayon's pool, combined.
pub fn crc_parallel(data: &[u8]) -> u32 {
    use rayon::prelude::*;
    if data.len() <= PIECE_BYTES {
        return crc32c::crc32c(data);
    }
    let parts: Vec<(u32, usize)> = data
        .par_chunks(PIECE_BYTES)
        .map(|c| (crc32c::crc32c(c), c.len()))
        .collect();
    combine(&parts)
}

/// Combines per-piece CRCs, in order, into the CRC of the whole.
pub fn combine(parts: &[(u32, usize)]) -> u32 {
    parts
        .iter()
        .skip(1)
        .fold(parts.first().map_or(0, |p| p.0), |acc, &(c, l)| {
            crc32c::crc32c_combine(acc, c, l)
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_crc_equals_serial_crc() {
        for len in [
            0usize,
            1,
            super::PIECE_BYTES,
            super::PIECE_BYTES + 1,
            5 << 20,
        ] {
            let data = kvtier_cache::conformance::payload(len as u64, len);
            assert_eq!(
                super::crc_parallel(&data),
                crc32c::crc32c(&data),
                "len {len}"
            );
        }
    }
}
