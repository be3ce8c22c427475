//! Tests of the disk tier: conformance, restart, torn tails, corruption, versions, budget and
//! reclaim, open errors.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use kvtier_cache::conformance;
use kvtier_cache::conformance::payload;
use kvtier_cache::tier::Fidelity;
use rand::Rng;
use tempfile::TempDir;

use super::record::reseal_header;
use super::*;

/// A disk tier that deletes its directory when dropped (for the conformance suite).
struct TempDisk {
    tier: DiskTier,
    _dir: TempDir,
}

impl Tier for TempDisk {
    fn kind(&self) -> TierKind {
        self.tier.kind()
    }
    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        self.tier.put(key, meta, payload)
    }
    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        self.tier.get(key)
    }
    fn contains(&self, key: ChunkKey) -> bool {
        self.tier.contains(key)
    }
    fn remove(&self, key: ChunkKey) -> Result<bool> {
        self.tier.remove(key)
    }
    fn usage(&self) -> TierUsage {
        self.tier.usage()
    }
    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        self.tier.entries()
    }
}

fn config(dir: &Path, budget: u64, durability: Durability) -> DiskConfig {
    DiskConfig {
        durability,
        ..DiskConfig::new(dir, budget)
    }
}

fn open(dir: &Path, budget: u64) -> DiskTier {
    DiskTier::open(config(dir, budget, Durability::None)).unwrap()
}

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta::raw(1, 2, 16, 0, len as u64)
}

fn put(tier: &DiskTier, k: u128, len: usize) {
    tier.put(ChunkKey(k), &meta(len), &payload(k as u64, len))
        .unwrap();
}

fn assert_holds(tier: &DiskTier, k: u128, len: usize) {
    let (m, got) = tier
        .get(ChunkKey(k))
        .unwrap()
        .unwrap_or_else(|| panic!("key {k} missing"));
    assert_eq!(m, meta(len));
    assert!(
        got[..] == payload(k as u64, len)[..],
        "key {k} bytes differ"
    );
}

fn flip_byte(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
}

#[test]
fn conformance_without_sync() {
    conformance::run_all(&|budget| {
        let dir = TempDir::new().unwrap();
        let tier = DiskTier::open(config(dir.path(), budget, Durability::None)).unwrap();
        Box::new(TempDisk { tier, _dir: dir })
    });
}

#[test]
fn conformance_with_group_commit() {
    conformance::run_all(&|budget| {
        let dir = TempDir::new().unwrap();
        let durability = Durability::Batch {
            max_delay: Duration::from_millis(1),
        };
        let tier = DiskTier::open(config(dir.path(), budget, durability)).unwrap();
        Box::new(TempDisk { tier, _dir: dir })
    });
}

#[test]
fn restart_keeps_puts_replacements_and_removes() {
    let dir = TempDir::new().unwrap();
    let lossy = ChunkMeta {
        parent: Some(ChunkKey(9)),
        codec: 4,
        fidelity: Fidelity::Lossy {
            codec: 4,
            error_bound: 0.5,
        },
        ..meta(300)
    };
    {
        let tier = DiskTier::open(config(dir.path(), 64 << 20, Durability::Always)).unwrap();
        for k in 0..20 {
            put(&tier, k, 1000 + k as usize * 37);
        }
        tier.put(ChunkKey(5), &meta(77), &payload(5, 77)).unwrap();
        tier.put(ChunkKey(100), &lossy, &payload(100, 300)).unwrap();
        assert!(tier.remove(ChunkKey(7)).unwrap());
        assert!(!tier.remove(ChunkKey(7)).unwrap());
    }
    let tier = open(dir.path(), 64 << 20);
    assert_eq!(tier.usage().chunks, 20);
    assert!(
        tier.get(ChunkKey(7)).unwrap().is_none(),
        "tombstone survives restart"
    );
    assert_eq!(tier.get(ChunkKey(100)).unwrap().unwrap().0, lossy);
    assert!(
        tier.get(ChunkKey(5)).unwrap().unwrap().1[..] == payload(5, 77)[..],
        "newest wins"
    );
    for k in (0..20).filter(|k| *k != 5 && *k != 7) {
        assert_holds(&tier, k, 1000 + k as usize * 37);
    }
    assert_eq!(tier.stats().skipped_corrupt_at_open, 0);
}

