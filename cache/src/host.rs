//! The host-memory tier: large arenas carved into fixed-size slots.
//!
//! A put reserves a slot (no allocation once the arenas exist), the payload is written into it,
//! and the slot is frozen into a reference-counted [`Bytes`] view. A get hands out a clone of that
//! view: no copy. When the last view of a removed chunk drops, its slot returns to the free list
//! of its size class, so a reader that still holds bytes can never see them reused.
//!
//! Slot sizes come in classes `2^k` and `1.5 * 2^k` (at most a third wasted). The budget charges
//! whole slots, so `usage().bytes` is the memory actually tied up. Arenas are obtained from an
//! [`ArenaAllocator`]; the default one uses the heap, and `kvtier-offload` provides one backed by
//! memfd so that same-host clients can map the arenas read-only. Arenas live for the rest of the
//! process: carving a `'static` region into disjoint `&mut` slots is what lets this module stay
//! free of `unsafe`. The total carved is capped at the budget plus two arenas.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::error::{CacheError, Result};
use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, Tier, TierKind, TierUsage};

/// Largest single payload the host tier accepts (1 GiB).
pub const MAX_SLOT_BYTES: usize = 1 << 30;
const MIN_SLOT_BYTES: usize = 4096;
/// Default arena size: large enough that a handful of arenas cover gigabytes.
pub const DEFAULT_ARENA_BYTES: usize = 256 << 20;

/// A region of memory that lives for the rest of the process.
pub struct Arena {
    pub mem: &'static mut [u8],
    /// The file descriptor behind the memory when it is shareable with other processes.
    pub shared_fd: Option<std::os::fd::OwnedFd>,
}

/// Where host arenas come from.
pub trait ArenaAllocator: Send + Sync {
    /// Zeroed memory of exactly `len` bytes.
    fn allocate(&self, len: usize) -> Result<Arena>;
}

/// Arenas from the process heap (zeroed pages are mapped lazily by the allocator).
pub struct HeapArenas;

impl ArenaAllocator for HeapArenas {
    fn allocate(&self, len: usize) -> Result<Arena> {
        let mem: &'static mut [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
        Ok(Arena {
            mem,
            shared_fd: None,
        })
    }
}

/// Position of a slot inside the arenas; meaningful to a client that mapped the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLocation {
    pub arena: u32,
    pub offset: u64,
    pub len: u64,
}

/// Description of one arena, for sharing with same-host clients.
#[derive(Debug)]
pub struct ArenaInfo {
    pub id: u32,
    pub len: u64,
    /// A duplicate of the arena's descriptor (the caller owns and closes it), when shareable.
    pub shared_fd: Option<std::os::fd::OwnedFd>,
}

struct Slot {
    mem: &'static mut [u8],
    arena: u32,
    offset: u64,
}

struct ClassPool {
    slot_size: usize,
    free: Mutex<Vec<Slot>>,
}

struct ArenaRecord {
    len: u64,
    fd: Option<std::os::fd::OwnedFd>,
}

struct Shared {
    budget: u64,
    used: AtomicU64,
    carved: AtomicU64,
    carve_cap: u64,
    arena_bytes: usize,
    allocator: Box<dyn ArenaAllocator>,
    classes: DashMap<usize, Arc<ClassPool>>,
    arenas: Mutex<Vec<ArenaRecord>>,
}

/// A reserved, writable slot. Dropping it unwritten returns it; [`SlotMut::freeze`] turns it into
/// a shared read-only view.
pub struct SlotMut {
    slot: Option<Slot>,
    len: usize,
    pool: Arc<ClassPool>,
    shared: Arc<Shared>,
}

impl SlotMut {
    /// Where the slot sits in the arenas.
    pub fn location(&self) -> SlotLocation {
        let s = self.slot.as_ref().expect("slot present until drop");
        SlotLocation {
            arena: s.arena,
            offset: s.offset,
            len: self.len as u64,
        }
    }

    /// Freezes the slot into a reference-counted view; the slot is freed when the last clone drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl std::ops::Deref for SlotMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.slot.as_ref().expect("slot present until drop").mem[..self.len]
    }
}

