//! `MemoryTier`: a plain in-memory [`Tier`] of any kind, with a byte budget.
//!
//! It is the reference implementation of the trait: tests use it to stand in for a disk or
//! remote tier, and it anchors the conformance suite.

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::RwLock;

use crate::error::{CacheError, Result};
use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, Tier, TierKind, TierUsage};

/// A heap-backed tier. Charges exactly the payload bytes.
pub struct MemoryTier {
    kind: TierKind,
    budget: u64,
    map: RwLock<HashMap<ChunkKey, (ChunkMeta, Bytes)>>,
}

impl MemoryTier {
    pub fn new(kind: TierKind, budget: u64) -> Self {
        MemoryTier {
            kind,
            budget,
            map: RwLock::new(HashMap::new()),
        }
    }
}

impl Tier for MemoryTier {
    fn kind(&self) -> TierKind {
        self.kind
    }

    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        let mut map = self.map.write();
        let used: u64 = map
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, (_, b))| b.len() as u64)
            .sum();
        if used + payload.len() as u64 > self.budget {
            return Err(CacheError::TierFull {
                tier: self.kind,
                needed: payload.len() as u64,
                budget: self.budget,
            });
        }
        map.insert(key, (*meta, Bytes::copy_from_slice(payload)));
        Ok(())
    }

    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        Ok(self.map.read().get(&key).cloned())
    }

    fn contains(&self, key: ChunkKey) -> bool {
        self.map.read().contains_key(&key)
    }

    fn remove(&self, key: ChunkKey) -> Result<bool> {
        Ok(self.map.write().remove(&key).is_some())
    }

    fn usage(&self) -> TierUsage {
        let map = self.map.read();
        TierUsage {
            chunks: map.len() as u64,
            bytes: map.values().map(|(_, b)| b.len() as u64).sum(),
            budget: self.budget,
        }
    }

    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        self.map.read().iter().map(|(k, (m, _))| (*k, *m)).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        crate::conformance::run_all(&|budget| {
            Box::new(super::MemoryTier::new(super::TierKind::Disk, budget))
        });
    }
}
