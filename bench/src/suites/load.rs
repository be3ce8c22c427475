//! `load` suite: many concurrent clients doing put/get against one server for a fixed time.
//!
//! 256 clients (fewer with `--quick`) each loop put + get of 256 KiB chunks over a key space
//! larger than the host budget, so eviction runs the whole time. Passes when no request fails
//! and every get returns either a miss or exactly the bytes put under that key; reports the
//! process's peak resident memory against the configured host budget (the server and the
//! clients share this process, so the figure includes the clients' buffers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use kvtier::client::{Client, ClientOptions};
use kvtier_cache::{ChunkKey, ChunkMeta};

use crate::report::{Figures, rss};

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Concurrent clients.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Seconds to run.
    #[arg(long)]
    pub seconds: Option<u64>,
}

const CHUNK: usize = 256 << 10;
const HOST_BUDGET: u64 = 256 << 20;
const KEYS: u64 = 4096; // 1 GiB of distinct chunks: four times the host budget

fn payload_for(key: u64) -> Vec<u8> {
    crate::inproc::payload(CHUNK, key)
}

pub fn run(args: Args) -> Result<()> {
    crate::inproc::runtime()?.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    let clients = args.clients.unwrap_or(if args.quick { 64 } else { 256 });
    let secs = args.seconds.unwrap_or(if args.quick { 10 } else { 30 });
    let server = crate::inproc::server(HOST_BUDGET, |c| c.max_in_flight = 16)?;
    let addr = server.tcp.clone();
    let (rss_before, _) = rss();
    let ops = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Client::connect(&addr, ClientOptions::default())
            .await
            .context("connecting a load client")?;
        let (ops, hits, bytes) = (ops.clone(), hits.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut i = c as u64 * 7919;
            while Instant::now() < deadline {
                let k = i % KEYS;
                i = i.wrapping_add(1_000_003);
                let data = payload_for(k);
                client
                    .put(
                        ChunkKey(u128::from(k) + 1),
                        &ChunkMeta::raw(0, 1, 256, 0, CHUNK as u64),
                        &data,
                    )
                    .await?;
                let probe = (k * 31 + 7) % KEYS;
                let (e, b) = client
                    .get_into(&[ChunkKey(u128::from(probe) + 1)], false, buf)
                    .await?;
                buf = b;
                if let Some((_, range)) = &e[0] {
                    if buf[range.clone()] != payload_for(probe)[..] {
                        bail!("key {probe} returned bytes that were never put under it");
                    }
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                ops.fetch_add(2, Ordering::Relaxed);
                bytes.fetch_add((CHUNK * 2) as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let mut errors = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let (_, peak) = rss();
    let stats = server.svc.store.stats();
    let host = &stats.tiers[0];
    server.stop()?;

    let ops = ops.load(Ordering::Relaxed);
    let gbps = bytes.load(Ordering::Relaxed) as f64 / secs as f64 / 1e9;
    // Fixed overhead beyond the budget: the carve cap's two spare arenas, plus per-client
    // buffers (a reused get buffer and a payload) and socket buffers.
    let overhead = peak.saturating_sub(rss_before).saturating_sub(HOST_BUDGET);
    println!(
        "kvtier load bench: {clients} clients, {secs} s, 256 KiB chunks, host budget {} MiB",
        HOST_BUDGET >> 20
    );
    println!(
        "requests {ops} ({:.0}/s), {gbps:.2} GB/s, get hits {}, errors {errors}",
        ops as f64 / secs as f64,
        hits.load(Ordering::Relaxed)
    );
    println!(
        "host tier: {} chunks, {} MiB charged of {} MiB, {} evictions",
        host.usage.chunks,
        host.usage.bytes >> 20,
        host.usage.budget >> 20,
        host.evictions
    );
    println!(
        "resident memory: {} MiB at start, {} MiB peak; peak above start and budget: {} MiB ({} KiB per client)",
        rss_before >> 20,
        peak >> 20,
        overhead >> 20,
        overhead / 1024 / clients as u64
    );
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    let mut f = Figures::new("load");
    f.set("clients", clients);
    f.set("seconds", secs);
    f.set("requests", ops);
    f.set("errors", errors);
    f.num("gbps", gbps);
    f.set("host_budget_mib", HOST_BUDGET >> 20);
    f.set("host_charged_end_mib", host.usage.bytes >> 20);
    f.set("rss_peak_mib", peak >> 20);
    f.set("rss_over_budget_mib", overhead >> 20);
    f.print();
    if errors > 0 {
        bail!("{errors} clients failed");
    }
    Ok(())
}
