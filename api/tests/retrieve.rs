//! RETRIEVE end to end over the data plane: exact answers before an index exists, the
//! background HNSW build once the prompt settles, K/V rows equal to the stored rows, tenant
//! isolation, bad requests, and index invalidation when a chunk goes away; and the
//! attention-aware index built from queries uploaded over HTTP.

use std::time::{Duration, Instant};

use kvtier::client::{Client, ClientOptions, PromptCache};
use kvtier::testing::TestServer;
use kvtier_cache::{ChunkKey, Dtype, ModelLayout, Namespace};

const CHUNK: usize = 64;
const CHUNKS: usize = 8;
const TOKENS: usize = CHUNK * CHUNKS;
const DIM: usize = 16;
const HEADS: u32 = 4; // query heads; 2 per KV head

fn layout() -> ModelLayout {
    ModelLayout::mha("retrieval-test", 2, 2, DIM as u32, Dtype::F32)
}

/// Deterministic pseudo-random keys and values in [-1, 1).
fn value(seed: u64) -> f32 {
    let x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// K (or V) element of (layer, kv, token, kv_head, d) of the whole prompt.
fn elem(layer: usize, kv: usize, t: usize, h: usize, d: usize) -> f32 {
    value((((layer * 2 + kv) * TOKENS + t) * 2 + h) as u64 * 64 + d as u64)
}

/// Raw chunk `c`: `[layer][K|V][token][kv_head][head_dim]` f32.
fn chunk(c: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for layer in 0..2 {
        for kv in 0..2 {
            for t in c * CHUNK..(c + 1) * CHUNK {
                for h in 0..2 {
                    for d in 0..DIM {
                        out.extend_from_slice(&elem(layer, kv, t, h, d).to_le_bytes());
                    }
                }
            }
        }
    }
    out
}

fn row(layer: usize, kv: usize, t: usize, h: usize) -> Vec<u8> {
    (0..DIM)
        .flat_map(|d| elem(layer, kv, t, h, d).to_le_bytes())
        .collect()
}

/// Exact top-k positions of `q` over KV head `h` of `layer`.
fn exact(layer: usize, h: usize, q: &[f32], k: usize) -> Vec<u32> {
    let mut s: Vec<(f32, u32)> = (0..TOKENS)
        .map(|t| {
            let dot: f32 = (0..DIM).map(|d| elem(layer, 0, t, h, d) * q[d]).sum();
            (dot, t as u32)
        })
        .collect();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    s.into_iter().take(k).map(|(_, t)| t).collect()
}

async fn client(addr: &str, tenant: &str) -> Client {
    Client::connect(
        addr,
        ClientOptions {
            token: None,
            tenant: Some(tenant.into()),
            client_name: "retrieve-test".into(),
        },
    )
    .await
    .unwrap()
}

/// A running server holding the test prompt of tenant "t".
struct Served {
    srv: TestServer,
    keys: Vec<ChunkKey>,
}

async fn serve_prompt() -> Served {
    let srv = TestServer::start(|c| {
        c.layouts = vec![layout()];
        c.retrieval_min_tokens = TOKENS as u64;
    })
    .unwrap();
    // The prompt goes in as an engine stores it: full chunks, each the parent of the next.
    let ns = Namespace::new(layout().fingerprint(), "t").with_chunk_tokens(CHUNK as u32);
    let pc = PromptCache::new(client(&srv.tcp, "t").await, ns);
    let tokens: Vec<u32> = (0..TOKENS as u32).collect();
    let keys = pc.namespace().chunk_keys(&tokens);
    for i in 0..CHUNKS {
        pc.put_chunk(&keys, i, &chunk(i)).await.unwrap();
    }
    Served { srv, keys }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_exact_then_indexed_with_rows_isolation_and_invalidation() {
    let Served { srv, keys } = serve_prompt().await;
    let (svc, addr) = (srv.svc.clone(), srv.tcp.clone());
    let c = client(&addr, "t").await;

    // Two decode steps' queries for all 4 query heads of layer 1.
    let queries: Vec<f32> = (0..2 * HEADS as usize * DIM)
        .map(|i| value(9_000_000 + i as u64))
        .collect();
    let k = 10u32;
    let first = c
        .retrieve(&keys, 1, HEADS, &queries, k, false)
        .await
        .unwrap();
    assert!(
        first.exact,
        "no index can exist yet (the prompt has not settled)"
    );
    assert_eq!((first.tokens, first.k), (TOKENS as u64, k));
    assert_eq!(first.positions.len(), 2 * HEADS as usize * k as usize);
    for (i, q) in queries.chunks_exact(DIM).enumerate() {
        let kvh = (i % HEADS as usize) / 2;
        let got = &first.positions[i * k as usize..][..k as usize];
        assert_eq!(got, exact(1, kvh, q, k as usize).as_slice(), "query {i}");
        for (j, &p) in got.iter().enumerate() {
            let at = (i * k as usize + j) * first.row_bytes;
            assert_eq!(
                &first.k_rows[at..at + first.row_bytes],
                row(1, 0, p as usize, kvh)
            );
            assert_eq!(
                &first.v_rows[at..at + first.row_bytes],
                row(1, 1, p as usize, kvh)
            );
        }
    }

    // The background builder indexes the prompt once it settles.
    let deadline = Instant::now() + Duration::from_secs(60);
    while svc.retrieval.indexed().is_empty() {
        assert!(Instant::now() < deadline, "index never built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(svc.retrieval.indexed()[0].1, keys);
    let second = c
        .retrieve(&keys, 1, HEADS, &queries, k, false)
        .await
        .unwrap();
    assert!(!second.exact, "answered from the graph");
    let mut hits = 0;
    for i in 0..2 * HEADS as usize {
        let want = &first.positions[i * k as usize..][..k as usize];
        let got = &second.positions[i * k as usize..][..k as usize];
        hits += got.iter().filter(|p| want.contains(p)).count();
    }
    let recall = hits as f64 / first.positions.len() as f64;
    assert!(recall >= 0.9, "HNSW recall {recall}");

    // Another tenant cannot retrieve over these chunks.
    let other = client(&addr, "u").await;
    let err = other
        .retrieve(&keys, 1, HEADS, &queries, k, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not stored"), "{err}");
    // Bad requests get clear errors and the connection keeps working.
    let err = c
        .retrieve(&keys, 2, HEADS, &queries, k, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("layer 2"), "{err}");
    let err = c
        .retrieve(&keys, 0, 3, &queries[..3 * DIM], k, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be grouped"), "{err}");
    let err = c
        .retrieve(&keys, 0, HEADS, &queries[..DIM + 1], k, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("whole"), "{err}");
    assert!(
        c.retrieve(&keys, 0, HEADS, &queries, k, false)
            .await
            .is_ok()
    );

    // Removing a chunk drops the index; the prompt can no longer be retrieved.
    assert_eq!(c.delete(&[keys[3]]).await.unwrap(), 1);
    assert!(svc.retrieval.indexed().is_empty());
    let err = c
        .retrieve(&keys, 1, HEADS, &queries, k, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not stored"), "{err}");

    srv.shutdown().await.unwrap();
}

/// Little-endian bytes of f32 values.
fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_queries_build_the_attention_aware_index() {
    let Served { srv, keys } = serve_prompt().await;
    let (svc, addr, http) = (srv.svc.clone(), srv.tcp.clone(), srv.http.clone());
    let c = client(&addr, "t").await;
    let tip = keys.last().unwrap().to_string();
    let url = |heads: &str| format!("http://{http}/v1/prompts/{tip}/queries?heads={heads}");
    let web = reqwest::Client::new();
    let upload = |body: Vec<u8>, heads: &'static str, tenant: &'static str| {
        web.put(url(heads))
            .header("x-kvtier-tenant", tenant)
            .body(body)
            .send()
    };

    // Prefill queries: [layer 2][heads 4][n][DIM], n = 128 sampled positions.
    let n = 128;
    let queries: Vec<f32> = (0..2 * HEADS as usize * n * DIM)
        .map(|i| value(7_000_000 + i as u64))
        .collect();
    // Bad uploads are refused with clear errors and change nothing.
    let r = upload(le_bytes(&queries[..queries.len() - DIM]), "4", "t")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("whole"));
    let r = upload(le_bytes(&queries), "3", "t").await.unwrap();
    assert_eq!(r.status(), 400);
    let r = upload(le_bytes(&queries), "4", "u").await.unwrap();
    assert_eq!(r.status(), 404, "another tenant cannot see the prompt");
    let mut bad = queries.clone();
    bad[5] = f32::NAN;
    let r = upload(le_bytes(&bad), "4", "t").await.unwrap();
    assert_eq!(r.status(), 400);

    let r = upload(le_bytes(&queries), "4", "t").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["positions"], n);

    // The builder builds the aware graphs for the prompt once it settles.
    let tenant = kvtier_cache::key::tenant_id("t");
    let deadline = Instant::now() + Duration::from_secs(60);
    while svc.retrieval.index_kind(tenant, &keys)
        != Some(kvtier_prompt::retrieval::IndexUsed::Aware)
    {
        assert!(Instant::now() < deadline, "aware index never built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Decode queries like the uploaded ones: sampled rows of layer 1, all four heads.
    let k = 10u32;
    let decode: Vec<f32> = (0..4)
        .flat_map(|step| {
            (0..HEADS as usize).flat_map(move |h| {
                let at = ((HEADS as usize + h) * n + step * 31) * DIM;
                (0..DIM).map(move |d| value(7_000_000 + (at + d) as u64))
            })
        })
        .collect();
    let got = c
        .retrieve(&keys, 1, HEADS, &decode, k, false)
        .await
        .unwrap();
    assert!(got.aware && !got.exact, "answered from the aware graphs");
    let mut hits = 0;
    for (i, q) in decode.chunks_exact(DIM).enumerate() {
        let kvh = (i % HEADS as usize) / 2;
        let want = exact(1, kvh, q, k as usize);
        let found = &got.positions[i * k as usize..][..k as usize];
        hits += found.iter().filter(|p| want.contains(p)).count();
        for (j, &p) in found.iter().enumerate() {
            let at = (i * k as usize + j) * got.row_bytes;
            assert_eq!(
                &got.k_rows[at..at + got.row_bytes],
                row(1, 0, p as usize, kvh)
            );
        }
    }
    // The search scores 64 of the 512 keys (12.5%); a random scan that size would recall about
    // 0.125. These keys and queries are unstructured noise, so the graph's edge is modest here;
    // its quality on real KV is measured by `kvtier-bench retrieval`.
    let recall = hits as f64 / got.positions.len() as f64;
    assert!(recall >= 0.4, "aware recall {recall}");

    // Deleting the tip drops the index and the uploaded queries.
    assert_eq!(c.delete(&[*keys.last().unwrap()]).await.unwrap(), 1);
    assert_eq!(svc.retrieval.index_kind(tenant, &keys), None);

    srv.shutdown().await.unwrap();
}
