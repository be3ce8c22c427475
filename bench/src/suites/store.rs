//! `store` suite: the core store against the machine's own limits, measured in the same run.
//!
//! - host put/get of Llama-3.1-8B-shaped (32 MiB) and SmolLM2-shaped (5.6 MiB) chunks against a
//!   memcpy of the same bytes into an already-touched buffer (get = lease + one copy into the
//!   caller's buffer + release);
//! - disk tier write/read of the same chunks against plain sequential file I/O with the same
//!   durability (fdatasync per chunk) and the same caching mode (reads through the page cache);
//! - prefix lookup of a 128k-token prompt whose 512 chunks are all present;
//! - key hashing cost per token.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvtier_cache::{
    ChunkKey, ChunkMeta, HostConfig, HostTier, ModelLayout, Namespace, StoreConfig, Tier,
    TieredStore,
};
use kvtier_offload::{DiskConfig, DiskTier, Durability};

use crate::inproc::payload;
use crate::report::{Figures, median, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Directory for the disk-tier and raw-file measurements (a fresh subdirectory is used).
    #[arg(long, default_value = "target/bench-store")]
    pub dir: PathBuf,
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

struct HostFigures {
    put: f64,
    get: f64,
    /// memcpy of each chunk into its own buffer (what a put does).
    memcpy: f64,
    /// memcpy of every chunk into one reused buffer (what a get into a caller's buffer does).
    memcpy_one_dst: f64,
}

/// Host tier put and get against memcpy, `reps` rounds of `n` chunks of `len` bytes.
fn bench_host(len: usize, n: usize, reps: usize) -> Result<HostFigures> {
    let budget = (len * (n + 1)) as u64 * 2;
    let host = Arc::new(HostTier::new(HostConfig {
        budget_bytes: budget,
        arena_bytes: 256 << 20,
    }));
    let store = TieredStore::new(StoreConfig::default(), host, Vec::new());
    let src: Vec<Vec<u8>> = (0..n).map(|i| payload(len, i as u64 + 1)).collect();
    let mut dst = vec![0u8; len];
    // The store writes each chunk into its own slot; the fair baseline copies each chunk into
    // its own already-touched buffer too (copying every chunk into one buffer is also shown).
    let mut dsts: Vec<Vec<u8>> = src.clone();
    let meta = ChunkMeta::raw(1, 1, 256, 0, len as u64);
    // Warm-up: carve and touch every slot once so that measured puts reuse slots, as a running
    // server does, and touch the memcpy destination likewise.
    for (i, s) in src.iter().enumerate() {
        store.put(ChunkKey(i as u128), meta, s)?;
        dst.copy_from_slice(s);
    }
    let (mut puts, mut gets, mut copies, mut same) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        for (i, _) in src.iter().enumerate() {
            store.delete(1, ChunkKey(i as u128))?;
        }
        let t = Instant::now();
        for (i, s) in src.iter().enumerate() {
            store.put(ChunkKey(i as u128), meta, s)?;
        }
        puts.push(gbps(len * n, t.elapsed()));
        let t = Instant::now();
        for i in 0..n {
            let key = ChunkKey(i as u128);
            let lease = store.lease(1, key, Duration::from_secs(10))?;
            let read = store.get(1, key, false)?.hit().context("chunk vanished")?;
            dst.copy_from_slice(&read.bytes);
            store.release(lease.id)?;
        }
        gets.push(gbps(len * n, t.elapsed()));
        let t = Instant::now();
        for (d, s) in dsts.iter_mut().zip(&src) {
            d.copy_from_slice(s);
            std::hint::black_box(&d);
        }
        copies.push(gbps(len * n, t.elapsed()));
        let t = Instant::now();
        for s in &src {
            dst.copy_from_slice(s);
            std::hint::black_box(&dst);
        }
        same.push(gbps(len * n, t.elapsed()));
        if r == 0 {
            anyhow::ensure!(dst == src[n - 1], "memcpy check");
        }
    }
    Ok(HostFigures {
        put: median(&puts),
        get: median(&gets),
        memcpy: median(&copies),
        memcpy_one_dst: median(&same),
    })
}

struct DiskFigures {
    write: f64,
    read: f64,
    raw_write: f64,
    raw_read: f64,
}

/// Disk tier vs plain file I/O: both fdatasync each chunk; both read back through the page cache.
fn bench_disk(dir: &PathBuf, len: usize, n: usize, reps: usize) -> Result<DiskFigures> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let src: Vec<Vec<u8>> = (0..n).map(|i| payload(len, i as u64 + 7)).collect();
    let meta = ChunkMeta::raw(1, 1, 256, 0, len as u64);
    let mut buf = vec![0u8; len];
    let (mut w, mut r, mut rw, mut rr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let tier_dir = dir.join(format!("tier-{rep}"));
        let mut cfg = DiskConfig::new(&tier_dir, (len * n * 2) as u64);
        cfg.durability = Durability::Always;
        let tier = DiskTier::open(cfg)?;
        let t = Instant::now();
        for (i, s) in src.iter().enumerate() {
            tier.put(ChunkKey(i as u128), &meta, s)?;
        }
        w.push(gbps(len * n, t.elapsed()));
        let t = Instant::now();
        for i in 0..n {
            tier.read_into(ChunkKey(i as u128), &mut buf)?
                .context("disk chunk missing")?;
        }
        r.push(gbps(len * n, t.elapsed()));
        anyhow::ensure!(buf == src[n - 1], "disk read back wrong bytes");
        drop(tier);
        let _ = std::fs::remove_dir_all(&tier_dir);

        let raw = dir.join(format!("raw-{rep}"));
        let mut f = File::create(&raw)?;
        let t = Instant::now();
        for s in &src {
            f.write_all(s)?;
            f.sync_data()?;
        }
        rw.push(gbps(len * n, t.elapsed()));
        let f = File::open(&raw)?;
        let t = Instant::now();
        for i in 0..n {
            f.read_exact_at(&mut buf, (i * len) as u64)?;
        }
        rr.push(gbps(len * n, t.elapsed()));
        drop(f);
        let _ = std::fs::remove_file(&raw);
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(DiskFigures {
        write: median(&w),
        read: median(&r),
        raw_write: median(&rw),
        raw_read: median(&rr),
    })
}

