//! The device level above host: promotion of hot host chunks, reads of device-only chunks,
//! demotion back to host when the device makes room, and deletes and replacements reaching it.

use std::sync::Arc;

use super::*;
use crate::host::{HostConfig, HostTier, slot_size_for};
use crate::key::ChunkKey;
use crate::memory::MemoryTier;
use crate::tier::{ChunkMeta, Tier, TierKind};

const T: u64 = 3;
const CHUNK: usize = 8_000;

fn meta(depth: u32) -> ChunkMeta {
    ChunkMeta::raw(T, 1, 4, depth, CHUNK as u64)
}

fn data(seed: u128) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (seed as usize * 13 + i * 5) as u8)
        .collect()
}

/// A store with `host_chunks` of host room, `device_chunks` of device room (a memory tier of
/// kind gpu) and a disk stand-in.
fn store(host_chunks: u64, device_chunks: u64) -> (TieredStore, Arc<MemoryTier>, Arc<MemoryTier>) {
    let slot = slot_size_for(CHUNK) as u64;
    let host = Arc::new(HostTier::new(HostConfig {
        budget_bytes: host_chunks * slot,
        arena_bytes: 1 << 20,
    }));
    let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 30));
    let device = Arc::new(MemoryTier::new(TierKind::Gpu, device_chunks * CHUNK as u64));
    let s = TieredStore::new(
        StoreConfig::default(),
        host,
        vec![disk.clone() as Arc<dyn Tier>],
    )
    .with_device(device.clone());
    (s, device, disk)
}

fn read(s: &TieredStore, k: u128) -> Option<(Vec<u8>, TierKind)> {
    s.get(T, ChunkKey(k), false)
        .unwrap()
        .hit()
        .map(|r| (r.bytes.to_vec(), r.tier))
}

#[test]
fn a_hot_host_chunk_is_copied_up_and_a_cold_one_is_not() {
    let (s, device, _) = store(8, 8);
    assert!(s.has_device());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    s.put(ChunkKey(2), meta(0), &data(2)).unwrap();
    // Key 1: put + two reads; key 2: put only (never read, so never queued).
    assert_eq!(read(&s, 1).unwrap(), (data(1), TierKind::Host));
    assert_eq!(read(&s, 1).unwrap(), (data(1), TierKind::Host));
    assert_eq!(s.device_queue_len(), 1);
    assert_eq!(s.promote_to_device(16), 1);
    assert_eq!(s.device_queue_len(), 0);
    assert!(device.contains(ChunkKey(1)));
    assert!(!device.contains(ChunkKey(2)));
    assert_eq!(
        device.get(ChunkKey(1)).unwrap().unwrap().1.to_vec(),
        data(1)
    );
    let info = s.info(T, ChunkKey(1)).unwrap();
    assert!(info.tiers.contains(TierKind::Gpu) && info.tiers.contains(TierKind::Host));
    // Host copies are still what reads are served from.
    assert_eq!(read(&s, 1).unwrap().1, TierKind::Host);
    // Already on the device: not queued again.
    assert_eq!(s.device_queue_len(), 0);
    let stats = s.stats();
    assert_eq!(stats.tiers[0].tier, TierKind::Gpu);
    assert_eq!(stats.tiers[0].promotions, 1);
    assert_eq!(stats.tiers[1].tier, TierKind::Host);
}

