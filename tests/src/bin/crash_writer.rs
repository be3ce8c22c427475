//! Child process for the disk-tier crash test (`tests/tests/crash.rs`).
//!
//! `crash_writer <dir> <first-key> <always|batch>` opens a `DiskTier` in `dir` and writes chunks
//! forever with payloads derived from their keys, printing `ACK <key>` only after `put` has
//! returned (so the record is durable). When the tier is full it removes its oldest chunk,
//! printing `REMOVING <key>` before and `DEL <key>` after the remove returns. The test kills it
//! with SIGKILL at a random moment and checks that the tier kept every acknowledgement.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use kvtier_cache::{CacheError, ChunkKey, ChunkMeta, Tier};
use kvtier_offload::{DiskConfig, DiskTier, Durability};

/// Budget of the tier, small enough that the writer keeps evicting and the tier compacting.
pub const BUDGET: u64 = 48 << 20;

/// Payload length of chunk `key`: log-uniform between 1 KiB and 2 MiB.
pub fn chunk_len(key: u64) -> usize {
    let h = mix(key);
    let exponent = (h % 10_000) as f64 / 10_000.0 * 11.0;
    (1024.0 * exponent.exp2()) as usize
}

/// Payload of chunk `key` (xorshift stream seeded by the key).
pub fn chunk_payload(key: u64) -> Vec<u8> {
    let mut x = mix(key) | 1;
    let mut out = Vec::with_capacity(chunk_len(key) + 8);
    while out.len() < chunk_len(key) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(chunk_len(key));
    out
}

/// Metadata stored with chunk `key`.
pub fn chunk_meta(key: u64) -> ChunkMeta {
    ChunkMeta::raw(3, 5, 256, (key % 64) as u32, chunk_len(key) as u64)
}

fn mix(key: u64) -> u64 {
    // splitmix64 finaliser
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the test is gone; nothing left to report to.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: crash_writer <dir> <first-key> <always|batch>"
    );
    let first: u64 = args[2].parse()?;
    let (durability, threads) = match args[3].as_str() {
        "always" => (Durability::Always, 1u64),
        "batch" => (
            Durability::Batch {
                max_delay: Duration::from_millis(2),
            },
            3u64,
        ),
        other => anyhow::bail!("unknown durability {other}"),
    };
    let tier = DiskTier::open(DiskConfig {
        durability,
        ..DiskConfig::new(&args[1], BUDGET)
    })?;
    let mut present: Vec<u64> = tier
        .entries()
        .into_iter()
        .map(|(k, _)| k.0 as u64)
        .collect();
    present.sort_unstable();
    let live = Mutex::new(VecDeque::from(present));
    say("READY");
    std::thread::scope(|s| {
        for t in 0..threads {
            let (tier, live) = (&tier, &live);
            s.spawn(move || write_forever(tier, live, first + t, threads));
        }
    });
    Ok(())
}

fn write_forever(tier: &DiskTier, live: &Mutex<VecDeque<u64>>, first: u64, step: u64) {
    let mut key = first;
    loop {
        let payload = chunk_payload(key);
        loop {
            match tier.put(ChunkKey(key as u128), &chunk_meta(key), &payload) {
                Ok(()) => break,
                Err(CacheError::TierFull { .. }) => {
                    let Some(victim) = live.lock().expect("live list").pop_front() else {
                        continue;
                    };
                    say(&format!("REMOVING {victim}"));
                    tier.remove(ChunkKey(victim as u128)).expect("remove");
                    say(&format!("DEL {victim}"));
                }
                Err(e) => panic!("put {key}: {e}"),
            }
        }
        say(&format!("ACK {key}"));
        live.lock().expect("live list").push_back(key);
        key += step;
    }
}
