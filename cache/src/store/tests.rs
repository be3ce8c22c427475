//! Store behaviour: round trips, tenants, lookup, eviction order, leases, admission, promotion,
//! restart, and a property test against a simple model.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::error::CacheError;
use crate::host::HostTier;
use crate::host::{HostConfig, slot_size_for};
use crate::key::{ChunkKey, Namespace};
use crate::memory::MemoryTier;
use crate::tier::Fidelity;
use crate::tier::{ChunkMeta, Tier, TierKind};

const T: u64 = 7;
const CHUNK: usize = 10_000;

fn meta(depth: u32) -> ChunkMeta {
    ChunkMeta::raw(T, 1, 4, depth, CHUNK as u64)
}

fn data(seed: u128) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect()
}

/// A store whose host holds exactly `host_chunks` chunks of CHUNK bytes, over a disk stand-in.
fn store(host_chunks: u64, disk: Option<Arc<MemoryTier>>, cfg: StoreConfig) -> TieredStore {
    let slot = slot_size_for(CHUNK) as u64;
    let host = Arc::new(HostTier::new(HostConfig {
        budget_bytes: host_chunks * slot,
        arena_bytes: 1 << 20,
    }));
    let lower: Vec<Arc<dyn Tier>> = disk.into_iter().map(|d| d as Arc<dyn Tier>).collect();
    TieredStore::new(cfg, host, lower)
}

fn get_bytes(s: &TieredStore, key: u128) -> Option<Vec<u8>> {
    s.get(T, ChunkKey(key), false)
        .unwrap()
        .hit()
        .map(|r| r.bytes.to_vec())
}

#[test]
fn put_get_round_trip_and_tenant_isolation() {
    let s = store(4, None, StoreConfig::default());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    assert_eq!(get_bytes(&s, 1).unwrap(), data(1));
    assert!(matches!(
        s.get(T + 1, ChunkKey(1), false).unwrap(),
        GetOutcome::Miss
    ));
    assert!(
        !s.delete(T + 1, ChunkKey(1)).unwrap(),
        "another tenant cannot delete"
    );
    assert!(s.list(T + 1, None, None, 10).is_empty());
    assert!(s.info(T + 1, ChunkKey(1)).is_none());
    assert!(s.delete(T, ChunkKey(1)).unwrap());
    assert!(get_bytes(&s, 1).is_none());
}

#[test]
fn length_mismatch_is_refused() {
    let s = store(4, None, StoreConfig::default());
    let err = s.put(ChunkKey(1), meta(0), &data(1)[..100]).unwrap_err();
    assert!(matches!(err, CacheError::LengthMismatch { .. }), "{err}");
}

#[test]
fn lookup_stops_at_first_miss_and_respects_tenants() {
    let s = store(8, None, StoreConfig::default());
    let ns = Namespace::new(1, "alice").with_chunk_tokens(4);
    let tokens: Vec<u32> = (0..20).collect();
    let keys = ns.chunk_keys(&tokens);
    let tid = ns.tenant_id();
    for (i, k) in keys.iter().enumerate() {
        if i != 3 {
            s.put(*k, ChunkMeta::raw(tid, 1, 4, i as u32, 8), &[i as u8; 8])
                .unwrap();
        }
    }
    let r = s.lookup(&ns, &tokens);
    assert_eq!(r.chunks.len(), 3);
    assert_eq!(r.hit_tokens, 12);
    assert_eq!(r.chunks[1].key, keys[1]);
    assert!(r.chunks[0].tiers.contains(TierKind::Host));
    // Same tokens under another tenant: nothing.
    let bob = Namespace::new(1, "bob").with_chunk_tokens(4);
    assert_eq!(s.lookup(&bob, &tokens).hit_tokens, 0);
}

#[test]
fn eviction_drops_tail_before_head_and_respects_budget() {
    let s = store(3, None, StoreConfig::default());
    let ns = Namespace::new(1, "t").with_chunk_tokens(4);
    let tokens: Vec<u32> = (0..12).collect();
    let keys = ns.chunk_keys(&tokens);
    for (i, k) in keys.iter().enumerate() {
        s.put(
            *k,
            ChunkMeta::raw(ns.tenant_id(), 1, 4, i as u32, CHUNK as u64),
            &data(i as u128),
        )
        .unwrap();
    }
    // One lookup makes the whole prefix equally recent; a new chunk must push out the tail.
    assert_eq!(s.lookup(&ns, &tokens).chunks.len(), 3);
    s.put(ChunkKey(99), meta(0), &data(99)).unwrap();
    let r = s.lookup(&ns, &tokens);
    assert_eq!(r.chunks.len(), 2, "the deepest chunk goes first");
    let host = &s.stats().tiers[0];
    assert!(host.usage.bytes <= host.usage.budget);
    assert_eq!(host.evictions, 1);
}