/// Lookup latency of a 128k-token prompt whose chunks are all present, in microseconds.
fn bench_lookup(iters: usize) -> Result<(f64, f64, usize)> {
    let host = Arc::new(HostTier::new(HostConfig::with_budget(64 << 20)));
    let store = TieredStore::new(StoreConfig::default(), host, Vec::new());
    let layout = ModelLayout::llama31_8b();
    let ns = Namespace::new(layout.fingerprint(), "bench");
    let tokens: Vec<u32> = (0..128 * 1024u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_000)
        .collect();
    let keys = ns.chunk_keys(&tokens);
    for (i, k) in keys.iter().enumerate() {
        // Lookup cost does not depend on payload size; small payloads keep the run light.
        store.put(
            *k,
            ChunkMeta::raw(ns.tenant_id(), layout.fingerprint(), 256, i as u32, 64),
            &[0u8; 64],
        )?;
    }
    let mut us = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let r = store.lookup(&ns, &tokens);
        us.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(r.chunks.len() == keys.len(), "lookup missed chunks");
    }
    Ok((median(&us), percentile(&us, 99.0), keys.len()))
}

/// Nanoseconds per token to hash a 128k-token prompt into chunk keys.
fn bench_hash(reps: usize) -> f64 {
    let ns = Namespace::new(1, "bench");
    let tokens: Vec<u32> = (0..128 * 1024u32).collect();
    let mut per = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let keys = ns.chunk_keys(std::hint::black_box(&tokens));
        std::hint::black_box(keys);
        per.push(t.elapsed().as_secs_f64() * 1e9 / tokens.len() as f64);
    }
    median(&per)
}

pub fn run(args: Args) -> Result<()> {
    let (n_llama, n_smol, reps) = if args.quick { (6, 16, 3) } else { (16, 48, 7) };
    let llama = ModelLayout::llama31_8b().chunk_bytes(256);
    let smol = ModelLayout::smollm2_135m().chunk_bytes(256);
    println!(
        "kvtier store bench ({} mode)",
        if args.quick { "quick" } else { "full" }
    );
    let hl = bench_host(llama, n_llama, reps)?;
    let hs = bench_host(smol, n_smol, reps)?;
    let dl = bench_disk(&args.dir, llama, n_llama.min(8), reps.min(3))?;
    let ds = bench_disk(&args.dir, smol, n_smol.min(24), reps.min(3))?;
    let (lk50, lk99, lk_chunks) = bench_lookup(if args.quick { 300 } else { 2000 })?;
    let hash = bench_hash(if args.quick { 10 } else { 50 });

    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "measure (median GB/s)", "kvtier", "baseline", "ratio"
    );
    let row =
        |name: &str, a: f64, b: f64| println!("{name:<34} {a:>10.2} {b:>10.2} {:>8.2}", a / b);
    row("host put 32 MiB vs memcpy", hl.put, hl.memcpy);
    row("host get 32 MiB vs memcpy 1 dst", hl.get, hl.memcpy_one_dst);
    row("host put 5.6 MiB vs memcpy", hs.put, hs.memcpy);
    row(
        "host get 5.6 MiB vs memcpy 1 dst",
        hs.get,
        hs.memcpy_one_dst,
    );
    row("disk write 32 MiB vs raw (fsync)", dl.write, dl.raw_write);
    row("disk read 32 MiB vs raw (cached)", dl.read, dl.raw_read);
    row("disk write 5.6 MiB vs raw (fsync)", ds.write, ds.raw_write);
    row("disk read 5.6 MiB vs raw (cached)", ds.read, ds.raw_read);
    println!("lookup 128k tokens ({lk_chunks} chunks): p50 {lk50:.1} us, p99 {lk99:.1} us");
    println!("key hashing: {hash:.3} ns/token");

    let mut f = Figures::new("store");
    f.num("host_put_gbps", hl.put);
    f.num("host_get_gbps", hl.get);
    f.num("memcpy_gbps", hl.memcpy);
    f.num("memcpy_one_dst_gbps", hl.memcpy_one_dst);
    f.num("host_put_vs_memcpy", hl.put / hl.memcpy);
    // A get copies into one caller buffer: compare with memcpy into one reused buffer.
    f.num("host_get_vs_memcpy", hl.get / hl.memcpy_one_dst);
    f.num("smol_host_put_vs_memcpy", hs.put / hs.memcpy);
    f.num("smol_host_get_vs_memcpy", hs.get / hs.memcpy_one_dst);
    f.num("disk_write_gbps", dl.write);
    f.num("disk_read_gbps", dl.read);
    f.num("raw_write_gbps", dl.raw_write);
    f.num("raw_read_gbps", dl.raw_read);
    f.num("disk_write_vs_raw", dl.write / dl.raw_write);
    f.num("disk_read_vs_raw", dl.read / dl.raw_read);
    f.num("smol_disk_write_vs_raw", ds.write / ds.raw_write);
    f.num("smol_disk_read_vs_raw", ds.read / ds.raw_read);
    f.num("lookup_128k_p50_us", lk50);
    f.num("lookup_128k_p99_us", lk99);
    f.num("hash_ns_per_token", hash);
    f.print();
    Ok(())
}
