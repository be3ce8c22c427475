//! The disk tier: chunks in append-only segment files, found through an in-memory index.
//!
//! Writes append a record (header + payload, see [`record`]) to the active segment with one
//! vectored positioned write, under a writer lock that also orders sequence numbers. Reads look
//! the key up in a sharded index and `pread` the payload straight into the returned buffer,
//! checking its CRC32C every time, so reads take no global lock and never serve damaged bytes.
//!
//! Restart rebuilds the index by scanning the segments (highest sequence number wins, tombstones
//! delete, torn tails are cut off). The budget charges the segment files' bytes, live and dead;
//! when a put would not fit, dead space is reclaimed first (whole-dead segments deleted, the
//! segment with most garbage rewritten) and only then does the put fail with `TierFull`.

mod commit;
mod reclaim;
pub mod record;
mod recover;
mod segment;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use kvtier_cache::key::ChunkKey;
use kvtier_cache::tier::{ChunkMeta, Tier, TierKind, TierUsage};
use kvtier_cache::{CacheError, Result};
use parking_lot::Mutex;

use commit::{GroupCommit, poisoned_error};
use record::{HEADER_LEN, Header, check_payload_len};
use recover::Recovered;
use segment::Segment;

/// Default size at which the active segment is sealed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 256 << 20;
/// Smallest segment size used for small budgets.
const MIN_SEGMENT_BYTES: u64 = 64 << 10;
const LOCK_FILE: &str = "LOCK";

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each put and remove runs `fdatasync` on its segment before returning.
    Always,
    /// Group commit: concurrent writes share one `fdatasync`; each returns once a sync covering
    /// its record has finished. A sync waits up to `max_delay` for appends already under way.
    Batch { max_delay: Duration },
    /// Page cache only: fast, lost on power failure. For benches and tests.
    None,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Batch {
            max_delay: Duration::from_millis(2),
        }
    }
}

/// How to open a [`DiskTier`].
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub dir: PathBuf,
    pub budget_bytes: u64,
    /// Size at which a segment is sealed. Budgets under eight segments' worth get smaller
    /// segments (at least 64 KiB) so that reclaiming has more than one segment to work with.
    pub segment_bytes: u64,
    pub durability: Durability,
}

impl DiskConfig {
    pub fn new(dir: impl Into<PathBuf>, budget_bytes: u64) -> Self {
        DiskConfig {
            dir: dir.into(),
            budget_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            durability: Durability::default(),
        }
    }
}

/// Occupancy and recovery figures of a disk tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub chunks: u64,
    /// Bytes of records the index points at.
    pub live_bytes: u64,
    /// Bytes of all segment files (what the budget charges).
    pub file_bytes: u64,
    pub segments: u64,
    /// Records skipped at the last open because a checksum or check failed.
    pub skipped_corrupt_at_open: u64,
    /// Bytes of torn tails cut off at the last open.
    pub torn_bytes_at_open: u64,
    /// Records dropped since open because a read found them corrupt.
    pub corrupt_dropped: u64,
    /// `fdatasync` batches run by group commit.
    pub group_syncs: u64,
    /// Segments whose live records were rewritten so the segment could be deleted.
    pub segments_compacted: u64,
}

/// Where a record lies on disk (for tools and fault-injection tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLocation {
    pub segment: PathBuf,
    pub record_offset: u64,
    pub payload_offset: u64,
    pub payload_len: u64,
}

#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    segment: u64,
    offset: u64,
    payload_len: u64,
    payload_crc: u32,
    seq: u64,
    meta: ChunkMeta,
}

impl IndexEntry {
    fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len
    }
}

/// State only the writer lock holder touches.
struct Writer {
    active: Arc<Segment>,
    next_seq: u64,
    next_segment: u64,
    /// Segments written since the last sync.
    dirty: Vec<Arc<Segment>>,
}

/// The disk tier. See the module documentation.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    segment_bytes: u64,
    /// Budget kept back from puts so removes can always write their tombstones.
    tombstone_reserve: u64,
    durability: Durability,
    index: DashMap<ChunkKey, IndexEntry>,
    segments: DashMap<u64, Arc<Segment>>,
    writer: Mutex<Writer>,
    commit: GroupCommit,
    file_bytes: AtomicU64,
    skipped_corrupt_at_open: u64,
    torn_bytes_at_open: u64,
    corrupt_dropped: AtomicU64,
    segments_compacted: AtomicU64,
    /// Held (with an exclusive `flock`) for as long as the tier is open.
    _lock: File,
}

