//! `retrieve` suite: RETRIEVE through a running kvtier service on a real KV dump.
//!
//! The dump's prompt (all but the last `--decode` positions, whole 256-token chunks) is put as
//! SmolLM2 chunks with parent links into an in-process server. The last positions' queries of
//! the evaluated layers (all 9 query heads per request) are then sent as RETRIEVE requests over
//! the Unix socket, twice:
//!
//! - to a server with background builds off, so every answer is an exact scan in the service;
//! - to a server with builds on, after its builder has indexed the prompt (HNSW per layer and
//!   KV head; the time from the last put to the index being ready is `build_s`);
//! - to a server with builds on that was also given sampled prefill queries of the prompt
//!   (`--aware-positions` evenly spaced positions, all heads, as an engine would upload them
//!   with `PUT /v1/prompts/{key}/queries`), after it built the attention-aware graphs
//!   (`aware_*` figures; `aware_index_est_mib` is the service's memory estimate for the index
//!   and the uploaded queries, since an RSS delta cannot see memory the allocator reuses).
//!
//! Baseline: an exact top-k over the same keys in this process (brute force, no I/O). Quality:
//! recall@k of both service answers against that exact top-k, and whether every returned K and V
//! row equals the dump's row at the returned position (f16, bit-exact).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use half::f16;
use kvtier::client::{Client, ClientOptions, PromptCache, RetrieveReply};
use kvtier_cache::{ChunkKey, ModelLayout, Namespace};
use kvtier_index::{MatrixView, exact_top_k};
use kvtier_prompt::retrieval::IndexUsed;

use crate::dump::KvDump;
use crate::inproc::runtime;
use crate::report::{Figures, median, rss};
use crate::suites::compress::data::{Scope, chunk_payload};

const CHUNK: usize = 256;

#[derive(clap::Args)]
pub struct Args {
    /// KV dump (safetensors, DESIGN.md format) of SmolLM2-135M.
    #[arg(long)]
    pub kv: PathBuf,
    /// Short run: at most 2,048 tokens, 4 layers, 4 decode positions.
    #[arg(long)]
    pub quick: bool,
    /// Keys to retrieve (default 2% of the prompt).
    #[arg(long)]
    pub k: Option<u32>,
    /// Trailing positions used as decode queries.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Links per node of the service's HNSW graphs (its `retrieval_hnsw_links`).
    #[arg(long, default_value_t = 24)]
    pub hnsw_links: usize,
    /// Prefill positions whose queries are uploaded for the attention-aware index (evenly
    /// spaced; quick: at most 256).
    #[arg(long, default_value_t = 2048)]
    pub aware_positions: usize,
}

struct Request {
    layer: usize,
    position: usize,
    /// `[heads][head_dim]`.
    queries: Vec<f32>,
    /// Exact top-k per head.
    exact: Vec<Vec<u32>>,
}

struct Outcome {
    micros: Vec<f64>,
    recall: f64,
    rows_match: bool,
    exact_answers: usize,
}

async fn put_prompt(
    c: &Client,
    d: &KvDump,
    layout: &ModelLayout,
    chunks: usize,
) -> Result<Vec<ChunkKey>> {
    let ns = Namespace::new(layout.fingerprint(), "bench").with_chunk_tokens(CHUNK as u32);
    let pc = PromptCache::new(c.clone(), ns);
    let ids: Vec<u32> = d.token_ids[..chunks * CHUNK]
        .iter()
        .map(|t| *t as u32)
        .collect();
    let keys = pc.namespace().chunk_keys(&ids);
    let scope = Scope {
        layers: d.layers,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        chunk_tokens: CHUNK,
        chunks,
    };
    for i in 0..chunks {
        pc.put_chunk(&keys, i, &chunk_payload(d, &scope, i)).await?;
    }
    Ok(keys)
}

fn score(d: &KvDump, reqs: &[Request], replies: &[RetrieveReply], k: usize) -> (f64, bool, usize) {
    let mut hits = 0usize;
    let mut total = 0usize;
    let mut rows_ok = true;
    let rb = d.head_dim * 2;
    for (r, rep) in reqs.iter().zip(replies) {
        for h in 0..d.heads {
            let got = &rep.positions[h * k..(h + 1) * k];
            hits += got.iter().filter(|p| r.exact[h].contains(p)).count();
            total += k;
            let kvh = d.kv_head_of(h);
            for (j, &p) in got.iter().enumerate() {
                let at = (h * k + j) * rb;
                let i = d.kv_index(r.layer, kvh, p as usize);
                let want_k: Vec<u8> = d.k[i..i + d.head_dim]
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect();
                let want_v: Vec<u8> = d.v[i..i + d.head_dim]
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect();
                rows_ok &=
                    rep.k_rows[at..at + rb] == want_k[..] && rep.v_rows[at..at + rb] == want_v[..];
            }
        }
    }
    let exact = replies.iter().filter(|r| r.exact).count();
    (hits as f64 / total.max(1) as f64, rows_ok, exact)
}

