//! Deleting and inspecting: delete and clear, info and list, verify, per-tier copies, stats and
//! flush. Each walks the one list of tiers.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{ChunkInfo, Level, StoreEvent, StoreStats, StoredCopy, TierStats, TieredStore};
use crate::error::{CacheError, Result};
use crate::key::ChunkKey;
use crate::tier::{TierKind, TierSet};

impl TieredStore {
    /// Deletes `key` from every tier. Returns false when absent or owned by another tenant.
    pub fn delete(&self, tenant: u64, key: ChunkKey) -> Result<bool> {
        let removed = self.remove_everywhere(tenant, key)?;
        if removed {
            self.emit(StoreEvent::Removed { key, tenant });
        }
        Ok(removed)
    }

    /// Deletes every chunk of `tenant`; returns how many. Listeners get one `Cleared` event.
    pub fn clear(&self, tenant: u64) -> Result<usize> {
        let keys: Vec<ChunkKey> = self
            .index
            .iter()
            .filter(|e| e.meta.tenant == tenant)
            .map(|e| *e.key())
            .collect();
        let mut n = 0;
        for k in keys {
            n += usize::from(self.remove_everywhere(tenant, k)?);
        }
        self.emit(StoreEvent::Cleared { tenant });
        Ok(n)
    }

    fn remove_everywhere(&self, tenant: u64, key: ChunkKey) -> Result<bool> {
        if self.index.get(&key).is_none_or(|e| e.meta.tenant != tenant) {
            return Ok(false);
        }
        for l in &self.levels {
            l.tier.remove(key)?;
        }
        Ok(self.index.remove(&key).is_some())
    }

    /// What the store knows about one chunk of `tenant`.
    pub fn info(&self, tenant: u64, key: ChunkKey) -> Option<ChunkInfo> {
        let e = self.index.get(&key)?;
        (e.meta.tenant == tenant).then(|| e.info(key))
    }

    /// The tiers holding `key` of `tenant`, or `NotFound`.
    fn tiers_of(&self, tenant: u64, key: ChunkKey) -> Result<TierSet> {
        match self.index.get(&key) {
            Some(e) if e.meta.tenant == tenant => Ok(e.tiers()),
            _ => Err(CacheError::NotFound(key.to_string())),
        }
    }

    /// Re-reads `key` in every tier holding it and checks checksums. Returns per-tier results.
    pub fn verify(&self, tenant: u64, key: ChunkKey) -> Result<Vec<(TierKind, bool)>> {
        let tiers = self.tiers_of(tenant, key)?;
        let mut out = Vec::new();
        for l in self.levels.iter().filter(|l| tiers.contains(l.kind())) {
            let ok = match l.tier.verify(key) {
                Ok(v) => v.unwrap_or(false),
                Err(CacheError::Corrupt(_)) => false,
                Err(e) => return Err(e),
            };
            out.push((l.kind(), ok));
        }
        Ok(out)
    }

    /// How each tier stores `key`: codec, fidelity and stored size (for `show`). No payload is
    /// read where the tier can answer from its index.
    pub fn copies(&self, tenant: u64, key: ChunkKey) -> Result<Vec<StoredCopy>> {
        let tiers = self.tiers_of(tenant, key)?;
        let mut out = Vec::new();
        for l in self.levels.iter().filter(|l| tiers.contains(l.kind())) {
            if let Some((m, len)) = l.tier.stat(key)? {
                out.push(StoredCopy {
                    tier: l.kind(),
                    codec: m.codec,
                    fidelity: m.fidelity,
                    stored_bytes: len,
                    raw_bytes: m.raw_len,
                });
            }
        }
        Ok(out)
    }

    /// Chunks of `tenant` in key order, starting after `after`, at most `limit`, optionally only
    /// those present in `tier`.
    pub fn list(
        &self,
        tenant: u64,
        tier: Option<TierKind>,
        after: Option<ChunkKey>,
        limit: usize,
    ) -> Vec<ChunkInfo> {
        let mut v: Vec<ChunkInfo> = self
            .index
            .iter()
            .filter(|e| e.meta.tenant == tenant)
            .filter(|e| after.is_none_or(|a| *e.key() > a))
            .filter(|e| tier.is_none_or(|t| e.tiers().contains(t)))
            .map(|e| e.info(*e.key()))
            .collect();
        v.sort_by_key(|i| i.key);
        v.truncate(limit);
        v
    }

    /// Per-tier occupancy and counters, fastest tier first.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            chunks: self.index.len() as u64,
            leases: self.leases.len() as u64,
            tiers: self.levels.iter().map(level_stats).collect(),
        }
    }

    /// Occupancy and counters of one tier, if the store has it (for example the host tier's
    /// usage, which the pressure squeezer watches).
    pub fn tier_stats(&self, kind: TierKind) -> Option<TierStats> {
        self.level_of(kind).map(level_stats)
    }

    /// Makes every acknowledged write durable in every tier.
    pub fn flush(&self) -> Result<()> {
        for l in &self.levels {
            l.tier.flush()?;
        }
        Ok(())
    }
}

fn level_stats(l: &Level) -> TierStats {
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let c = &l.counters;
    TierStats {
        tier: l.kind(),
        usage: l.tier.usage(),
        hits: r(&c.hits),
        misses: r(&c.misses),
        evictions: r(&c.evictions),
        promotions: r(&c.promotions),
        demotions: r(&c.demotions),
        corrupt: r(&c.corrupt),
        errors: r(&c.errors),
    }
}
