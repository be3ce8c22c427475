//! The tiered store: one index over every tier, and the policy that moves chunks between them.
//!
//! - **put** lands in host memory (write-back: demoted to disk only when evicted and admitted;
//!   write-through: written to the first lower tier too before the put returns);
//! - **get** serves from the fastest tier holding the chunk and promotes lower-tier hits to host;
//! - **lookup** hashes a prompt chunk by chunk and stops at the first miss, in one pass;
//! - **eviction** follows [`crate::policy`]: least recently used first, deeper chunks of a
//!   prompt before shallower ones, leased chunks skipped until their lease ends or expires;
//! - **admission** to disk needs a chunk to have been seen `admit_after` times;
//! - **codecs**: with a [`Transcoder`], raw chunks are encoded as they enter a slower tier and
//!   decoded before they are served or promoted. The index keeps each chunk's metadata as put,
//!   plus which tiers hold a lossy copy: a caller asking for exact data is only served from the
//!   others, and lookups report the best fidelity held.
//!
//! The index is a sharded map whose entries carry atomics, so reads take no global lock; the
//! eviction order is the only ordered structure and is not touched by reads.

mod types;

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::error::{CacheError, Result};
use crate::host::{HostTier, SlotMut};
use crate::key::{ChunkKey, Namespace};
use crate::policy::{EvictionOrder, FrequencySketch};
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, Tier, TierKind, TierSet};
use crate::transcode::{Transcoder, compose, served_meta};

pub use types::*;

struct Entry {
    /// The chunk as it was put (raw codec unless the client encoded it itself).
    meta: ChunkMeta,
    tiers: AtomicU8,
    /// Tiers whose copy is lossy (encoded lossy by the store, or decoded from such a copy).
    lossy: AtomicU8,
    /// The fidelity of the lossy copies, when there are any.
    lossy_fidelity: Mutex<Option<Fidelity>>,
    last_access: AtomicU64,
    /// Live leases: (id, expiry). Locked only by lease operations and evictors.
    leases: Mutex<Vec<(u64, Instant)>>,
}

impl Entry {
    fn tiers(&self) -> TierSet {
        TierSet(self.tiers.load(Ordering::Acquire))
    }

    fn add_tier(&self, t: TierKind) {
        self.tiers.fetch_or(t.bit(), Ordering::AcqRel);
    }

    /// Removes `t`; returns the remaining set.
    fn drop_tier(&self, t: TierKind) -> TierSet {
        TierSet(self.tiers.fetch_and(!t.bit(), Ordering::AcqRel) & !t.bit())
    }

    /// Tiers holding a copy that decodes to exactly what was put.
    fn exact_tiers(&self) -> TierSet {
        TierSet(self.tiers.load(Ordering::Acquire) & !self.lossy.load(Ordering::Acquire))
    }

    /// Records the fidelity of the copy now in `t`.
    fn mark(&self, t: TierKind, copy: Fidelity) {
        if copy.is_exact() {
            self.lossy.fetch_and(!t.bit(), Ordering::AcqRel);
        } else {
            *self.lossy_fidelity.lock() = Some(copy);
            self.lossy.fetch_or(t.bit(), Ordering::AcqRel);
        }
    }

    /// Records the copy now in `t`, of fidelity `copy`: it is marked lossy only when it is lossy
    /// beyond what was put (a client-labelled lossy chunk is that in every tier).
    fn record_copy(&self, t: TierKind, copy: Fidelity) {
        match copy != self.meta.fidelity && !copy.is_exact() {
            true => self.mark(t, copy),
            false => self.mark(t, Fidelity::Exact),
        }
    }

    /// The best fidelity any held copy can be served with.
    fn fidelity(&self) -> Fidelity {
        if !self.exact_tiers().is_empty() || self.lossy.load(Ordering::Acquire) == 0 {
            return self.meta.fidelity;
        }
        self.lossy_fidelity.lock().unwrap_or(self.meta.fidelity)
    }

    /// The metadata as put, with the best fidelity held.
    fn effective_meta(&self) -> ChunkMeta {
        let mut m = self.meta;
        m.fidelity = self.fidelity();
        m
    }

    fn is_pinned(&self, now: Instant) -> bool {
        let mut l = self.leases.lock();
        l.retain(|(_, exp)| *exp > now);
        !l.is_empty()
    }
}

type Listener = Arc<dyn Fn(&StoreEvent) + Send + Sync>;

