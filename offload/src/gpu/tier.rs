//! [`GpuTier`]: a [`Tier`] in device memory, arenas carved into slots ([`super::slots`]).
//!
//! Metadata, payload length and a CRC32C of each payload stay on the host. A put copies the
//! payload to its slot while the CRC is computed in parallel on the host; a get copies it into
//! a pinned staging buffer in pieces, checking each piece's CRC as soon as it lands, and hands
//! the buffer out as `Bytes` (it returns to the pool when the last view drops). A payload
//! whose CRC does not match is [`CacheError::Corrupt`] and is never returned. Slots are held
//! by reference-counted guards, so a slot being read is not reused by a concurrent put.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use kvtier_cache::{CacheError, ChunkKey, ChunkMeta, Result, Tier, TierKind, TierUsage};
use parking_lot::Mutex;

use super::GpuError;
use super::device::{GpuDevice, PIECE_BYTES, combine, crc_parallel};
use super::slots::{ReserveError, Slot, SlotBook};

/// Default device arena: 256 MiB (at most a quarter of the budget).
pub const DEFAULT_GPU_ARENA_BYTES: u64 = 256 << 20;
/// Largest fraction of free device memory a budget may claim: the engine owns the rest.
pub const MAX_FREE_FRACTION: f64 = 0.95;

/// How much device memory the tier may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuBudget {
    Bytes(u64),
    /// A fraction (0, 0.95] of the device's free memory when the tier is opened.
    FractionOfFree(f64),
}

impl GpuBudget {
    /// The budget in bytes given the device's free memory.
    pub fn resolve(self, free_bytes: u64) -> std::result::Result<u64, GpuError> {
        match self {
            GpuBudget::Bytes(0) => Err(GpuError::Config("gpu budget must be positive".into())),
            GpuBudget::Bytes(n) => Ok(n),
            GpuBudget::FractionOfFree(f) if f > 0.0 && f <= MAX_FREE_FRACTION => {
                Ok((free_bytes as f64 * f) as u64)
            }
            GpuBudget::FractionOfFree(f) => Err(GpuError::Config(format!(
                "gpu budget fraction {f} must be in (0, {MAX_FREE_FRACTION}]"
            ))),
        }
    }
}

/// Configuration of a [`GpuTier`].
#[derive(Debug, Clone)]
pub struct GpuConfig {
    pub ordinal: usize,
    pub budget: GpuBudget,
    pub arena_bytes: u64,
}

impl GpuConfig {
    pub fn with_budget(budget: GpuBudget) -> Self {
        GpuConfig {
            ordinal: 0,
            budget,
            arena_bytes: DEFAULT_GPU_ARENA_BYTES,
        }
    }
}

/// A slot in use; returns to the book when the last holder drops it.
struct SlotGuard {
    slot: Slot,
    book: Arc<Mutex<SlotBook>>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.book.lock().release(self.slot);
    }
}

#[derive(Clone)]
struct GpuEntry {
    meta: ChunkMeta,
    len: usize,
    crc: u32,
    slot: Arc<SlotGuard>,
}

/// The GPU tier.
pub struct GpuTier {
    dev: Arc<GpuDevice>,
    book: Arc<Mutex<SlotBook>>,
    map: DashMap<ChunkKey, GpuEntry>,
}

impl GpuTier {
    /// Opens device `config.ordinal` and a tier on it.
    pub fn open(config: &GpuConfig) -> std::result::Result<Self, GpuError> {
        let dev = GpuDevice::open(config.ordinal)?;
        Self::on_device(dev, config)
    }

    /// A tier on an already opened device.
    pub fn on_device(
        dev: Arc<GpuDevice>,
        config: &GpuConfig,
    ) -> std::result::Result<Self, GpuError> {
        let (free, _) = dev.mem_info()?;
        let budget = config.budget.resolve(free)?;
        Ok(GpuTier {
            dev,
            book: Arc::new(Mutex::new(SlotBook::new(budget, config.arena_bytes))),
            map: DashMap::new(),
        })
    }

    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    fn reserve(&self, len: usize) -> Result<Arc<SlotGuard>> {
        let dev = &self.dev;
        let mut book = self.book.lock();
        let budget = book.budget();
        let slot = book
            .reserve(len, &mut |bytes| dev.alloc(bytes))
            .map_err(|e| match e {
                ReserveError::TooLarge { len, max } => CacheError::PayloadTooLarge { len, max },
                ReserveError::Full { needed } => CacheError::TierFull {
                    tier: TierKind::Gpu,
                    needed,
                    budget,
                },
                ReserveError::Alloc(e) => e.into(),
            })?;
        Ok(Arc::new(SlotGuard {
            slot,
            book: self.book.clone(),
        }))
    }