async fn measure(
    c: &Client,
    keys: &[ChunkKey],
    reqs: &[Request],
    d: &KvDump,
    k: u32,
) -> Result<Outcome> {
    let mut micros = Vec::new();
    let mut replies = Vec::new();
    for r in reqs {
        let t = Instant::now();
        let rep = c
            .retrieve(keys, r.layer as u32, d.heads as u32, &r.queries, k, false)
            .await?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
        replies.push(rep);
    }
    let (recall, rows_match, exact_answers) = score(d, reqs, &replies, k as usize);
    Ok(Outcome {
        micros,
        recall,
        rows_match,
        exact_answers,
    })
}

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let d = KvDump::load(&args.kv)?;
    let layout = ModelLayout::smollm2_135m();
    ensure!(
        d.layers == layout.num_layers as usize
            && d.kv_heads == layout.kv_heads as usize
            && d.head_dim == layout.head_dim as usize,
        "the dump is not SmolLM2-135M shaped"
    );
    let decode = if args.quick {
        args.decode.min(4)
    } else {
        args.decode
    };
    let usable = if args.quick {
        d.tokens.min(2048)
    } else {
        d.tokens
    };
    ensure!(usable > decode + CHUNK, "dump too short");
    let chunks = (usable - decode) / CHUNK;
    let prompt = chunks * CHUNK;
    let k = args
        .k
        .unwrap_or(((prompt as f64 * 0.02).round() as u32).max(1));
    let layers: Vec<usize> = if args.quick {
        (0..4).map(|i| i * (d.layers - 1) / 3).collect()
    } else {
        (0..d.layers).collect()
    };
    let positions: Vec<usize> = (usable - decode..usable).collect();
    println!(
        "retrieve: {} — prompt {prompt} tokens in {chunks} chunks, k = {k}, {} layers × {} positions × {} heads",
        args.kv.display(),
        layers.len(),
        positions.len(),
        d.heads
    );

    // Requests and the in-process brute-force baseline.
    let mut reqs = Vec::new();
    let mut local_us = Vec::new();
    for &layer in &layers {
        let keys: Vec<Vec<f32>> = (0..d.kv_heads)
            .map(|h| {
                d.k_rows(layer, h)[..prompt * d.head_dim]
                    .iter()
                    .map(|x| f16::from_f32(*x).to_f32())
                    .collect()
            })
            .collect();
        for &p in &positions {
            let queries: Vec<f32> = (0..d.heads)
                .flat_map(|h| {
                    let i = d.q_index(layer, h, p);
                    d.q[i..i + d.head_dim].to_vec()
                })
                .collect();
            let t = Instant::now();
            let exact: Vec<Vec<u32>> = (0..d.heads)
                .map(|h| {
                    let view = MatrixView::new(&keys[d.kv_head_of(h)], d.head_dim)?;
                    Ok(exact_top_k(
                        view,
                        &queries[h * d.head_dim..][..d.head_dim],
                        k as usize,
                    ))
                })
                .collect::<Result<_>>()?;
            local_us.push(t.elapsed().as_secs_f64() * 1e6);
            reqs.push(Request {
                layer,
                position: p,
                queries,
                exact,
            });
        }
    }
    debug_assert!(reqs.iter().all(|r| r.position >= prompt));

    let host = (prompt * layout.bytes_per_token()) as u64 * 2 + (256 << 20);
    let rt = runtime()?;
    let opts = || ClientOptions {
        token: None,
        tenant: Some("bench".into()),
        client_name: "bench-retrieve".into(),
    };
    // Exact: background builds off.
    let srv = crate::inproc::server(host, |c| c.retrieval_min_tokens = 0)?;
    let exact = rt.block_on(async {
        let c = Client::connect(&srv.unix, opts()).await?;
        let keys = put_prompt(&c, &d, &layout, chunks).await?;
        measure(&c, &keys, &reqs, &d, k).await
    })?;
    srv.stop()?;
    // Indexed: builds on for prompts of this length.
    let srv = crate::inproc::server(host, |c| {
        c.retrieval_min_tokens = prompt as u64;
        c.retrieval_index_bytes = 64 << 30;
        c.retrieval_hnsw_links = args.hnsw_links;
    })?;
    let (build_s, index_bytes, hnsw) = rt.block_on(async {
        let c = Client::connect(&srv.unix, opts()).await?;
        let keys = put_prompt(&c, &d, &layout, chunks).await?;
        let t = Instant::now();
        let before = rss().0;
        while srv.svc.retrieval.indexed().is_empty() {
            ensure!(t.elapsed() < Duration::from_secs(3600), "index never built");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let build_s = t.elapsed().as_secs_f64();
        let index_bytes = rss().0.saturating_sub(before);
        anyhow::Ok((
            build_s,
            index_bytes,
            measure(&c, &keys, &reqs, &d, k).await?,
        ))
    })?;
    srv.stop().context("stopping the indexed server")?;
    // Aware: builds on, and the engine's sampled prefill queries uploaded.
    let sample = if args.quick {
        args.aware_positions.min(256)
    } else {
        args.aware_positions
    }
    .clamp(1, prompt);
    let uploaded: Vec<f32> = (0..d.layers)
        .flat_map(|layer| {
            let d = &d;
            (0..d.heads).flat_map(move |h| {
                (0..sample).flat_map(move |j| {
                    let i = d.q_index(layer, h, j * prompt / sample);
                    d.q[i..i + d.head_dim].iter().copied()
                })
            })
        })
        .collect();
    let uploaded_mib = (uploaded.len() * 4) as f64 / (1 << 20) as f64;
    let srv = crate::inproc::server(host, |c| {
        c.retrieval_min_tokens = prompt as u64;
        c.retrieval_index_bytes = 64 << 30;
    })?;
    let (aware_build_s, aware_bytes, aware) = rt.block_on(async {
        let c = Client::connect(&srv.unix, opts()).await?;
        let keys = put_prompt(&c, &d, &layout, chunks).await?;
        let tenant = kvtier_cache::key::tenant_id("bench");
        let t = Instant::now();
        let tip = *keys.last().context("no chunks")?;
        srv.svc
            .retrieval
            .set_queries(&srv.svc.store, tenant, tip, d.heads as u32, uploaded)
            .map_err(|e| anyhow::anyhow!("uploading queries: {e}"))?;
        while srv.svc.retrieval.index_kind(tenant, &keys) != Some(IndexUsed::Aware) {
            ensure!(
                t.elapsed() < Duration::from_secs(3600),
                "aware index never built"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let build_s = t.elapsed().as_secs_f64();
        // The service's own estimate (f32 keys + ≤64 B of links per key + the uploaded
        // queries): an RSS delta is meaningless here, the allocator reuses the memory the
        // previous server freed.
        let bytes = srv.svc.retrieval.usage().1;
        anyhow::Ok((build_s, bytes, measure(&c, &keys, &reqs, &d, k).await?))
    })?;
    srv.stop().context("stopping the aware server")?;

    let exact_us = median(&exact.micros);
    let hnsw_us = median(&hnsw.micros);
    let local = median(&local_us);
    println!(
        "{:<28} {:>12} {:>10} {:>10}",
        "answer", "median µs", "recall", "rows ok"
    );
    println!(
        "{:<28} {:>12.0} {:>10.3} {:>10}",
        "local brute force", local, 1.0, "-"
    );
    println!(
        "{:<28} {:>12.0} {:>10.3} {:>10}",
        "service, exact scan", exact_us, exact.recall, exact.rows_match
    );
    println!(
        "{:<28} {:>12.0} {:>10.3} {:>10}",
        "service, HNSW", hnsw_us, hnsw.recall, hnsw.rows_match
    );
    let aware_us = median(&aware.micros);
    println!(
        "{:<28} {:>12.0} {:>10.3} {:>10}",
        "service, attention-aware", aware_us, aware.recall, aware.rows_match
    );
    println!(
        "HNSW build after the last put: {build_s:.1} s, {:.0} MiB resident; {} of {} indexed answers came from the graph",
        index_bytes as f64 / (1 << 20) as f64,
        hnsw.micros.len() - hnsw.exact_answers,
        hnsw.micros.len(),
    );
    println!(
        "aware build after the upload ({sample} positions, {uploaded_mib:.0} MiB of queries): {aware_build_s:.1} s, {:.0} MiB by the service's estimate with the queries; {} of {} answers from the graph; total {:.0} s",
        aware_bytes as f64 / (1 << 20) as f64,
        aware.micros.len() - aware.exact_answers,
        aware.micros.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut f = Figures::new("retrieve");
    f.set("tokens", prompt);
    f.set("k", k);
    f.set("hnsw_links", args.hnsw_links);
    f.set("layers_evaluated", layers.len());
    f.set("requests", reqs.len());
    f.num("local_bruteforce_us", local);
    f.num("service_exact_us", exact_us);
    f.num("service_hnsw_us", hnsw_us);
    f.num("hnsw_vs_exact_speedup", exact_us / hnsw_us);
    f.num("service_exact_recall", exact.recall);
    f.num("service_hnsw_recall", hnsw.recall);
    f.set("rows_match", exact.rows_match && hnsw.rows_match);
    f.set("graph_answers", hnsw.micros.len() - hnsw.exact_answers);
    f.num("build_s", build_s);
    f.num("index_mib", index_bytes as f64 / (1 << 20) as f64);
    f.num(
        "index_bytes_per_key",
        index_bytes as f64 / (prompt * d.layers * d.kv_heads) as f64,
    );
    f.set("aware_positions", sample);
    f.num("service_aware_us", aware_us);
    f.num("service_aware_recall", aware.recall);
    f.num("aware_vs_hnsw_speedup", hnsw_us / aware_us);
    f.set("aware_rows_match", aware.rows_match);
    f.set(
        "aware_graph_answers",
        aware.micros.len() - aware.exact_answers,
    );
    f.num("aware_build_s", aware_build_s);
    f.num("aware_uploaded_mib", uploaded_mib);
    f.num("aware_index_est_mib", aware_bytes as f64 / (1 << 20) as f64);
    f.print();
    Ok(())
}
