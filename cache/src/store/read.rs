//! The read path: get, prefix lookup, whether a read may block, and the fidelity rule.
//!
//! **The fidelity rule** (nothing lossy is ever served to a caller that asked for exact data)
//! lives in [`may_serve`], which every read asks twice: before reading, for the tiers whose copy
//! may be served ([`servable`]); after reading, for the copy actually read (so that an index that
//! did not yet know a copy was lossy still cannot leak it). Leases, RETRIEVE and budgets all read through
//! [`TieredStore::get`].

use std::sync::atomic::Ordering;

use super::entry::Entry;
use super::{ChunkHit, ChunkRead, GetOutcome, LookupResult, TieredStore};
use crate::error::{CacheError, Result};
use crate::key::{ChunkKey, Namespace};
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, TierKind, TierSet};
use crate::transcode::served_meta;

/// The fidelity rule itself: whether data of fidelity `f` may reach a caller that does (or
/// does not) accept lossy data.
fn may_serve(accept_lossy: bool, f: Fidelity) -> bool {
    accept_lossy || f.is_exact()
}

/// What a read of `e` may serve under the fidelity rule.
enum Servable {
    /// The tiers whose copy may be served.
    From(TierSet),
    /// Nothing: the best fidelity held is lossy and the caller asked for exact data.
    Rejected(Fidelity),
}

/// The tiers of `e` whose copy [`may_serve`] the caller.
fn servable(e: &Entry, accept_lossy: bool) -> Servable {
    if accept_lossy {
        return Servable::From(TierSet(u8::MAX));
    }
    let exact = e.exact_tiers();
    match may_serve(false, e.meta.fidelity) && !exact.is_empty() {
        true => Servable::From(exact),
        false => Servable::Rejected(e.fidelity()),
    }
}

/// The metadata a copy read from a tier is served with. A tier that decoded its own encoding
/// hands back a raw record: it is served as the chunk was put, with the copy's fidelity when
/// that is lossy. A client's own encoding is served as stored.
pub(super) fn served(logical: &ChunkMeta, copy: ChunkMeta) -> ChunkMeta {
    match copy.codec {
        CODEC_RAW => served_meta(logical, &copy),
        _ => copy,
    }
}

impl TieredStore {
    /// Reads a chunk owned by `tenant` from the fastest tier holding a copy the caller accepts.
    /// Hits in slower tiers are promoted to host when there is room.
    pub fn get(&self, tenant: u64, key: ChunkKey, accept_lossy: bool) -> Result<GetOutcome> {
        let tick = self.tick();
        let (logical, allowed) = match self.index.get(&key) {
            Some(e) if e.meta.tenant == tenant => {
                e.last_access.store(tick, Ordering::Release);
                match servable(&e, accept_lossy) {
                    Servable::From(tiers) => (e.meta, tiers),
                    Servable::Rejected(best) => return Ok(GetOutcome::FidelityRejected(best)),
                }
            }
            _ => {
                self.levels[self.host_at]
                    .counters
                    .misses
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(GetOutcome::Miss);
            }
        };
        self.sketch.increment(key);
        // Host first (its copy is served without a copy), then the others fastest first.
        let order = std::iter::once(self.host_at)
            .chain((0..self.levels.len()).filter(|&i| i != self.host_at));
        for i in order {
            let level = &self.levels[i];
            let kind = level.kind();
            if !allowed.contains(kind) {
                // The host counts every get it does not serve; slower tiers only those they try.
                if i == self.host_at {
                    level.counters.misses.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            match level.tier.get(key) {
                Ok(Some((rec, bytes))) => {
                    let meta = served(&logical, rec);
                    if !may_serve(accept_lossy, meta.fidelity) {
                        // The index did not know this copy is lossy: it does now.
                        if let Some(e) = self.index.get(&key) {
                            e.mark(kind, meta.fidelity);
                        }
                        level.counters.misses.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    level.counters.hits.fetch_add(1, Ordering::Relaxed);
                    let bytes = match i == self.host_at {
                        true => {
                            self.note_device_candidate(key);
                            bytes
                        }
                        false => self.promote(key, meta, bytes),
                    };
                    return Ok(GetOutcome::Hit(ChunkRead {
                        meta,
                        bytes,
                        tier: kind,
                    }));
                }
                Ok(None) => {
                    level.counters.misses.fetch_add(1, Ordering::Relaxed);
                    self.drop_from_index(key, kind);
                }
                Err(CacheError::Corrupt(_)) => {
                    // Never served; forget this copy and try the next tier.
                    level.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    let _ = level.tier.remove(key);
                    self.drop_from_index(key, kind);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(GetOutcome::Miss)
    }

    /// Whether reading `keys` of `tenant` may block on I/O: some chunk is held only in tiers
    /// slower than host (its read, or the lease that promotes it, goes to disk or the network).
    pub fn read_may_block(&self, tenant: u64, keys: &[ChunkKey]) -> bool {
        keys.iter().any(|k| {
            self.index
                .get(k)
                .is_some_and(|e| e.meta.tenant == tenant && !e.tiers().contains(TierKind::Host))
        })
    }

    /// How many leading chunks of `tokens` are stored under `ns`, and where. One pass: hashing
    /// stops at the first miss.
    pub fn lookup(&self, ns: &Namespace, tokens: &[u32]) -> LookupResult {
        let tenant = ns.tenant_id();
        let tick = self.tick();
        let mut chain = ns.hasher();
        let per = chain.chunk_tokens().max(1);
        let mut chunks = Vec::with_capacity(tokens.len() / per);
        let mut blocks = tokens.chunks_exact(per);
        let mut first_miss = None;
        for c in blocks.by_ref() {
            let key = chain.next_key(c);
            if !self.push_hit(&mut chunks, key, tenant, tick) {
                first_miss = Some(key);
                break;
            }
        }
        // The rest of the prefix may be in a tier other nodes share: one probe for all of it.
        if let Some(miss) = first_miss.filter(|_| self.lookup_may_block()) {
            let rest: Vec<ChunkKey> = std::iter::once(miss)
                .chain(blocks.map(|c| chain.next_key(c)))
                .collect();
            let n = self.probe_shared(tenant, &rest, tick);
            for key in &rest[..n] {
                if !self.push_hit(&mut chunks, *key, tenant, tick) {
                    break;
                }
            }
        }
        for c in &chunks {
            self.sketch.increment(c.key);
        }
        LookupResult {
            hit_tokens: chunks.len() * per,
            chunks,
        }
    }

    /// Appends `key` to a lookup's hits when the index holds it for `tenant` in some tier.
    fn push_hit(&self, chunks: &mut Vec<ChunkHit>, key: ChunkKey, tenant: u64, tick: u64) -> bool {
        let Some(e) = self.index.get(&key) else {
            return false;
        };
        let tiers = e.tiers();
        if e.meta.tenant != tenant || tiers.is_empty() {
            return false;
        }
        e.last_access.store(tick, Ordering::Release);
        chunks.push(ChunkHit {
            key,
            tiers,
            fidelity: e.fidelity(),
        });
        true
    }
}
