//! Moving chunks between tiers: writing a copy into a slower tier (write-through or demotion)
//! and promoting a slower hit into host memory.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{TieredStore, WriteMode};
use crate::error::Result;
use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, Tier, TierKind};

impl TieredStore {
    /// Writes a copy of a chunk into `levels[level]`, evicting there as needed. `meta` describes
    /// `bytes` as they are (raw, possibly of lossy fidelity); the tier may store them encoded,
    /// and the index records the fidelity of the copy it stored.
    pub(super) fn write_copy(
        &self,
        level: usize,
        key: ChunkKey,
        meta: &ChunkMeta,
        bytes: &[u8],
    ) -> Result<()> {
        let tier = &self.levels[level].tier;
        let rec = tier.put_making_room(key, meta, bytes, &mut || self.evict_one(level))?;
        if let Some(e) = self.index.get(&key) {
            e.add_tier(tier.kind());
            e.record_copy(tier.kind(), rec.fidelity);
        }
        self.levels[level]
            .order
            .insert(self.clock.load(Ordering::Relaxed), meta.depth, key);
        Ok(())
    }

    /// Whether a chunk leaving `levels[level]` goes down to the next tier: in write-back mode,
    /// when that tier does not hold it yet and the chunk was seen often enough.
    pub(super) fn should_demote(&self, level: usize, key: ChunkKey) -> bool {
        let Some(next) = self.levels.get(level + 1) else {
            return false;
        };
        self.config.write_mode == WriteMode::WriteBack
            && !self
                .index
                .get(&key)
                .is_some_and(|e| e.tiers().contains(next.kind()))
            && self.sketch.estimate(key) >= self.config.admit_after
    }

    /// Copies the chunk in `levels[level]` into the next tier. A full or failing next tier must
    /// not stop this one from evicting: failures are counted, not returned.
    pub(super) fn demote(&self, level: usize, key: ChunkKey, logical: &ChunkMeta) {
        let copy = self.levels[level].tier.get(key).ok().flatten();
        let Some((rec, bytes)) = copy else {
            return;
        };
        let meta = super::read::served(logical, rec);
        let counters = &self.levels[level + 1].counters;
        match self.write_copy(level + 1, key, &meta, &bytes) {
            Ok(()) => counters.demotions.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Copies a slower-tier hit into host memory; returns the bytes to serve (the host view when
    /// promoted, the slower tier's buffer otherwise).
    pub(super) fn promote(&self, key: ChunkKey, meta: ChunkMeta, bytes: Bytes) -> Bytes {
        if !self.config.promote_on_hit {
            return bytes;
        }
        let Ok(mut slot) = self.reserve(bytes.len()) else {
            return bytes;
        };
        slot.copy_from_slice(&bytes);
        self.host.insert(key, meta, slot);
        let tick = self.tick();
        if let Some(e) = self.index.get(&key) {
            e.add_tier(TierKind::Host);
            e.record_copy(TierKind::Host, meta.fidelity);
            e.last_access.store(tick, Ordering::Release);
        }
        self.levels[self.host_at]
            .order
            .insert(tick, meta.depth, key);
        self.levels[self.host_at]
            .counters
            .promotions
            .fetch_add(1, Ordering::Relaxed);
        self.host
            .get(key)
            .ok()
            .flatten()
            .map(|(_, b)| b)
            .unwrap_or(bytes)
    }
}
