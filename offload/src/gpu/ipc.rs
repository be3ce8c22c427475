//! Engine buffers mapped by CUDA IPC: an engine exports its paged KV buffer
//! (`cudaIpcGetMemHandle`, or PyTorch's `storage._share_cuda_()`), kvtier maps it in its own
//! process (`cuIpcOpenMemHandle`) and saves or restores pages by page id with one gather or
//! scatter launch plus one host copy, without the bytes passing through the engine process.
//!
//! Layout: the mapped range is `planes` planes (one per layer and K/V; vLLM's per-layer
//! `[2, num_blocks, ...]` tensors stacked, or SGLang's separate K and V buffers) of
//! `pages_per_plane` pages of `page_bytes` each, contiguous. A page id selects that page in
//! every plane; the saved bytes are plane-major (plane 0's pages, then plane 1's, ...).
//! The mapping is bounds-checked against the allocation's real size (`cuMemGetAddressRange`)
//! and closed on drop. Status: built and unit-tested here without a GPU; the device path is
//! exercised by `tests/gpu/ipc_engine.py` on a GPU machine only.

use std::sync::Arc;

use cudarc::driver::sys;

use super::buffer::DeviceRegion;
use super::{DeviceBuffer, GpuDevice, GpuError, PageCopier};

/// A CUDA IPC memory handle (64 opaque bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

impl IpcHandle {
    /// Parses exactly 128 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, GpuError> {
        let s = s.trim();
        if s.len() != 128 || !s.is_ascii() {
            return Err(GpuError::Config(format!(
                "an ipc handle is 128 hex digits, got {} characters",
                s.len()
            )));
        }
        let mut out = [0u8; 64];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| GpuError::Config("an ipc handle is hex digits only".into()))?;
        }
        Ok(IpcHandle(out))
    }
}

/// Where pages sit in an engine's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    pub planes: usize,
    pub pages_per_plane: usize,
    pub page_bytes: usize,
}

impl PagedLayout {
    /// vLLM: per layer a `[2, num_blocks, block_size, kv_heads, head_dim]` tensor, the layers'
    /// tensors stacked (K then V of layer 0, then layer 1, ...).
    pub fn vllm(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> Self {
        PagedLayout {
            planes: layers * 2,
            pages_per_plane: num_blocks,
            page_bytes: block_size * kv_heads * head_dim * dtype_bytes,
        }
    }

    /// Total bytes of the buffer.
    pub fn bytes(&self) -> Option<usize> {
        self.planes
            .checked_mul(self.pages_per_plane)?
            .checked_mul(self.page_bytes)
    }

    /// Byte offsets of `page_ids` in every plane, plane-major; ids out of range are refused.
    pub fn offsets(&self, page_ids: &[usize]) -> Result<Vec<usize>, GpuError> {
        if let Some(&bad) = page_ids.iter().find(|&&p| p >= self.pages_per_plane) {
            return Err(GpuError::Config(format!(
                "page id {bad} out of range (the buffer has {} pages per plane)",
                self.pages_per_plane
            )));
        }
        Ok((0..self.planes)
            .flat_map(|plane| {
                page_ids
                    .iter()
                    .map(move |&p| (plane * self.pages_per_plane + p) * self.page_bytes)
            })
            .collect())
    }
}

/// An engine's buffer mapped into this process.
pub struct EngineRegion {
    dev: Arc<GpuDevice>,
    mapped: u64,
    ptr: u64,
    layout: PagedLayout,
}

impl DeviceRegion for EngineRegion {
    fn addr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.layout.bytes().unwrap_or(0)
    }
}

