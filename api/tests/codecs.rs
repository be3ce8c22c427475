//! Codecs through the service: a configured disk codec encodes evicted chunks, gets decode them,
//! lossy tenants' copies are never served to exact readers, and `GET /v1/chunks/{key}` reports
//! each copy's codec, stored size and ratio.

use kvtier::config::{CodecName, ServeConfig};
use kvtier::service::Service;
use kvtier::testing::{TestServer, loopback_config};
use kvtier_cache::{ChunkKey, ChunkMeta, Fidelity, GetOutcome, ModelLayout, Tier, TierKind};
use serde_json::Value;

const TOKENS: u32 = 16;

/// A smooth f16 chunk of SmolLM2's layout: values of one channel drift slowly along tokens, as
/// real keys do, so byte planes compress.
fn chunk(layout: &ModelLayout, seed: u32) -> Vec<u8> {
    let n = layout.chunk_bytes(TOKENS as usize) / 2;
    (0..n)
        .flat_map(|i| {
            let x = (i as f32 * 0.013 + seed as f32).sin() * 2.0;
            half::f16::from_f32(x).to_le_bytes()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_codecs_encode_decode_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        host_bytes: 1 << 20,
        disk_bytes: 64 << 20,
        admit_after: 0,
        disk_codec: CodecName::Lossless,
        lossy_disk_codec: CodecName::Int8,
        lossy_tenants: vec!["batch".into()],
        ..loopback_config(dir.path())
    };
    let srv = TestServer::start_with(config).unwrap();
    let svc = srv.svc.clone();
    let store = svc.store.clone();
    let layout = ModelLayout::smollm2_135m();
    let exact_t = kvtier_cache::key::tenant_id("t");
    let lossy_t = kvtier_cache::key::tenant_id("batch");
    let meta = |tenant, raw: &[u8]| {
        ChunkMeta::raw(tenant, layout.fingerprint(), TOKENS, 0, raw.len() as u64)
    };
    // 360 KiB chunks into a 1 MiB host tier: most end up on disk.
    let chunks: Vec<Vec<u8>> = (0..6).map(|s| chunk(&layout, s)).collect();
    for (i, c) in chunks.iter().enumerate() {
        store.put(ChunkKey(i as u128), meta(exact_t, c), c).unwrap();
        store
            .put(ChunkKey(100 + i as u128), meta(lossy_t, c), c)
            .unwrap();
    }
    let on_disk = |k: u128| {
        store
            .copies(if k >= 100 { lossy_t } else { exact_t }, ChunkKey(k))
            .unwrap()
            .into_iter()
            .find(|c| c.tier == TierKind::Disk && !store.host().contains(ChunkKey(k)))
    };
    let exact_disk = (0..6)
        .find_map(on_disk)
        .expect("an exact chunk only on disk");
    assert_eq!(exact_disk.codec, kvtier_compress::CODEC_PLANES_LZ4);
    assert!(exact_disk.ratio() > 1.0, "{exact_disk:?}");
    let lossy_on_disk = (100..106u128)
        .find(|k| on_disk(*k).is_some())
        .expect("a lossy chunk only on disk");
    let lossy_disk = on_disk(lossy_on_disk).unwrap();
    assert_eq!(lossy_disk.codec, kvtier_compress::CODEC_KIVI_INT8);
    assert!(lossy_disk.ratio() > 1.5, "{lossy_disk:?}");

    // Exact tenant: every chunk comes back bit-exact, wherever it was.
    for (i, c) in chunks.iter().enumerate() {
        let r = store
            .get(exact_t, ChunkKey(i as u128), false)
            .unwrap()
            .hit()
            .unwrap();
        assert_eq!(r.bytes.as_ref(), c.as_slice(), "chunk {i}");
        assert_eq!(r.meta.fidelity, Fidelity::Exact);
    }
    // Lossy tenant: disk-only chunks are refused to exact readers, served close to lossy ones.
    let mut refused = 0;
    for (i, c) in chunks.iter().enumerate() {
        let key = ChunkKey(100 + i as u128);
        if let GetOutcome::FidelityRejected(f) = store.get(lossy_t, key, false).unwrap() {
            assert!(!f.is_exact());
            refused += 1;
            let r = store.get(lossy_t, key, true).unwrap().hit().unwrap();
            assert!(!r.meta.fidelity.is_exact());
            let max_err = r
                .bytes
                .chunks_exact(2)
                .zip(c.chunks_exact(2))
                .map(|(a, b)| {
                    let a = half::f16::from_le_bytes([a[0], a[1]]).to_f32();
                    let b = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    (a - b).abs()
                })
                .fold(0f32, f32::max);
            assert!(max_err < 0.05, "int8 error {max_err}");
        }
    }
    assert!(refused > 0, "some lossy chunks were only on disk");

    // `show` over HTTP reports the copies.
    let base = srv.http_url();
    let key = (100..106)
        .map(ChunkKey)
        .find(|k| store.host().contains(*k) && store.copies(lossy_t, *k).unwrap().len() == 2)
        .unwrap_or(ChunkKey(100));
    let v: Value = reqwest::Client::new()
        .get(format!("{base}/v1/chunks/{key}"))
        .header("X-Kvtier-Tenant", "batch")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let copies = v["copies"].as_array().expect("copies listed");
    let disk = copies
        .iter()
        .find(|c| c["tier"] == "disk")
        .expect("disk copy");
    assert_eq!(disk["codec_name"], "int8");
    assert!(disk["ratio"].as_f64().unwrap() > 1.5);
    assert!(disk["stored_bytes"].as_u64().unwrap() < disk["raw_bytes"].as_u64().unwrap());
    // A restart rebuilds the index from the encoded records: exact chunks still come back
    // bit-exact, lossy ones are still lossy. Stopping the server flushes the store.
    srv.shutdown().await.unwrap();
    let config = svc.config.clone();
    drop((svc, store));
    let svc = Service::open(config).unwrap();
    let store = svc.store.clone();
    let mut from_disk = 0;
    for (i, c) in chunks.iter().enumerate() {
        let Some(r) = store
            .get(exact_t, ChunkKey(i as u128), false)
            .unwrap()
            .hit()
        else {
            continue; // only ever in host memory: not durable, by design (write-back)
        };
        assert_eq!(r.bytes.as_ref(), c.as_slice(), "chunk {i} after restart");
        from_disk += 1;
    }
    assert!(from_disk > 0);
    let key = ChunkKey(lossy_on_disk);
    assert!(matches!(
        store.get(lossy_t, key, false).unwrap(),
        GetOutcome::FidelityRejected(_)
    ));
    assert!(store.get(lossy_t, key, true).unwrap().hit().is_some());
}

#[test]
fn lossy_disk_codec_for_exact_tenants_is_refused() {
    let c = ServeConfig {
        disk_codec: CodecName::Int4,
        ..ServeConfig::default()
    };
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("lossy_disk_codec"), "{err}");
}
