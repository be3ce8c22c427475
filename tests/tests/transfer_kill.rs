//! Faults of prefill→decode transfers with real `kvtier serve` processes, SIGKILLed mid-transfer:
//! - the receiver dies: the sender's push fails (it does not hang) and lets go of every view of
//!   the chunks it was sending; the restarted receiver holds no chunk of the transfer; a retry
//!   with the same id completes byte-exact;
//! - the sender (a prefill server pushing to an in-process receiver) dies: the receiver frees
//!   the reservation within its `transfer_timeout_ms` and shows no partial chunk.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvtier::testing::TestServer;
use kvtier_cache::{ChunkKey, ChunkMeta, ModelLayout};
use kvtier_client::Client;
use kvtier_client::transfer::{self, OutgoingChunk, PushOptions};
use kvtier_tests::{connect_when_up, free_port, spawn_serve};

/// Llama-3.1-8B chunks of 16 tokens (2 MiB each, 32 layers).
const TOKENS: usize = 16;

fn spawn(dir: &Path, port: u16) -> Child {
    spawn_serve(
        env!("CARGO_BIN_EXE_kvtier_process"),
        dir,
        port,
        "768MiB",
        "batch",
    )
}

fn request(n: usize, base: u128) -> Vec<OutgoingChunk> {
    let l = ModelLayout::llama31_8b();
    let len = l.chunk_bytes(TOKENS);
    (0..n)
        .map(|c| {
            let mut x = (base as u64 + c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let bytes: Vec<u8> = (0..len / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect();
            let mut meta = ChunkMeta::raw(0, l.fingerprint(), TOKENS as u32, c as u32, len as u64);
            meta.parent = c.checked_sub(1).map(|p| ChunkKey(base + p as u128));
            OutgoingChunk {
                key: ChunkKey(base + c as u128),
                meta,
                bytes: Bytes::from(bytes),
            }
        })
        .collect()
}

fn keys(c: &[OutgoingChunk]) -> Vec<ChunkKey> {
    c.iter().map(|c| c.key).collect()
}

/// Waits (polling while the transfer is not begun yet) until layer 0 arrived.
async fn first_layer(c: &Client, id: u128) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.wait_layers(id, 1, Duration::from_secs(30)).await {
            Ok(p) if p.layers_done >= 1 => return,
            Ok(p) => panic!("wait ended early: {p:?}"),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_micros(200)).await
            }
            Err(e) => panic!("transfer never began: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_mid_transfer_then_retry_completes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn(dir.path(), port);
    let conns = vec![connect_when_up(&addr).await, connect_when_up(&addr).await];
    let watcher = connect_when_up(&addr).await;
    let chunks = request(96, 1 << 40);
    let opts = PushOptions {
        layers: 32,
        layers_per_run: 1,
        timeout: Duration::from_secs(30),
    };
    let push = {
        let (conns, chunks) = (conns.clone(), chunks.clone());
        tokio::spawn(async move { transfer::push(&conns, 77, &chunks, opts).await })
    };
    first_layer(&watcher, 77).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), push)
        .await
        .expect("the push reports the dead receiver instead of hanging")
        .unwrap();
    assert!(r.is_err(), "push to a killed receiver succeeded: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Every view the push took of the chunks is gone: only ours remain.
    assert!(
        chunks.iter().all(|c| c.bytes.is_unique()),
        "sender still holds chunk views"
    );
    drop(conns);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn(dir.path(), port);
    let c = connect_when_up(&addr).await;
    let got = c.get(&keys(&chunks)[..64], false).await.unwrap();
    assert!(
        got.iter().all(Option::is_none),
        "a chunk of the killed transfer survived"
    );
    let r = transfer::push(std::slice::from_ref(&c), 77, &chunks, opts)
        .await
        .unwrap();
    assert_eq!(r.calls, 32);
    for batch in chunks.chunks(16) {
        let got = c.get(&keys(batch), false).await.unwrap();
        for (want, got) in batch.iter().zip(got) {
            assert_eq!(got.expect("stored after the retry").bytes, want.bytes);
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_killed_mid_transfer_frees_the_reservation() {
    let decode = TestServer::start(|c| {
        c.host_bytes = 512 << 20;
        c.transfer_bytes = 512 << 20;
        c.transfer_timeout_ms = 500;
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut prefill = spawn(dir.path(), port);
    let p = connect_when_up(&addr).await;
    let chunks = request(96, 2 << 40);
    for c in &chunks {
        p.put(c.key, &c.meta, &c.bytes).await.unwrap();
    }
    let d = connect_when_up(&decode.tcp).await;
    let push = {
        let (p, keys, to) = (p.clone(), keys(&chunks), decode.tcp.clone());
        tokio::spawn(async move { p.push_transfer(5, &keys, &to, 1, 1).await })
    };
    first_layer(&d, 5).await;
    prefill.kill().unwrap();
    prefill.wait().unwrap();
    assert!(
        push.await.unwrap().is_err(),
        "the killed sender cannot report success"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (free, cap, known) = decode.svc.transfers.stats();
        if free == cap && known == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reservation still held: {free}/{cap}, {known}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = d.get(&keys(&chunks)[..64], false).await.unwrap();
    assert!(
        got.iter().all(Option::is_none),
        "a partial chunk is visible"
    );
    assert_eq!(decode.svc.store.stats().chunks, 0);
}