impl EngineRegion {
    /// Maps the allocation behind `handle`; the buffer starts `offset` bytes into it.
    pub fn open(
        dev: &Arc<GpuDevice>,
        handle: IpcHandle,
        offset: usize,
        layout: PagedLayout,
    ) -> Result<Self, GpuError> {
        let len = layout
            .bytes()
            .ok_or_else(|| GpuError::Config("layout size overflows".into()))?;
        dev.context()
            .bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context", e))?;
        let mut mapped: sys::CUdeviceptr = 0;
        let h = sys::CUipcMemHandle_st {
            reserved: handle.0.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: writes one device pointer into `mapped`; the handle is plain bytes.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut mapped,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
            .result()
        }
        .map_err(|e| GpuError::driver("opening the ipc handle", e))?;
        let region = EngineRegion {
            dev: dev.clone(),
            mapped,
            ptr: mapped + offset as u64,
            layout,
        };
        let (mut base, mut size) = (0, 0usize);
        // SAFETY: queries the allocation containing `mapped`, writing two integers.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, mapped).result() }
            .map_err(|e| GpuError::driver("reading the mapped size", e))?;
        let end = (mapped - base) as usize + offset + len;
        if end > size {
            return Err(GpuError::Config(format!(
                "the layout needs {len} bytes at offset {offset} but the exported allocation has {size}"
            )));
        }
        Ok(region)
    }

    pub fn layout(&self) -> PagedLayout {
        self.layout
    }

    /// Gathers `page_ids` (every plane) through `staging` into `dst` (exactly their bytes).
    pub fn save(
        &self,
        copier: &PageCopier,
        staging: &mut DeviceBuffer,
        page_ids: &[usize],
        dst: &mut [u8],
    ) -> Result<(), GpuError> {
        let offsets = self.layout.offsets(page_ids)?;
        copier.gather(self, &offsets, self.layout.page_bytes, staging, 0)?;
        staging.download(0, dst)
    }

    /// Scatters `src` (bytes from [`EngineRegion::save`]) into `page_ids` through `staging`.
    pub fn restore(
        &mut self,
        copier: &PageCopier,
        staging: &mut DeviceBuffer,
        src: &[u8],
        page_ids: &[usize],
    ) -> Result<(), GpuError> {
        let offsets = self.layout.offsets(page_ids)?;
        if src.len() != offsets.len() * self.layout.page_bytes {
            return Err(GpuError::Config(format!(
                "{} bytes do not fill {} pages of {}",
                src.len(),
                offsets.len(),
                self.layout.page_bytes
            )));
        }
        staging.upload(0, src)?;
        copier.scatter(staging, 0, self, &offsets, self.layout.page_bytes)
    }
}

impl Drop for EngineRegion {
    fn drop(&mut self) {
        if self.dev.context().bind_to_thread().is_ok() {
            // SAFETY: `mapped` came from cuIpcOpenMemHandle and is closed once; no copy is in
            // flight (every copy waits before returning).
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.mapped) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_parse_from_exactly_128_hex_digits() {
        let hex: String = (0..64).map(|i| format!("{:02x}", i * 3 % 256)).collect();
        let h = IpcHandle::from_hex(&hex).unwrap();
        assert_eq!(h.0[1], 3);
        assert!(IpcHandle::from_hex(&hex[..126]).is_err());
        assert!(IpcHandle::from_hex(&format!("{}zz", &hex[..126])).is_err());
        assert!(IpcHandle::from_hex(&"é".repeat(64)).is_err());
    }

    #[test]
    fn offsets_are_plane_major_and_bounded() {
        let l = PagedLayout::vllm(2, 10, 16, 8, 128, 2);
        assert_eq!(l.page_bytes, 32 << 10);
        assert_eq!(l.planes, 4);
        let o = l.offsets(&[3, 7]).unwrap();
        let p = l.page_bytes;
        assert_eq!(
            o,
            vec![3 * p, 7 * p, 13 * p, 17 * p, 23 * p, 27 * p, 33 * p, 37 * p]
        );
        assert!(l.offsets(&[10]).is_err());
        assert_eq!(l.bytes(), Some(40 * p));
        let huge = PagedLayout {
            planes: usize::MAX,
            pages_per_plane: 2,
            page_bytes: 2,
        };
        assert_eq!(huge.bytes(), None);
    }
}
