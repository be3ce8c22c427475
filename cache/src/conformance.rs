//! The conformance suite every [`Tier`] implementation must pass.
//!
//! Backends call [`run_all`] from their own tests with a constructor for a fresh, empty tier of a
//! given budget. The checks panic with a description on failure, like any test assertion.

use crate::error::CacheError;
use crate::key::ChunkKey;
use crate::tier::{ChunkMeta, Fidelity, Tier};

/// `len` deterministic, incompressible bytes for `seed` (xorshift), shared by backend tests.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    // xorshift: deterministic, incompressible enough, no dependency.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn meta(len: usize, depth: u32) -> ChunkMeta {
    let mut m = ChunkMeta::raw(7, 11, 16, depth, len as u64);
    if depth % 2 == 1 {
        m.parent = Some(ChunkKey(depth as u128));
        m.fidelity = Fidelity::Lossy {
            codec: 3,
            error_bound: 0.01,
        };
        m.codec = 3;
    }
    m
}

/// Runs every check. `make(budget_bytes)` returns a fresh, empty tier.
pub fn run_all(make: &dyn Fn(u64) -> Box<dyn Tier>) {
    round_trip_exact_bytes(make);
    replace_and_remove(make);
    budget_is_never_exceeded(make);
    entries_lists_everything(make);
    concurrent_readers_and_writers(make);
}

/// Bytes and metadata come back exactly as put, for several sizes including empty.
pub fn round_trip_exact_bytes(make: &dyn Fn(u64) -> Box<dyn Tier>) {
    let tier = make(64 << 20);
    for (i, len) in [0usize, 1, 4095, 4096, 65_537, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let key = ChunkKey(1000 + i as u128);
        let data = payload(i as u64, len);
        let m = meta(len, i as u32);
        tier.put(key, &m, &data).unwrap();
        assert!(tier.contains(key));
        let (got_meta, got) = tier.get(key).unwrap().expect("present after put");
        assert_eq!(got_meta, m, "metadata round trip");
        assert_eq!(&got[..], &data[..], "payload round trip, len {len}");
    }
    assert!(tier.get(ChunkKey(1)).unwrap().is_none());
    assert!(!tier.contains(ChunkKey(1)));
}

/// A second put replaces the first; remove reports presence and frees the space.
pub fn replace_and_remove(make: &dyn Fn(u64) -> Box<dyn Tier>) {
    let tier = make(16 << 20);
    let key = ChunkKey(5);
    tier.put(key, &meta(1000, 0), &payload(1, 1000)).unwrap();
    tier.put(key, &meta(2000, 0), &payload(2, 2000)).unwrap();
    let (_, got) = tier.get(key).unwrap().unwrap();
    assert_eq!(&got[..], &payload(2, 2000)[..]);
    assert_eq!(tier.usage().chunks, 1);
    assert!(tier.remove(key).unwrap());
    assert!(!tier.remove(key).unwrap());
    assert!(tier.get(key).unwrap().is_none());
    assert_eq!(tier.usage().chunks, 0);
}

/// Filling past the budget fails with `TierFull` and usage never exceeds the budget; removing
/// makes room again.
pub fn budget_is_never_exceeded(make: &dyn Fn(u64) -> Box<dyn Tier>) {
    let budget = 8u64 << 20;
    let tier = make(budget);
    let len = 1 << 20;
    let mut stored = Vec::new();
    for i in 0..32u128 {
        match tier.put(ChunkKey(i), &meta(len, 0), &payload(i as u64, len)) {
            Ok(()) => stored.push(i),
            Err(CacheError::TierFull { .. }) => break,
            Err(e) => panic!("unexpected error filling tier: {e}"),
        }
        assert!(
            tier.usage().bytes <= budget,
            "usage {:?} over budget",
            tier.usage()
        );
    }
    assert!(
        !stored.is_empty() && stored.len() < 32,
        "stored {} chunks of 1 MiB in 8 MiB",
        stored.len()
    );
    for i in &stored {
        tier.remove(ChunkKey(*i)).unwrap();
    }
    tier.put(ChunkKey(999), &meta(len, 0), &payload(9, len))
        .expect("room after removal");
}

/// `entries` reports every stored key with its metadata.
pub fn entries_lists_everything(make: &dyn Fn(u64) -> Box<dyn Tier>) {
    let tier = make(16 << 20);
    for i in 0..10u128 {
        tier.put(ChunkKey(i), &meta(100, i as u32), &payload(i as u64, 100))
            .unwrap();
    }
    tier.remove(ChunkKey(3)).unwrap();
    let mut keys: Vec<u128> = tier.entries().into_iter().map(|(k, _)| k.0).collect();
    keys.sort();
    assert_eq!(keys, vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
}

/// Many threads putting and reading distinct and shared keys never see foreign bytes.
pub fn concurrent_readers_and_writers(make: &dyn Fn(u64) -> Box<dyn Tier>) {
    let tier = make(64 << 20);
    let tier = &*tier;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..50u64 {
                    let k = ChunkKey((t * 1000 + i % 10) as u128);
                    let seed = t * 1000 + i % 10;
                    let data = payload(seed, 4096 + (seed as usize % 7) * 100);
                    tier.put(k, &meta(data.len(), 0), &data).unwrap();
                    if let Some((_, got)) = tier.get(k).unwrap() {
                        assert_eq!(&got[..], &data[..], "foreign bytes under {k}");
                    }
                }
            });
        }
    });
}
