//! The receiver's transfer region: host memory carved into one contiguous segment per incoming
//! transfer, written piece by piece straight from the socket, then frozen into shared
//! [`Bytes`] views that become ordinary host-tier chunks.
//!
//! The region owns one heap allocation of `capacity` bytes (zeroed pages are mapped lazily by
//! the allocator, so an idle region costs address space only). [`TransferRegion::reserve`]
//! carves a [`SegmentWriter`] with the [`SegmentAllocator`]; the writer hands out
//! [`PieceMut`] windows (`&mut [u8]` over a checked sub-range) so several layer frames of one
//! transfer can be read into their places concurrently. Claims are tracked: two windows never
//! overlap, so no two `&mut` alias. [`SegmentWriter::freeze`] (only with no window open) turns
//! the segment read-only; [`FrozenSegment::view`] gives reference-counted views of its ranges.
//! The segment returns to the allocator when the writer is dropped unfrozen (a failed or
//! expired transfer) or when the last view of a frozen one drops, so memory is never reused
//! under a reader. This is the one place that needs `unsafe` for transfers: carving disjoint
//! mutable windows out of one allocation at run time is what the borrow checker cannot see.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use super::segments::{Segment, SegmentAllocator, SegmentError, SegmentStats};

/// Why a window or view of a segment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("range {start}..{end} is outside the segment of {len} bytes")]
    OutOfRange {
        start: usize,
        end: usize,
        len: usize,
    },
    #[error("range {start}..{end} overlaps a window being written")]
    Overlap { start: usize, end: usize },
    #[error("segment still has {0} windows being written")]
    Busy(usize),
}

/// Segments start on this boundary (a page), so pieces read from sockets are page-aligned.
const ALIGN: u64 = 4096;

struct RegionInner {
    /// Start of the allocation (from `Box::into_raw`), freed in `Drop`.
    base: *mut u8,
    capacity: usize,
    alloc: Mutex<SegmentAllocator>,
}

// SAFETY: the pointer is only dereferenced through `PieceMut` (exclusive, non-overlapping
// windows, enforced by claims) and `View` (after freezing, when no window can exist); the
// allocator is behind a mutex.
unsafe impl Send for RegionInner {}
unsafe impl Sync for RegionInner {}

impl Drop for RegionInner {
    fn drop(&mut self) {
        // SAFETY: `base`/`capacity` came from `Box::<[u8]>::into_raw` in `TransferRegion::new`,
        // and every segment holds an `Arc` of this, so nothing points into it any more.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.base,
                self.capacity,
            )))
        };
    }
}

/// Host memory for incoming transfers. Cheap to clone; clones share the region.
#[derive(Clone)]
pub struct TransferRegion {
    inner: Arc<RegionInner>,
}

impl std::fmt::Debug for TransferRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferRegion")
            .field("stats", &self.stats())
            .finish()
    }
}

