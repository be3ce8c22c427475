//! `remote` suite: the remote tier against a plain Redis Cluster client, on a real local
//! cluster (3 masters + 3 replicas on loopback) that the suite starts and stops itself.
//!
//! - put and get of 32 MiB (Llama-3.1-8B-shaped) and 2 MiB chunks through `RemoteTier`
//!   against a plain `redis` cluster client doing `SET`/`GET` of the same bytes, one request at
//!   a time on one multiplexed connection, as the tier does;
//! - a 32k-token SmolLM2 prompt stored through node A, then found by LOOKUP and read through
//!   node B (a second kvtier on the same cluster, empty), against the plain client `GET`ting
//!   the same values (what the cluster itself delivers).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvtier_cache::{ChunkKey, ChunkMeta, ModelLayout, Namespace, Tier, WriteMode};
use kvtier_offload::remote::cluster::LocalCluster;
use kvtier_offload::{RemoteConfig, RemoteTier};
use redis::AsyncCommands;

use crate::inproc::{payload, runtime, server};
use crate::report::{Figures, median};

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute on 2 cores): fewer chunks and an 8k-token prompt.
    #[arg(long)]
    pub quick: bool,
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

struct Pair {
    put: f64,
    get: f64,
    set: f64,
    plain_get: f64,
}

/// `reps` rounds of `n` chunks of `len` bytes through the tier and through the plain client;
/// medians of the per-round throughputs.
fn bench_size(cluster: &LocalCluster, len: usize, n: usize, reps: usize) -> Result<Pair> {
    let mut cfg = RemoteConfig::new(cluster.urls());
    cfg.namespace = format!("bench{len}");
    cfg.budget = u64::MAX / 4;
    cfg.timeout = Duration::from_secs(20);
    let tier = RemoteTier::open(cfg)?;
    let rt = runtime()?;
    let client = redis::cluster::ClusterClient::new(cluster.urls())?;
    let mut plain = rt.block_on(client.get_async_connection())?;
    let src: Vec<Vec<u8>> = (0..n).map(|i| payload(len, i as u64 + 1)).collect();
    let meta = ChunkMeta::raw(1, 1, 256, 0, len as u64);
    let names: Vec<String> = (0..n).map(|i| format!("plain{len}:{i}")).collect();
    let (mut puts, mut gets, mut sets, mut pgets) = (vec![], vec![], vec![], vec![]);
    for r in 0..reps + 1 {
        let t = Instant::now();
        for (i, s) in src.iter().enumerate() {
            tier.put(ChunkKey(i as u128), &meta, s)?;
        }
        let put = t.elapsed();
        let t = Instant::now();
        for (i, s) in src.iter().enumerate() {
            let (_, got) = tier
                .get(ChunkKey(i as u128))?
                .context("remote chunk missing")?;
            anyhow::ensure!(got.len() == s.len(), "short remote read");
        }
        let get = t.elapsed();
        let t = Instant::now();
        for (name, s) in names.iter().zip(&src) {
            rt.block_on(plain.set::<_, _, ()>(name, &s[..]))?;
        }
        let set = t.elapsed();
        let t = Instant::now();
        for (name, s) in names.iter().zip(&src) {
            let v: Vec<u8> = rt.block_on(plain.get(name))?;
            anyhow::ensure!(v.len() == s.len(), "short plain read");
        }
        let pget = t.elapsed();
        // The first round warms connections and server memory; it is not counted.
        if r > 0 {
            let total = len * n;
            puts.push(gbps(total, put));
            gets.push(gbps(total, get));
            sets.push(gbps(total, set));
            pgets.push(gbps(total, pget));
        }
    }
    for (i, name) in names.iter().enumerate() {
        tier.remove(ChunkKey(i as u128))?;
        rt.block_on(plain.del::<_, ()>(name))?;
    }
    Ok(Pair {
        put: median(&puts),
        get: median(&gets),
        set: median(&sets),
        plain_get: median(&pgets),
    })
}

struct CrossNode {
    tokens: usize,
    bytes: usize,
    lookup_ms: f64,
    prefix_ms: f64,
    /// The same reads from node B's host memory after promotion.
    warm_ms: f64,
    plain_ms: f64,
}

