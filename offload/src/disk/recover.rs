//! Recovery: rebuilding the index of a disk tier from its segment files at open.
//!
//! Segments are scanned oldest first. The record with the highest sequence number decides each
//! key (a tombstone deletes it), torn tails are cut off, and records failing their checks are
//! skipped and counted. An intact record of an unknown format version fails the open.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;
use kvtier_cache::key::ChunkKey;
use kvtier_cache::{CacheError, Result};

use super::IndexEntry;
use super::record::{Header, RecordKind};
use super::segment::Segment;

/// What recovery found.
pub(super) struct Recovered {
    /// Segment ids, oldest first.
    pub ids: Vec<u64>,
    pub segments: DashMap<u64, Arc<Segment>>,
    pub index: DashMap<ChunkKey, IndexEntry>,
    pub max_seq: u64,
    pub skipped_corrupt: u64,
    pub torn_bytes: u64,
    pub file_bytes: u64,
}

pub(super) fn recover(dir: &Path) -> Result<Recovered> {
    let mut ids = list_segments(dir)?;
    ids.sort_unstable();
    let segments = DashMap::new();
    // Newest record per key: header, segment id, offset.
    let mut newest: HashMap<ChunkKey, (Header, u64, u64)> = HashMap::new();
    let (mut max_seq, mut skipped_corrupt, mut torn_bytes, mut file_bytes) = (0, 0, 0, 0);
    for (i, &id) in ids.iter().enumerate() {
        let seg = Segment::open(dir, id)?;
        // Appends are serialised and a sealed segment is synced before the next one starts,
        // so only the newest segment can end in a write that never completed: its payloads
        // are checked now. Older records are checked on every read.
        let scan = seg.scan(i + 1 == ids.len())?;
        if scan.good_end < seg.len() {
            torn_bytes += seg.len() - scan.good_end;
            seg.truncate(scan.good_end)?;
        }
        skipped_corrupt += scan.skipped_corrupt;
        for r in scan.records {
            max_seq = max_seq.max(r.header.seq);
            if r.header.kind == RecordKind::Tombstone {
                seg.tombstones.fetch_add(1, Ordering::Relaxed);
            }
            let slot = newest
                .entry(r.header.key)
                .or_insert((r.header, id, r.offset));
            if r.header.seq > slot.0.seq {
                *slot = (r.header, id, r.offset);
            }
        }
        file_bytes += seg.len();
        segments.insert(id, Arc::new(seg));
    }
    let index = DashMap::new();
    for (key, (h, segment, offset)) in newest {
        if h.kind != RecordKind::Put {
            continue;
        }
        let seg = segments.get(&segment).expect("scanned segment");
        seg.live.fetch_add(h.record_len(), Ordering::Relaxed);
        let entry = IndexEntry {
            segment,
            offset,
            payload_len: h.payload_len,
            payload_crc: h.payload_crc,
            seq: h.seq,
            meta: h.meta,
        };
        index.insert(key, entry);
    }
    Ok(Recovered {
        ids,
        segments,
        index,
        max_seq,
        skipped_corrupt,
        torn_bytes,
        file_bytes,
    })
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let listing_error =
        |e| CacheError::io(format!("list disk tier directory {}", dir.display()), e);
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(listing_error)? {
        let name = entry.map_err(listing_error)?.file_name();
        if let Some(id) = name.to_str().and_then(Segment::parse_name) {
            ids.push(id);
        }
    }
    Ok(ids)
}
