//! The store with a transcoder: encoded in slower tiers, decoded on the way back, fidelity kept.

use std::sync::Arc;

use super::*;
use crate::encoding::EncodingTier;
use crate::error::{CacheError, Result};
use crate::host::HostTier;
use crate::host::{HostConfig, slot_size_for};
use crate::key::ChunkKey;
use crate::memory::MemoryTier;
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, Tier, TierKind};
use crate::transcode::{Encoded, Transcoder};

const T: u64 = 3;
const CHUNK: usize = 4096;
const LOSSLESS: u16 = 50;
const LOSSY: u16 = 51;
const BOUND: f32 = 0.02;

/// Test codec: "lossless" stores the bytes reversed plus a trailer byte; "lossy" keeps the first
/// half with low bits cleared and decodes it twice. Tenant 4 allows lossy data.
struct Toy;

impl Transcoder for Toy {
    fn owns(&self, codec: u16) -> bool {
        codec == LOSSLESS || codec == LOSSY
    }

    fn encode(&self, tier: TierKind, meta: &ChunkMeta, raw: &[u8]) -> Result<Option<Encoded>> {
        if tier != TierKind::Disk {
            return Ok(None);
        }
        if meta.tenant == 4 {
            return Ok(Some(Encoded {
                codec: LOSSY,
                fidelity: Fidelity::Lossy {
                    codec: LOSSY,
                    error_bound: BOUND,
                },
                payload: raw[..raw.len() / 2].iter().map(|b| b & !1).collect(),
            }));
        }
        let mut p: Vec<u8> = raw.iter().rev().copied().collect();
        p.push(0xee);
        Ok(Some(Encoded {
            codec: LOSSLESS,
            fidelity: Fidelity::Lossless,
            payload: p,
        }))
    }

    fn decode(&self, meta: &ChunkMeta, payload: &[u8]) -> Result<Vec<u8>> {
        match meta.codec {
            LOSSLESS if payload.last() == Some(&0xee) => {
                Ok(payload[..payload.len() - 1].iter().rev().copied().collect())
            }
            LOSSY => Ok(payload.iter().chain(payload.iter()).copied().collect()),
            _ => Err(CacheError::Codec("not a toy payload".into())),
        }
    }
}

fn data(seed: u8) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

fn meta(tenant: u64) -> ChunkMeta {
    ChunkMeta::raw(tenant, 1, 4, 0, CHUNK as u64)
}

fn store(disk: &Arc<MemoryTier>, mode: WriteMode) -> TieredStore {
    let host = Arc::new(HostTier::new(HostConfig {
        budget_bytes: slot_size_for(CHUNK) as u64,
        arena_bytes: 1 << 20,
    }));
    let cfg = StoreConfig {
        write_mode: mode,
        admit_after: 0,
        ..StoreConfig::default()
    };
    let lower: Vec<Arc<dyn Tier>> = vec![Arc::new(EncodingTier::new(disk.clone(), Arc::new(Toy)))];
    TieredStore::new(cfg, host, lower)
}

#[test]
fn lossless_copies_are_encoded_on_disk_and_served_raw_and_exact() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 20));
    let s = store(&disk, WriteMode::WriteBack);
    s.put(ChunkKey(1), meta(T), &data(1)).unwrap();
    s.put(ChunkKey(2), meta(T), &data(2)).unwrap(); // evicts 1 to disk
    let (rec, stored) = disk.get(ChunkKey(1)).unwrap().unwrap();
    assert_eq!((rec.codec, rec.fidelity), (LOSSLESS, Fidelity::Lossless));
    assert_ne!(stored.to_vec(), data(1), "stored encoded");
    let copies = s.copies(T, ChunkKey(1)).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].stored_bytes, CHUNK as u64 + 1);
    // Exact readers get the raw bytes back, tagged raw and exact.
    let r = s.get(T, ChunkKey(1), false).unwrap().hit().unwrap();
    assert_eq!(r.bytes.to_vec(), data(1));
    assert_eq!(
        (r.meta.codec, r.meta.fidelity),
        (CODEC_RAW, Fidelity::Exact)
    );
    assert_eq!(r.tier, TierKind::Disk);
    // Promoted: the host copy is raw.
    let h = s.get(T, ChunkKey(1), false).unwrap().hit().unwrap();
    assert_eq!((h.tier, h.bytes.to_vec()), (TierKind::Host, data(1)));
}