#[test]
fn leases_pin_until_released_or_expired() {
    let s = store(2, None, StoreConfig::default());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    s.put(ChunkKey(2), meta(0), &data(2)).unwrap();
    let lease = s.lease(T, ChunkKey(1), Duration::from_secs(60)).unwrap();
    let short = s.lease(T, ChunkKey(2), Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    // Chunk 1 is the oldest but leased; chunk 2's lease has expired, so it goes.
    s.put(ChunkKey(3), meta(0), &data(3)).unwrap();
    assert!(get_bytes(&s, 1).is_some());
    assert!(get_bytes(&s, 2).is_none());
    assert!(matches!(
        s.release(short.id),
        Err(CacheError::LeaseNotFound(_))
    ));
    // With every chunk pinned, a put that needs room fails cleanly instead of evicting.
    let _l3 = s.lease(T, ChunkKey(3), Duration::from_secs(60)).unwrap();
    let err = s.put(ChunkKey(4), meta(0), &data(4)).unwrap_err();
    assert!(matches!(err, CacheError::TierFull { .. }), "{err}");
    s.release(lease.id).unwrap();
    s.put(ChunkKey(4), meta(0), &data(4)).unwrap();
    assert!(get_bytes(&s, 1).is_none(), "released chunk was evicted");
    assert!(matches!(
        s.lease(T + 1, ChunkKey(4), Duration::from_secs(1)),
        Err(CacheError::NotFound(_))
    ));
}

#[test]
fn expired_leases_are_reaped_from_the_table() {
    let s = store(4, None, StoreConfig::default());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    let short = s.lease(T, ChunkKey(1), Duration::from_millis(1)).unwrap();
    let long = s.lease(T, ChunkKey(1), Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(s.stats().leases, 2);
    assert_eq!(s.reap_leases(), 1, "only the expired lease goes");
    assert_eq!(s.stats().leases, 1);
    assert!(matches!(
        s.release(short.id),
        Err(CacheError::LeaseNotFound(_))
    ));
    s.release(long.id).unwrap();
}

#[test]
fn admission_keeps_one_off_chunks_off_disk() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 30));
    let s = store(1, Some(disk.clone()), StoreConfig::default());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap(); // seen once
    s.put(ChunkKey(2), meta(0), &data(2)).unwrap(); // evicts 1: not admitted
    assert!(!disk.contains(ChunkKey(1)));
    get_bytes(&s, 2).unwrap(); // 2 seen twice
    s.put(ChunkKey(3), meta(0), &data(3)).unwrap(); // evicts 2: admitted
    assert!(disk.contains(ChunkKey(2)));
    let st = s.stats();
    assert_eq!(st.tiers[1].demotions, 1);
    // A disk hit is served bit-exact and promoted back to host.
    let r = s.get(T, ChunkKey(2), false).unwrap().hit().unwrap();
    assert_eq!(r.tier, TierKind::Disk);
    assert_eq!(&r.bytes[..], &data(2)[..]);
    let info = s.info(T, ChunkKey(2)).unwrap();
    assert!(info.tiers.contains(TierKind::Host) && info.tiers.contains(TierKind::Disk));
    assert_eq!(s.stats().tiers[0].promotions, 1);
}

#[test]
fn write_through_and_restart_keep_chunks() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 30));
    let cfg = StoreConfig {
        write_mode: WriteMode::WriteThrough,
        ..StoreConfig::default()
    };
    let s = store(4, Some(disk.clone()), cfg.clone());
    for i in 0..3 {
        s.put(ChunkKey(i), meta(i as u32), &data(i)).unwrap();
    }
    assert_eq!(disk.usage().chunks, 3);
    drop(s);
    let s = store(4, Some(disk), cfg);
    for i in 0..3 {
        assert_eq!(get_bytes(&s, i).unwrap(), data(i));
    }
}

#[test]
fn lossy_chunks_never_reach_exact_readers() {
    let s = store(4, None, StoreConfig::default());
    let mut m = meta(0);
    m.codec = 9;
    m.fidelity = Fidelity::Lossy {
        codec: 9,
        error_bound: 0.01,
    };
    s.put(ChunkKey(1), m, &data(1)).unwrap();
    assert!(matches!(
        s.get(T, ChunkKey(1), false).unwrap(),
        GetOutcome::FidelityRejected(_)
    ));
    assert!(s.get(T, ChunkKey(1), true).unwrap().hit().is_some());
}

#[test]
fn events_report_stored_and_removed() {
    let s = store(1, None, StoreConfig::default());
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    s.subscribe(move |e| sink.lock().push(e.clone()));
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    s.put(ChunkKey(2), meta(0), &data(2)).unwrap(); // evicts 1 (no lower tier)
    let ev = seen.lock().clone();
    assert!(matches!(
        ev[0],
        StoreEvent::Stored {
            key: ChunkKey(1),
            ..
        }
    ));
    assert!(ev.iter().any(|e| matches!(
        e,
        StoreEvent::Removed {
            key: ChunkKey(1),
            ..
        }
    )));
}