/// The tiered store. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct TieredStore {
    config: StoreConfig,
    host: Arc<HostTier>,
    /// Slower tiers, fastest first (disk, then remote).
    lower: Vec<Arc<dyn Tier>>,
    index: DashMap<ChunkKey, Entry>,
    /// Eviction order per tier: index 0 is host, `i + 1` is `lower[i]`.
    order: Vec<EvictionOrder>,
    clock: AtomicU64,
    sketch: FrequencySketch,
    leases: DashMap<u64, ChunkKey>,
    next_lease: AtomicU64,
    counters: [TierCounters; 4],
    listeners: RwLock<Vec<Listener>>,
    transcoder: Option<Arc<dyn Transcoder>>,
}

impl TieredStore {
    /// Builds a store over a host tier and slower tiers (fastest first), rebuilding the index
    /// from whatever the slower tiers already hold (a restart keeps every acknowledged chunk).
    pub fn new(config: StoreConfig, host: Arc<HostTier>, lower: Vec<Arc<dyn Tier>>) -> Self {
        Self::with_transcoder(config, host, lower, None)
    }

    /// [`TieredStore::new`] with a codec hook: raw chunks are encoded for slower tiers by
    /// `transcoder` and decoded on the way back.
    pub fn with_transcoder(
        config: StoreConfig,
        host: Arc<HostTier>,
        lower: Vec<Arc<dyn Tier>>,
        transcoder: Option<Arc<dyn Transcoder>>,
    ) -> Self {
        let order = (0..=lower.len())
            .map(|_| EvictionOrder::default())
            .collect();
        let store = TieredStore {
            sketch: FrequencySketch::new(config.sketch_capacity),
            config,
            host,
            lower,
            index: DashMap::new(),
            order,
            clock: AtomicU64::new(1),
            leases: DashMap::new(),
            next_lease: AtomicU64::new(1),
            counters: Default::default(),
            listeners: RwLock::new(Vec::new()),
            transcoder,
        };
        for (i, tier) in store.lower.iter().enumerate() {
            for (key, rec) in tier.entries() {
                let (logical, copy) = match store.owned(&rec) {
                    // An encoding the store applied: the chunk was put raw.
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
                let e = store
                    .index
                    .entry(key)
                    .or_insert_with(|| new_entry(logical, 0));
                e.add_tier(tier.kind());
                e.mark(tier.kind(), copy);
                store.order[i + 1].insert(0, rec.depth, key);
            }
        }
        store
    }

    /// Whether `rec` is encoded with one of the transcoder's codecs.
    fn owned(&self, rec: &ChunkMeta) -> bool {
        rec.codec != CODEC_RAW && self.transcoder.as_ref().is_some_and(|t| t.owns(rec.codec))
    }

    /// Decodes a lower-tier record when the store encoded it. Returns the metadata to serve it
    /// with and raw bytes. A record that fails to decode is reported as corrupt.
    fn decode_record(
        &self,
        key: ChunkKey,
        logical: &ChunkMeta,
        rec: ChunkMeta,
        bytes: Bytes,
    ) -> Result<(ChunkMeta, Bytes)> {
        let Some(tc) = self.transcoder.as_ref().filter(|_| self.owned(&rec)) else {
            return Ok((rec, bytes));
        };
        let raw = tc
            .decode(&rec, &bytes)
            .map_err(|e| CacheError::Corrupt(format!("chunk {key} does not decode: {e}")))?;
        if raw.len() as u64 != rec.raw_len {
            return Err(CacheError::Corrupt(format!(
                "chunk {key} decodes to {} bytes, its record says {}",
                raw.len(),
                rec.raw_len
            )));
        }
        Ok((served_meta(logical, &rec), Bytes::from(raw)))
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Number of tiers below host (disk, remote).
    pub fn lower_tiers(&self) -> usize {
        self.lower.len()
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

    fn counter(&self, t: TierKind) -> &TierCounters {
        &self.counters[t as usize]
    }

    /// Reserves a host slot for a payload of `len` bytes, evicting as needed. Write the payload
    /// into it (for example straight from a socket), then [`TieredStore::put_slot`].
    pub fn reserve(&self, len: usize) -> Result<SlotMut> {
        loop {
            match self.host.reserve(len) {
                Ok(slot) => return Ok(slot),
                Err(CacheError::TierFull { .. }) if self.evict_one(0)? => continue,
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

    /// Publishes a reserved and written slot under `key` without copying it.
    pub fn put_slot(&self, key: ChunkKey, meta: ChunkMeta, slot: SlotMut) -> Result<()> {
        check_meta(&meta, slot.len())?;
        if self.owned(&meta) {
            return Err(CacheError::ReservedCodec(meta.codec));
        }
        let through = match (&self.config.write_mode, self.lower.first()) {
            (WriteMode::WriteThrough, Some(_)) => Some(Bytes::copy_from_slice(&slot)),
            _ => None,
        };
        self.host.insert(key, meta, slot);
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
        for t in self.lower.iter().filter(|t| stale_tiers.contains(t.kind())) {
            t.remove(key)?;
        }
        if let Some(e) = self.index.get(&key) {
            e.add_tier(TierKind::Host);
            e.mark(TierKind::Host, Fidelity::Exact);
            e.last_access.store(tick, Ordering::Release);
        }
        self.order[0].insert(tick, meta.depth, key);
        self.sketch.increment(key);
        if let Some(bytes) = through {
            self.store_lower(0, key, &meta, &bytes)?;
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

    /// Writes a chunk into `lower[i]` (encoded when the transcoder says so), evicting there as
    /// needed. `meta` describes `bytes` as they are (raw, possibly of lossy fidelity).
    fn store_lower(&self, i: usize, key: ChunkKey, meta: &ChunkMeta, bytes: &[u8]) -> Result<()> {
        let tier = &self.lower[i];
        let encoded = match &self.transcoder {
            Some(tc) if meta.codec == CODEC_RAW => tc.encode(tier.kind(), meta, bytes)?,
            _ => None,
        };
        let (rec, payload) = match &encoded {
            Some(enc) => {
                let mut m = *meta;
                m.codec = enc.codec;
                m.fidelity = compose(meta.fidelity, enc.fidelity);
                (m, enc.payload.as_slice())
            }
            None => (*meta, bytes),
        };
        loop {
            match tier.put(key, &rec, payload) {
                Ok(()) => break,
                Err(CacheError::TierFull { .. }) if self.evict_one(i + 1)? => continue,
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = self.index.get(&key) {
            e.add_tier(tier.kind());
            e.record_copy(tier.kind(), rec.fidelity);
        }
        self.order[i + 1].insert(self.clock.load(Ordering::Relaxed), meta.depth, key);
        Ok(())
    }

    /// Evicts one chunk from tier `t` (0 = host). Returns false when nothing can be evicted.
    fn evict_one(&self, t: usize) -> Result<bool> {
        let kind = if t == 0 {
            TierKind::Host
        } else {
            self.lower[t - 1].kind()
        };
        let now = Instant::now();
        let mut pinned = Vec::new();
        let budget = self.order[t].len() + 1;
        let mut evicted = false;
        for _ in 0..budget {
            let Some((tick, Reverse(depth), key)) = self.order[t].pop() else {
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
                self.order[t].insert(last, depth, key);
                continue;
            }
            if kind == TierKind::Host && e.is_pinned(now) {
                pinned.push((tick, depth, key));
                continue;
            }
            let meta = e.meta;
            drop(e);
            self.evict_from(t, key, meta)?;
            evicted = true;
            break;
        }
        for (tick, depth, key) in pinned {
            self.order[t].insert(tick, depth, key);
        }
        Ok(evicted)
    }

    /// Removes `key` from tier `t`, demoting it to the next tier when the policy says so.
    fn evict_from(&self, t: usize, key: ChunkKey, meta: ChunkMeta) -> Result<()> {
        let kind = if t == 0 {
            TierKind::Host
        } else {
            self.lower[t - 1].kind()
        };
        let next = t; // index into `lower` of the next slower tier
        let demote = self.config.write_mode == WriteMode::WriteBack
            && next < self.lower.len()
            && !self
                .index
                .get(&key)
                .is_some_and(|e| e.tiers().contains(self.lower[next].kind()))
            && self.sketch.estimate(key) >= self.config.admit_after;
        if demote {
            let copy = if t == 0 {
                self.host.get(key)?
            } else {
                self.lower[t - 1]
                    .get(key)
                    .ok()
                    .flatten()
                    .and_then(|(rec, b)| self.decode_record(key, &meta, rec, b).ok())
            };
            if let Some((meta, bytes)) = copy {
                match self.store_lower(next, key, &meta, &bytes) {
                    Ok(()) => self
                        .counter(self.lower[next].kind())
                        .demotions
                        .fetch_add(1, Ordering::Relaxed),
                    // A full or failing lower tier must not stop the upper one from evicting.
                    Err(_) => self
                        .counter(self.lower[next].kind())
                        .errors
                        .fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        let removed = if t == 0 {
            self.host.remove(key)?
        } else {
            self.lower[t - 1].remove(key).unwrap_or(false)
        };
        if removed {
            self.counter(kind).evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.drop_from_index(key, kind);
        Ok(())
    }

    /// Clears `kind` from the entry; forgets the entry (and tells listeners) when no tier is left.
    fn drop_from_index(&self, key: ChunkKey, kind: TierKind) {
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

    /// Reads a chunk owned by `tenant`. Lower-tier hits are promoted to host when there is room.
    pub fn get(&self, tenant: u64, key: ChunkKey, accept_lossy: bool) -> Result<GetOutcome> {
        let tick = self.tick();
        let (logical, allowed, best) = match self.index.get(&key) {
            Some(e) if e.meta.tenant == tenant => {
                e.last_access.store(tick, Ordering::Release);
                let allowed = match accept_lossy {
                    true => TierSet(u8::MAX),
                    false => e.exact_tiers(),
                };
                (e.meta, allowed, e.fidelity())
            }
            _ => {
                self.counter(TierKind::Host)
                    .misses
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(GetOutcome::Miss);
            }
        };
        if !accept_lossy && (!logical.fidelity.is_exact() || allowed.is_empty()) {
            return Ok(GetOutcome::FidelityRejected(best));
        }
        self.sketch.increment(key);
        let host_hit = match allowed.contains(TierKind::Host) {
            true => self.host.get(key)?,
            false => None,
        };
        if let Some((meta, bytes)) = host_hit {
            self.counter(TierKind::Host)
                .hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(GetOutcome::Hit(ChunkRead {
                meta,
                bytes,
                tier: TierKind::Host,
            }));
        }
        self.counter(TierKind::Host)
            .misses
            .fetch_add(1, Ordering::Relaxed);
        for (i, tier) in self.lower.iter().enumerate() {
            let kind = tier.kind();
            if !allowed.contains(kind) {
                continue;
            }
            let read = tier.get(key).and_then(|r| {
                r.map(|(rec, b)| self.decode_record(key, &logical, rec, b))
                    .transpose()
            });
            match read {
                Ok(Some((meta, bytes))) => {
                    self.counter(kind).hits.fetch_add(1, Ordering::Relaxed);
                    let bytes = self.promote(key, meta, bytes);
                    return Ok(GetOutcome::Hit(ChunkRead {
                        meta,
                        bytes,
                        tier: kind,
                    }));
                }
                Ok(None) => {
                    self.counter(kind).misses.fetch_add(1, Ordering::Relaxed);
                    self.drop_from_index(key, kind);
                }
                Err(CacheError::Corrupt(_)) => {
                    // Never served; forget this copy and try the next tier.
                    self.counter(kind).corrupt.fetch_add(1, Ordering::Relaxed);
                    let _ = self.lower[i].remove(key);
                    self.drop_from_index(key, kind);
                }
                Err(e) => return Err(e),
            }
        }
        if allowed.0 == u8::MAX {
            self.drop_from_index(key, TierKind::Host);
        }
        Ok(GetOutcome::Miss)
    }

    /// Copies a lower-tier hit into host memory; returns the bytes to serve (the host view when
    /// promoted, the lower tier's buffer otherwise).
    fn promote(&self, key: ChunkKey, meta: ChunkMeta, bytes: Bytes) -> Bytes {
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
        self.order[0].insert(tick, meta.depth, key);
        self.counter(TierKind::Host)
            .promotions
            .fetch_add(1, Ordering::Relaxed);
        self.host
            .get(key)
            .ok()
            .flatten()
            .map(|(_, b)| b)
            .unwrap_or(bytes)
    }

    /// How many leading chunks of `tokens` are stored under `ns`, and where. One pass: hashing
    /// stops at the first miss.
    pub fn lookup(&self, ns: &Namespace, tokens: &[u32]) -> LookupResult {
        let tenant = ns.tenant_id();
        let tick = self.tick();
        let mut chain = ns.hasher();
        let per = chain.chunk_tokens().max(1);
        let mut chunks = Vec::with_capacity(tokens.len() / per);
        for c in tokens.chunks_exact(per) {
            let key = chain.next_key(c);
            let Some(e) = self.index.get(&key) else { break };
            let tiers = e.tiers();
            if e.meta.tenant != tenant || tiers.is_empty() {
                break;
            }
            e.last_access.store(tick, Ordering::Release);
            chunks.push(ChunkHit {
                key,
                tiers,
                fidelity: e.fidelity(),
            });
        }
        for c in &chunks {
            self.sketch.increment(c.key);
        }
        LookupResult {
            hit_tokens: chunks.len() * per,
            chunks,
        }
    }

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
        self.host.remove(key)?;
        for t in &self.lower {
            t.remove(key)?;
        }
        Ok(self.index.remove(&key).is_some())
    }

    /// What the store knows about one chunk of `tenant`.
    pub fn info(&self, tenant: u64, key: ChunkKey) -> Option<ChunkInfo> {
        let e = self.index.get(&key)?;
        (e.meta.tenant == tenant).then(|| info_of(key, &e))
    }

    /// Re-reads `key` in every tier holding it and checks checksums. Returns per-tier results.
    pub fn verify(&self, tenant: u64, key: ChunkKey) -> Result<Vec<(TierKind, bool)>> {
        let tiers = match self.index.get(&key) {
            Some(e) if e.meta.tenant == tenant => e.tiers(),
            _ => return Err(CacheError::NotFound(key.to_string())),
        };
        let mut out = Vec::new();
        if tiers.contains(TierKind::Host) {
            out.push((TierKind::Host, self.host.verify(key)?.unwrap_or(false)));
        }
        for t in &self.lower {
            if tiers.contains(t.kind()) {
                let ok = match t.verify(key) {
                    Ok(v) => v.unwrap_or(false),
                    Err(CacheError::Corrupt(_)) => false,
                    Err(e) => return Err(e),
                };
                out.push((t.kind(), ok));
            }
        }
        Ok(out)
    }

    /// How each tier stores `key`: codec, fidelity and stored size (for `show`). No payload is
    /// read where the tier can answer from its index.
    pub fn copies(&self, tenant: u64, key: ChunkKey) -> Result<Vec<StoredCopy>> {
        let tiers = match self.index.get(&key) {
            Some(e) if e.meta.tenant == tenant => e.tiers(),
            _ => return Err(CacheError::NotFound(key.to_string())),
        };
        let mut out = Vec::new();
        let all = std::iter::once(&*self.host as &dyn Tier).chain(self.lower.iter().map(|t| &**t));
        for t in all.filter(|t| tiers.contains(t.kind())) {
            if let Some((m, len)) = t.stat(key)? {
                out.push(StoredCopy {
                    tier: t.kind(),
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
            .map(|e| info_of(*e.key(), &e))
            .collect();
        v.sort_by_key(|i| i.key);
        v.truncate(limit);
        v
    }

    /// Per-tier occupancy and counters.
    pub fn stats(&self) -> StoreStats {
        let mut tiers = vec![tier_stats(
            &*self.host as &dyn Tier,
            self.counter(TierKind::Host),
        )];
        for t in &self.lower {
            tiers.push(tier_stats(&**t, self.counter(t.kind())));
        }
        StoreStats {
            chunks: self.index.len() as u64,
            leases: self.leases.len() as u64,
            tiers,
        }
    }

    /// Makes every acknowledged write durable in every tier.
    pub fn flush(&self) -> Result<()> {
        for t in &self.lower {
            t.flush()?;
        }
        Ok(())
    }
}

fn new_entry(meta: ChunkMeta, tick: u64) -> Entry {
    Entry {
        meta,
        tiers: AtomicU8::new(0),
        lossy: AtomicU8::new(0),
        lossy_fidelity: Mutex::new(None),
        last_access: AtomicU64::new(tick),
        leases: Mutex::new(Vec::new()),
    }
}

fn check_meta(meta: &ChunkMeta, len: usize) -> Result<()> {
    if meta.codec == crate::tier::CODEC_RAW && meta.raw_len != len as u64 {
        return Err(CacheError::LengthMismatch {
            expected: meta.raw_len,
            got: len as u64,
        });
    }
    Ok(())
}

fn info_of(key: ChunkKey, e: &Entry) -> ChunkInfo {
    let now = Instant::now();
    let leases = e.leases.lock().iter().filter(|(_, exp)| *exp > now).count() as u32;
    ChunkInfo {
        key,
        meta: e.effective_meta(),
        tiers: e.tiers(),
        leases,
        last_access: e.last_access.load(Ordering::Relaxed),
    }
}

fn tier_stats(t: &dyn Tier, c: &TierCounters) -> TierStats {
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    TierStats {
        tier: t.kind(),
        usage: t.usage(),
        hits: r(&c.hits),
        misses: r(&c.misses),
        evictions: r(&c.evictions),
        promotions: r(&c.promotions),
        demotions: r(&c.demotions),
        corrupt: r(&c.corrupt),
        errors: r(&c.errors),
    }
}

#[cfg(test)]
mod codec_tests;
#[cfg(test)]
mod tests;