#[test]
fn a_device_only_chunk_is_served_from_the_device_and_promoted_to_host() {
    let (s, device, disk) = store(2, 8);
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    read(&s, 1);
    read(&s, 1);
    assert_eq!(s.promote_to_device(16), 1);
    // Push key 1 out of the host (it is admitted, so it is demoted to disk too).
    for k in 10..14 {
        s.put(ChunkKey(k), meta(0), &data(k)).unwrap();
    }
    let info = s.info(T, ChunkKey(1)).unwrap();
    assert!(!info.tiers.contains(TierKind::Host), "{info:?}");
    assert!(info.tiers.contains(TierKind::Gpu));
    // Lose the disk copy: the device copy alone must serve it.
    disk.remove(ChunkKey(1)).unwrap();
    assert!(device.contains(ChunkKey(1)));
    let (bytes, tier) = read(&s, 1).unwrap();
    assert_eq!(bytes, data(1));
    assert_eq!(tier, TierKind::Gpu);
    assert!(
        s.info(T, ChunkKey(1))
            .unwrap()
            .tiers
            .contains(TierKind::Host)
    );
    assert_eq!(read(&s, 1).unwrap().1, TierKind::Host);
}

#[test]
fn a_full_device_evicts_its_oldest_and_demotes_it_to_host_when_the_host_lost_it() {
    let (s, device, disk) = store(2, 1);
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    read(&s, 1);
    read(&s, 1);
    assert_eq!(s.promote_to_device(16), 1);
    // Key 1 leaves host and disk: the device holds the only copy.
    for k in 10..14 {
        s.put(ChunkKey(k), meta(0), &data(k)).unwrap();
    }
    disk.remove(ChunkKey(1)).unwrap();
    s.put(ChunkKey(2), meta(0), &data(2)).unwrap();
    read(&s, 2);
    read(&s, 2);
    // Room for key 2 on the device evicts key 1, which goes back down to host, not lost.
    assert_eq!(s.promote_to_device(16), 1);
    assert!(device.contains(ChunkKey(2)) && !device.contains(ChunkKey(1)));
    let info = s.info(T, ChunkKey(1)).expect("demoted, not lost");
    assert!(info.tiers.contains(TierKind::Host), "{info:?}");
    assert_eq!(read(&s, 1).unwrap(), (data(1), TierKind::Host));
    assert!(s.stats().tiers[1].demotions >= 1);
}

#[test]
fn deletes_and_replacing_puts_reach_the_device_copy() {
    let (s, device, _) = store(8, 8);
    for k in [1, 2] {
        s.put(ChunkKey(k), meta(0), &data(k)).unwrap();
        read(&s, k);
        read(&s, k);
    }
    assert_eq!(s.promote_to_device(16), 2);
    assert!(s.delete(T, ChunkKey(1)).unwrap());
    assert!(!device.contains(ChunkKey(1)));
    // Same key, other metadata: the old device copy is not this chunk.
    let mut other = meta(1);
    other.tokens = 8;
    s.put(ChunkKey(2), other, &data(9)).unwrap();
    assert!(!device.contains(ChunkKey(2)));
    assert_eq!(read(&s, 2).unwrap(), (data(9), TierKind::Host));
    // Another tenant never sees or queues them.
    assert!(s.get(T + 1, ChunkKey(2), true).unwrap().hit().is_none());
}

#[test]
fn a_queued_chunk_deleted_before_the_copy_is_skipped() {
    let (s, device, _) = store(8, 8);
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    read(&s, 1);
    read(&s, 1);
    assert_eq!(s.device_queue_len(), 1);
    s.delete(T, ChunkKey(1)).unwrap();
    assert_eq!(s.promote_to_device(16), 0);
    assert!(!device.contains(ChunkKey(1)));
    assert_eq!(device.usage().chunks, 0);
}

#[test]
fn without_a_device_nothing_is_queued() {
    let slot = slot_size_for(CHUNK) as u64;
    let host = Arc::new(HostTier::new(HostConfig {
        budget_bytes: 4 * slot,
        arena_bytes: 1 << 20,
    }));
    let s = TieredStore::new(StoreConfig::default(), host, Vec::new());
    s.put(ChunkKey(1), meta(0), &data(1)).unwrap();
    for _ in 0..4 {
        read(&s, 1);
    }
    assert!(!s.has_device());
    assert_eq!(s.device_queue_len(), 0);
    assert_eq!(s.promote_to_device(16), 0);
}
