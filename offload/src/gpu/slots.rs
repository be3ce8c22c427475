//! Slot bookkeeping of the GPU tier's device arenas, with no CUDA in it.
//!
//! Device memory is obtained in arenas (one `cuMemAlloc` each) and each arena is carved into
//! slots of one size class, the host tier's classes (`2^k` and `1.5·2^k`, at least 4 KiB, at
//! most 1 GiB, see [`kvtier_cache::host::slot_size_for`]). The budget charges whole slots, and
//! arenas are carved only while the carved total stays within the budget, so the device memory
//! the tier ties up never exceeds it. As in the host tier, slots of one class are not re-carved
//! for another class. The allocator is passed in as a closure, so this module is tested here
//! without a device.

use std::collections::HashMap;

use kvtier_cache::host::{MAX_SLOT_BYTES, slot_size_for};

/// Smallest arena: also the smallest slot class.
const MIN_ARENA_BYTES: u64 = 4096;

/// One slot: `size` bytes at device address `addr` (`arena`'s base + `offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub arena: u32,
    pub offset: u64,
    pub addr: u64,
    pub size: u64,
}

/// Why a reservation failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ReserveError<E> {
    /// The payload is larger than the largest slot.
    TooLarge { len: u64, max: u64 },
    /// No room within the budget for a slot of `needed` bytes.
    Full { needed: u64 },
    /// The device allocator failed.
    Alloc(E),
}

/// Arena record: base address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaSpan {
    pub base: u64,
    pub len: u64,
}

/// Free lists per class, budget and carving of the device arenas.
#[derive(Debug)]
pub struct SlotBook {
    budget: u64,
    arena_bytes: u64,
    used: u64,
    carved: u64,
    free: HashMap<u64, Vec<Slot>>,
    arenas: Vec<ArenaSpan>,
}