impl DiskTier {
    /// Opens (creating if needed) the tier in `config.dir` and rebuilds its index.
    pub fn open(config: DiskConfig) -> Result<DiskTier> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| {
            CacheError::io(format!("create disk tier directory {}", dir.display()), e)
        })?;
        let lock = lock_dir(&dir)?;
        let segment_bytes = config
            .segment_bytes
            .min((config.budget_bytes / 8).max(MIN_SEGMENT_BYTES));
        let tombstone_reserve = (config.budget_bytes / 32).clamp(8 * HEADER_LEN as u64, 4 << 20);

        let Recovered {
            ids,
            segments,
            index,
            max_seq,
            skipped_corrupt,
            torn_bytes,
            file_bytes,
        } = recover::recover(&dir)?;
        let last = ids
            .last()
            .and_then(|id| segments.get(id).map(|s| s.clone()));
        let next_segment = ids.last().map_or(1, |id| id + 1);
        let tier = DiskTier {
            dir,
            budget: config.budget_bytes,
            segment_bytes,
            tombstone_reserve,
            durability: config.durability,
            index,
            segments,
            writer: Mutex::new(Writer {
                // Replaced below when there is no open segment to continue.
                active: match &last {
                    Some(s) => s.clone(),
                    None => Arc::new(Segment::create(&config.dir, next_segment)?),
                },
                next_seq: max_seq + 1,
                next_segment: if last.is_some() {
                    next_segment
                } else {
                    next_segment + 1
                },
                dirty: Vec::new(),
            }),
            commit: GroupCommit::new(max_seq, batch_delay(config.durability)),
            file_bytes: AtomicU64::new(file_bytes),
            skipped_corrupt_at_open: skipped_corrupt,
            torn_bytes_at_open: torn_bytes,
            corrupt_dropped: AtomicU64::new(0),
            segments_compacted: AtomicU64::new(0),
            _lock: lock,
        };
        {
            let mut w = tier.writer.lock();
            if last.is_none() {
                tier.segments.insert(w.active.id, w.active.clone());
                tier.sync_dir()?;
            } else if w.active.len() >= tier.segment_bytes {
                tier.rotate(&mut w)?;
            }
        }
        Ok(tier)
    }

    /// Paths of the segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        let mut segs = self.all_segments();
        segs.sort_by_key(|s| s.id);
        segs.iter().map(|s| s.path.clone()).collect()
    }

    /// Where `key`'s current record lies.
    pub fn locate(&self, key: ChunkKey) -> Option<RecordLocation> {
        let e = *self.index.get(&key)?;
        let seg = self.segments.get(&e.segment)?;
        Some(RecordLocation {
            segment: seg.path.clone(),
            record_offset: e.offset,
            payload_offset: e.offset + HEADER_LEN as u64,
            payload_len: e.payload_len,
        })
    }

    pub fn stats(&self) -> DiskStats {
        let segs = self.all_segments();
        DiskStats {
            chunks: self.index.len() as u64,
            live_bytes: segs.iter().map(|s| s.live.load(Ordering::Relaxed)).sum(),
            file_bytes: self.file_bytes.load(Ordering::Acquire),
            segments: segs.len() as u64,
            skipped_corrupt_at_open: self.skipped_corrupt_at_open,
            torn_bytes_at_open: self.torn_bytes_at_open,
            corrupt_dropped: self.corrupt_dropped.load(Ordering::Relaxed),
            group_syncs: self.commit.syncs(),
            segments_compacted: self.segments_compacted.load(Ordering::Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn all_segments(&self) -> Vec<Arc<Segment>> {
        self.segments.iter().map(|s| s.value().clone()).collect()
    }

    /// Appends one record to the active segment, sealing it first when the record would not
    /// fit. The caller has made room in the budget.
    fn append(
        &self,
        w: &mut Writer,
        header: &Header,
        payload: &[u8],
    ) -> Result<(Arc<Segment>, u64)> {
        let rec_len = header.record_len();
        if w.active.len() > 0 && w.active.len() + rec_len > self.segment_bytes {
            self.rotate(w)?;
        }
        let seg = w.active.clone();
        let offset = seg.len();
        seg.write_record(offset, &header.encode(), payload)?;
        seg.len.store(offset + rec_len, Ordering::Release);
        self.file_bytes.fetch_add(rec_len, Ordering::AcqRel);
        if !w.dirty.iter().any(|s| s.id == seg.id) {
            w.dirty.push(seg.clone());
        }
        Ok((seg, offset))
    }

    /// Seals the active segment and starts a new one.
    fn rotate(&self, w: &mut Writer) -> Result<()> {
        // Syncing the sealed segment now (once per segment) means that only the newest segment
        // can hold unsynced bytes, which is the one recovery reads in full.
        if self.durability != Durability::None {
            w.active.sync().inspect_err(|_| self.commit.poison())?;
        }
        let seg = Arc::new(Segment::create(&self.dir, w.next_segment)?);
        w.next_segment += 1;
        // The new file's directory entry must be durable before records in it are acknowledged.
        self.sync_dir()?;
        self.segments.insert(seg.id, seg.clone());
        w.active = seg;
        Ok(())
    }

    fn sync_dir(&self) -> Result<()> {
        if self.durability == Durability::None {
            return Ok(());
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CacheError::io(format!("sync directory {}", self.dir.display()), e))
    }

    /// Syncs every segment written so far; returns the highest sequence number covered.
    fn sync_written(&self) -> Result<u64> {
        let (covered, dirty) = {
            let mut w = self.writer.lock();
            (w.next_seq - 1, std::mem::take(&mut w.dirty))
        };
        for seg in &dirty {
            seg.sync()?;
        }
        Ok(covered)
    }

    /// Returns once the write with sequence `seq` (in `seg`) is as durable as the policy asks.
    fn make_durable(&self, seq: u64, seg: &Segment) -> Result<()> {
        match self.durability {
            Durability::None => Ok(()),
            Durability::Always => seg.sync().inspect_err(|_| self.commit.poison()),
            Durability::Batch { .. } => self.commit.wait_durable(seq, &|| self.sync_written()),
        }
    }

    /// Takes a replaced or removed entry's bytes off its segment's live count.
    fn release(&self, old: &IndexEntry) {
        if let Some(seg) = self.segments.get(&old.segment) {
            seg.live.fetch_sub(old.record_len(), Ordering::AcqRel);
        }
    }

    /// Drops `key` if the index still points at the record found corrupt, writing a tombstone
    /// so a restart does not find (and refuse) the same record again. The check and the
    /// tombstone happen under the writer lock, which orders every index change, so a good record
    /// put in the meantime is never tombstoned. If the tombstone cannot be written (disk full,
    /// failed sync) the key is only dropped from the index; the record stays refused by its
    /// checksum either way. The tombstone is not waited on for durability.
    /// Must not be called with the writer lock held (compaction uses [`Self::forget_corrupt`]).
    fn drop_corrupt(&self, key: ChunkKey, bad: &IndexEntry) {
        let still_bad = |cur: &IndexEntry| cur.segment == bad.segment && cur.offset == bad.offset;
        let mut dropped = false;
        if !self.commit.is_poisoned() {
            self.commit.append_started();
            {
                let mut w = self.writer.lock();
                if self.index.get(&key).is_some_and(|cur| still_bad(&cur)) {
                    dropped = matches!(
                        self.write_tombstone(&mut w, Header::tombstone(0, key)),
                        Ok(Some((_, _, true)))
                    );
                }
            }
            self.commit.append_finished();
        }
        if dropped {
            self.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.forget_corrupt(key, bad);
        }
    }

    /// Drops `key` from the index (no tombstone) if it still points at the record found
    /// corrupt. Used under the writer lock by compaction, which deletes the record's segment.
    fn forget_corrupt(&self, key: ChunkKey, bad: &IndexEntry) {
        let removed = self.index.remove_if(&key, |_, cur| {
            cur.segment == bad.segment && cur.offset == bad.offset
        });
        if let Some((_, old)) = removed {
            self.release(&old);
            self.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The budget puts may fill. One segment's worth is kept free so compaction can always copy
    /// a sealed segment's live records before deleting it (a sealed segment holding more than
    /// one record is at most `segment_bytes` long), and a little more so removes can always
    /// write their tombstones.
    fn put_limit(&self) -> u64 {
        self.tombstone_limit()
            .saturating_sub(self.tombstone_reserve)
    }

    fn tombstone_limit(&self) -> u64 {
        self.budget.saturating_sub(self.segment_bytes)
    }

    fn full(&self, needed: u64) -> CacheError {
        CacheError::TierFull {
            tier: TierKind::Disk,
            needed,
            budget: self.budget,
        }
    }

    /// Appends a put record and points the index at it. Index changes happen under the writer
    /// lock so that they follow sequence order, exactly as a restart would replay them.
    fn write_put(
        &self,
        w: &mut Writer,
        key: ChunkKey,
        header: &mut Header,
        payload: &[u8],
    ) -> Result<Arc<Segment>> {
        let rec_len = header.record_len();
        self.make_room(w, rec_len, self.put_limit())?;
        header.seq = w.next_seq;
        w.next_seq += 1;
        let (seg, offset) = self.append(w, header, payload)?;
        seg.live.fetch_add(rec_len, Ordering::AcqRel);
        let entry = IndexEntry {
            segment: seg.id,
            offset,
            payload_len: header.payload_len,
            payload_crc: header.payload_crc,
            seq: header.seq,
            meta: header.meta,
        };
        if let Some(old) = self.index.insert(key, entry) {
            self.release(&old);
        }
        Ok(seg)
    }

    /// Appends a tombstone for `header.key` if the key is present; returns its sequence number,
    /// segment and whether the key was still indexed when it was written.
    fn write_tombstone(
        &self,
        w: &mut Writer,
        mut header: Header,
    ) -> Result<Option<(u64, Arc<Segment>, bool)>> {
        if !self.index.contains_key(&header.key) {
            return Ok(None);
        }
        // Tombstones may use the reserve puts leave free.
        self.make_room(w, header.record_len(), self.tombstone_limit())?;
        header.seq = w.next_seq;
        w.next_seq += 1;
        let (seg, _) = self.append(w, &header, &[])?;
        seg.tombstones.fetch_add(1, Ordering::AcqRel);
        let present = match self.index.remove(&header.key) {
            Some((_, old)) => {
                self.release(&old);
                true
            }
            None => false,
        };
        Ok(Some((header.seq, seg, present)))
    }

    /// Reads the payload of `key` into `dst` (resized to fit; old contents are overwritten, not
    /// zeroed first) and verifies its checksum. `Ok(None)` when absent.
    pub fn read_into(&self, key: ChunkKey, dst: &mut Vec<u8>) -> Result<Option<ChunkMeta>> {
        for _ in 0..8 {
            let Some(e) = self.index.get(&key).map(|e| *e) else {
                return Ok(None);
            };
            let Some(seg) = self.segments.get(&e.segment).map(|s| s.clone()) else {
                continue; // moved by a compaction: look again
            };
            let n = e.payload_len as usize;
            if dst.len() >= n {
                dst.truncate(n);
            } else {
                dst.resize(n, 0);
            }
            let crc = seg.read_checked_into(e.offset + HEADER_LEN as u64, dst)?;
            if crc != e.payload_crc {
                self.drop_corrupt(key, &e);
                return Err(CacheError::Corrupt(format!(
                    "payload checksum mismatch for chunk {key} at offset {} of {}",
                    e.offset,
                    seg.path.display()
                )));
            }
            return Ok(Some(e.meta));
        }
        Err(CacheError::Backend {
            tier: TierKind::Disk,
            message: format!("chunk {key} kept moving during the read"),
        })
    }

    /// Reads the payload of `e`; `Ok(None)` when its segment vanished under a compaction.
    fn read_payload(&self, key: ChunkKey, e: &IndexEntry) -> Result<Option<Bytes>> {
        self.read_payload_with(key, e, false)
    }

    /// [`Self::read_payload`] for callers holding the writer lock: a corrupt record is only
    /// forgotten, since tombstoning it would take the lock again.
    fn read_payload_locked(&self, key: ChunkKey, e: &IndexEntry) -> Result<Option<Bytes>> {
        self.read_payload_with(key, e, true)
    }

    fn read_payload_with(
        &self,
        key: ChunkKey,
        e: &IndexEntry,
        locked: bool,
    ) -> Result<Option<Bytes>> {
        let Some(seg) = self.segments.get(&e.segment).map(|s| s.clone()) else {
            return Ok(None);
        };
        let (buf, crc) = seg.read_checked(e.offset + HEADER_LEN as u64, e.payload_len as usize)?;
        if crc != e.payload_crc {
            if locked {
                self.forget_corrupt(key, e);
            } else {
                self.drop_corrupt(key, e);
            }
            return Err(CacheError::Corrupt(format!(
                "payload checksum mismatch for chunk {key} at offset {} of {}",
                e.offset,
                seg.path.display()
            )));
        }
        Ok(Some(Bytes::from(buf)))
    }
}

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        check_payload_len(payload.len())?;
        if self.commit.is_poisoned() {
            return Err(poisoned_error());
        }
        // The checksum is computed before taking the writer lock so appends stay short.
        let mut header = Header::put(0, key, *meta, payload);
        self.commit.append_started();
        let appended = {
            let mut w = self.writer.lock();
            self.write_put(&mut w, key, &mut header, payload)
        };
        self.commit.append_finished();
        let seg = appended?;
        self.make_durable(header.seq, &seg).inspect_err(|_| {
            // Not acknowledged, so not served either.
            if let Some((_, e)) = self.index.remove_if(&key, |_, cur| cur.seq == header.seq) {
                self.release(&e);
            }
        })
    }

    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        // Compaction moves an entry before deleting its old segment, so a vanished segment means
        // the entry has a new home: look again.
        for _ in 0..8 {
            let Some(e) = self.index.get(&key).map(|e| *e) else {
                return Ok(None);
            };
            if let Some(bytes) = self.read_payload(key, &e)? {
                return Ok(Some((e.meta, bytes)));
            }
        }
        Err(CacheError::Backend {
            tier: TierKind::Disk,
            message: format!("chunk {key} kept moving during the read"),
        })
    }

    fn stat(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, u64)>> {
        Ok(self.index.get(&key).map(|e| (e.meta, e.payload_len)))
    }

    fn contains(&self, key: ChunkKey) -> bool {
        self.index.contains_key(&key)
    }

    fn remove(&self, key: ChunkKey) -> Result<bool> {
        if !self.index.contains_key(&key) {
            return Ok(false);
        }
        if self.commit.is_poisoned() {
            return Err(poisoned_error());
        }
        let header = Header::tombstone(0, key);
        self.commit.append_started();
        let written = {
            let mut w = self.writer.lock();
            self.write_tombstone(&mut w, header)
        };
        self.commit.append_finished();
        let Some((seq, seg, present)) = written? else {
            return Ok(false);
        };
        self.make_durable(seq, &seg)?;
        Ok(present)
    }

    fn usage(&self) -> TierUsage {
        TierUsage {
            chunks: self.index.len() as u64,
            bytes: self.file_bytes.load(Ordering::Acquire),
            budget: self.budget,
        }
    }

    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        self.index.iter().map(|e| (*e.key(), e.meta)).collect()
    }

    fn flush(&self) -> Result<()> {
        self.sync_written()
            .map(|_| ())
            .inspect_err(|_| self.commit.poison())
    }

    fn verify(&self, key: ChunkKey) -> Result<Option<bool>> {
        let Some(e) = self.index.get(&key).map(|e| *e) else {
            return Ok(None);
        };
        let Some(seg) = self.segments.get(&e.segment).map(|s| s.clone()) else {
            return Ok(Some(self.contains(key)));
        };
        let intact = match seg.read_header(e.offset, seg.len())? {
            Some(Ok(h)) => h.key == key && h.seq == e.seq && seg.payload_ok(&h, e.offset)?,
            _ => false,
        };
        if !intact {
            self.drop_corrupt(key, &e);
        }
        Ok(Some(intact))
    }
}

fn batch_delay(d: Durability) -> Duration {
    match d {
        Durability::Batch { max_delay } => max_delay,
        _ => Duration::ZERO,
    }
}

/// Takes an exclusive lock on the directory so two processes never append to the same segments.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CacheError::io(format!("create lock file {}", path.display()), e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |e| {
            CacheError::io(
                format!(
                    "lock disk tier directory {} (in use by another process?)",
                    dir.display()
                ),
                e.into(),
            )
        },
    )?;
    Ok(file)
}
