//! The receiving side's segment allocator: contiguous space for a whole transfer, reserved up
//! front.
//!
//! A prefill→decode transfer declares its total size before the first byte moves; the receiver
//! reserves one contiguous extent for it so the incoming KV lands in one region instead of being
//! allocated chunk by chunk. The allocator manages offsets only (the memory itself belongs to
//! whoever owns the region), which keeps it pure and testable:
//!
//! - **best fit** over the free list: the smallest free extent that holds the request, lowest
//!   offset among equals, so large extents stay whole for large transfers;
//! - **coalescing on free**: a freed extent merges with free neighbours on both sides, so a
//!   region whose reservations are all freed is one extent again;
//! - **bounded reservation time**: every reservation carries a deadline; one not committed by
//!   then is reclaimed by [`SegmentAllocator::expire`], so a sender that dies mid-transfer cannot
//!   hold the receiver's memory. A committed reservation (its transfer completed) has no deadline.
//!
//! Time is passed in by the caller (`Instant`), never read here, so tests control it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error(
        "reservation of {requested} bytes exceeds the largest free extent ({largest} of {free} bytes free)"
    )]
    NoSpace {
        requested: u64,
        largest: u64,
        free: u64,
    },
    #[error("reservation of zero bytes")]
    Empty,
    #[error("reservation {0} not found (freed or expired)")]
    NotFound(u64),
}

/// One reserved extent of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Names the reservation for `commit`/`free`.
    pub id: u64,
    /// Offset of the first byte in the region.
    pub offset: u64,
    /// Reserved bytes (the request rounded up to the allocator's alignment).
    pub len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Reserved {
    offset: u64,
    len: u64,
    /// `None` once committed.
    deadline: Option<Instant>,
}

/// Offsets of one region, handed out as contiguous segments.
#[derive(Debug)]
pub struct SegmentAllocator {
    capacity: u64,
    align: u64,
    /// Free extents by offset → length (for coalescing).
    by_offset: BTreeMap<u64, u64>,
    /// The same extents ordered by (length, offset) (for best fit).
    by_size: BTreeSet<(u64, u64)>,
    reserved: HashMap<u64, Reserved>,
    next_id: u64,
    free_bytes: u64,
}

/// A snapshot of the allocator's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentStats {
    pub capacity: u64,
    pub free_bytes: u64,
    pub largest_free: u64,
    pub free_extents: usize,
    pub reservations: usize,
}

