//! `gpu` suite: the GPU tier and page gathering against plain pinned copies, in the same run.
//!
//! - host→device and device→host of 32 MiB chunks through [`GpuTier`] (put from pinned host
//!   memory; get into a pooled pinned buffer, and `get_into` a caller's pinned buffer; both
//!   with the tier's CRC32C check) against a plain pinned `cuMemcpy` of the same size;
//! - a 4k-token request scattered over 16-token pages of a paged KV buffer (one page = one
//!   layer's K or V for 16 tokens, 8 KV heads × 128 dims × bf16 = 32 KiB; 32 layers, so
//!   16,384 pages, 512 MiB), saved to host one copy per page (as paged engines do) against
//!   kvtier's gathered copy (one kernel launch gathers the pages on the device, then one copy);
//!   and restored the same two ways (one copy, then one scatter launch). Results are checked
//!   bit-exact against each other.
//! - The IPC save/restore round trip is not measured: CUDA IPC engine registration is not built
//!   yet, and the table says so (`ipc_*` are `null`).
//!
//! Without a GPU it prints why, ends with `{"suite":"gpu","gpu":null,...}` and exits 0 — or 1
//! when `KVTIER_REQUIRE_GPU=1`, so a GPU machine never records an empty run as a success.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvtier_cache::{ChunkKey, ChunkMeta, Tier};
use kvtier_offload::gpu::{
    self, DeviceBuffer, GpuBudget, GpuConfig, GpuDevice, GpuTier, PageCopier,
};

use crate::inproc::payload;
use crate::report::{Figures, median};

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute).
    #[arg(long)]
    pub quick: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

const CHUNK: usize = 32 << 20;
const PAGE_TOKENS: usize = 16;
/// 16 tokens × 8 KV heads × 128 dims × 2 bytes (bf16): one layer's K (or V) for one page.
const PAGE_BYTES: usize = PAGE_TOKENS * 8 * 128 * 2;
const REQUEST_TOKENS: usize = 4096;

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Median GB/s of `reps` runs of `f`, each moving `bytes`.
fn time(reps: usize, bytes: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: first-touch of pinned pools, lazy driver state
    let mut xs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        xs.push(gbps(bytes, t.elapsed().as_secs_f64()));
    }
    Ok(median(&xs))
}

