//! Kill test of the whole server: a real `kvtier serve` process (write-through, durability
//! `always` or `batch`) takes puts from several wire clients at once and is SIGKILLed at a
//! seeded random moment while they are in flight; it restarts on the same data directory, and
//! every chunk a put acknowledged must read back byte-exact. A chunk whose put was cut off may be
//! absent, but if it is there it holds its own bytes. Several rounds accumulate chunks.
//!
//! The seed is printed; `KVTIER_KILL_SEED=<seed>` replays the same kill schedule.

use std::collections::HashSet;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvtier_cache::{ChunkKey, ChunkMeta};
use kvtier_client::Client;
use kvtier_tests::{connect_when_up, free_port, seed, spawn_serve, xorshift};

const ROUNDS: u64 = 10;
const PUTTERS: u64 = 4;
/// Puts per putter and round at most, so everything fits the disk budget (nothing is evicted
/// from disk, so every acknowledged chunk must still be there).
const MAX_PUTS: u64 = 1000;
/// Bytes of every chunk: an engine's chunks of one layout are all one size. (Mixing many sizes
/// in a small host tier runs into its size-class limit, which is not what this test is about.)
const CHUNK_BYTES: usize = 16 << 10;
const TOKENS: u32 = 256;

/// `kvtier serve` on `dir`, every put written to disk and made durable before it is
/// acknowledged.
fn spawn(dir: &Path, data: u16, durability: &str) -> Child {
    spawn_serve(
        env!("CARGO_BIN_EXE_kvtier_process"),
        dir,
        data,
        "64MiB",
        durability,
    )
}

/// Payload of chunk `key`: a xorshift stream seeded by the key.
fn payload(key: u128) -> Vec<u8> {
    let mut x = (key as u64 ^ (key >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..CHUNK_BYTES / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect()
}

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta::raw(0, 0x5eed, TOKENS, 0, len as u64)
}

/// What the clients were told, over all rounds.
#[derive(Default)]
struct Ledger {
    acked: HashSet<u128>,
    /// Sent but never acknowledged (the server died first): may or may not be there.
    unsure: HashSet<u128>,
}

/// Reads every chunk the ledger names from the restarted server.
async fn check(c: &Client, ledger: &Ledger, round: u64) {
    let keys: Vec<u128> = ledger.acked.iter().chain(&ledger.unsure).copied().collect();
    for batch in keys.chunks(64) {
        let ks: Vec<ChunkKey> = batch.iter().map(|k| ChunkKey(*k)).collect();
        let got = c.get(&ks, false).await.expect("get after restart");
        for (key, g) in batch.iter().zip(got) {
            match g {
                Some(g) => {
                    assert!(
                        g.bytes[..] == payload(*key)[..],
                        "round {round}: chunk {key:#x} has foreign bytes"
                    );
                    assert_eq!(g.meta.tokens, TOKENS, "round {round}: metadata of {key:#x}");
                }
                None => assert!(
                    !ledger.acked.contains(key),
                    "round {round}: acknowledged chunk {key:#x} lost"
                ),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill_of_the_server() {
    let mut seed = seed("KVTIER_KILL_SEED");
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::default();
    for round in 0..=ROUNDS {
        let durability = if round % 2 == 0 { "always" } else { "batch" };
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = spawn(dir.path(), port, durability);
        let c = connect_when_up(&addr).await;
        check(&c, &ledger, round).await;
        if round == ROUNDS {
            // The last start only checks what the previous kill left.
            child.kill().unwrap();
            child.wait().unwrap();
            break;
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let mut putters = Vec::new();
        for p in 0..PUTTERS {
            let (c, acked, sent) = (c.clone(), acked.clone(), sent.clone());
            putters.push(tokio::spawn(async move {
                for n in 0..MAX_PUTS {
                    let key = ((round as u128) << 64) | ((p as u128) << 32) | n as u128 | 1 << 100;
                    let data = payload(key);
                    sent.lock().unwrap().push(key);
                    if c.put(ChunkKey(key), &meta(data.len()), &data)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    acked.lock().unwrap().push(key);
                }
            }));
        }
        // Kill while the puts are in flight: 50–800 ms after they start.
        tokio::time::sleep(Duration::from_millis(50 + xorshift(&mut seed) % 750)).await;
        child.kill().expect("SIGKILL the server");
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: server exited on its own");
        for p in putters {
            p.await.unwrap();
        }
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let sent = std::mem::take(&mut *sent.lock().unwrap());
        eprintln!(
            "round {round} ({durability}): {} puts acknowledged, {} cut off",
            acked.len(),
            sent.len() - acked.len()
        );
        ledger.acked.extend(&acked);
        ledger
            .unsure
            .extend(sent.into_iter().filter(|k| !acked.contains(k)));
    }
    assert!(
        ledger.acked.len() as u64 >= ROUNDS,
        "only {} puts were acknowledged in {ROUNDS} rounds",
        ledger.acked.len()
    );
}
