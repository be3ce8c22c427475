//! GPU tier tests. Those that need a device print "gpu tests: ... skipped, not run" and return
//! when there is none, unless `KVTIER_REQUIRE_GPU=1` (set on GPU machines), which turns a
//! missing device into a failure. The no-driver path is tested wherever there is no driver.

use std::sync::Arc;

use kvtier_cache::conformance::{self, payload};
use kvtier_cache::host::{HeapArenas, HostConfig, HostTier};
use kvtier_cache::{CacheError, ChunkKey, ChunkMeta, Tier};
use kvtier_offload::gpu::{
    self, DeviceBuffer, GpuBudget, GpuConfig, GpuDevice, GpuError, GpuTier, PageCopier,
    PinnedArenas,
};

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta::raw(1, 2, 16, 0, len as u64)
}

fn tier(dev: &Arc<GpuDevice>, budget: u64) -> GpuTier {
    GpuTier::on_device(
        dev.clone(),
        &GpuConfig::with_budget(GpuBudget::Bytes(budget)),
    )
    .unwrap()
}

#[test]
fn without_a_driver_everything_reports_a_clean_error() {
    if gpu::is_driver_present() {
        assert!(!gpu::gpu_required() || GpuDevice::open(0).is_ok());
        gpu::say("gpu tests: a cuda driver is present, the no-driver path was not exercised");
        return;
    }
    assert!(matches!(GpuDevice::open(0), Err(GpuError::NoDriver)));
    let e = GpuTier::open(&GpuConfig::with_budget(GpuBudget::Bytes(1 << 20)))
        .err()
        .expect("no tier without a driver");
    assert_eq!(
        e.to_string(),
        "no cuda driver found (libcuda could not be loaded); gpu features are disabled"
    );
    assert!(matches!(gpu::probe(0), Err(GpuError::NoDriver)));
    let c: CacheError = e.into();
    assert!(
        c.to_string()
            .starts_with("gpu tier backend error: no cuda driver"),
        "{c}"
    );
    assert!(
        !gpu::gpu_required(),
        "KVTIER_REQUIRE_GPU=1 but no cuda driver is present"
    );
}

#[test]
fn telemetry_lists_gpus_or_says_why_not() {
    match gpu::gpu_stats() {
        Ok(stats) => {
            for s in &stats {
                assert!(s.memory_total_bytes > 0 && s.memory_used_bytes <= s.memory_total_bytes);
                assert!(!s.name.is_empty());
            }
            if gpu::gpu_required() {
                assert!(
                    !stats.is_empty(),
                    "KVTIER_REQUIRE_GPU=1 but nvml lists no gpu"
                );
            }
            gpu::say(&format!(
                "gpu tests: nvml sees {} gpu(s): {stats:?}",
                stats.len()
            ));
        }
        Err(e) => {
            assert!(!gpu::gpu_required(), "KVTIER_REQUIRE_GPU=1 but {e}");
            assert!(e.to_string().starts_with("nvml: not available"), "{e}");
            let (list, why) = gpu::telemetry::gpu_stats_or_empty();
            assert!(list.is_empty() && why.is_some());
            gpu::say(&format!("gpu tests: telemetry without nvml checked ({e})"));
        }
    }
}

#[test]
fn conformance_on_the_device() {
    let Some(dev) = gpu::test_device("conformance_on_the_device") else {
        return;
    };
    conformance::run_all(&|budget| Box::new(tier(&dev, budget)));
    gpu::say(&format!(
        "gpu tests: conformance suite passed on {:?}",
        dev.info().unwrap().name
    ));
}

