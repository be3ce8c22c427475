//! Index entries: what the store knows about one chunk besides its bytes.
//!
//! An entry keeps the chunk's metadata as it was put, the set of tiers holding a copy, which of
//! those copies are lossy (encoded lossy by a tier, or promoted from such a copy), the last
//! access tick and the live leases. Everything a reader touches is an atomic, so reads take no
//! lock beyond the index shard.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::types::ChunkInfo;
use crate::error::{CacheError, Result};
use crate::key::ChunkKey;
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, TierKind, TierSet};

pub(super) struct Entry {
    /// The chunk as it was put (raw codec unless the client encoded it itself).
    pub(super) meta: ChunkMeta,
    tiers: AtomicU8,
    /// Tiers whose copy is lossy (encoded lossy by a tier, or decoded from such a copy).
    lossy: AtomicU8,
    /// The fidelity of the lossy copies, when there are any.
    lossy_fidelity: Mutex<Option<Fidelity>>,
    pub(super) last_access: AtomicU64,
    /// Live leases: (id, expiry). Locked only by lease operations and evictors.
    pub(super) leases: Mutex<Vec<(u64, Instant)>>,
}

pub(super) fn new_entry(meta: ChunkMeta, tick: u64) -> Entry {
    Entry {
        meta,
        tiers: AtomicU8::new(0),
        lossy: AtomicU8::new(0),
        lossy_fidelity: Mutex::new(None),
        last_access: AtomicU64::new(tick),
        leases: Mutex::new(Vec::new()),
    }
}

impl Entry {
    pub(super) fn tiers(&self) -> TierSet {
        TierSet(self.tiers.load(Ordering::Acquire))
    }

    pub(super) fn add_tier(&self, t: TierKind) {
        self.tiers.fetch_or(t.bit(), Ordering::AcqRel);
    }

    /// Removes `t`; returns the remaining set.
    pub(super) fn drop_tier(&self, t: TierKind) -> TierSet {
        TierSet(self.tiers.fetch_and(!t.bit(), Ordering::AcqRel) & !t.bit())
    }

    /// Tiers holding a copy that decodes to exactly what was put.
    pub(super) fn exact_tiers(&self) -> TierSet {
        TierSet(self.tiers.load(Ordering::Acquire) & !self.lossy.load(Ordering::Acquire))
    }

    /// Records the fidelity of the copy now in `t`.
    pub(super) fn mark(&self, t: TierKind, copy: Fidelity) {
        if copy.is_exact() {
            self.lossy.fetch_and(!t.bit(), Ordering::AcqRel);
        } else {
            *self.lossy_fidelity.lock() = Some(copy);
            self.lossy.fetch_or(t.bit(), Ordering::AcqRel);
        }
    }

    /// Records the copy now in `t`, of fidelity `copy`: it is marked lossy only when it is lossy
    /// beyond what was put (a client-labelled lossy chunk is that in every tier).
    pub(super) fn record_copy(&self, t: TierKind, copy: Fidelity) {
        match copy != self.meta.fidelity && !copy.is_exact() {
            true => self.mark(t, copy),
            false => self.mark(t, Fidelity::Exact),
        }
    }

    /// The best fidelity any held copy can be served with.
    pub(super) fn fidelity(&self) -> Fidelity {
        if !self.exact_tiers().is_empty() || self.lossy.load(Ordering::Acquire) == 0 {
            return self.meta.fidelity;
        }
        self.lossy_fidelity.lock().unwrap_or(self.meta.fidelity)
    }

    /// The metadata as put, with the best fidelity held.
    pub(super) fn effective_meta(&self) -> ChunkMeta {
        let mut m = self.meta;
        m.fidelity = self.fidelity();
        m
    }

    pub(super) fn is_pinned(&self, now: Instant) -> bool {
        let mut l = self.leases.lock();
        l.retain(|(_, exp)| *exp > now);
        !l.is_empty()
    }

    /// What [`crate::TieredStore::info`] and `list` report about this entry.
    pub(super) fn info(&self, key: ChunkKey) -> ChunkInfo {
        let now = Instant::now();
        let leases = self
            .leases
            .lock()
            .iter()
            .filter(|(_, exp)| *exp > now)
            .count() as u32;
        ChunkInfo {
            key,
            meta: self.effective_meta(),
            tiers: self.tiers(),
            leases,
            last_access: self.last_access.load(Ordering::Relaxed),
        }
    }
}

/// Refuses a raw payload whose length is not the one its metadata states.
pub(super) fn check_meta(meta: &ChunkMeta, len: usize) -> Result<()> {
    if meta.codec == CODEC_RAW && meta.raw_len != len as u64 {
        return Err(CacheError::LengthMismatch {
            expected: meta.raw_len,
            got: len as u64,
        });
    }
    Ok(())
}