impl SlotBook {
    /// A book for `budget` bytes in arenas of about `arena_bytes`. Arenas are at most a quarter
    /// of the budget, so that a small budget still holds several size classes.
    pub fn new(budget: u64, arena_bytes: u64) -> Self {
        let arena_bytes = arena_bytes.min(budget / 4).max(MIN_ARENA_BYTES);
        SlotBook {
            budget,
            arena_bytes,
            used: 0,
            carved: 0,
            free: HashMap::new(),
            arenas: Vec::new(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of slots handed out.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes of device memory allocated as arenas.
    pub fn carved(&self) -> u64 {
        self.carved
    }

    pub fn arena_bytes(&self) -> u64 {
        self.arena_bytes
    }

    /// Every arena allocated so far (to free them when the tier drops).
    pub fn arenas(&self) -> &[ArenaSpan] {
        &self.arenas
    }

    /// A slot for `len` bytes, carving a new arena with `alloc(bytes) -> base` when the class
    /// has no free slot and the budget allows.
    pub fn reserve<E>(
        &mut self,
        len: usize,
        alloc: &mut dyn FnMut(u64) -> Result<u64, E>,
    ) -> Result<Slot, ReserveError<E>> {
        if len > MAX_SLOT_BYTES {
            return Err(ReserveError::TooLarge {
                len: len as u64,
                max: MAX_SLOT_BYTES as u64,
            });
        }
        let size = slot_size_for(len) as u64;
        if self.used + size > self.budget {
            return Err(ReserveError::Full { needed: size });
        }
        let slot = match self.free.get_mut(&size).and_then(Vec::pop) {
            Some(s) => s,
            None => self.grow(size, alloc)?,
        };
        self.used += size;
        Ok(slot)
    }

    /// Returns a slot to its class.
    pub fn release(&mut self, slot: Slot) {
        debug_assert!(self.used >= slot.size);
        self.used = self.used.saturating_sub(slot.size);
        self.free.entry(slot.size).or_default().push(slot);
    }

    fn grow<E>(
        &mut self,
        size: u64,
        alloc: &mut dyn FnMut(u64) -> Result<u64, E>,
    ) -> Result<Slot, ReserveError<E>> {
        let room = self.budget.saturating_sub(self.carved);
        let want = (self.arena_bytes / size).max(1) * size;
        let len = want.min(room / size * size);
        if len < size {
            return Err(ReserveError::Full { needed: size });
        }
        let base = alloc(len).map_err(ReserveError::Alloc)?;
        let arena = self.arenas.len() as u32;
        self.arenas.push(ArenaSpan { base, len });
        self.carved += len;
        let mut slots: Vec<Slot> = (0..len / size)
            .rev()
            .map(|i| Slot {
                arena,
                offset: i * size,
                addr: base + i * size,
                size,
            })
            .collect();
        let first = slots.pop().expect("len >= size, so at least one slot");
        self.free.entry(size).or_default().extend(slots);
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake device: hands out disjoint address ranges and records them.
    fn fake() -> (
        impl FnMut(u64) -> Result<u64, String>,
        std::rc::Rc<std::cell::Cell<u64>>,
    ) {
        let next = std::rc::Rc::new(std::cell::Cell::new(1u64 << 40));
        let n = next.clone();
        let f = move |len: u64| {
            let base = n.get();
            n.set(base + len + 4096);
            Ok(base)
        };
        (f, next)
    }

    #[test]
    fn slots_are_disjoint_and_within_their_arena() {
        let mut book = SlotBook::new(64 << 20, 8 << 20);
        let (mut alloc, _) = fake();
        let mut got = Vec::new();
        for len in [1usize, 4096, 5000, 70_000, 1 << 20, 3 << 19] {
            for _ in 0..5 {
                got.push(book.reserve(len, &mut alloc).unwrap());
            }
        }
        got.sort_by_key(|s| s.addr);
        for w in got.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "overlap {w:?}");
        }
        for s in &got {
            let a = book.arenas()[s.arena as usize];
            assert_eq!(s.addr, a.base + s.offset);
            assert!(s.offset + s.size <= a.len);
        }
        assert_eq!(book.used(), got.iter().map(|s| s.size).sum::<u64>());
        assert!(book.carved() <= book.budget());
    }

    #[test]
    fn budget_bounds_used_and_carved() {
        let budget = 8u64 << 20;
        let mut book = SlotBook::new(budget, 256 << 20);
        assert_eq!(book.arena_bytes(), 2 << 20, "a quarter of the budget");
        let (mut alloc, _) = fake();
        let mut n = 0;
        loop {
            match book.reserve(1 << 20, &mut alloc) {
                Ok(_) => n += 1,
                Err(ReserveError::Full { needed }) => {
                    assert_eq!(needed, 1 << 20);
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
            assert!(book.used() <= budget && book.carved() <= budget);
        }
        assert_eq!(n, 8);
        // Another class cannot carve: all device memory of the budget is in the 1 MiB class.
        assert!(matches!(
            book.reserve(10, &mut alloc),
            Err(ReserveError::Full { .. })
        ));
    }

    #[test]
    fn released_slots_are_reused_without_allocating() {
        let mut book = SlotBook::new(16 << 20, 4 << 20);
        let mut allocs = 0;
        let mut alloc = |_len: u64| -> Result<u64, String> {
            allocs += 1;
            Ok(1 << 30)
        };
        let a = book.reserve(100_000, &mut alloc).unwrap();
        book.release(a);
        assert_eq!(book.used(), 0);
        let b = book.reserve(100_000, &mut alloc).unwrap();
        assert_eq!(a, b);
        assert_eq!(allocs, 1);
    }

    #[test]
    fn too_large_and_allocator_failure_are_reported() {
        let mut book = SlotBook::new(u64::MAX / 2, 256 << 20);
        let mut fail = |_len: u64| -> Result<u64, String> { Err("out of memory".into()) };
        assert!(matches!(
            book.reserve(MAX_SLOT_BYTES + 1, &mut fail),
            Err(ReserveError::TooLarge { .. })
        ));
        assert_eq!(
            book.reserve(10, &mut fail),
            Err(ReserveError::Alloc("out of memory".to_string()))
        );
        assert_eq!(book.used(), 0, "a failed reservation charges nothing");
        assert_eq!(book.carved(), 0);
    }

    #[test]
    fn a_slot_larger_than_the_arena_gets_an_arena_of_its_own() {
        let mut book = SlotBook::new(1 << 30, 4 << 20);
        let (mut alloc, _) = fake();
        let s = book.reserve(100 << 20, &mut alloc).unwrap();
        assert_eq!(s.size, 128 << 20);
        assert_eq!(book.arenas()[0].len, 128 << 20);
    }
}
