//! Plain data the store takes and returns: configuration, outcomes, stats, events.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, Fidelity, TierKind, TierSet, TierUsage};

/// When chunks reach the first slower tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteMode {
    /// On eviction from host, if admitted (seen often enough). Fast puts; a crash loses chunks
    /// that only lived in memory, which were never promised durable.
    WriteBack,
    /// On every put, before it returns. Slower puts; every acknowledged chunk is on disk.
    WriteThrough,
}

/// Store policy knobs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub write_mode: WriteMode,
    /// Accesses (puts, gets, lookup hits) a chunk needs before it may be demoted to disk.
    pub admit_after: u8,
    /// Longest lease a client may take; longer requests are capped.
    pub max_lease_ttl: Duration,
    /// Copy lower-tier hits into host memory.
    pub promote_on_hit: bool,
    /// Distinct hot keys the admission sketch is sized for.
    pub sketch_capacity: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            write_mode: WriteMode::WriteBack,
            admit_after: 2,
            max_lease_ttl: Duration::from_secs(300),
            promote_on_hit: true,
            sketch_capacity: 1 << 16,
        }
    }
}

/// A chunk read from the store.
#[derive(Debug, Clone)]
pub struct ChunkRead {
    pub meta: ChunkMeta,
    /// Zero-copy view for host hits; an owned buffer when served from a slower tier unpromoted.
    pub bytes: Bytes,
    /// The tier the bytes came from.
    pub tier: TierKind,
}

/// Result of a get: a hit, a miss, or a chunk the caller's fidelity requirement excludes.
#[derive(Debug, Clone)]
pub enum GetOutcome {
    Hit(ChunkRead),
    Miss,
    /// Present, but lossy and the caller asked for exact data.
    FidelityRejected(Fidelity),
}

impl GetOutcome {
    pub fn hit(self) -> Option<ChunkRead> {
        match self {
            GetOutcome::Hit(r) => Some(r),
            _ => None,
        }
    }
}

/// One chunk found by a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChunkHit {
    pub key: ChunkKey,
    pub tiers: TierSet,
    pub fidelity: Fidelity,
}

/// Result of a prefix lookup: the leading chunks present, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LookupResult {
    pub hit_tokens: usize,
    pub chunks: Vec<ChunkHit>,
}

/// A hold on a chunk that keeps it in host memory until released or expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub key: ChunkKey,
    pub ttl: Duration,
}

/// What the store knows about one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub key: ChunkKey,
    pub meta: ChunkMeta,
    pub tiers: TierSet,
    /// Live leases.
    pub leases: u32,
    /// Logical access tick (higher = more recent).
    pub last_access: u64,
}

/// How one tier holds a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StoredCopy {
    pub tier: TierKind,
    /// Codec of the stored payload (0 = raw).
    pub codec: u16,
    /// What the copy decodes to, relative to what was put.
    pub fidelity: Fidelity,
    /// Bytes the payload occupies in the tier.
    pub stored_bytes: u64,
    /// Bytes of the decoded chunk.
    pub raw_bytes: u64,
}

impl StoredCopy {
    /// Raw size over stored size (1.0 for raw copies).
    pub fn ratio(&self) -> f64 {
        self.raw_bytes as f64 / self.stored_bytes.max(1) as f64
    }
}

/// Counters of one tier.
#[derive(Debug, Default)]
pub(crate) struct TierCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    pub corrupt: AtomicU64,
    pub errors: AtomicU64,
}

/// Occupancy and counters of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TierStats {
    pub tier: TierKind,
    pub usage: TierUsage,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Chunks copied into this tier from a slower one.
    pub promotions: u64,
    /// Chunks written into this tier from a faster one.
    pub demotions: u64,
    /// Records found corrupt and dropped.
    pub corrupt: u64,
    /// Failed writes into this tier (the chunk stayed where it was or was dropped).
    pub errors: u64,
}

/// Store-wide stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    pub chunks: u64,
    pub leases: u64,
    pub tiers: Vec<TierStats>,
}

/// What routers and operators are told about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum StoreEvent {
    /// A chunk became available (it was not stored anywhere before).
    Stored {
        key: ChunkKey,
        meta: ChunkMeta,
        tier: TierKind,
    },
    /// A chunk is no longer stored in any tier.
    Removed { key: ChunkKey, tenant: u64 },
    /// Every chunk of a tenant was deleted.
    Cleared { tenant: u64 },
}
