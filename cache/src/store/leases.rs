//! Leases: a reader's time-bounded hold on a chunk's host copy, so that it is not evicted while
//! the reader uses it. Expired leases stop pinning at once (evictors check expiry); the lease
//! table is reaped separately.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{GetOutcome, Lease, TieredStore};
use crate::error::{CacheError, Result};
use crate::key::ChunkKey;
use crate::tier::TierKind;

impl TieredStore {
    /// Pins `key` in host memory for `ttl` (capped by the configured maximum), promoting it first
    /// if it only lives in a slower tier.
    pub fn lease(&self, tenant: u64, key: ChunkKey, ttl: Duration) -> Result<Lease> {
        let ttl = ttl.min(self.config.max_lease_ttl);
        let in_host = match self.index.get(&key) {
            Some(e) if e.meta.tenant == tenant => e.tiers().contains(TierKind::Host),
            _ => return Err(CacheError::NotFound(key.to_string())),
        };
        if !in_host {
            match self.get(tenant, key, true)? {
                GetOutcome::Hit(_) => {}
                _ => return Err(CacheError::NotFound(key.to_string())),
            }
        }
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let expires = Instant::now() + ttl;
        let e = self
            .index
            .get(&key)
            .ok_or_else(|| CacheError::NotFound(key.to_string()))?;
        e.leases.lock().push((id, expires));
        self.leases.insert(id, key);
        Ok(Lease { id, key, ttl })
    }

    /// Ends a lease early.
    pub fn release(&self, lease_id: u64) -> Result<()> {
        let (_, key) = self
            .leases
            .remove(&lease_id)
            .ok_or(CacheError::LeaseNotFound(lease_id))?;
        let e = self
            .index
            .get(&key)
            .ok_or(CacheError::LeaseNotFound(lease_id))?;
        let mut l = e.leases.lock();
        let now = Instant::now();
        let live = l.iter().any(|(id, exp)| *id == lease_id && *exp > now);
        l.retain(|(id, exp)| *id != lease_id && *exp > now);
        if live {
            Ok(())
        } else {
            Err(CacheError::LeaseNotFound(lease_id))
        }
    }

    /// Forgets lease records whose entries expired (their pins already lapse on their own).
    pub fn reap_leases(&self) -> usize {
        let now = Instant::now();
        let mut dead = Vec::new();
        for l in self.leases.iter() {
            let live = self.index.get(l.value()).is_some_and(|e| {
                e.leases
                    .lock()
                    .iter()
                    .any(|(id, exp)| id == l.key() && *exp > now)
            });
            if !live {
                dead.push(*l.key());
            }
        }
        for id in &dead {
            self.leases.remove(id);
        }
        dead.len()
    }
}