#[test]
fn concurrent_puts_and_gets_see_only_their_bytes() {
    let s = Arc::new(store(16, None, StoreConfig::default()));
    std::thread::scope(|sc| {
        for t in 0..4u128 {
            let s = s.clone();
            sc.spawn(move || {
                for i in 0..200u128 {
                    let k = t * 1000 + i % 20;
                    s.put(ChunkKey(k), meta(0), &data(k)).unwrap();
                    if let Some(b) = get_bytes(&s, k) {
                        assert_eq!(b, data(k));
                    }
                }
            });
        }
    });
    let host = &s.stats().tiers[0];
    assert!(host.usage.bytes <= host.usage.budget);
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8),
    Get(u8),
    Lease(u8),
    Delete(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12).prop_map(Op::Put),
        (0u8..12).prop_map(Op::Get),
        (0u8..12).prop_map(Op::Lease),
        (0u8..12).prop_map(Op::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random put/get/lease/delete against a model: never foreign bytes, never over budget,
    /// a deleted chunk never comes back, a leased chunk is never evicted.
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let disk = Arc::new(MemoryTier::new(TierKind::Disk, 6 * CHUNK as u64));
        let s = store(3, Some(disk), StoreConfig::default());
        let mut model: HashMap<u8, bool> = HashMap::new(); // key -> leased
        for op in ops {
            match op {
                Op::Put(k) => match s.put(ChunkKey(k as u128), meta(0), &data(k as u128)) {
                    Ok(()) => { model.entry(k).or_insert(false); }
                    Err(CacheError::TierFull { .. }) => {}
                    Err(e) => panic!("put: {e}"),
                },
                Op::Get(k) => {
                    if let Some(b) = get_bytes(&s, k as u128) {
                        prop_assert!(model.contains_key(&k), "served a chunk never put or deleted");
                        prop_assert_eq!(b, data(k as u128));
                    } else {
                        prop_assert!(model.get(&k) != Some(&true), "leased chunk {} vanished", k);
                    }
                }
                Op::Lease(k) => {
                    if s.lease(T, ChunkKey(k as u128), Duration::from_secs(60)).is_ok() {
                        prop_assert!(model.contains_key(&k));
                        model.insert(k, true);
                    }
                }
                Op::Delete(k) => {
                    s.delete(T, ChunkKey(k as u128)).unwrap();
                    model.remove(&k);
                }
            }
            for t in s.stats().tiers {
                prop_assert!(t.usage.bytes <= t.usage.budget, "{:?} over budget", t);
            }
        }
    }
}

#[test]
fn the_store_says_which_reads_and_puts_may_block() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 30));
    let cfg = StoreConfig {
        admit_after: 0,
        ..StoreConfig::default()
    };
    let s = store(1, Some(disk.clone()), cfg);
    assert!(!s.put_may_block(), "write-back puts stay in memory");
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    assert!(!s.read_may_block(T, &[ChunkKey(1)]));
    s.put(ChunkKey(2), meta(0), &data(2)).unwrap(); // demotes 1 to disk
    assert!(s.read_may_block(T, &[ChunkKey(2), ChunkKey(1)]));
    assert!(
        !s.read_may_block(T + 1, &[ChunkKey(1)]),
        "another tenant's chunk"
    );
    assert!(!s.read_may_block(T, &[ChunkKey(9)]), "a miss reads nothing");
    let host = s.tier_stats(TierKind::Host).unwrap();
    assert_eq!((host.usage.chunks, host.evictions), (1, 1));
    assert_eq!(s.tier_stats(TierKind::Disk).unwrap().demotions, 1);
    assert!(s.tier_stats(TierKind::Remote).is_none());
    let through = StoreConfig {
        write_mode: WriteMode::WriteThrough,
        ..StoreConfig::default()
    };
    assert!(store(1, Some(disk), through.clone()).put_may_block());
    assert!(
        !store(1, None, through).put_may_block(),
        "nothing to write through to"
    );
}

#[test]
fn adopted_views_are_ordinary_chunks_and_evict_to_make_room() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 30));
    let s = store(2, Some(disk), StoreConfig::default());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    s.put(ChunkKey(2), meta(1), &data(2)).unwrap();
    // The host is full of slots: adopting a view evicts (demotes) to make room.
    s.put_view(ChunkKey(3), meta(2), bytes::Bytes::from(data(3)))
        .unwrap();
    assert_eq!(get_bytes(&s, 3).unwrap(), data(3));
    let host = s.host().usage();
    assert!(host.bytes <= host.budget && host.chunks == 2, "{host:?}");
    assert!(matches!(
        s.get(T + 1, ChunkKey(3), false).unwrap(),
        GetOutcome::Miss
    ));
    assert!(s.delete(T, ChunkKey(3)).unwrap());
    assert!(get_bytes(&s, 3).is_none());
}