#[test]
fn lossy_copies_are_never_served_to_exact_readers_and_survive_restart() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 20));
    let s = store(&disk, WriteMode::WriteBack);
    s.put(ChunkKey(1), meta(4), &data(1)).unwrap();
    // In host only: exact.
    assert_eq!(s.lookup_fidelity(4, ChunkKey(1)), Some(Fidelity::Exact));
    s.put(ChunkKey(2), meta(4), &data(2)).unwrap(); // 1 goes to disk, lossy
    let lossy = Fidelity::Lossy {
        codec: LOSSY,
        error_bound: BOUND,
    };
    assert_eq!(s.lookup_fidelity(4, ChunkKey(1)), Some(lossy));
    assert_eq!(s.info(4, ChunkKey(1)).unwrap().meta.fidelity, lossy);
    assert!(matches!(
        s.get(4, ChunkKey(1), false).unwrap(),
        GetOutcome::FidelityRejected(f) if f == lossy
    ));
    let r = s.get(4, ChunkKey(1), true).unwrap().hit().unwrap();
    assert_eq!(r.meta.fidelity, lossy);
    let want: Vec<u8> = data(1)[..CHUNK / 2]
        .iter()
        .chain(data(1)[..CHUNK / 2].iter())
        .map(|b| b & !1)
        .collect();
    assert_eq!(r.bytes.to_vec(), want);
    // The promoted host copy is lossy too: still refused to exact readers.
    assert!(matches!(
        s.get(4, ChunkKey(1), false).unwrap(),
        GetOutcome::FidelityRejected(_)
    ));
    drop(s);
    // A restart rebuilds the index from the lossy record: still lossy.
    let s = store(&disk, WriteMode::WriteBack);
    assert_eq!(s.lookup_fidelity(4, ChunkKey(1)), Some(lossy));
    assert!(matches!(
        s.get(4, ChunkKey(1), false).unwrap(),
        GetOutcome::FidelityRejected(_)
    ));
    // An exact re-put makes it exact again.
    s.put(ChunkKey(1), meta(4), &data(1)).unwrap();
    assert_eq!(
        s.get(4, ChunkKey(1), false)
            .unwrap()
            .hit()
            .unwrap()
            .bytes
            .to_vec(),
        data(1)
    );
}

#[test]
fn write_through_keeps_an_exact_host_copy_beside_a_lossy_disk_copy() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 20));
    let s = store(&disk, WriteMode::WriteThrough);
    s.put(ChunkKey(1), meta(4), &data(1)).unwrap();
    assert_eq!(disk.get(ChunkKey(1)).unwrap().unwrap().0.codec, LOSSY);
    let r = s.get(4, ChunkKey(1), false).unwrap().hit().unwrap();
    assert_eq!((r.tier, r.bytes.to_vec()), (TierKind::Host, data(1)));
    assert_eq!(s.lookup_fidelity(4, ChunkKey(1)), Some(Fidelity::Exact));
}

#[test]
fn undecodable_records_are_corrupt_and_never_served() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 20));
    let s = store(&disk, WriteMode::WriteBack);
    s.put(ChunkKey(1), meta(T), &data(1)).unwrap();
    s.put(ChunkKey(2), meta(T), &data(2)).unwrap();
    let (mut rec, _) = disk.get(ChunkKey(1)).unwrap().unwrap();
    rec.codec = LOSSLESS;
    disk.put(ChunkKey(1), &rec, b"garbage without trailer")
        .unwrap();
    assert!(matches!(
        s.get(T, ChunkKey(1), true).unwrap(),
        GetOutcome::Miss
    ));
    assert_eq!(s.stats().tiers[1].corrupt, 1);
}

#[test]
fn clients_cannot_put_payloads_tagged_with_the_store_codecs() {
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 20));
    let s = store(&disk, WriteMode::WriteBack);
    let mut m = meta(T);
    m.codec = LOSSLESS;
    assert!(matches!(
        s.put(ChunkKey(1), m, &data(1)),
        Err(CacheError::ReservedCodec(LOSSLESS))
    ));
    // Private codec ids are stored untouched, in every tier.
    m.codec = 900;
    s.put(ChunkKey(1), m, &data(1)).unwrap();
    s.put(ChunkKey(2), meta(T), &data(2)).unwrap();
    let (rec, b) = disk.get(ChunkKey(1)).unwrap().unwrap();
    assert_eq!((rec.codec, b.to_vec()), (900, data(1)));
}

impl TieredStore {
    fn lookup_fidelity(&self, tenant: u64, key: ChunkKey) -> Option<Fidelity> {
        self.info(tenant, key).map(|i| i.meta.fidelity)
    }
}