impl std::ops::DerefMut for SlotMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.slot.as_mut().expect("slot present until drop").mem[..self.len]
    }
}

impl AsRef<[u8]> for SlotMut {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for SlotMut {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.free.lock().push(slot);
            self.shared
                .used
                .fetch_sub(self.pool.slot_size as u64, Ordering::AcqRel);
        }
    }
}

/// The slot size that holds `len` bytes.
pub fn slot_size_for(len: usize) -> usize {
    if len <= MIN_SLOT_BYTES {
        return MIN_SLOT_BYTES;
    }
    let p = len.next_power_of_two();
    let three_quarters = p / 4 * 3;
    if len <= three_quarters {
        three_quarters
    } else {
        p
    }
}

struct HostEntry {
    meta: ChunkMeta,
    bytes: Bytes,
    /// `None` for adopted views (their memory is not in an arena).
    loc: Option<SlotLocation>,
}

/// An adopted view with its budget charge, released when the last clone of the view drops.
struct Charged {
    bytes: Bytes,
    charge: u64,
    shared: Arc<Shared>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.shared.used.fetch_sub(self.charge, Ordering::AcqRel);
    }
}

/// Configuration of the host tier.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub budget_bytes: u64,
    pub arena_bytes: usize,
}

impl HostConfig {
    pub fn with_budget(budget_bytes: u64) -> Self {
        HostConfig {
            budget_bytes,
            arena_bytes: DEFAULT_ARENA_BYTES,
        }
    }
}

/// The host-memory tier.
pub struct HostTier {
    shared: Arc<Shared>,
    map: DashMap<ChunkKey, HostEntry>,
}

impl HostTier {
    /// A host tier with heap arenas.
    pub fn new(config: HostConfig) -> Self {
        Self::with_allocator(config, Box::new(HeapArenas))
    }

    /// A host tier whose arenas come from `allocator`.
    pub fn with_allocator(config: HostConfig, allocator: Box<dyn ArenaAllocator>) -> Self {
        // Arenas no larger than the budget (rounded to a page) keep small test budgets honest.
        let arena_bytes = config.arena_bytes.clamp(
            MIN_SLOT_BYTES,
            (config.budget_bytes as usize).max(MIN_SLOT_BYTES),
        );
        HostTier {
            shared: Arc::new(Shared {
                budget: config.budget_bytes,
                used: AtomicU64::new(0),
                carved: AtomicU64::new(0),
                carve_cap: config.budget_bytes + 2 * arena_bytes as u64,
                arena_bytes,
                allocator,
                classes: DashMap::new(),
                arenas: Mutex::new(Vec::new()),
            }),
            map: DashMap::new(),
        }
    }

