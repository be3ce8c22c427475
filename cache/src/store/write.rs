//! The write path: reserving a host slot, publishing a put, and whether a put may block.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::entry::{check_meta, new_entry};
use super::{StoreEvent, TieredStore, WriteMode};
use crate::error::{CacheError, Result};
use crate::host::SlotMut;
use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, Fidelity, TierKind, TierSet};

impl TieredStore {
    /// Reserves a host slot for a payload of `len` bytes, evicting as needed. Write the payload
    /// into it (for example straight from a socket), then [`TieredStore::put_slot`].
    pub fn reserve(&self, len: usize) -> Result<SlotMut> {
        loop {
            match self.host.reserve(len) {
                Ok(slot) => return Ok(slot),
                Err(CacheError::TierFull { .. }) if self.evict_one(self.host_at)? => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores a copy of `payload` under `key`.
    pub fn put(&self, key: ChunkKey, meta: ChunkMeta, payload: &[u8]) -> Result<()> {
        let mut slot = self.reserve(payload.len())?;
        slot.copy_from_slice(payload);
        self.put_slot(key, meta, slot)
    }

    /// Whether [`TieredStore::put_slot`] may block on I/O (write-through into a slower tier), so
    /// that async callers run it on a blocking thread. Reserving may block too when the host is
    /// full (eviction can demote); [`crate::HostTier::reserve`] is the non-evicting fast path.
    pub fn put_may_block(&self) -> bool {
        self.write_through_level().is_some()
    }

    /// The level a put is written through to before it returns, if any.
    fn write_through_level(&self) -> Option<usize> {
        match self.config.write_mode {
            WriteMode::WriteThrough if self.levels.len() > self.host_at + 1 => {
                Some(self.host_at + 1)
            }
            _ => None,
        }
    }

    /// Publishes a reserved and written slot under `key` without copying it.
    pub fn put_slot(&self, key: ChunkKey, meta: ChunkMeta, slot: SlotMut) -> Result<()> {
        check_meta(&meta, slot.len())?;
        if self.levels.iter().any(|l| l.owns(meta.codec)) {
            return Err(CacheError::ReservedCodec(meta.codec));
        }
        let through = self
            .write_through_level()
            .map(|level| (level, Bytes::copy_from_slice(&slot)));
        self.host.insert(key, meta, slot);
        self.publish_host(key, meta, through)
    }

    /// Stores an externally owned view under `key` without copying it (a chunk received into
    /// a transfer segment): the host tier adopts it, evicting like a reservation when the
    /// budget has no room; then it is indexed exactly as a put.
    pub fn put_view(&self, key: ChunkKey, meta: ChunkMeta, bytes: Bytes) -> Result<()> {
        check_meta(&meta, bytes.len())?;
        if self.levels.iter().any(|l| l.owns(meta.codec)) {
            return Err(CacheError::ReservedCodec(meta.codec));
        }
        let through = self
            .write_through_level()
            .map(|level| (level, bytes.clone()));
        loop {
            match self.host.adopt(key, meta, bytes.clone()) {
                Ok(()) => break,
                Err(CacheError::TierFull { .. }) if self.evict_one(self.host_at)? => continue,
                Err(e) => return Err(e),
            }
        }
        self.publish_host(key, meta, through)
    }

    /// Indexes a chunk the host tier now holds (the tail of every host put).
    fn publish_host(
        &self,
        key: ChunkKey,
        meta: ChunkMeta,
        through: Option<(usize, Bytes)>,
    ) -> Result<()> {
        let tick = self.tick();
        let (fresh, stale_tiers) = match self.index.entry(key) {
            dashmap::Entry::Occupied(mut o) if o.get().meta != meta => {
                // Same key, different metadata: older copies in slower tiers are not this chunk.
                let stale = o.get().tiers().without(TierKind::Host);
                o.insert(new_entry(meta, tick));
                (false, stale)
            }
            dashmap::Entry::Occupied(_) => (false, TierSet::EMPTY),
            dashmap::Entry::Vacant(v) => {
                v.insert(new_entry(meta, tick));
                (true, TierSet::EMPTY)
            }
        };
        for l in self
            .levels
            .iter()
            .filter(|l| l.kind() != TierKind::Host && stale_tiers.contains(l.kind()))
        {
            l.tier.remove(key)?;
        }
        if let Some(e) = self.index.get(&key) {
            e.add_tier(TierKind::Host);
            e.mark(TierKind::Host, Fidelity::Exact);
            e.last_access.store(tick, Ordering::Release);
        }
        self.levels[self.host_at]
            .order
            .insert(tick, meta.depth, key);
        self.sketch.increment(key);
        if let Some((level, bytes)) = through {
            // The next tier, and every shared (remote) pool below it, so that other nodes find
            // the chunk at once rather than when this node's disk evicts it. A shared pool that
            // cannot take the copy (unreachable, full) costs only the sharing: the put still
            // holds locally, and the failure is counted as that tier's error.
            for l in level..self.levels.len() {
                let shared = self.levels[l].tier.is_shared();
                if l != level && !shared {
                    continue;
                }
                match self.write_copy(l, key, &meta, &bytes) {
                    Ok(()) => {}
                    Err(_) if shared => {
                        self.levels[l]
                            .counters
                            .errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if fresh {
            self.emit(StoreEvent::Stored {
                key,
                meta,
                tier: TierKind::Host,
            });
        }
        Ok(())
    }
}
