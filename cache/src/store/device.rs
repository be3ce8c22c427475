//! The device level: a tier above host memory (GPU memory, [`crate::TierKind::Gpu`]) holding copies of
//! the hottest host chunks, so that an engine on the same host restores them device to device.
//!
//! Policy, the same rules as the levels below, pointed upwards:
//! - **promotion host → device**: a host hit on a chunk seen at least `admit_after` times (the
//!   admission sketch that gates demotion to disk) queues it; [`TieredStore::promote_to_device`]
//!   copies queued chunks up. The copy runs off the read path (the service drains the queue on
//!   a blocking thread), so a socket get never waits for a device copy;
//! - **demotion device → host**: making room on the device evicts its least recently used
//!   chunk; one the host no longer holds is copied back down first when admitted (write-back),
//!   exactly as host evictions demote to disk;
//! - **reads**: the host copy is served first (socket readers need host bytes); a chunk held
//!   only on the device is read from it, checked, and promoted back into host memory.
//!
//! Puts still land in host memory and leases still pin host copies: the device level never
//! holds the only copy of an acknowledged write in write-through mode, and in write-back mode
//! it holds no chunk the host would not have held.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{DEVICE_QUEUE, Level, TierCounters, TieredStore};
use crate::policy::EvictionOrder;
use crate::tier::Tier;

impl TieredStore {
    /// Puts `device` (a volatile tier of kind [`crate::TierKind::Gpu`], empty when opened) above the
    /// host tier. Call once, before the store is shared.
    pub fn with_device(mut self, device: Arc<dyn Tier>) -> Self {
        debug_assert_eq!(self.host_at, 0, "with_device called twice");
        if self.host_at != 0 {
            return self;
        }
        self.levels.insert(
            0,
            Level {
                tier: device,
                order: EvictionOrder::default(),
                counters: TierCounters::default(),
            },
        );
        self.host_at = 1;
        self
    }

    /// Whether a device level sits above the host tier.
    pub fn has_device(&self) -> bool {
        self.host_at > 0
    }

    /// Queues a host hit for the device level when it is hot enough and not there yet.
    pub(super) fn note_device_candidate(&self, key: crate::key::ChunkKey) {
        if !self.has_device() || self.sketch.estimate(key) < self.config.admit_after {
            return;
        }
        let device = self.levels[0].kind();
        if self
            .index
            .get(&key)
            .is_none_or(|e| e.tiers().contains(device))
        {
            return;
        }
        let mut q = self.device_queue.lock();
        if q.len() < DEVICE_QUEUE && !q.contains(&key) {
            q.push_back(key);
        }
    }

    /// Copies up to `max` queued host chunks to the device level, evicting (and demoting) there
    /// as needed; returns how many were copied. A chunk that left the host meanwhile, or that the
    /// device cannot take, is skipped; failures are counted as the device level's errors. May
    /// block on device copies: call it from a blocking thread.
    pub fn promote_to_device(&self, max: usize) -> usize {
        if !self.has_device() {
            return 0;
        }
        let mut done = 0;
        for _ in 0..max {
            let Some(key) = self.device_queue.lock().pop_front() else {
                break;
            };
            if self.copy_to_device(key) {
                done += 1;
            }
        }
        done
    }

    /// Host chunks waiting for the device level.
    pub fn device_queue_len(&self) -> usize {
        self.device_queue.lock().len()
    }

    fn copy_to_device(&self, key: crate::key::ChunkKey) -> bool {
        let device = &self.levels[0];
        let logical = match self.index.get(&key) {
            Some(e) if !e.tiers().contains(device.kind()) => e.meta,
            _ => return false,
        };
        let Ok(Some((rec, bytes))) = self.host.get(key) else {
            return false;
        };
        let meta = super::read::served(&logical, rec);
        match self.write_copy(0, key, &meta, &bytes) {
            Ok(()) => {
                // Deleted (or replaced by a put of other metadata) while we copied: the copy
                // is not this chunk any more and nothing would ever evict it.
                let current = self.index.get(&key).is_some_and(|e| e.meta == logical);
                if !current {
                    let _ = device.tier.remove(key);
                    self.drop_from_index(key, device.kind());
                    return false;
                }
                device.counters.promotions.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                device.counters.errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}