    /// Reserves a slot for a payload of `len` bytes, charged against the budget.
    pub fn reserve(&self, len: usize) -> Result<SlotMut> {
        if len > MAX_SLOT_BYTES {
            return Err(CacheError::PayloadTooLarge {
                len: len as u64,
                max: MAX_SLOT_BYTES as u64,
            });
        }
        let size = slot_size_for(len);
        let sh = &self.shared;
        let full = || CacheError::TierFull {
            tier: TierKind::Host,
            needed: size as u64,
            budget: sh.budget,
        };
        sh.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + size as u64 <= sh.budget).then_some(u + size as u64)
            })
            .map_err(|_| full())?;
        let pool = sh
            .classes
            .entry(size)
            .or_insert_with(|| {
                Arc::new(ClassPool {
                    slot_size: size,
                    free: Mutex::new(Vec::new()),
                })
            })
            .clone();
        let slot = pool.free.lock().pop();
        let slot = match slot {
            Some(s) => Some(s),
            None => self.grow(&pool),
        };
        match slot {
            Some(slot) => Ok(SlotMut {
                slot: Some(slot),
                len,
                pool,
                shared: sh.clone(),
            }),
            None => {
                sh.used.fetch_sub(size as u64, Ordering::AcqRel);
                Err(full())
            }
        }
    }

    /// Carves a new arena for `pool` and returns one of its slots; `None` when the carve cap is hit.
    fn grow(&self, pool: &Arc<ClassPool>) -> Option<Slot> {
        let sh = &self.shared;
        let size = pool.slot_size;
        let mut arenas = sh.arenas.lock();
        // Another thread may have grown the pool while we waited for the lock.
        if let Some(s) = pool.free.lock().pop() {
            return Some(s);
        }
        let carved = sh.carved.load(Ordering::Acquire);
        let room = sh.carve_cap.saturating_sub(carved) as usize;
        let want = (sh.arena_bytes / size).max(1) * size;
        let len = want.min(room / size * size);
        if len < size {
            return None;
        }
        let arena = sh.allocator.allocate(len).ok()?;
        let id = arenas.len() as u32;
        let fd = arena.shared_fd;
        arenas.push(ArenaRecord {
            len: len as u64,
            fd,
        });
        sh.carved.fetch_add(len as u64, Ordering::AcqRel);
        let mut slots: Vec<Slot> = arena
            .mem
            .chunks_exact_mut(size)
            .enumerate()
            .map(|(i, mem)| Slot {
                mem,
                arena: id,
                offset: (i * size) as u64,
            })
            .collect();
        let first = slots.pop();
        pool.free.lock().extend(slots);
        first
    }

    /// Publishes a written slot under `key` without copying it.
    pub fn insert(&self, key: ChunkKey, meta: ChunkMeta, slot: SlotMut) {
        let loc = slot.location();
        let bytes = slot.freeze();
        self.map.insert(
            key,
            HostEntry {
                meta,
                bytes,
                loc: Some(loc),
            },
        );
    }

    /// Charges `len` bytes against the budget for an externally owned view, or `TierFull`.
    fn charge(&self, len: u64) -> Result<()> {
        let sh = &self.shared;
        sh.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + len <= sh.budget).then_some(u + len)
            })
            .map(|_| ())
            .map_err(|_| CacheError::TierFull {
                tier: TierKind::Host,
                needed: len,
                budget: sh.budget,
            })
    }

    /// Publishes an externally owned view (for example a chunk received into a transfer
    /// segment) under `key` without copying it. Its length is charged against the budget
    /// until the last clone of the view drops; `TierFull` when the budget has no room. Adopted
    /// chunks have no arena location ([`HostTier::locate`] misses them).
    pub fn adopt(&self, key: ChunkKey, meta: ChunkMeta, bytes: Bytes) -> Result<()> {
        if bytes.len() > MAX_SLOT_BYTES {
            return Err(CacheError::PayloadTooLarge {
                len: bytes.len() as u64,
                max: MAX_SLOT_BYTES as u64,
            });
        }
        let charge = bytes.len() as u64;
        self.charge(charge)?;
        let bytes = Bytes::from_owner(Charged {
            bytes,
            charge,
            shared: self.shared.clone(),
        });
        self.map.insert(
            key,
            HostEntry {
                meta,
                bytes,
                loc: None,
            },
        );
        Ok(())
    }

    /// Where `key`'s bytes sit in the arenas, with a view that keeps the slot alive (`None` for
    /// a miss or an adopted view).
    pub fn locate(&self, key: ChunkKey) -> Option<(ChunkMeta, SlotLocation, Bytes)> {
        self.map
            .get(&key)
            .and_then(|e| e.loc.map(|loc| (e.meta, loc, e.bytes.clone())))
    }

    /// The arenas carved so far, with duplicated descriptors where they are shareable.
    pub fn arenas(&self) -> Result<Vec<ArenaInfo>> {
        let arenas = self.shared.arenas.lock();
        let mut out = Vec::with_capacity(arenas.len());
        for (i, a) in arenas.iter().enumerate() {
            let shared_fd = match &a.fd {
                Some(fd) => Some(
                    fd.try_clone()
                        .map_err(|e| CacheError::io("duplicating an arena descriptor", e))?,
                ),
                None => None,
            };
            out.push(ArenaInfo {
                id: i as u32,
                len: a.len,
                shared_fd,
            });
        }
        Ok(out)
    }

    /// Bytes of arena memory carved (the resident upper bound of this tier).
    pub fn carved_bytes(&self) -> u64 {
        self.shared.carved.load(Ordering::Acquire)
    }
}

impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }

    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        let mut slot = self.reserve(payload.len())?;
        slot.copy_from_slice(payload);
        self.insert(key, *meta, slot);
        Ok(())
    }

    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        Ok(self.map.get(&key).map(|e| (e.meta, e.bytes.clone())))
    }

    fn stat(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, u64)>> {
        Ok(self.map.get(&key).map(|e| (e.meta, e.bytes.len() as u64)))
    }

    fn contains(&self, key: ChunkKey) -> bool {
        self.map.contains_key(&key)
    }

    fn remove(&self, key: ChunkKey) -> Result<bool> {
        Ok(self.map.remove(&key).is_some())
    }

    fn usage(&self) -> TierUsage {
        TierUsage {
            chunks: self.map.len() as u64,
            bytes: self.shared.used.load(Ordering::Acquire),
            budget: self.shared.budget,
        }
    }

    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        self.map.iter().map(|e| (*e.key(), e.meta)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        crate::conformance::run_all(&|budget| {
            Box::new(HostTier::new(HostConfig {
                budget_bytes: budget,
                arena_bytes: 4 << 20,
            }))
        });
    }

    #[test]
    fn slot_classes_waste_at_most_a_third() {
        for len in [4097usize, 5_898_240, 32 << 20, (32 << 20) + 1, 1 << 29] {
            let s = slot_size_for(len);
            assert!(
                s >= len && (s as f64) < len as f64 * 1.5 + 1.0,
                "{len} -> {s}"
            );
        }
        assert_eq!(slot_size_for(32 << 20), 32 << 20);
        assert_eq!(slot_size_for(5_898_240), 6 << 20);
    }

    #[test]
    fn views_outlive_removal_and_keep_their_bytes() {
        let host = HostTier::new(HostConfig {
            budget_bytes: 1 << 20,
            arena_bytes: 1 << 20,
        });
        let k = ChunkKey(1);
        host.put(k, &ChunkMeta::raw(0, 0, 1, 0, 5000), &[7u8; 5000])
            .unwrap();
        let (_, view) = host.get(k).unwrap().unwrap();
        host.remove(k).unwrap();
        // The slot is still charged while the view lives, so nobody can overwrite it.
        assert_eq!(host.usage().bytes, slot_size_for(5000) as u64);
        for i in 0..100u128 {
            let _ = host.put(
                ChunkKey(100 + i),
                &ChunkMeta::raw(0, 0, 1, 0, 5000),
                &[9u8; 5000],
            );
        }
        assert!(view.iter().all(|b| *b == 7));
        drop(view);
        for i in 0..100u128 {
            host.remove(ChunkKey(100 + i)).unwrap();
        }
        assert_eq!(host.usage().bytes, 0);
    }

    #[test]
    fn adopted_views_are_charged_until_their_last_clone_drops() {
        let host = HostTier::new(HostConfig::with_budget(10_000));
        let k = ChunkKey(3);
        let view = Bytes::from(vec![5u8; 6000]);
        host.adopt(k, ChunkMeta::raw(0, 0, 1, 0, 6000), view)
            .unwrap();
        assert_eq!(host.usage().bytes, 6000);
        assert!(matches!(
            host.adopt(
                ChunkKey(4),
                ChunkMeta::raw(0, 0, 1, 0, 6000),
                Bytes::from(vec![1u8; 6000])
            ),
            Err(CacheError::TierFull { .. })
        ));
        assert!(
            host.locate(k).is_none(),
            "adopted views have no arena location"
        );
        let (_, got) = host.get(k).unwrap().unwrap();
        assert!(got.iter().all(|b| *b == 5));
        host.remove(k).unwrap();
        assert_eq!(
            host.usage().bytes,
            6000,
            "a reader's clone still holds the charge"
        );
        drop(got);
        assert_eq!(host.usage().bytes, 0);
    }

    #[test]
    fn oversize_payload_is_refused() {
        let host = HostTier::new(HostConfig::with_budget(1 << 20));
        assert!(matches!(
            host.reserve(MAX_SLOT_BYTES + 1),
            Err(CacheError::PayloadTooLarge { .. })
        ));
    }
}
