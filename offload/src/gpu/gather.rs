//! [`PageCopier`]: copies many equal-sized pieces between arbitrary device addresses in one
//! kernel launch, the gather (scattered engine pages → one contiguous chunk) and scatter
//! (contiguous chunk → given pages) of paged KV caches.
//!
//! A paged engine keeps a request's KV in pages of, say, 16 tokens × one layer's K (or V); one
//! `cudaMemcpy` per page is bound by per-copy overhead (512 MiB as 32 KiB pieces ran at about
//! 2.3 GB/s on the H200 machine). One launch copies every piece at device-memory speed, after
//! which the contiguous chunk moves to the host in one copy. The kernel is tiny and compiled at
//! run time with nvrtc (loaded dynamically like the driver), so no CUDA toolkit is needed at
//! build time: each block copies whole pieces as 16-byte words, grid-striding over pieces.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::buffer::{DeviceRegion, check_pieces};
use super::{GpuDevice, GpuError, guarded};

const KERNEL: &str = r#"
extern "C" __global__ void kvtier_copy_pieces(
    const unsigned long long* __restrict__ src,
    const unsigned long long* __restrict__ dst,
    unsigned long long pieces,
    unsigned long long words)
{
    for (unsigned long long p = blockIdx.x; p < pieces; p += gridDim.x) {
        const uint4* s = (const uint4*)src[p];
        uint4* d = (uint4*)dst[p];
        for (unsigned long long i = threadIdx.x; i < words; i += blockDim.x) {
            d[i] = s[i];
        }
    }
}
"#;

/// Threads per block of the copy kernel.
const THREADS: u32 = 256;
/// Most blocks launched; blocks grid-stride over the pieces beyond.
const MAX_BLOCKS: usize = 65_535;

/// One-launch copier of equal-sized pieces between device addresses.
pub struct PageCopier {
    dev: Arc<GpuDevice>,
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl PageCopier {
    /// Compiles and loads the kernel; [`GpuError::Kernel`] when nvrtc is missing or fails.
    pub fn new(dev: Arc<GpuDevice>) -> Result<Self, GpuError> {
        // SAFETY: only tries to dlopen libnvrtc; no symbol is called.
        let present =
            std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
                .unwrap_or(false);
        if !present {
            return Err(GpuError::Kernel(
                "libnvrtc not found (put its folder on LD_LIBRARY_PATH)".into(),
            ));
        }
        guarded("compiling the gather kernel", || {
            let ptx = cudarc::nvrtc::compile_ptx(KERNEL)
                .map_err(|e| GpuError::Kernel(format!("nvrtc: {e}")))?;
            let ctx = dev.context().clone();
            let module = ctx
                .load_module(ptx)
                .map_err(|e| GpuError::Kernel(format!("loading the module: {e}")))?;
            let func = module
                .load_function("kvtier_copy_pieces")
                .map_err(|e| GpuError::Kernel(format!("loading the function: {e}")))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| GpuError::driver("creating a stream", e))?;
            Ok(PageCopier { dev, func, stream })
        })
    }

    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// Copies `piece_bytes` from each `srcs[i]` to `dsts[i]` in one launch and waits for it.
    /// Addresses must be 16-byte aligned and `piece_bytes` a multiple of 16.
    ///
    /// # Safety
    /// Every range `srcs[i]..+piece_bytes` and `dsts[i]..+piece_bytes` lies in live device
    /// memory; destination ranges do not overlap each other or any source, and nothing else
    /// touches them during the call.
    pub unsafe fn copy(
        &self,
        srcs: &[u64],
        dsts: &[u64],
        piece_bytes: usize,
    ) -> Result<(), GpuError> {
        if srcs.len() != dsts.len() {
            return Err(GpuError::Config(format!(
                "{} sources but {} destinations",
                srcs.len(),
                dsts.len()
            )));
        }
        if !piece_bytes.is_multiple_of(16) || srcs.iter().chain(dsts).any(|a| !a.is_multiple_of(16))
        {
            return Err(GpuError::Config(
                "piece addresses and sizes must be multiples of 16 bytes".into(),
            ));
        }
        if srcs.is_empty() || piece_bytes == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let src_d = s
            .clone_htod(srcs)
            .map_err(|e| GpuError::driver("uploading source addresses", e))?;
        let dst_d = s
            .clone_htod(dsts)
            .map_err(|e| GpuError::driver("uploading destination addresses", e))?;
        let pieces = srcs.len() as u64;
        let words = (piece_bytes / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (srcs.len().min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&self.func);
        launch.arg(&src_d).arg(&dst_d).arg(&pieces).arg(&words);
        // SAFETY: the kernel reads `pieces` addresses from each array (both that long) and
        // copies `words` 16-byte words per piece within the ranges the caller vouches for.
        unsafe { launch.launch(cfg) }.map_err(|e| GpuError::driver("launching the copy", e))?;
        s.synchronize()
            .map_err(|e| GpuError::driver("waiting for the copy", e))
    }

    /// Gathers the pieces of `src` at `offsets` (`piece` bytes each) into `dst` back to back
    /// from `dst_offset`, in one launch.
    pub fn gather(
        &self,
        src: &impl DeviceRegion,
        offsets: &[usize],
        piece: usize,
        dst: &mut impl DeviceRegion,
        dst_offset: usize,
    ) -> Result<(), GpuError> {
        check_pieces("gather", offsets, piece, src.len(), false)?;
        let total = offsets.len() * piece;
        check_pieces("gather", &[dst_offset], total, dst.len(), false)?;
        let srcs: Vec<u64> = offsets.iter().map(|&o| src.addr() + o as u64).collect();
        let dsts: Vec<u64> = (0..offsets.len())
            .map(|i| dst.addr() + (dst_offset + i * piece) as u64)
            .collect();
        // SAFETY: all ranges are in bounds of two live regions, distinct because one is borrowed
        // `&mut` (a `DeviceRegion` owns or exclusively maps its range),
        // destination pieces are consecutive and so disjoint.
        unsafe { self.copy(&srcs, &dsts, piece) }
    }

    /// Scatters `offsets.len()` pieces of `src`, back to back from `src_offset`, to the
    /// (disjoint) pieces of `dst` at `offsets`, in one launch.
    pub fn scatter(
        &self,
        src: &impl DeviceRegion,
        src_offset: usize,
        dst: &mut impl DeviceRegion,
        offsets: &[usize],
        piece: usize,
    ) -> Result<(), GpuError> {
        check_pieces("scatter", offsets, piece, dst.len(), true)?;
        let total = offsets.len() * piece;
        check_pieces("scatter", &[src_offset], total, src.len(), false)?;
        let srcs: Vec<u64> = (0..offsets.len())
            .map(|i| src.addr() + (src_offset + i * piece) as u64)
            .collect();
        let dsts: Vec<u64> = offsets.iter().map(|&o| dst.addr() + o as u64).collect();
        // SAFETY: as in `gather`; destination pieces were checked disjoint.
        unsafe { self.copy(&srcs, &dsts, piece) }
    }
}