#[test]
fn torn_tail_is_cut_off_and_appends_continue() {
    let dir = TempDir::new().unwrap();
    let seg_path;
    let good_len;
    {
        let tier = open(dir.path(), 64 << 20);
        for k in 0..5 {
            put(&tier, k, 5000);
        }
        seg_path = tier.segment_paths().pop().unwrap();
        good_len = std::fs::metadata(&seg_path).unwrap().len();
    }
    // A crash mid-write: a whole header and part of the payload of key 99.
    let header = Header::put(1000, ChunkKey(99), meta(8000), &payload(99, 8000)).encode();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&seg_path)
        .unwrap();
    f.write_all(&header).unwrap();
    f.write_all(&payload(99, 3000)).unwrap();
    drop(f);
    {
        let tier = open(dir.path(), 64 << 20);
        assert_eq!(
            std::fs::metadata(&seg_path).unwrap().len(),
            good_len,
            "tail truncated"
        );
        assert_eq!(tier.stats().torn_bytes_at_open, HEADER_LEN as u64 + 3000);
        assert!(tier.get(ChunkKey(99)).unwrap().is_none());
        put(&tier, 6, 4000);
    }
    let tier = open(dir.path(), 64 << 20);
    assert_eq!(tier.stats().torn_bytes_at_open, 0);
    for k in 0..5 {
        assert_holds(&tier, k, 5000);
    }
    assert_holds(&tier, 6, 4000);
}

#[test]
fn torn_header_at_the_tail_is_cut_off() {
    let dir = TempDir::new().unwrap();
    let seg_path;
    {
        let tier = open(dir.path(), 64 << 20);
        put(&tier, 1, 5000);
        seg_path = tier.segment_paths().pop().unwrap();
    }
    let header = Header::put(1000, ChunkKey(99), meta(10), &payload(99, 10)).encode();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&seg_path)
        .unwrap();
    f.write_all(&header[..60]).unwrap();
    drop(f);
    let tier = open(dir.path(), 64 << 20);
    assert_eq!(tier.stats().torn_bytes_at_open, 60);
    assert_holds(&tier, 1, 5000);
}

#[test]
fn corrupt_payload_is_never_served() {
    let dir = TempDir::new().unwrap();
    let tier = open(dir.path(), 64 << 20);
    for k in 0..4 {
        put(&tier, k, 10_000);
    }
    let loc = tier.locate(ChunkKey(2)).unwrap();
    flip_byte(&loc.segment, loc.payload_offset + 1234);
    assert!(matches!(tier.get(ChunkKey(2)), Err(CacheError::Corrupt(_))));
    assert!(!tier.contains(ChunkKey(2)), "dropped from the index");
    assert!(tier.get(ChunkKey(2)).unwrap().is_none());
    assert_eq!(tier.stats().corrupt_dropped, 1);
    for k in [0, 1, 3] {
        assert_holds(&tier, k, 10_000);
        assert_eq!(tier.verify(ChunkKey(k)).unwrap(), Some(true));
    }
    drop(tier);
    // The damaged record is in the newest segment, whose payloads are checked at open.
    let tier = open(dir.path(), 64 << 20);
    assert!(tier.get(ChunkKey(2)).unwrap().is_none());
    assert_eq!(tier.stats().skipped_corrupt_at_open, 1);
    assert_holds(&tier, 3, 10_000);
}

