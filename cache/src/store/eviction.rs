//! Eviction: picking the least recently used chunk of a tier, demoting it when admitted, and
//! forgetting index entries no tier holds any more.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{StoreEvent, TieredStore};
use crate::error::Result;
use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, TierKind, TierSet};

impl TieredStore {
    /// Evicts one chunk from `levels[level]`. Returns false when nothing can be evicted (every
    /// candidate is leased, or the tier is empty).
    pub(super) fn evict_one(&self, level: usize) -> Result<bool> {
        let order = &self.levels[level].order;
        let kind = self.levels[level].kind();
        let now = Instant::now();
        let mut pinned = Vec::new();
        let budget = order.len() + 1;
        let mut evicted = false;
        for _ in 0..budget {
            let Some((tick, Reverse(depth), key)) = order.pop() else {
                break;
            };
            let Some(e) = self.index.get(&key) else {
                continue;
            };
            if !e.tiers().contains(kind) {
                continue;
            }
            let last = e.last_access.load(Ordering::Acquire);
            if last > tick {
                // Read since it was filed: re-file under its newer tick.
                order.insert(last, depth, key);
                continue;
            }
            // Leases pin host copies only; a leased chunk's slower copies may go.
            if level == self.host_at && e.is_pinned(now) {
                pinned.push((tick, depth, key));
                continue;
            }
            let meta = e.meta;
            drop(e);
            self.evict_from(level, key, meta);
            evicted = true;
            break;
        }
        for (tick, depth, key) in pinned {
            order.insert(tick, depth, key);
        }
        Ok(evicted)
    }

    /// Removes `key` from `levels[level]`, demoting it to the next tier when the policy says so.
    fn evict_from(&self, level: usize, key: ChunkKey, meta: ChunkMeta) {
        let l = &self.levels[level];
        if self.should_demote(level, key) {
            self.demote(level, key, &meta);
        }
        if l.tier.remove(key).unwrap_or(false) {
            l.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.drop_from_index(key, l.kind());
    }

    /// Clears `kind` from the entry; forgets the entry (and tells listeners) when no tier is left.
    pub(super) fn drop_from_index(&self, key: ChunkKey, kind: TierKind) {
        let remaining = self.index.get(&key).map(|e| e.drop_tier(kind));
        if remaining.is_some_and(TierSet::is_empty)
            && let Some((_, e)) = self.index.remove_if(&key, |_, e| e.tiers().is_empty())
        {
            self.emit(StoreEvent::Removed {
                key,
                tenant: e.meta.tenant,
            });
        }
    }
}