#[test]
fn large_chunks_round_trip_and_get_into_checks_length() {
    let Some(dev) = gpu::test_device("large_chunks_round_trip") else {
        return;
    };
    let t = tier(&dev, 256 << 20);
    for (i, len) in [(32usize << 20) + 3, 32 << 20, 5 << 20]
        .into_iter()
        .enumerate()
    {
        let k = ChunkKey(i as u128);
        let data = payload(i as u64 + 40, len);
        t.put(k, &meta(len), &data).unwrap();
        let (_, got) = t.get(k).unwrap().unwrap();
        assert!(got[..] == data[..], "get of {len} bytes");
        let mut dst = dev.pinned(len).unwrap();
        t.get_into(k, &mut dst).unwrap().unwrap();
        assert!(dst[..] == data[..], "get_into of {len} bytes");
        let mut short = vec![0u8; len - 1];
        assert!(matches!(
            t.get_into(k, &mut short),
            Err(CacheError::LengthMismatch { .. })
        ));
        assert_eq!(t.verify(k).unwrap(), Some(true));
    }
    assert!(t.get_into(ChunkKey(99), &mut [0u8; 4]).unwrap().is_none());
}

#[test]
fn corrupted_device_bytes_are_detected_and_never_served() {
    let Some(dev) = gpu::test_device("corrupted_device_bytes") else {
        return;
    };
    let t = tier(&dev, 64 << 20);
    let k = ChunkKey(7);
    let data = payload(7, 3 << 20);
    t.put(k, &meta(data.len()), &data).unwrap();
    let (addr, len) = t.device_addr(k).unwrap();
    assert_eq!(len, data.len());
    // SAFETY: the range is the chunk's own slot; nothing else uses the tier meanwhile.
    unsafe { dev.htod(addr + (2 << 20) + 5, &[0xAB, 0xCD]) }.unwrap();
    match t.get(k) {
        Err(CacheError::Corrupt(m)) => assert!(m.contains("checksum"), "{m}"),
        other => panic!("corrupt chunk served or wrong error: {other:?}"),
    }
    assert_eq!(t.verify(k).unwrap(), Some(false));
}

#[test]
fn fraction_of_free_memory_budget() {
    let Some(dev) = gpu::test_device("fraction_of_free_memory_budget") else {
        return;
    };
    let (free, total) = dev.mem_info().unwrap();
    assert!(free <= total && free > 0);
    let cfg = GpuConfig::with_budget(GpuBudget::FractionOfFree(0.01));
    let t = GpuTier::on_device(dev.clone(), &cfg).unwrap();
    let b = t.usage().budget;
    assert!(b > 0 && b <= free / 100 + 1, "budget {b} of free {free}");
    let bad = GpuConfig::with_budget(GpuBudget::FractionOfFree(1.5));
    assert!(matches!(
        GpuTier::on_device(dev, &bad),
        Err(GpuError::Config(_))
    ));
}