#[test]
fn verify_detects_damage_in_older_segments() {
    let dir = TempDir::new().unwrap();
    // 8 MiB budget gives 1 MiB segments, so 600 KiB records end up in several segments.
    let tier = open(dir.path(), 8 << 20);
    for k in 0..4 {
        put(&tier, k, 600 << 10);
    }
    assert!(tier.segment_paths().len() >= 3);
    let loc = tier.locate(ChunkKey(0)).unwrap();
    assert_ne!(&loc.segment, tier.segment_paths().last().unwrap());
    flip_byte(&loc.segment, loc.payload_offset + 100);
    drop(tier);
    let tier = open(dir.path(), 8 << 20);
    assert!(
        tier.contains(ChunkKey(0)),
        "older payloads are checked on read, not at open"
    );
    assert_eq!(tier.verify(ChunkKey(0)).unwrap(), Some(false));
    assert!(tier.get(ChunkKey(0)).unwrap().is_none());
    for k in 1..4 {
        assert_holds(&tier, k, 600 << 10);
    }
    // The drop wrote a tombstone: a restart does not bring the damaged record back.
    tier.flush().unwrap();
    drop(tier);
    let tier = open(dir.path(), 8 << 20);
    assert!(!tier.contains(ChunkKey(0)), "tombstoned when found corrupt");
    for k in 1..4 {
        assert_holds(&tier, k, 600 << 10);
    }
    // A good record put after the damage is found is kept.
    put(&tier, 0, 1000);
    assert_holds(&tier, 0, 1000);
}