pub fn run(args: Args) -> Result<()> {
    let dev = match GpuDevice::open(args.device) {
        Ok(d) => d,
        Err(e) => {
            println!("gpu suite: no gpu, nothing measured: {e}");
            let mut f = Figures::new("gpu");
            f.set("gpu", serde_json::Value::Null);
            f.set("reason", e.to_string());
            f.print();
            if gpu::gpu_required() {
                bail!("KVTIER_REQUIRE_GPU=1 but no gpu: {e}");
            }
            return Ok(());
        }
    };
    let info = dev.info()?;
    println!(
        "device {}: {} (sm {}.{}), {:.1} GiB free of {:.1} GiB",
        info.ordinal,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.free_bytes as f64 / (1u64 << 30) as f64,
        info.total_bytes as f64 / (1u64 << 30) as f64
    );
    let reps = if args.quick { 5 } else { 20 };
    let mut fig = Figures::new("gpu");
    fig.set("gpu", info.name.clone());
    fig.set("quick", args.quick);

    // 1. Plain pinned copies of one 32 MiB buffer: the baseline.
    let mut pinned = dev.pinned(CHUNK)?;
    pinned.copy_from_slice(&payload(CHUNK, 1));
    let mut dbuf = DeviceBuffer::new(&dev, CHUNK)?;
    let pin_h2d = time(reps, CHUNK, || Ok(dbuf.upload(0, &pinned)?))?;
    let pin_d2h = time(reps, CHUNK, || Ok(dbuf.download(0, &mut pinned)?))?;
    drop(dbuf);

    // 2. The GPU tier: 8 chunks per round, put from pinned memory, read back two ways.
    let n = 8;
    let tier = GpuTier::on_device(
        dev.clone(),
        &GpuConfig::with_budget(GpuBudget::Bytes(((n + 2) * CHUNK) as u64)),
    )?;
    let srcs: Vec<_> = (0..n)
        .map(|i| -> Result<_> {
            let mut b = dev.pinned(CHUNK)?;
            b.copy_from_slice(&payload(CHUNK, 10 + i as u64));
            Ok(b)
        })
        .collect::<Result<_>>()?;
    let meta = ChunkMeta::raw(1, 1, 4096, 0, CHUNK as u64);
    let tier_h2d = time(reps, n * CHUNK, || {
        for (i, s) in srcs.iter().enumerate() {
            tier.put(ChunkKey(i as u128), &meta, s)?;
        }
        Ok(())
    })?;
    let tier_d2h = time(reps, n * CHUNK, || {
        for i in 0..n {
            let (_, b) = tier.get(ChunkKey(i as u128))?.context("chunk vanished")?;
            anyhow::ensure!(b.len() == CHUNK);
        }
        Ok(())
    })?;
    let mut dst = dev.pinned(CHUNK)?;
    let tier_d2h_into = time(reps, n * CHUNK, || {
        for i in 0..n {
            tier.get_into(ChunkKey(i as u128), &mut dst)?;
        }
        Ok(())
    })?;
    let (_, back) = tier.get(ChunkKey(3))?.context("chunk 3")?;
    anyhow::ensure!(back[..] == srcs[3][..], "gpu tier returned different bytes");
    drop((tier, srcs, dst, back, pinned));

    // 3. A scattered request: per-page copies against one gather launch + one copy.
    let layers = if args.quick { 8 } else { 32 };
    let paged = paged(&dev, layers, reps.min(10))?;

    println!();
    println!(
        "{:<46} {:>10} {:>10}",
        "path (32 MiB chunks)", "GB/s", "vs pinned"
    );
    let row = |name: &str, v: f64, base: f64| {
        println!("{name:<46} {v:>10.2} {:>10.3}", v / base);
    };
    row("pinned cuMemcpy host->device", pin_h2d, pin_h2d);
    row("gpu tier put (host->device, crc32c)", tier_h2d, pin_h2d);
    row("pinned cuMemcpy device->host", pin_d2h, pin_d2h);
    row(
        "gpu tier get (device->host, crc32c, Bytes)",
        tier_d2h,
        pin_d2h,
    );
    row(
        "gpu tier get_into (pinned dst, crc32c)",
        tier_d2h_into,
        pin_d2h,
    );
    println!();
    println!(
        "request: {REQUEST_TOKENS} tokens, {layers} layers x K,V, pages of {PAGE_TOKENS} tokens = {} KiB; {} pages, {} MiB",
        PAGE_BYTES >> 10,
        paged.pieces,
        paged.bytes >> 20
    );
    println!("{:<46} {:>10} {:>10}", "path", "GB/s", "vs naive");
    match paged.gathered {
        Some((save, restore)) => {
            row(
                "save: one cuMemcpy per page (naive)",
                paged.naive_save,
                paged.naive_save,
            );
            row("save: gather launch + one copy", save, paged.naive_save);
            row(
                "restore: one cuMemcpy per page (naive)",
                paged.naive_restore,
                paged.naive_restore,
            );
            row(
                "restore: one copy + scatter launch",
                restore,
                paged.naive_restore,
            );
        }
        None => {
            row(
                "save: one cuMemcpy per page (naive)",
                paged.naive_save,
                paged.naive_save,
            );
            println!(
                "gathered copies not measured: {}",
                paged.why.as_deref().unwrap_or("?")
            );
        }
    }
    println!("ipc save/restore: not measured (CUDA IPC engine registration is not built)");

    fig.num("pinned_h2d_gbps", pin_h2d);
    fig.num("pinned_d2h_gbps", pin_d2h);
    fig.num("pinned_copy_gbps", (pin_h2d + pin_d2h) / 2.0);
    fig.num("h2d_gbps", tier_h2d);
    fig.num("d2h_gbps", tier_d2h);
    fig.num("d2h_into_gbps", tier_d2h_into);
    fig.num("h2d_vs_pinned", tier_h2d / pin_h2d);
    fig.num("d2h_vs_pinned", tier_d2h / pin_d2h);
    fig.num("paged_naive_gbps", paged.naive_save);
    fig.num("paged_restore_naive_gbps", paged.naive_restore);
    match paged.gathered {
        Some((save, restore)) => {
            fig.num("paged_gathered_gbps", save);
            fig.num("gathered_vs_naive", save / paged.naive_save);
            fig.num("paged_restore_gathered_gbps", restore);
            fig.num("restore_gathered_vs_naive", restore / paged.naive_restore);
        }
        None => {
            fig.set("paged_gathered_gbps", serde_json::Value::Null);
            fig.set("gathered_vs_naive", serde_json::Value::Null);
            fig.set("gather_unavailable", paged.why.clone().unwrap_or_default());
        }
    }
    fig.set("paged_pieces", paged.pieces as u64);
    fig.set("ipc_save_ms", serde_json::Value::Null);
    fig.set("ipc_restore_ms", serde_json::Value::Null);
    fig.set("ipc", "not built");
    fig.print();
    Ok(())
}