#[test]
fn pinned_host_arenas_serve_the_host_tier() {
    let Some(dev) = gpu::test_device("pinned_host_arenas") else {
        return;
    };
    let alloc = PinnedArenas::new(Box::new(HeapArenas), dev.clone());
    let stats = alloc.stats();
    let host = HostTier::with_allocator(
        HostConfig {
            budget_bytes: 64 << 20,
            arena_bytes: 16 << 20,
        },
        Box::new(alloc),
    );
    let data = payload(3, 1 << 20);
    host.put(ChunkKey(1), &meta(data.len()), &data).unwrap();
    let (_, slot) = host.get(ChunkKey(1)).unwrap().unwrap();
    assert_eq!(
        stats
            .failed_arenas
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "{:?}",
        stats.last_error.lock()
    );
    assert!(
        stats
            .pinned_arenas
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // A copy from the registered slot to the device and back is bit-exact.
    let t = tier(&dev, 16 << 20);
    t.put(ChunkKey(2), &meta(slot.len()), &slot).unwrap();
    assert!(t.get(ChunkKey(2)).unwrap().unwrap().1[..] == data[..]);
}

#[test]
fn gather_and_scatter_move_scattered_pages_bit_exact() {
    let Some(dev) = gpu::test_device("gather_and_scatter") else {
        return;
    };
    let copier = match PageCopier::new(dev.clone()) {
        Ok(c) => c,
        Err(e) if gpu::gpu_required() => panic!("KVTIER_REQUIRE_GPU=1 but {e}"),
        Err(e) => {
            gpu::say(&format!("gpu tests: gather skipped, not run: {e}"));
            return;
        }
    };
    let page = 32 << 10;
    let pages = 64usize;
    let mut pool = DeviceBuffer::new(&dev, pages * page).unwrap();
    let mut staging = DeviceBuffer::new(&dev, 16 * page).unwrap();
    let content = payload(11, pages * page);
    pool.upload(0, &content).unwrap();
    let ids = [
        5usize, 63, 0, 17, 18, 40, 2, 9, 33, 34, 35, 60, 1, 12, 44, 50,
    ];
    let offs: Vec<usize> = ids.iter().map(|&i| i * page).collect();
    copier.gather(&pool, &offs, page, &mut staging, 0).unwrap();
    let mut out = vec![0u8; 16 * page];
    staging.download(0, &mut out).unwrap();
    for (j, &i) in ids.iter().enumerate() {
        assert!(
            out[j * page..(j + 1) * page] == content[i * page..(i + 1) * page],
            "page {i}"
        );
    }
    // The per-page path gives the same bytes.
    let mut naive = vec![0u8; 16 * page];
    pool.download_pages(&offs, page, &mut naive).unwrap();
    assert!(naive == out);
    // Scatter back into other pages, then read the whole pool.
    let targets: Vec<usize> = (0..16).map(|j| (j * 4 + 3) * page).collect();
    copier
        .scatter(&staging, 0, &mut pool, &targets, page)
        .unwrap();
    let mut all = vec![0u8; pages * page];
    pool.download(0, &mut all).unwrap();
    for (j, &i) in ids.iter().enumerate() {
        let t = j * 4 + 3;
        assert!(all[t * page..(t + 1) * page] == content[i * page..(i + 1) * page]);
    }
    // Misaligned, out-of-bounds and overlapping requests are refused before any launch.
    let refused = |r: Result<(), GpuError>| assert!(matches!(r, Err(GpuError::Config(_))), "{r:?}");
    refused(copier.gather(&pool, &[1], page, &mut staging, 0));
    refused(copier.gather(&pool, &[pages * page], page, &mut staging, 0));
    refused(copier.gather(&pool, &offs, page, &mut staging, page));
    refused(copier.scatter(&staging, 0, &mut pool, &[0, page / 2], page));
    refused(pool.upload_pages(&[0, 16], page, &vec![0u8; 2 * page]));
    refused(staging.download(16 * page - 1, &mut [0u8; 2]));
}

#[test]
fn the_store_promotes_hot_chunks_to_the_gpu_and_serves_them_back_bit_exact() {
    use kvtier_cache::{StoreConfig, TierKind, TieredStore};
    let Some(dev) = gpu::test_device("store_with_a_gpu_level") else {
        return;
    };
    const LEN: usize = 2 << 20;
    let host = Arc::new(HostTier::with_allocator(
        HostConfig {
            budget_bytes: 2 * LEN as u64,
            arena_bytes: 4 << 20,
        },
        Box::new(HeapArenas),
    ));
    let gpu_tier = Arc::new(tier(&dev, 8 * LEN as u64));
    let store = TieredStore::new(StoreConfig::default(), host, Vec::new()).with_device(gpu_tier);
    let m = ChunkMeta::raw(1, 2, 16, 0, LEN as u64);
    let want = payload(7, LEN);
    store.put(ChunkKey(1), m, &want).unwrap();
    for _ in 0..2 {
        store.get(1, ChunkKey(1), false).unwrap().hit().unwrap();
    }
    assert_eq!(store.promote_to_device(8), 1);
    // Fill the host so chunk 1 lives on the GPU only.
    for k in 2..6 {
        store.put(ChunkKey(k), m, &payload(k as u64, LEN)).unwrap();
    }
    let info = store.info(1, ChunkKey(1)).unwrap();
    assert_eq!(info.tiers.fastest(), Some(TierKind::Gpu), "{info:?}");
    assert!(!info.tiers.contains(TierKind::Host));
    let r = store.get(1, ChunkKey(1), false).unwrap().hit().unwrap();
    assert_eq!(r.tier, TierKind::Gpu);
    assert!(r.bytes == want, "gpu copy served different bytes");
    assert!(
        store
            .info(1, ChunkKey(1))
            .unwrap()
            .tiers
            .contains(TierKind::Host)
    );
    gpu::say("gpu tests: store with a gpu level ran on the device");
}