impl TransferRegion {
    /// A region of `capacity` bytes (rounded down to a page).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity & !(ALIGN as usize - 1);
        let mem: Box<[u8]> = vec![0u8; capacity].into_boxed_slice();
        let base = Box::into_raw(mem) as *mut u8;
        TransferRegion {
            inner: Arc::new(RegionInner {
                base,
                capacity,
                alloc: Mutex::new(SegmentAllocator::new(capacity as u64, ALIGN)),
            }),
        }
    }

    /// Reserves one contiguous segment of `len` bytes. `deadline` is recorded with the
    /// allocator for reporting; the owner enforces it by dropping the writer (the allocator
    /// never frees a segment a writer still owns).
    pub fn reserve(&self, len: usize, deadline: Instant) -> Result<SegmentWriter, SegmentError> {
        let seg = self.inner.alloc.lock().reserve(len as u64, deadline)?;
        Ok(SegmentWriter {
            shared: Arc::new(SegmentShared {
                region: self.inner.clone(),
                seg,
                len,
                claims: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Occupancy of the region.
    pub fn stats(&self) -> SegmentStats {
        self.inner.alloc.lock().stats()
    }
}

struct SegmentShared {
    region: Arc<RegionInner>,
    seg: Segment,
    /// Usable bytes (the request; `seg.len` is rounded up to the alignment).
    len: usize,
    /// Ranges with a live `PieceMut`.
    claims: Mutex<Vec<Range<usize>>>,
}

impl SegmentShared {
    fn ptr(&self, start: usize) -> *mut u8 {
        // SAFETY (of the arithmetic): the allocator keeps `seg.offset + seg.len <= capacity`
        // and callers check `start <= len <= seg.len`.
        unsafe { self.region.base.add(self.seg.offset as usize + start) }
    }

    fn check(&self, r: &Range<usize>) -> Result<(), RegionError> {
        if r.start > r.end || r.end > self.len {
            return Err(RegionError::OutOfRange {
                start: r.start,
                end: r.end,
                len: self.len,
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for SegmentShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("segment", &self.seg)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for SegmentShared {
    fn drop(&mut self) {
        let _ = self.region.alloc.lock().free(self.seg.id);
    }
}

/// A reserved segment being written. Dropping it frees the segment.
#[derive(Debug)]
pub struct SegmentWriter {
    shared: Arc<SegmentShared>,
}

impl SegmentWriter {
    /// Usable bytes of the segment.
    pub fn len(&self) -> usize {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    /// Where the segment sits in the region.
    pub fn segment(&self) -> Segment {
        self.shared.seg
    }

    /// An exclusive window over `range` of the segment, refused if it overlaps a live one.
    pub fn piece_mut(&self, range: Range<usize>) -> Result<PieceMut, RegionError> {
        self.shared.check(&range)?;
        let mut claims = self.shared.claims.lock();
        if claims
            .iter()
            .any(|c| c.start < range.end && range.start < c.end)
        {
            return Err(RegionError::Overlap {
                start: range.start,
                end: range.end,
            });
        }
        claims.push(range.clone());
        Ok(PieceMut {
            shared: self.shared.clone(),
            range,
        })
    }

    /// Turns the segment read-only. Refused while a window is open.
    pub fn freeze(self) -> Result<FrozenSegment, (SegmentWriter, RegionError)> {
        let open = self.shared.claims.lock().len();
        if open > 0 {
            return Err((self, RegionError::Busy(open)));
        }
        let _ = self.shared.region.alloc.lock().commit(self.shared.seg.id);
        Ok(FrozenSegment {
            shared: self.shared,
        })
    }
}

/// An exclusive, writable window of a segment; its claim ends when it drops.
pub struct PieceMut {
    shared: Arc<SegmentShared>,
    range: Range<usize>,
}

impl std::ops::Deref for PieceMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is inside the segment (checked at creation) and claimed: no other
        // window overlaps it and no view exists before freezing, which needs every claim gone.
        unsafe { std::slice::from_raw_parts(self.shared.ptr(self.range.start), self.range.len()) }
    }
}

impl std::ops::DerefMut for PieceMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `&mut self` makes this the only borrow of the window.
        unsafe {
            std::slice::from_raw_parts_mut(self.shared.ptr(self.range.start), self.range.len())
        }
    }
}

impl Drop for PieceMut {
    fn drop(&mut self) {
        let mut claims = self.shared.claims.lock();
        if let Some(i) = claims.iter().position(|c| *c == self.range) {
            claims.swap_remove(i);
        }
    }
}

/// A completely written, read-only segment.
#[derive(Clone)]
pub struct FrozenSegment {
    shared: Arc<SegmentShared>,
}

impl FrozenSegment {
    /// A reference-counted view of `range`; the segment stays reserved while any view lives.
    pub fn view(&self, range: Range<usize>) -> Result<Bytes, RegionError> {
        self.shared.check(&range)?;
        Ok(Bytes::from_owner(View {
            shared: self.shared.clone(),
            range,
        }))
    }
}

struct View {
    shared: Arc<SegmentShared>,
    range: Range<usize>,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the segment is frozen: no `PieceMut` exists or can be made (the writer was
        // consumed with no claim open), so shared reads cannot race a write.
        unsafe { std::slice::from_raw_parts(self.shared.ptr(self.range.start), self.range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn pieces_are_exclusive_and_views_keep_the_segment() {
        let region = TransferRegion::new(1 << 20);
        let w = region.reserve(10_000, deadline()).unwrap();
        let mut a = w.piece_mut(0..5000).unwrap();
        assert!(matches!(
            w.piece_mut(4999..6000),
            Err(RegionError::Overlap { .. })
        ));
        assert!(matches!(
            w.piece_mut(9000..10_001),
            Err(RegionError::OutOfRange { .. })
        ));
        let mut b = w.piece_mut(5000..10_000).unwrap();
        a.fill(1);
        b.fill(2);
        let w = match w.freeze() {
            Err((w, RegionError::Busy(2))) => w,
            _ => panic!("freeze with open windows must fail"),
        };
        drop((a, b));
        let frozen = w.freeze().unwrap();
        let v = frozen.view(4990..5010).unwrap();
        drop(frozen);
        assert_eq!(&v[..10], &[1u8; 10]);
        assert_eq!(&v[10..], &[2u8; 10]);
        assert_eq!(region.stats().reservations, 1);
        drop(v);
        assert_eq!(region.stats().reservations, 0);
        assert_eq!(region.stats().free_bytes, 1 << 20);
    }

    #[test]
    fn dropped_writer_frees_and_space_is_refused_when_full() {
        let region = TransferRegion::new(64 << 10);
        let w = region.reserve(60 << 10, deadline()).unwrap();
        assert!(matches!(
            region.reserve(8 << 10, deadline()),
            Err(SegmentError::NoSpace { .. })
        ));
        drop(w);
        assert!(region.reserve(64 << 10, deadline()).is_ok());
    }
}
