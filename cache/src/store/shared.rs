//! Chunks other processes wrote to a shared tier (the remote pool of many kvtier nodes).
//!
//! The index knows only what this store put or found. A lookup whose prefix runs past the
//! local index asks each shared tier ([`crate::Tier::is_shared`]) about the rest of the prefix
//! in one batched [`crate::Tier::probe`] (headers only, no payloads) and indexes the chunks of
//! the caller's tenant it reports, as held in that tier. Reads then go through the ordinary get
//! path (fidelity rule, checksums, promotion to host).

use super::TieredStore;
use crate::key::ChunkKey;

impl TieredStore {
    /// Whether some tier is written by other processes too, so that a lookup may do network
    /// I/O (callers on async threads move lookups to blocking threads then).
    pub fn lookup_may_block(&self) -> bool {
        self.levels.iter().any(|l| l.tier.is_shared())
    }

    /// Probes the shared tiers for `keys` (the chunks of a prefix after its first local miss,
    /// in order), indexes those of `tenant` they hold, and returns how many leading keys are
    /// now indexed. A tier that cannot be reached contributes nothing (it counts the error).
    pub(super) fn probe_shared(&self, tenant: u64, keys: &[ChunkKey], tick: u64) -> usize {
        let mut found = vec![false; keys.len()];
        for level in self.levels.iter().filter(|l| l.tier.is_shared()) {
            let Ok(records) = level.tier.probe(keys) else {
                continue;
            };
            for (i, rec) in records.into_iter().enumerate().take(keys.len()) {
                match rec {
                    Some(rec) if rec.tenant == tenant => {
                        self.index_record(level, keys[i], rec, tick);
                        found[i] = true;
                    }
                    _ => {}
                }
            }
        }
        found.iter().take_while(|f| **f).count()
    }
}