/// A prompt stored through node A, found and read through node B.
fn bench_cross_node(cluster: &LocalCluster, tokens: usize) -> Result<CrossNode> {
    let layout = ModelLayout::smollm2_135m();
    let fp = layout.fingerprint();
    let chunk_tokens = 256;
    let len = layout.chunk_bytes(chunk_tokens);
    let n = tokens / chunk_tokens;
    let host = (len * (n + 4)) as u64;
    let seeds = cluster.config_value();
    let tune = |c: &mut kvtier::config::ServeConfig| {
        c.remote = Some(seeds.clone());
        c.remote_bytes = 4 << 30;
        c.remote_timeout_ms = 20_000;
        c.remote_namespace = "crossbench".into();
        c.write_mode = WriteMode::WriteThrough;
    };
    let a = server(host, tune)?;
    let b = server(host, tune)?;
    let rt = runtime()?;
    let ns = Namespace::new(fp, "bench");
    let prompt: Vec<u32> = (0..tokens as u32).collect();
    let keys = ns.chunk_keys(&prompt);
    let data: Vec<Vec<u8>> = (0..n).map(|i| payload(len, 100 + i as u64)).collect();
    let (lookup_ms, prefix_ms, warm_ms) = rt.block_on(async {
        let ca = a.client(&a.tcp, None, "bench").await?;
        for (i, k) in keys.iter().enumerate() {
            let mut m = ChunkMeta::raw(0, fp, chunk_tokens as u32, i as u32, len as u64);
            m.parent = i.checked_sub(1).map(|p| keys[p]);
            ca.put(*k, &m, &data[i]).await?;
        }
        let cb = b.client(&b.tcp, None, "bench").await?;
        let t = Instant::now();
        let hit = cb.lookup(fp, None, chunk_tokens as u32, &prompt).await?;
        let lookup = t.elapsed();
        anyhow::ensure!(
            hit.hit_tokens as usize == n * chunk_tokens,
            "node b missed chunks"
        );
        let mut read = 0usize;
        for (g, batch) in keys.chunks(8).enumerate() {
            let got = cb.get(batch, false).await?;
            for (j, c) in got.iter().enumerate() {
                let c = c.as_ref().context("chunk missing on node b")?;
                anyhow::ensure!(c.bytes[..] == data[g * 8 + j][..], "wrong bytes on node b");
                read += c.bytes.len();
            }
        }
        let total = t.elapsed();
        anyhow::ensure!(read == len * n, "short read");
        // The same reads again, now from node B's host memory: what the wire alone costs.
        let t = Instant::now();
        for batch in keys.chunks(8) {
            let got = cb.get(batch, false).await?;
            anyhow::ensure!(got.iter().all(Option::is_some), "promoted chunk missing");
        }
        let warm = t.elapsed();
        anyhow::Ok((
            lookup.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
        ))
    })?;
    // What the cluster delivers: the same values with the plain client, one GET at a time.
    let client = redis::cluster::ClusterClient::new(cluster.urls())?;
    let names: Vec<String> = keys
        .iter()
        .map(|k| format!("crossbench:c:{:032x}", k.0))
        .collect();
    let plain_ms = rt.block_on(async {
        let mut c = client.get_async_connection().await?;
        let t = Instant::now();
        for name in &names {
            let v: Vec<u8> = c.get(name).await?;
            anyhow::ensure!(
                v.len() == len + 128,
                "plain read of {name}: {} bytes",
                v.len()
            );
        }
        anyhow::Ok(t.elapsed().as_secs_f64() * 1e3)
    })?;
    a.stop()?;
    b.stop()?;
    Ok(CrossNode {
        tokens: n * chunk_tokens,
        bytes: len * n,
        lookup_ms,
        prefix_ms,
        warm_ms,
        plain_ms,
    })
}

pub fn run(a: Args) -> Result<()> {
    let cluster = LocalCluster::start().map_err(|e| anyhow::anyhow!(e))?;
    let masters = cluster
        .master_ports()
        .map_err(|e| anyhow::anyhow!(e))?
        .len();
    let (big_n, small_n, reps, tokens) = match a.quick {
        true => (3, 24, 2, 8192),
        false => (8, 64, 3, 32768),
    };
    let big = bench_size(&cluster, 32 << 20, big_n, reps)?;
    let small = bench_size(&cluster, 2 << 20, small_n, reps)?;
    let cross = bench_cross_node(&cluster, tokens)?;
    println!("remote tier vs plain redis cluster client ({masters} masters + replicas, loopback)");
    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "GB/s", "remote", "plain", "ratio"
    );
    let row =
        |name: &str, x: f64, y: f64| println!("{name:<28} {x:>10.3} {y:>10.3} {:>8.2}", x / y);
    row("put/SET 32 MiB", big.put, big.set);
    row("get/GET 32 MiB", big.get, big.plain_get);
    row("put/SET 2 MiB", small.put, small.set);
    row("get/GET 2 MiB", small.get, small.plain_get);
    let delivered = cross.bytes as f64 / (cross.prefix_ms / 1e3) / 1e9;
    println!(
        "cross-node {}-token prompt ({} MiB): lookup {:.1} ms, lookup + get {:.1} ms ({delivered:.3} GB/s); plain GETs of the same values {:.1} ms; again from B's host {:.1} ms",
        cross.tokens,
        cross.bytes >> 20,
        cross.lookup_ms,
        cross.prefix_ms,
        cross.plain_ms,
        cross.warm_ms
    );
    let mut f = Figures::new("remote");
    f.num("remote_put_gbps", big.put);
    f.num("remote_get_gbps", big.get);
    f.num("plain_set_gbps", big.set);
    f.num("plain_get_gbps", big.plain_get);
    f.num("remote_put_vs_plain", big.put / big.set);
    f.num("remote_get_vs_plain", big.get / big.plain_get);
    f.num("remote_put_2m_gbps", small.put);
    f.num("remote_get_2m_gbps", small.get);
    f.num("remote_put_2m_vs_plain", small.put / small.set);
    f.num("remote_get_2m_vs_plain", small.get / small.plain_get);
    f.num("cross_node_prefix_ms", cross.prefix_ms);
    f.num("cross_node_lookup_ms", cross.lookup_ms);
    f.num("cross_node_gbps", delivered);
    f.num("cross_node_plain_ms", cross.plain_ms);
    f.num("cross_node_warm_ms", cross.warm_ms);
    f.num("cross_node_vs_plain", cross.plain_ms / cross.prefix_ms);
    f.set("cross_node_tokens", cross.tokens);
    f.set("masters", masters);
    f.set("quick", a.quick);
    drop(cluster);
    f.print();
    Ok(())
}
