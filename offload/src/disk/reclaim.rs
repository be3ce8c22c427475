//! Reclaiming dead space so that puts fit the budget.
//!
//! The budget charges segment files, so removes and replacements only free space once the
//! segments holding dead records go. In order of cost: delete segments with nothing live, then
//! rewrite the live records of the segment with the most garbage into the active segment and
//! delete it. Tombstones need care: one may only vanish when no older record of its key can
//! remain on disk, i.e. when it sits in the oldest segment or its key was put again since.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvtier_cache::Result;

use super::record::{HEADER_LEN, Header, RecordKind};
use super::segment::Segment;
use super::{DiskTier, Durability, Writer};

impl DiskTier {
    /// Makes room for `needed` more bytes under `limit`, reclaiming dead space as needed;
    /// `TierFull` when live data leaves no room.
    pub(super) fn make_room(&self, w: &mut Writer, needed: u64, limit: u64) -> Result<()> {
        let fits = |t: &DiskTier| t.file_bytes.load(Ordering::Acquire) + needed <= limit;
        let max_rounds = self.segments.len() + 2;
        for _ in 0..max_rounds {
            if fits(self) {
                return Ok(());
            }
            if self.reclaim_one(w)? {
                continue;
            }
            // The active segment is never rewritten in place; seal it (a new segment costs no
            // bytes) so its garbage becomes reclaimable.
            let active = &w.active;
            if active.len() > 0 && active.live.load(Ordering::Acquire) < active.len() {
                self.rotate(w)?;
                continue;
            }
            break;
        }
        if fits(self) {
            Ok(())
        } else {
            Err(self.full(needed))
        }
    }

    /// Frees one sealed segment's dead space; `false` when nothing can be reclaimed. Copies may
    /// use the whole budget, including the reserve puts leave for them.
    fn reclaim_one(&self, w: &mut Writer) -> Result<bool> {
        let sealed: Vec<Arc<Segment>> = self
            .all_segments()
            .into_iter()
            .filter(|s| s.id != w.active.id)
            .collect();
        let Some(oldest) = self.segments.iter().map(|s| *s.key()).min() else {
            return Ok(false);
        };
        let live = |s: &Segment| s.live.load(Ordering::Acquire);
        let tombs = |s: &Segment| s.tombstones.load(Ordering::Acquire) * HEADER_LEN as u64;
        if let Some(dead) = sealed
            .iter()
            .find(|s| live(s) == 0 && (s.tombstones.load(Ordering::Acquire) == 0 || s.id == oldest))
        {
            self.delete_segment(w, dead)?;
            return Ok(true);
        }
        let headroom = self
            .budget
            .saturating_sub(self.file_bytes.load(Ordering::Acquire));
        let best = sealed
            .iter()
            .filter(|s| live(s) + tombs(s) <= headroom && s.len() > live(s) + tombs(s))
            .max_by_key(|s| s.len() - live(s) - tombs(s));
        match best {
            Some(seg) => {
                self.compact(w, seg, seg.id == oldest)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Rewrites the live records (and needed tombstones) of `seg` into the active segment, makes
    /// them durable, then deletes `seg`.
    fn compact(&self, w: &mut Writer, seg: &Arc<Segment>, is_oldest: bool) -> Result<()> {
        let scan = seg.scan(false)?;
        for rec in scan.records {
            let key = rec.header.key;
            match rec.header.kind {
                RecordKind::Put => {
                    let Some(entry) = self.index.get(&key).map(|e| *e) else {
                        continue;
                    };
                    if entry.segment != seg.id || entry.offset != rec.offset {
                        continue;
                    }
                    // Reading through the checked path drops a damaged record instead of
                    // copying it.
                    let Ok(Some(payload)) = self.read_payload_locked(key, &entry) else {
                        continue;
                    };
                    let mut header = Header::put(w.next_seq, key, entry.meta, &[]);
                    header.payload_len = entry.payload_len;
                    header.payload_crc = entry.payload_crc;
                    w.next_seq += 1;
                    let (new_seg, offset) = self.append(w, &header, &payload)?;
                    if let Some(mut e) = self.index.get_mut(&key)
                        && e.segment == seg.id
                        && e.offset == rec.offset
                    {
                        e.segment = new_seg.id;
                        e.offset = offset;
                        e.seq = header.seq;
                        new_seg
                            .live
                            .fetch_add(header.record_len(), Ordering::AcqRel);
                        seg.live.fetch_sub(header.record_len(), Ordering::AcqRel);
                    }
                }
                RecordKind::Tombstone => {
                    if is_oldest || self.index.contains_key(&key) {
                        continue;
                    }
                    let header = Header::tombstone(w.next_seq, key);
                    w.next_seq += 1;
                    let (new_seg, _) = self.append(w, &header, &[])?;
                    new_seg.tombstones.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        // The copies must be on disk before the originals go.
        if self.durability != Durability::None {
            for s in std::mem::take(&mut w.dirty) {
                s.sync().inspect_err(|_| self.commit.poison())?;
            }
        }
        self.delete_segment(w, seg)?;
        self.segments_compacted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes a segment file and forgets it. Readers holding the segment keep reading from the
    /// open file; the index no longer points at it.
    fn delete_segment(&self, w: &mut Writer, seg: &Arc<Segment>) -> Result<()> {
        std::fs::remove_file(&seg.path).map_err(|e| {
            kvtier_cache::CacheError::io(format!("delete segment {}", seg.path.display()), e)
        })?;
        self.segments.remove(&seg.id);
        w.dirty.retain(|s| s.id != seg.id);
        self.file_bytes.fetch_sub(seg.len(), Ordering::AcqRel);
        // A deleted segment that came back after a crash could bring back records whose
        // tombstones were dropped with a later segment.
        self.sync_dir()
    }
}
