//! Crash test of the disk tier: a writer process is killed with SIGKILL at random moments, and
//! every chunk it acknowledged must read back bit-exact after reopening; then a damaged record
//! must be refused while the others still read.
//!
//! The kill moments come from a seed printed at the start; `KVTIER_CRASH_SEED=<seed>` replays
//! the same schedule (the writer's progress at each moment still depends on the machine).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvtier_cache::{CacheError, ChunkKey, Tier};
use kvtier_offload::{DiskConfig, DiskTier, Durability};
use kvtier_tests::{seed, xorshift};

#[allow(dead_code)]
#[path = "../src/bin/crash_writer.rs"]
mod crash_writer;

use crash_writer::{BUDGET, chunk_meta, chunk_payload};

const ROUNDS: u64 = 24;

/// What the writer reported, accumulated over all rounds.
#[derive(Default)]
struct Ledger {
    acked: HashSet<u64>,
    /// Removal started but not confirmed: the chunk may or may not be there.
    removing: HashSet<u64>,
    deleted: HashSet<u64>,
}

impl Ledger {
    fn apply(&mut self, line: &str) {
        let Some((verb, key)) = line.split_once(' ') else {
            return;
        };
        let Ok(key) = key.parse::<u64>() else { return };
        match verb {
            "ACK" => {
                self.acked.insert(key);
            }
            "REMOVING" => {
                self.removing.insert(key);
            }
            "DEL" => {
                self.removing.remove(&key);
                self.acked.remove(&key);
                self.deleted.insert(key);
            }
            _ => panic!("unexpected writer line {line:?}"),
        }
    }
}

fn open(dir: &Path) -> DiskTier {
    DiskTier::open(DiskConfig {
        durability: Durability::None,
        ..DiskConfig::new(dir, BUDGET)
    })
    .expect("reopen after crash")
}

/// Checks the reopened tier against everything the writer acknowledged.
fn check(tier: &DiskTier, ledger: &Ledger, round: u64) {
    for &key in &ledger.acked {
        match tier.get(ChunkKey(key as u128)).expect("read after crash") {
            Some((meta, bytes)) => {
                assert_eq!(meta, chunk_meta(key), "round {round}: metadata of {key}");
                assert!(
                    bytes[..] == chunk_payload(key)[..],
                    "round {round}: bytes of {key} differ"
                );
            }
            None => assert!(
                ledger.removing.contains(&key),
                "round {round}: acknowledged chunk {key} lost"
            ),
        }
    }
    for &key in &ledger.deleted {
        assert!(
            !tier.contains(ChunkKey(key as u128)),
            "round {round}: deleted chunk {key} came back"
        );
    }
    // Chunks written but not yet acknowledged may be present, but only with their own bytes.
    for (key, _) in tier.entries() {
        let key = key.0 as u64;
        if !ledger.acked.contains(&key) {
            let (_, bytes) = tier
                .get(ChunkKey(key as u128))
                .unwrap()
                .expect("listed chunk");
            assert!(
                bytes[..] == chunk_payload(key)[..],
                "round {round}: unacknowledged {key} has foreign bytes"
            );
        }
    }
}

#[test]
fn acknowledged_chunks_survive_sigkill_and_damage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut seed = seed("KVTIER_CRASH_SEED");
    let mut ledger = Ledger::default();
    let mut rounds_with_acks = 0;
    for round in 0..ROUNDS {
        let mode = if round % 2 == 0 { "batch" } else { "always" };
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer"))
            .arg(dir.path())
            .arg((round * 1_000_000).to_string())
            .arg(mode)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn crash_writer");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            // Only whole lines count: a line cut short by the kill was never fully reported.
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    lines.push(line.trim_end().to_string());
                }
                line.clear();
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(150 + xorshift(&mut seed) % 500));
        child.kill().expect("SIGKILL the writer");
        let status = child.wait().unwrap();
        assert!(!status.success(), "writer exited on its own: {status}");
        let lines = reader.join().unwrap();
        assert_eq!(
            lines.first().map(String::as_str),
            Some("READY"),
            "round {round}: writer failed to open"
        );
        let acks = lines.iter().filter(|l| l.starts_with("ACK")).count();
        rounds_with_acks += (acks > 0) as u32;
        for line in &lines[1..] {
            ledger.apply(line);
        }
        let tier = open(dir.path());
        check(&tier, &ledger, round);
        assert!(
            tier.usage().bytes <= BUDGET,
            "round {round}: {:?}",
            tier.usage()
        );
    }
    assert!(
        rounds_with_acks >= ROUNDS as u32 / 2,
        "only {rounds_with_acks} rounds wrote anything"
    );
    assert!(
        !ledger.deleted.is_empty(),
        "the writer never filled the tier"
    );

    // Damage one byte of one acknowledged payload.
    let tier = open(dir.path());
    let mut live: Vec<u64> = ledger
        .acked
        .iter()
        .copied()
        .filter(|k| tier.contains(ChunkKey(*k as u128)))
        .collect();
    live.sort_unstable();
    assert!(live.len() >= 3, "too few chunks left to damage one");
    let victim = live[live.len() / 2];
    let loc = tier.locate(ChunkKey(victim as u128)).unwrap();
    drop(tier);
    let mut bytes = std::fs::read(&loc.segment).unwrap();
    let at = (loc.payload_offset + loc.payload_len / 2) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(&loc.segment, &bytes).unwrap();

    let tier = open(dir.path());
    match tier.get(ChunkKey(victim as u128)) {
        Err(CacheError::Corrupt(_)) | Ok(None) => {}
        Err(e) => panic!("unexpected error for the damaged chunk: {e}"),
        Ok(Some(_)) => panic!("damaged chunk {victim} was served"),
    }
    assert!(
        tier.get(ChunkKey(victim as u128)).unwrap().is_none(),
        "damaged chunk served on a second read"
    );
    let mut others = HashMap::new();
    for &key in live.iter().filter(|k| **k != victim) {
        let (_, got) = tier
            .get(ChunkKey(key as u128))
            .unwrap()
            .expect("undamaged chunk");
        others.insert(key, got[..] == chunk_payload(key)[..]);
    }
    assert!(others.values().all(|ok| *ok), "an undamaged chunk changed");
    eprintln!(
        "{ROUNDS} kills: {} chunks acknowledged and kept, {} deleted, {:?}",
        ledger.acked.len(),
        ledger.deleted.len(),
        started.elapsed()
    );
}