struct Paged {
    pieces: usize,
    bytes: usize,
    naive_save: f64,
    naive_restore: f64,
    /// (save, restore) GB/s of the gathered path, when the kernel could be built.
    gathered: Option<(f64, f64)>,
    why: Option<String>,
}

/// A paged buffer of `layers` × {K, V} × 1024 pages; a request owns 256 random pages of each.
fn paged(dev: &Arc<GpuDevice>, layers: usize, reps: usize) -> Result<Paged> {
    const POOL_PAGES: usize = 1024;
    let pages_per_seq = REQUEST_TOKENS / PAGE_TOKENS;
    let planes = layers * 2;
    let pool_bytes = planes * POOL_PAGES * PAGE_BYTES;
    let mut pool = DeviceBuffer::new(dev, pool_bytes)?;
    // Fill the pool with a pattern, 64 MiB at a time.
    let step = 64 << 20;
    let pattern = payload(step, 77);
    for off in (0..pool_bytes).step_by(step) {
        let len = step.min(pool_bytes - off);
        pool.upload(off, &pattern[..len])?;
    }
    // Which pages the request owns: a seeded shuffle, as a block table would be after churn.
    let mut ids: Vec<usize> = (0..POOL_PAGES).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let table = &ids[..pages_per_seq];
    let offsets: Vec<usize> = (0..planes)
        .flat_map(|p| {
            table
                .iter()
                .map(move |&b| (p * POOL_PAGES + b) * PAGE_BYTES)
        })
        .collect();
    let bytes = offsets.len() * PAGE_BYTES;
    let mut naive_dst = dev.pinned(bytes)?;
    let naive_save = time(reps, bytes, || {
        Ok(pool.download_pages(&offsets, PAGE_BYTES, &mut naive_dst)?)
    })?;
    let naive_restore = time(reps, bytes, || {
        Ok(pool.upload_pages(&offsets, PAGE_BYTES, &naive_dst)?)
    })?;
    let mut out = Paged {
        pieces: offsets.len(),
        bytes,
        naive_save,
        naive_restore,
        gathered: None,
        why: None,
    };
    match PageCopier::new(dev.clone()) {
        Ok(copier) => {
            let mut staging = DeviceBuffer::new(dev, bytes)?;
            let mut dst = dev.pinned(bytes)?;
            let save = time(reps, bytes, || {
                copier.gather(&pool, &offsets, PAGE_BYTES, &mut staging, 0)?;
                Ok(staging.download(0, &mut dst)?)
            })?;
            anyhow::ensure!(
                dst[..] == naive_dst[..],
                "gathered save differs from per-page save"
            );
            let restore = time(reps, bytes, || {
                staging.upload(0, &dst)?;
                Ok(copier.scatter(&staging, 0, &mut pool, &offsets, PAGE_BYTES)?)
            })?;
            // The restored pages read back as saved.
            pool.download_pages(&offsets, PAGE_BYTES, &mut naive_dst)?;
            anyhow::ensure!(dst[..] == naive_dst[..], "scattered restore lost bytes");
            out.gathered = Some((save, restore));
        }
        Err(e) => {
            if gpu::gpu_required() {
                bail!("KVTIER_REQUIRE_GPU=1 but the gather kernel is unavailable: {e}");
            }
            out.why = Some(e.to_string());
        }
    }
    Ok(out)
}
