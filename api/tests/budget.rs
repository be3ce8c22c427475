//! `POST /v1/prompts/budget` end to end: a stored prompt is pruned to a squeezed layer budget,
//! chunks become lossy pruned chunks holding exactly the selected rows, exact readers are refused,
//! and tenants that demand exact data cannot prune.

use kvtier::config::ServeConfig;
use kvtier::service::Service;
use kvtier::testing::TestServer;
use kvtier_cache::{ChunkKey, ChunkMeta, Dtype, GetOutcome, ModelLayout};
use kvtier_index::{CODEC_PRUNED, decode_pruned};
use serde_json::{Value, json};

const CHUNK: u32 = 32;
const CHUNKS: usize = 4;
const TOKENS: usize = CHUNK as usize * CHUNKS;

fn layout() -> ModelLayout {
    ModelLayout::mha("budget-test", 6, 1, 4, Dtype::F16)
}

fn chunk(c: usize) -> Vec<u8> {
    (0..layout().chunk_bytes(CHUNK as usize))
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(c as u32 * 977) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_prune_stored_prompts_of_lossy_tenants_only() {
    let srv = TestServer::start(|c| {
        c.layouts = vec![layout()];
        c.lossy_tenants = vec!["batch".into()];
    })
    .unwrap();
    let (svc, base) = (srv.svc.clone(), srv.http_url());
    let http = reqwest::Client::new();
    let fp = layout().fingerprint();
    let put_prompt = |tenant: &str, base_key: u128| -> Vec<ChunkKey> {
        let t = kvtier_cache::key::tenant_id(tenant);
        let keys: Vec<ChunkKey> = (0..CHUNKS)
            .map(|c| ChunkKey(base_key + c as u128))
            .collect();
        for (c, key) in keys.iter().enumerate() {
            let data = chunk(c);
            let mut m = ChunkMeta::raw(t, fp, CHUNK, c as u32, data.len() as u64);
            m.parent = c.checked_sub(1).map(|p| keys[p]);
            svc.store.put(*key, m, &data).unwrap();
        }
        keys
    };
    let post = |tenant: &'static str, body: Value| {
        let http = http.clone();
        let url = format!("{base}/v1/prompts/budget");
        async move {
            let r = http
                .post(url)
                .header("X-Kvtier-Tenant", tenant)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let hex = |keys: &[ChunkKey]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();

    // An exact-only tenant cannot prune.
    let exact_keys = put_prompt("t", 100);
    let (status, v) = post("t", json!({ "keys": hex(&exact_keys), "fraction": 0.25 })).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("lossy_tenants"),
        "{v}"
    );

    // Squeezed StreamingLLM budget. A high cosine similarity means attention changed the
    // residual stream little: layers 0 and 5 are the least important.
    let keys = put_prompt("batch", 200);
    let cos = [0.9f32, 0.2, 0.6, 0.6, 0.2, 0.9];
    let (status, v) = post(
        "batch",
        json!({ "keys": hex(&keys), "fraction": 0.25, "layer_cos": cos, "p": 0.5, "sinks": 4 }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let budgets: Vec<usize> = serde_json::from_value(v["budgets"].clone()).unwrap();
    assert_eq!(
        budgets.iter().sum::<usize>(),
        TOKENS * 6 / 4,
        "total conserved"
    );
    assert_eq!(v["squeezed_layers"], json!([0, 5]));
    assert!(budgets[0] < budgets[1] && budgets[5] < budgets[2]);
    assert!(v["bytes_after"].as_u64().unwrap() < v["bytes_before"].as_u64().unwrap() / 2);

    // Every chunk is now a pruned chunk: refused to exact readers, and for lossy readers it
    // holds exactly the sinks and the most recent tokens of each layer, rows unchanged.
    let t = kvtier_cache::key::tenant_id("batch");
    let layout = layout();
    let row = layout.head_dim as usize * 2;
    let mut kept = vec![Vec::new(); 6];
    for (c, key) in keys.iter().enumerate() {
        assert!(matches!(
            svc.store.get(t, *key, false).unwrap(),
            GetOutcome::FidelityRejected(_)
        ));
        let r = svc.store.get(t, *key, true).unwrap().hit().unwrap();
        assert_eq!(r.meta.codec, CODEC_PRUNED);
        let (n, layers) = decode_pruned(&layout, &r.bytes).unwrap();
        assert_eq!(n, CHUNK);
        let raw = chunk(c);
        let lb = layout.layer_bytes(CHUNK as usize);
        for (l, pl) in layers.iter().enumerate() {
            for (i, &p) in pl.positions.iter().enumerate() {
                let k_at = l * lb + p as usize * row;
                let v_at = k_at + CHUNK as usize * row;
                assert_eq!(&pl.data[i * row..(i + 1) * row], &raw[k_at..k_at + row]);
                let vi = (pl.positions.len() + i) * row;
                assert_eq!(&pl.data[vi..vi + row], &raw[v_at..v_at + row]);
                kept[l].push(p + c as u32 * CHUNK);
            }
        }
    }
    for (l, k) in kept.iter().enumerate() {
        let b = budgets[l] as u32;
        let want: Vec<u32> = (0..4)
            .chain(TOKENS as u32 - (b - 4)..TOKENS as u32)
            .collect();
        assert_eq!(k, &want, "layer {l}");
    }
    // A pruned prompt cannot be pruned again.
    let (status, v) = post("batch", json!({ "keys": hex(&keys), "fraction": 0.1 })).await;
    assert_eq!(status, 400, "{v}");

    // H2O with scores: the heavy hitters are kept.
    let keys = put_prompt("batch", 300);
    let mut scores = vec![vec![0f32; TOKENS]; 6];
    for s in scores.iter_mut() {
        s[50] = 10.0;
        s[70] = 9.0;
    }
    let (status, v) = post(
        "batch",
        json!({ "keys": hex(&keys), "fraction": 0.25, "policy": "h2o", "scores": scores }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let r = svc.store.get(t, keys[1], true).unwrap().hit().unwrap();
    let (_, layers) = decode_pruned(&layout, &r.bytes).unwrap();
    assert!(layers[0].positions.contains(&(50 - CHUNK)));
    let r = svc.store.get(t, keys[2], true).unwrap().hit().unwrap();
    let (_, layers) = decode_pruned(&layout, &r.bytes).unwrap();
    assert!(layers[0].positions.contains(&(70 - 2 * CHUNK)));
    // Malformed requests are clear 400s.
    let (status, _) = post("batch", json!({ "keys": hex(&keys), "fraction": 1.5 })).await;
    assert_eq!(status, 400);
    let (status, v) = post(
        "batch",
        json!({ "keys": hex(&keys), "fraction": 0.2, "policy": "h2o" }),
    )
    .await;
    assert_eq!(status, 400, "{v}");

    srv.shutdown().await.unwrap();
}

#[test]
fn host_pressure_squeezes_lossy_tenants_prompts_only() {
    let big = ModelLayout::mha("squeeze-test", 6, 4, 64, Dtype::F16);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::open(ServeConfig {
        data_dir: dir.path().to_path_buf(),
        host_bytes: 4 << 20,
        disk_bytes: 0,
        layouts: vec![big.clone()],
        lossy_tenants: vec!["batch".into()],
        squeeze_watermark: 0.3,
        squeeze_fraction: 0.25,
        // Reallocation is opt-in (the default, 1.0, is uniform): exercise it.
        squeeze_p: 0.5,
        ..ServeConfig::default()
    })
    .unwrap();
    let fp = big.fingerprint();
    // The engine told us which layers matter (normally through a budget request).
    svc.importance.remember(fp, &[0.9, 0.2, 0.6, 0.6, 0.2, 0.9]);
    let put = |tenant: &str, base: u128| -> Vec<ChunkKey> {
        let t = kvtier_cache::key::tenant_id(tenant);
        let keys: Vec<ChunkKey> = (0..CHUNKS).map(|c| ChunkKey(base + c as u128)).collect();
        for (c, key) in keys.iter().enumerate() {
            let data: Vec<u8> = (0..big.chunk_bytes(CHUNK as usize))
                .map(|i| (i + c) as u8)
                .collect();
            let mut m = ChunkMeta::raw(t, fp, CHUNK, c as u32, data.len() as u64);
            m.parent = c.checked_sub(1).map(|p| keys[p]);
            svc.store.put(*key, m, &data).unwrap();
        }
        keys
    };
    let exact = put("t", 10);
    let lossy = put("batch", 20);
    let codec = |tenant: &str, k: ChunkKey| {
        svc.store
            .info(kvtier_cache::key::tenant_id(tenant), k)
            .unwrap()
            .meta
            .codec
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while lossy.iter().any(|k| codec("batch", *k) != CODEC_PRUNED) {
        assert!(std::time::Instant::now() < deadline, "never squeezed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        exact.iter().all(|k| codec("t", *k) == 0),
        "exact tenants are never squeezed"
    );
    // Nothing was evicted: every chunk of both prompts is still there.
    assert_eq!(svc.store.stats().chunks, 2 * CHUNKS as u64);
}