impl SegmentAllocator {
    /// An allocator over `capacity` bytes whose segments start and end on multiples of `align`
    /// (a power of two; 4096 keeps segments page-aligned). Capacity is rounded down to `align`.
    pub fn new(capacity: u64, align: u64) -> Self {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let capacity = capacity & !(align - 1);
        let mut a = SegmentAllocator {
            capacity,
            align,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
            reserved: HashMap::new(),
            next_id: 1,
            free_bytes: 0,
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    /// Reserves `len` bytes (rounded up to the alignment) until `deadline`, or refuses with the
    /// largest extent that is free. Call [`expire`](Self::expire) first when reservations may be
    /// overdue, so their space counts as free.
    pub fn reserve(&mut self, len: u64, deadline: Instant) -> Result<Segment, SegmentError> {
        if len == 0 {
            return Err(SegmentError::Empty);
        }
        let len = len
            .checked_add(self.align - 1)
            .map(|l| l & !(self.align - 1))
            .ok_or(SegmentError::NoSpace {
                requested: len,
                largest: self.largest_free(),
                free: self.free_bytes,
            })?;
        let Some(&(ext_len, offset)) = self.by_size.range((len, 0)..).next() else {
            return Err(SegmentError::NoSpace {
                requested: len,
                largest: self.largest_free(),
                free: self.free_bytes,
            });
        };
        self.remove_free(offset, ext_len);
        if ext_len > len {
            self.insert_free(offset + len, ext_len - len);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.reserved.insert(
            id,
            Reserved {
                offset,
                len,
                deadline: Some(deadline),
            },
        );
        Ok(Segment { id, offset, len })
    }

    /// Marks a reservation complete: it no longer expires and is freed only by `free`.
    pub fn commit(&mut self, id: u64) -> Result<(), SegmentError> {
        let r = self
            .reserved
            .get_mut(&id)
            .ok_or(SegmentError::NotFound(id))?;
        r.deadline = None;
        Ok(())
    }

    /// Returns a reservation's extent to the free list, merged with free neighbours.
    pub fn free(&mut self, id: u64) -> Result<Segment, SegmentError> {
        let r = self
            .reserved
            .remove(&id)
            .ok_or(SegmentError::NotFound(id))?;
        self.release(r.offset, r.len);
        Ok(Segment {
            id,
            offset: r.offset,
            len: r.len,
        })
    }

    /// Frees every uncommitted reservation whose deadline is at or before `now`, returning them.
    pub fn expire(&mut self, now: Instant) -> Vec<Segment> {
        let overdue: Vec<u64> = self
            .reserved
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        let mut freed: Vec<Segment> = overdue
            .into_iter()
            .filter_map(|id| self.free(id).ok())
            .collect();
        freed.sort_by_key(|s| s.id);
        freed
    }

    /// The earliest deadline among uncommitted reservations (when to call `expire` next).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.reserved.values().filter_map(|r| r.deadline).min()
    }

    /// Time left before reservation `id` expires (`None` if committed or unknown).
    pub fn time_left(&self, id: u64, now: Instant) -> Option<Duration> {
        let d = self.reserved.get(&id)?.deadline?;
        Some(d.saturating_duration_since(now))
    }

    pub fn stats(&self) -> SegmentStats {
        SegmentStats {
            capacity: self.capacity,
            free_bytes: self.free_bytes,
            largest_free: self.largest_free(),
            free_extents: self.by_offset.len(),
            reservations: self.reserved.len(),
        }
    }

    fn largest_free(&self) -> u64 {
        self.by_size.last().map_or(0, |&(len, _)| len)
    }

    fn release(&mut self, mut offset: u64, mut len: u64) {
        // Merge with the free extent that ends where this one starts…
        if let Some((&prev_off, &prev_len)) = self.by_offset.range(..offset).next_back()
            && prev_off + prev_len == offset
        {
            self.remove_free(prev_off, prev_len);
            offset = prev_off;
            len += prev_len;
        }
        // …and with the one that starts where this one ends.
        if let Some(&next_len) = self.by_offset.get(&(offset + len)) {
            self.remove_free(offset + len, next_len);
            len += next_len;
        }
        self.insert_free(offset, len);
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_size.insert((len, offset));
        self.free_bytes += len;
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_size.remove(&(len, offset));
        self.free_bytes -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALIGN: u64 = 4096;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn best_fit_takes_the_smallest_extent_that_holds_the_request() {
        let mut a = SegmentAllocator::new(100 * ALIGN, ALIGN);
        let s1 = a.reserve(10 * ALIGN, far()).unwrap();
        let s2 = a.reserve(5 * ALIGN, far()).unwrap();
        let s3 = a.reserve(20 * ALIGN, far()).unwrap();
        let _s4 = a.reserve(ALIGN, far()).unwrap();
        // Free extents now: [0,10) and [15,35) plus the tail [36,100).
        a.free(s1.id).unwrap();
        a.free(s3.id).unwrap();
        assert_eq!(a.stats().free_extents, 3);
        // 8 pages fit in [0,10) (smallest that holds it), not in the 20-page hole or the tail.
        let s = a.reserve(8 * ALIGN, far()).unwrap();
        assert_eq!(s.offset, 0);
        // 15 pages skip the 2-page remainder and take the 20-page hole.
        let s = a.reserve(15 * ALIGN, far()).unwrap();
        assert_eq!(s.offset, s2.offset + s2.len);
    }

    #[test]
    fn requests_round_up_to_alignment_and_capacity_rounds_down() {
        let mut a = SegmentAllocator::new(10 * ALIGN + 17, ALIGN);
        assert_eq!(a.stats().capacity, 10 * ALIGN);
        let s = a.reserve(1, far()).unwrap();
        assert_eq!(s.len, ALIGN);
        assert_eq!(a.reserve(0, far()), Err(SegmentError::Empty));
        assert!(matches!(
            a.reserve(u64::MAX, far()),
            Err(SegmentError::NoSpace { .. })
        ));
    }

    #[test]
    fn refusal_names_the_largest_free_extent() {
        let mut a = SegmentAllocator::new(10 * ALIGN, ALIGN);
        let s = a.reserve(4 * ALIGN, far()).unwrap();
        a.reserve(2 * ALIGN, far()).unwrap();
        a.free(s.id).unwrap();
        // 8 pages free in two extents of 4: a 5-page request fails although 8 are free.
        assert_eq!(
            a.reserve(5 * ALIGN, far()),
            Err(SegmentError::NoSpace {
                requested: 5 * ALIGN,
                largest: 4 * ALIGN,
                free: 8 * ALIGN
            })
        );
    }

    #[test]
    fn overdue_reservations_expire_and_committed_ones_do_not() {
        let t0 = Instant::now();
        let mut a = SegmentAllocator::new(10 * ALIGN, ALIGN);
        let early = a.reserve(ALIGN, t0 + Duration::from_secs(1)).unwrap();
        let late = a.reserve(ALIGN, t0 + Duration::from_secs(5)).unwrap();
        let done = a.reserve(ALIGN, t0 + Duration::from_secs(1)).unwrap();
        a.commit(done.id).unwrap();
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(a.expire(t0), vec![]);
        assert_eq!(a.expire(t0 + Duration::from_secs(2)), vec![early]);
        assert_eq!(
            a.time_left(late.id, t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(a.time_left(done.id, t0), None);
        assert_eq!(a.expire(t0 + Duration::from_secs(60)), vec![late]);
        assert_eq!(a.stats().reservations, 1);
        assert_eq!(a.free(early.id), Err(SegmentError::NotFound(early.id)));
        assert_eq!(a.commit(late.id), Err(SegmentError::NotFound(late.id)));
        a.free(done.id).unwrap();
        assert_eq!(a.stats().free_extents, 1);
        assert_eq!(a.stats().free_bytes, 10 * ALIGN);
    }

    proptest! {
        /// Random reserve/free sequences: segments never overlap, free + reserved bytes equal the
        /// capacity, no two free extents touch (coalescing is complete), and freeing everything
        /// leaves one extent covering the region.
        #[test]
        fn segments_never_overlap_and_free_space_coalesces(
            ops in proptest::collection::vec((any::<bool>(), 1u64..40, any::<prop::sample::Index>()), 1..200)
        ) {
            let cap = 256 * ALIGN;
            let mut a = SegmentAllocator::new(cap, ALIGN);
            let mut live: Vec<Segment> = Vec::new();
            for (reserve, pages, pick) in ops {
                if reserve || live.is_empty() {
                    if let Ok(s) = a.reserve(pages * ALIGN - 7, far()) {
                        prop_assert_eq!(s.offset % ALIGN, 0);
                        prop_assert_eq!(s.len, pages * ALIGN);
                        live.push(s);
                    }
                } else {
                    let s = live.swap_remove(pick.index(live.len()));
                    prop_assert_eq!(a.free(s.id), Ok(s));
                }
                let mut sorted = live.clone();
                sorted.sort_by_key(|s| s.offset);
                for w in sorted.windows(2) {
                    prop_assert!(w[0].offset + w[0].len <= w[1].offset);
                }
                let reserved: u64 = live.iter().map(|s| s.len).sum();
                prop_assert_eq!(a.stats().free_bytes + reserved, cap);
                let extents: Vec<(u64, u64)> = a.by_offset.iter().map(|(&o, &l)| (o, l)).collect();
                for w in extents.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0, "free extents {:?} touch", w);
                }
            }
            for s in live.drain(..) {
                a.free(s.id).unwrap();
            }
            prop_assert_eq!(a.stats().free_extents, 1);
            prop_assert_eq!(a.stats().largest_free, cap);
        }
    }
}