#[test]
fn corrupt_header_is_skipped_and_later_records_survive() {
    let dir = TempDir::new().unwrap();
    {
        let tier = open(dir.path(), 64 << 20);
        for k in 0..6 {
            put(&tier, k, 3000);
        }
        let loc = tier.locate(ChunkKey(2)).unwrap();
        flip_byte(&loc.segment, loc.record_offset + 30);
    }
    let tier = open(dir.path(), 64 << 20);
    assert!(tier.get(ChunkKey(2)).unwrap().is_none());
    assert_eq!(tier.stats().skipped_corrupt_at_open, 1);
    for k in [0, 1, 3, 4, 5] {
        assert_holds(&tier, k, 3000);
    }
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = TempDir::new().unwrap();
    let loc;
    {
        let tier = open(dir.path(), 64 << 20);
        put(&tier, 1, 100);
        put(&tier, 2, 100);
        loc = tier.locate(ChunkKey(2)).unwrap();
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&loc.segment)
        .unwrap();
    let mut h = [0u8; HEADER_LEN];
    f.seek(SeekFrom::Start(loc.record_offset)).unwrap();
    f.read_exact(&mut h).unwrap();
    h[4..8].copy_from_slice(&7u32.to_le_bytes());
    reseal_header(&mut h);
    f.seek(SeekFrom::Start(loc.record_offset)).unwrap();
    f.write_all(&h).unwrap();
    drop(f);
    let err = DiskTier::open(config(dir.path(), 64 << 20, Durability::None))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            CacheError::UnsupportedVersion {
                found: 7,
                supported: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn unusable_directories_give_io_errors_naming_the_path() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("in-the-way");
    std::fs::write(&file, b"x").unwrap();
    let err = DiskTier::open(config(&file.join("tier"), 1 << 20, Durability::None))
        .err()
        .unwrap();
    assert!(matches!(err, CacheError::Io { .. }), "{err}");
    assert!(err.to_string().contains("in-the-way"), "{err}");
    // procfs refuses new files even to root, unlike a read-only permission bit.
    let err = DiskTier::open(config(
        Path::new("/proc/self/kvtier"),
        1 << 20,
        Durability::None,
    ))
    .err()
    .unwrap();
    assert!(matches!(err, CacheError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/proc/self/kvtier"), "{err}");
}

#[test]
fn a_directory_is_opened_by_one_tier_at_a_time() {
    let dir = TempDir::new().unwrap();
    let tier = open(dir.path(), 1 << 20);
    let err = DiskTier::open(config(dir.path(), 1 << 20, Durability::None))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("lock disk tier directory"),
        "{err}"
    );
    drop(tier);
    open(dir.path(), 1 << 20);
}

#[test]
fn usage_stays_in_budget_and_removes_free_space() {
    let dir = TempDir::new().unwrap();
    let budget = 16u64 << 20;
    let tier = open(dir.path(), budget);
    let mut rng = rand::rng();
    let mut live: Vec<(u128, usize)> = Vec::new();
    let mut full = 0;
    for k in 0..600u128 {
        let len = rng.random_range(1usize..400_000);
        match tier.put(ChunkKey(k), &meta(len), &payload(k as u64, len)) {
            Ok(()) => live.push((k, len)),
            Err(CacheError::TierFull { .. }) => {
                full += 1;
                // Evict like the store would: a few random victims.
                for _ in 0..3.min(live.len()) {
                    let (victim, _) = live.swap_remove(rng.random_range(0..live.len()));
                    assert!(tier.remove(ChunkKey(victim)).unwrap());
                }
            }
            Err(e) => panic!("{e}"),
        }
        let usage = tier.usage();
        assert!(usage.bytes <= budget, "usage {usage:?}");
        let on_disk: u64 = tier
            .segment_paths()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(on_disk, usage.bytes, "charged bytes are the files' bytes");
    }
    assert!(full > 0, "the workload must hit the budget");
    for (k, len) in &live {
        assert_holds(&tier, *k, *len);
    }
    let before = tier.stats();
    for (k, _) in live.drain(..) {
        tier.remove(ChunkKey(k)).unwrap();
    }
    // Filling again must reclaim everything the removes left dead.
    for k in 1000..1010u128 {
        put(&tier, k, 1 << 20);
    }
    let after = tier.stats();
    assert_eq!(after.chunks, 10);
    assert!(after.file_bytes <= budget);
    assert!(after.live_bytes >= 10 << 20);
    assert!(before.file_bytes > 0);
    drop(tier);
    let tier = open(dir.path(), budget);
    assert_eq!(
        tier.usage().chunks,
        10,
        "removed keys stay removed after reclaim and restart"
    );
    for k in 1000..1010u128 {
        assert_holds(&tier, k, 1 << 20);
    }
}

#[test]
fn compaction_keeps_live_records_and_tombstones_across_restart() {
    let dir = TempDir::new().unwrap();
    let budget = 16u64 << 20;
    {
        let tier = open(dir.path(), budget);
        // 2 MiB segments: each holds a few 300 KiB records.
        for k in 0..40u128 {
            put(&tier, k, 300 << 10);
        }
        // Remove all but every fifth record: every segment becomes mostly garbage but not empty.
        for k in (0..40u128).filter(|k| k % 5 != 0) {
            assert!(tier.remove(ChunkKey(k)).unwrap());
        }
        for k in 100..130u128 {
            put(&tier, k, 300 << 10);
        }
        assert!(tier.usage().bytes <= budget);
        // Every sealed segment kept a live record, so only rewriting could make room.
        assert!(tier.stats().segments_compacted > 0, "{:?}", tier.stats());
    }
    let tier = open(dir.path(), budget);
    for k in 0..40u128 {
        if k % 5 == 0 {
            assert_holds(&tier, k, 300 << 10);
        } else {
            assert!(!tier.contains(ChunkKey(k)), "removed key {k} came back");
        }
    }
    for k in 100..130u128 {
        assert_holds(&tier, k, 300 << 10);
    }
}

#[test]
fn oversized_records_and_payloads_are_refused() {
    let dir = TempDir::new().unwrap();
    let tier = open(dir.path(), 1 << 20);
    let err = tier
        .put(ChunkKey(1), &meta(2 << 20), &vec![0u8; 2 << 20])
        .unwrap_err();
    assert!(matches!(err, CacheError::TierFull { .. }), "{err}");
    assert!(tier.usage().bytes <= 1 << 20);
}

#[test]
fn group_commit_concurrent_puts_are_durable() {
    let dir = TempDir::new().unwrap();
    let durability = Durability::Batch {
        max_delay: Duration::from_millis(2),
    };
    {
        let tier = DiskTier::open(config(dir.path(), 256 << 20, durability)).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u128 {
                let tier = &tier;
                s.spawn(move || {
                    for i in 0..25u128 {
                        put(tier, t * 1000 + i, 20_000);
                    }
                });
            }
        });
        let stats = tier.stats();
        assert!(
            stats.group_syncs >= 1 && stats.group_syncs <= 100,
            "{stats:?}"
        );
    }
    let tier = open(dir.path(), 256 << 20);
    assert_eq!(tier.usage().chunks, 100);
    for t in 0..4u128 {
        for i in 0..25u128 {
            assert_holds(&tier, t * 1000 + i, 20_000);
        }
    }
}