    /// The device address and length of `key`'s payload (for engine-side copies).
    pub fn device_addr(&self, key: ChunkKey) -> Option<(u64, usize)> {
        self.map.get(&key).map(|e| (e.slot.slot.addr, e.len))
    }

    /// Reads `key`'s payload into `dst` (exactly its length), checking its CRC. `Ok(None)` when
    /// absent; a `dst` of the wrong length is an error. Pinned `dst` gives full copy speed.
    pub fn get_into(&self, key: ChunkKey, dst: &mut [u8]) -> Result<Option<ChunkMeta>> {
        let Some(e) = self.map.get(&key).map(|e| e.clone()) else {
            return Ok(None);
        };
        if dst.len() != e.len {
            return Err(CacheError::LengthMismatch {
                expected: e.len as u64,
                got: dst.len() as u64,
            });
        }
        self.read_checked(&e, dst)?;
        Ok(Some(e.meta))
    }

    fn read_checked(&self, e: &GpuEntry, dst: &mut [u8]) -> Result<()> {
        let n = e.len.div_ceil(PIECE_BYTES);
        let crcs = Mutex::new(vec![(0u32, 0usize); n]);
        let on_piece = |i: usize, piece: &[u8]| {
            let c = crc32c::crc32c(piece);
            crcs.lock()[i] = (c, piece.len());
        };
        // SAFETY: the slot is held by `e.slot` for this whole call, so its device range is
        // live and no put writes it; `dst` has exactly the slot's payload length.
        unsafe { self.dev.dtoh_pipelined(dst, e.slot.slot.addr, &on_piece) }?;
        let got = combine(&crcs.into_inner());
        if got != e.crc {
            return Err(CacheError::Corrupt(format!(
                "gpu slot checksum mismatch: stored {:08x}, read {got:08x}",
                e.crc
            )));
        }
        Ok(())
    }
}

impl Tier for GpuTier {
    fn kind(&self) -> TierKind {
        TierKind::Gpu
    }

    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        let slot = self.reserve(payload.len())?;
        // SAFETY: the slot was just reserved for this put alone and lies in a live arena.
        let crc = unsafe {
            self.dev
                .htod_overlapped(slot.slot.addr, payload, || crc_parallel(payload))
        }?;
        // The replaced entry's slot returns to the book when its last reader is done.
        self.map.insert(
            key,
            GpuEntry {
                meta: *meta,
                len: payload.len(),
                crc,
                slot,
            },
        );
        Ok(())
    }

    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        let Some(e) = self.map.get(&key).map(|e| e.clone()) else {
            return Ok(None);
        };
        if e.len == 0 {
            return Ok(Some((e.meta, Bytes::new())));
        }
        let mut buf = self.dev.pinned(e.len)?;
        self.read_checked(&e, &mut buf)?;
        Ok(Some((e.meta, Bytes::from_owner(buf))))
    }

    fn contains(&self, key: ChunkKey) -> bool {
        self.map.contains_key(&key)
    }

    fn remove(&self, key: ChunkKey) -> Result<bool> {
        Ok(self.map.remove(&key).is_some())
    }

    fn usage(&self) -> TierUsage {
        let book = self.book.lock();
        TierUsage {
            chunks: self.map.len() as u64,
            bytes: book.used(),
            budget: book.budget(),
        }
    }

    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        self.map.iter().map(|e| (*e.key(), e.meta)).collect()
    }

    fn stat(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, u64)>> {
        Ok(self.map.get(&key).map(|e| (e.meta, e.len as u64)))
    }

    fn verify(&self, key: ChunkKey) -> Result<Option<bool>> {
        match self.get(key) {
            Ok(found) => Ok(found.map(|_| true)),
            Err(CacheError::Corrupt(_)) => Ok(Some(false)),
            Err(e) => Err(e),
        }
    }
}

impl Drop for GpuTier {
    fn drop(&mut self) {
        // Every slot guard lives in the map (readers hold clones only during a call on `&self`).
        self.map.clear();
        let arenas = self.book.lock().arenas().to_vec();
        for a in arenas {
            // SAFETY: each arena came from `alloc` on this device, is freed once, and no copy
            // uses it: no call on the tier is in progress while it drops.
            let _ = unsafe { self.dev.free(a.base) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_resolve_and_reject_out_of_range() {
        assert_eq!(GpuBudget::Bytes(5).resolve(100).unwrap(), 5);
        assert_eq!(GpuBudget::FractionOfFree(0.5).resolve(100).unwrap(), 50);
        for bad in [
            GpuBudget::Bytes(0),
            GpuBudget::FractionOfFree(0.0),
            GpuBudget::FractionOfFree(0.96),
            GpuBudget::FractionOfFree(f64::NAN),
        ] {
            let e = bad.resolve(100).unwrap_err();
            assert!(e.to_string().contains("invalid gpu configuration"), "{e}");
        }
    }
}
