//! Eviction order and admission: the two policies the tiered store consults.
//!
//! - [`EvictionOrder`]: a lazily-updated LRU per tier. Readers only bump an atomic access tick in
//!   the index (no lock on the read path); the ordered set is touched on insert and when an
//!   evictor pops a stale candidate, which it re-files under its newer tick. Among chunks of
//!   equal recency, deeper chunks of a prompt go first, so a prefix loses its tail before its
//!   head (a head without its tail is still a useful hit; a tail without its head never is).
//! - [`FrequencySketch`]: a count-min sketch of recent accesses (TinyLFU-style, with periodic
//!   halving) that decides whether a chunk has been seen often enough to be worth writing to
//!   disk, so one-off prompts do not churn the SSD.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::key::ChunkKey;

/// One candidate in eviction order: (access tick, deeper first, key).
pub(crate) type Candidate = (u64, Reverse<u32>, ChunkKey);

/// Lazily-maintained LRU order of one tier.
#[derive(Default)]
pub(crate) struct EvictionOrder {
    set: Mutex<BTreeSet<Candidate>>,
}

impl EvictionOrder {
    pub(crate) fn insert(&self, tick: u64, depth: u32, key: ChunkKey) {
        self.set.lock().insert((tick, Reverse(depth), key));
    }

    /// The least recently used candidate, removed from the order.
    pub(crate) fn pop(&self) -> Option<Candidate> {
        self.set.lock().pop_first()
    }

    pub(crate) fn len(&self) -> usize {
        self.set.lock().len()
    }
}

const SKETCH_ROWS: usize = 4;

/// Count-min sketch with 4-bit-ish saturating counters (u8, capped at 15) and aging.
pub(crate) struct FrequencySketch {
    counters: Vec<AtomicU8>,
    width: usize,
    additions: AtomicU64,
    reset_after: u64,
}

impl FrequencySketch {
    /// A sketch sized for about `capacity` distinct hot keys.
    pub(crate) fn new(capacity: usize) -> Self {
        let width = capacity.max(64).next_power_of_two();
        FrequencySketch {
            counters: (0..width * SKETCH_ROWS).map(|_| AtomicU8::new(0)).collect(),
            width,
            additions: AtomicU64::new(0),
            reset_after: 10 * width as u64,
        }
    }

    fn slots(&self, key: ChunkKey) -> [usize; SKETCH_ROWS] {
        // The key is already a uniform 128-bit hash: slice it instead of hashing again.
        let h = key.0;
        std::array::from_fn(|row| {
            let part = (h >> (row * 32)) as u32 as usize;
            row * self.width + (part & (self.width - 1))
        })
    }

    /// Records one access.
    pub(crate) fn increment(&self, key: ChunkKey) {
        for s in self.slots(key) {
            let c = &self.counters[s];
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v < 15).then_some(v + 1)
            });
        }
        if self.additions.fetch_add(1, Ordering::Relaxed) + 1 >= self.reset_after {
            self.age();
        }
    }

    /// Estimated recent accesses of `key`.
    pub(crate) fn estimate(&self, key: ChunkKey) -> u8 {
        self.slots(key)
            .iter()
            .map(|s| self.counters[*s].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Halves every counter so the sketch follows the recent workload.
    fn age(&self) {
        self.additions.store(0, Ordering::Relaxed);
        for c in &self.counters {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v / 2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_order_is_oldest_then_deepest() {
        let o = EvictionOrder::default();
        o.insert(5, 0, ChunkKey(1));
        o.insert(5, 3, ChunkKey(2));
        o.insert(4, 0, ChunkKey(3));
        assert_eq!(o.pop().unwrap().2, ChunkKey(3));
        assert_eq!(
            o.pop().unwrap().2,
            ChunkKey(2),
            "deeper chunk of equal recency goes first"
        );
        assert_eq!(o.pop().unwrap().2, ChunkKey(1));
        assert!(o.pop().is_none());
    }

    #[test]
    fn sketch_counts_and_ages() {
        let s = FrequencySketch::new(64);
        let k = ChunkKey(0xdead_beef_1234_5678_9abc_def0_1111_2222);
        assert_eq!(s.estimate(k), 0);
        s.increment(k);
        s.increment(k);
        assert!(s.estimate(k) >= 2);
        for i in 0..20u32 {
            s.increment(k);
            assert!(s.estimate(k) <= 15, "saturates at 15 after {i}");
        }
        // Aging halves: flood with other keys until a reset happens.
        for i in 0..(10 * 64 + 1) as u128 {
            s.increment(ChunkKey(
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
            ));
        }
        assert!(s.estimate(k) < 15);
    }
}
