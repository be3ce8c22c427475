//! The tiered store: one index over an ordered list of tiers, and the policy that moves chunks
//! between them.
//!
//! The tiers form one list, fastest first: an optional GPU level ([`device`]), the host tier, then
//! disk (then remote). Eviction,
//! demotion, promotion and stats iterate that list; the only special tier is the host, where
//! puts land and hits are promoted to, and the store keeps a typed handle to it for zero-copy
//! slot reservation. Encoding for slower tiers is not the store's business: a tier that encodes
//! is an [`crate::EncodingTier`] wrapped around a backend, and the store only asks each tier
//! which codec ids it owns (so that clients cannot put them).
//!
//! - **put** ([`write`]) lands in host memory (write-back: demoted when evicted and admitted;
//!   write-through: written to the next tier too before the put returns);
//! - **get** ([`read`]) serves from the fastest tier holding an acceptable copy, through the one
//!   function that enforces the fidelity rule, and promotes slower hits to host;
//! - **lookup** hashes a prompt chunk by chunk and stops at the first miss, in one pass;
//! - **eviction** ([`eviction`]) follows [`crate::policy`]: least recently used first, deeper
//!   chunks of a prompt before shallower ones, leased chunks skipped until their lease ends;
//! - **moves** ([`moves`]): demotion on eviction (needs `admit_after` accesses), promotion on hit;
//! - **leases** ([`leases`]) pin chunks in host memory for a bounded time;
//! - **entries** ([`entry`]): each chunk's metadata as put, the tiers holding it and which of
//!   those copies are lossy, so lookups report the best fidelity held;
//! - **inspection** ([`inspect`]): delete, list, info, verify, copies, stats.
//!
//! The index is a sharded map whose entries carry atomics, so reads take no global lock; the
//! eviction orders are the only ordered structures and are not touched by reads.

mod device;
mod entry;
mod eviction;
mod inspect;
mod leases;
mod moves;
mod read;
mod shared;
mod types;
mod write;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::RwLock;

use crate::host::HostTier;
use crate::key::ChunkKey;
use crate::policy::{EvictionOrder, FrequencySketch};
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, Tier, TierKind};

use entry::{Entry, new_entry};
pub use types::*;

/// Longest queue of host chunks waiting to be copied up to the device level.
const DEVICE_QUEUE: usize = 4096;

/// One tier of the store with its eviction order and counters.
struct Level {
    tier: Arc<dyn Tier>,
    order: EvictionOrder,
    counters: TierCounters,
}

impl Level {
    fn kind(&self) -> TierKind {
        self.tier.kind()
    }

    /// Whether records tagged `codec` are an encoding this tier applies (and decodes) itself.
    fn owns(&self, codec: u16) -> bool {
        codec != CODEC_RAW && self.tier.owns_codec(codec)
    }
}

type Listener = Arc<dyn Fn(&StoreEvent) + Send + Sync>;

/// The tiered store. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct TieredStore {
    config: StoreConfig,
    /// Typed handle to `levels[host_at]`, for slot reservation and arena sharing.
    host: Arc<HostTier>,
    /// Every tier, fastest first: the device level (if any), then the host, then slower tiers.
    levels: Vec<Level>,
    /// Position of the host tier in `levels`: puts land there, socket reads are served from
    /// there, hits are promoted there and only its chunks can be leased. 0, or 1 when a device
    /// (GPU) level sits above it.
    host_at: usize,
    /// Host chunks hot enough for the device level, waiting for [`TieredStore::promote_to_device`].
    device_queue: parking_lot::Mutex<std::collections::VecDeque<ChunkKey>>,
    index: DashMap<ChunkKey, Entry>,
    clock: AtomicU64,
    sketch: FrequencySketch,
    leases: DashMap<u64, ChunkKey>,
    next_lease: AtomicU64,
    listeners: RwLock<Vec<Listener>>,
}

impl TieredStore {
    /// Builds a store over a host tier and slower tiers (fastest first), rebuilding the index
    /// from whatever the tiers already hold (a restart keeps every acknowledged chunk). A slower
    /// tier that should hold encoded chunks is passed wrapped in an [`crate::EncodingTier`].
    pub fn new(config: StoreConfig, host: Arc<HostTier>, lower: Vec<Arc<dyn Tier>>) -> Self {
        let levels = std::iter::once(host.clone() as Arc<dyn Tier>)
            .chain(lower)
            .map(|tier| Level {
                tier,
                order: EvictionOrder::default(),
                counters: TierCounters::default(),
            })
            .collect();
        let store = TieredStore {
            sketch: FrequencySketch::new(config.sketch_capacity),
            config,
            host,
            levels,
            host_at: 0,
            device_queue: parking_lot::Mutex::new(std::collections::VecDeque::new()),
            index: DashMap::new(),
            clock: AtomicU64::new(1),
            leases: DashMap::new(),
            next_lease: AtomicU64::new(1),
            listeners: RwLock::new(Vec::new()),
        };
        store.rebuild_index();
        store
    }

    /// Indexes every record the tiers hold. A record in one of its tier's own encodings was put
    /// raw and exact; its copy keeps the encoding's fidelity.
    fn rebuild_index(&self) {
        for level in &self.levels {
            for (key, rec) in level.tier.entries() {
                self.index_record(level, key, rec, 0);
            }
        }
    }

    /// Indexes the record `rec` of `key` found in `level` (see [`TieredStore::rebuild_index`]).
    fn index_record(&self, level: &Level, key: ChunkKey, rec: ChunkMeta, tick: u64) {
        let kind = level.kind();
        let (logical, copy) = match level.owns(rec.codec) {
            true => (
                ChunkMeta {
                    codec: CODEC_RAW,
                    fidelity: Fidelity::Exact,
                    ..rec
                },
                rec.fidelity,
            ),
            false => (rec, Fidelity::Exact),
        };
        let e = self
            .index
            .entry(key)
            .or_insert_with(|| new_entry(logical, tick));
        e.add_tier(kind);
        e.mark(kind, copy);
        level.order.insert(tick, rec.depth, key);
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The host tier (for zero-copy slot reservation and arena sharing).
    pub fn host(&self) -> &Arc<HostTier> {
        &self.host
    }

    /// Calls `f` for every stored, removed or cleared chunk from now on.
    pub fn subscribe(&self, f: impl Fn(&StoreEvent) + Send + Sync + 'static) {
        self.listeners.write().push(Arc::new(f));
    }

    fn emit(&self, ev: StoreEvent) {
        for l in self.listeners.read().iter() {
            l(&ev);
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The level of `kind`, if the store has that tier.
    fn level_of(&self, kind: TierKind) -> Option<&Level> {
        self.levels.iter().find(|l| l.kind() == kind)
    }
}

#[cfg(test)]
mod codec_tests;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod tests;