#[test]
fn a_full_device_is_an_io_error_not_a_panic() {
    let dir = TempDir::new().unwrap();
    let seg = open(dir.path(), 1 << 20).segment_paths().pop().unwrap();
    // Swap the (empty) active segment for /dev/full: every write to it fails with ENOSPC.
    std::fs::remove_file(&seg).unwrap();
    std::os::unix::fs::symlink("/dev/full", &seg).unwrap();
    let tier = open(dir.path(), 1 << 20);
    let err = tier
        .put(ChunkKey(1), &meta(100), &payload(1, 100))
        .unwrap_err();
    match &err {
        CacheError::Io { context, source } => {
            assert!(context.contains("write segment"), "{err}");
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{err}");
        }
        other => panic!("expected an io error, got {other}"),
    }
    assert!(!tier.contains(ChunkKey(1)));
    assert_eq!(tier.usage().bytes, 0);
}

#[test]
fn large_payloads_round_trip_and_damage_in_any_piece_is_caught() {
    let dir = TempDir::new().unwrap();
    let tier = open(dir.path(), 256 << 20);
    // Above the pipelined-read and parallel-checksum thresholds, not a multiple of a piece.
    let len = (9 << 20) + 3;
    put(&tier, 1, len);
    put(&tier, 2, len);
    assert_holds(&tier, 1, len);
    assert_eq!(tier.verify(ChunkKey(2)).unwrap(), Some(true));
    let loc = tier.locate(ChunkKey(2)).unwrap();
    flip_byte(&loc.segment, loc.payload_offset + loc.payload_len - 1);
    assert!(matches!(tier.get(ChunkKey(2)), Err(CacheError::Corrupt(_))));
    assert_holds(&tier, 1, len);
}

#[test]
fn compaction_over_a_corrupt_record_drops_it_without_deadlock() {
    let dir = TempDir::new().unwrap();
    // 8 MiB budget: 1 MiB segments holding three 300 KiB records each.
    let tier = std::sync::Arc::new(open(dir.path(), 8 << 20));
    for k in 0..3 {
        put(&tier, k, 300 << 10);
    }
    let loc = tier.locate(ChunkKey(0)).unwrap();
    assert_eq!(tier.locate(ChunkKey(2)).unwrap().segment, loc.segment);
    flip_byte(&loc.segment, loc.payload_offset + 77);
    assert!(
        tier.remove(ChunkKey(1)).unwrap(),
        "garbage in the first segment"
    );
    // Filling the budget compacts the first segment, reading the damaged record under the
    // writer lock. Run it on a thread so a deadlock fails the test instead of hanging it.
    let (done, wait) = std::sync::mpsc::channel();
    let t = tier.clone();
    std::thread::spawn(move || {
        for k in 10..40 {
            let _ = t.put(ChunkKey(k), &meta(300 << 10), &payload(k as u64, 300 << 10));
        }
        let _ = done.send(());
    });
    wait.recv_timeout(std::time::Duration::from_secs(60))
        .expect("puts that compact a segment holding a corrupt record must finish");
    assert!(tier.stats().segments_compacted > 0, "{:?}", tier.stats());
    assert!(
        !tier.contains(ChunkKey(0)),
        "the damaged record is dropped, never copied"
    );
    assert!(tier.get(ChunkKey(0)).unwrap().is_none());
}
