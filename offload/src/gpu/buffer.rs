//! [`DeviceBuffer`]: an owned device allocation with bounds-checked, safe copies, so that code
//! outside this crate (benchmarks, engines in Rust) never needs `unsafe` to move bytes.

use std::sync::Arc;

use super::{GpuDevice, GpuError};

/// `len` bytes of device memory, freed on drop. Writes take `&mut self`, so no copy can race
/// another write of the same buffer.
pub struct DeviceBuffer {
    dev: Arc<GpuDevice>,
    ptr: u64,
    len: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on {:?})", self.len, self.dev)
    }
}

fn check_range(what: &str, offset: usize, n: usize, len: usize) -> Result<(), GpuError> {
    match offset.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(GpuError::Config(format!(
            "{what}: {n} bytes at offset {offset} exceed the buffer's {len} bytes"
        ))),
    }
}

/// Checks that pieces at `offsets` of `piece` bytes lie within `len` and, when they are to
/// be written, do not overlap.
pub(crate) fn check_pieces(
    what: &str,
    offsets: &[usize],
    piece: usize,
    len: usize,
    disjoint: bool,
) -> Result<(), GpuError> {
    for &o in offsets {
        check_range(what, o, piece, len)?;
    }
    if disjoint {
        let mut sorted = offsets.to_vec();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[1] - w[0] < piece) {
            return Err(GpuError::Config(format!(
                "{what}: destination pieces overlap"
            )));
        }
    }
    Ok(())
}

/// A range of device memory this process may copy into and out of: an owned
/// [`DeviceBuffer`] or an engine's buffer mapped by IPC ([`super::ipc::EngineRegion`]).
/// Implementors guarantee `addr()..addr()+len()` stays mapped while the value lives and that
/// no two values cover the same range.
pub trait DeviceRegion {
    fn addr(&self) -> u64;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DeviceRegion for DeviceBuffer {
    fn addr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl DeviceBuffer {
    /// Allocates `len` bytes (contents undefined until written).
    pub fn new(dev: &Arc<GpuDevice>, len: usize) -> Result<Self, GpuError> {
        let ptr = dev.alloc(len.max(1) as u64)?;
        Ok(DeviceBuffer {
            dev: dev.clone(),
            ptr,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address (for kernels and IPC export).
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// Copies `src` to `offset`.
    pub fn upload(&mut self, offset: usize, src: &[u8]) -> Result<(), GpuError> {
        check_range("upload", offset, src.len(), self.len)?;
        // SAFETY: in bounds of this live allocation, which `&mut self` keeps exclusive.
        unsafe { self.dev.htod(self.ptr + offset as u64, src) }
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    pub fn download(&self, offset: usize, dst: &mut [u8]) -> Result<(), GpuError> {
        check_range("download", offset, dst.len(), self.len)?;
        // SAFETY: in bounds of this live allocation; writers need `&mut self`, so none runs.
        unsafe { self.dev.dtoh(dst, self.ptr + offset as u64) }
    }

    /// Copies the pieces at `offsets` (`piece` bytes each) into `dst` back to back, one copy
    /// per piece (what a paged engine does without a gather kernel).
    pub fn download_pages(
        &self,
        offsets: &[usize],
        piece: usize,
        dst: &mut [u8],
    ) -> Result<(), GpuError> {
        check_pieces("download_pages", offsets, piece, self.len, false)?;
        let srcs: Vec<u64> = offsets.iter().map(|&o| self.ptr + o as u64).collect();
        // SAFETY: every piece is in bounds of this live allocation; no writer runs (`&self`).
        unsafe { self.dev.dtoh_each(dst, &srcs, piece) }
    }

    /// Copies `src`, piece by piece, to the (disjoint) pieces at `offsets`, one copy each.
    pub fn upload_pages(
        &mut self,
        offsets: &[usize],
        piece: usize,
        src: &[u8],
    ) -> Result<(), GpuError> {
        check_pieces("upload_pages", offsets, piece, self.len, true)?;
        let dsts: Vec<u64> = offsets.iter().map(|&o| self.ptr + o as u64).collect();
        // SAFETY: disjoint, in-bounds pieces of this allocation, exclusive through `&mut self`.
        unsafe { self.dev.htod_each(&dsts, src, piece) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once here; every copy on it has been waited for.
        let _ = unsafe { self.dev.free(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_checks_catch_out_of_bounds_and_overlap() {
        assert!(check_pieces("t", &[0, 4096, 8192], 4096, 12288, true).is_ok());
        assert!(check_pieces("t", &[8192, 0], 4096, 12288, true).is_ok());
        assert!(check_pieces("t", &[8193], 4096, 12288, false).is_err());
        assert!(check_pieces("t", &[usize::MAX], 4096, 12288, false).is_err());
        let e = check_pieces("t", &[0, 100], 4096, 12288, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid gpu configuration: t: destination pieces overlap"
        );
        assert!(
            check_pieces("t", &[0, 100], 4096, 12288, false).is_ok(),
            "sources may overlap"
        );
        assert!(check_range("t", 10, 0, 10).is_ok());
        assert!(check_range("t", 11, 0, 10).is_err());
    }
}
