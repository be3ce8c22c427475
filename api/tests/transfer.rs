//! Prefill→decode transfers between two in-process servers over loopback: byte-exact push and
//! pull, layer progress before the last layer, tenant isolation, credentials, malformed and
//! oversized requests, a sender that disappears mid-frame, and idempotent retries.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvtier::client::transfer::{self, OutgoingChunk};
use kvtier::client::{Client, ClientOptions};
use kvtier::testing::TestServer;
use kvtier::wire::{self, AlignedVec, ErrorCode, Limits, Opcode};
use kvtier_cache::{ChunkKey, ChunkMeta, Dtype, ModelLayout};
use tokio::io::AsyncWriteExt;

const LAYERS: u32 = 8;
const TOKENS: u32 = 16;
const TOKEN: &str = "transfer-secret";

fn layout() -> ModelLayout {
    ModelLayout::mha("transfer-test", LAYERS, 2, 64, Dtype::Bf16)
}

fn chunks(tenant: &str, base: u128, n: usize) -> Vec<OutgoingChunk> {
    let l = layout();
    let len = l.chunk_bytes(TOKENS as usize);
    (0..n)
        .map(|c| {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    (i as u32)
                        .wrapping_mul(2654435761)
                        .wrapping_add((base as u32) ^ (c as u32 * 977)) as u8
                })
                .collect();
            let mut meta = ChunkMeta::raw(
                kvtier_cache::key::tenant_id(tenant),
                l.fingerprint(),
                TOKENS,
                c as u32,
                len as u64,
            );
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

async fn connect(addr: &str, token: Option<&str>, tenant: &str) -> Client {
    Client::connect(
        addr,
        ClientOptions {
            token: token.map(str::to_string),
            tenant: Some(tenant.into()),
            client_name: "transfer-test".into(),
        },
    )
    .await
    .unwrap()
}

async fn put_all(c: &Client, chunks: &[OutgoingChunk]) {
    for ch in chunks {
        c.put(ch.key, &ch.meta, &ch.bytes).await.unwrap();
    }
}

async fn assert_exact(c: &Client, chunks: &[OutgoingChunk]) {
    let got = c.get(&keys(chunks), false).await.unwrap();
    for (want, got) in chunks.iter().zip(got) {
        let got = got.expect("transferred chunk is stored");
        assert_eq!(got.bytes, want.bytes, "chunk {:?} differs", want.key);
        assert_eq!(got.meta.tokens, want.meta.tokens);
        assert_eq!(got.meta.parent, want.meta.parent);
    }
}

fn server(tune: impl FnOnce(&mut kvtier::config::ServeConfig)) -> TestServer {
    TestServer::start(|c| {
        c.layouts = vec![layout()];
        c.token = Some(TOKEN.into());
        tune(c);
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_are_byte_exact_and_retries_are_idempotent() {
    let prefill = server(|_| {});
    let decode = server(|_| {});
    let p = connect(&prefill.tcp, Some(TOKEN), "a").await;
    let d = connect(&decode.tcp, Some(TOKEN), "a").await;

    let pushed = chunks("a", 1000, 5);
    put_all(&p, &pushed).await;
    let r = p
        .push_transfer(1, &keys(&pushed), &decode.tcp, 2, 3)
        .await
        .unwrap();
    assert_eq!((r.chunks, r.layers, r.calls), (5, LAYERS, 3), "{r:?}");
    assert_eq!(
        r.bytes,
        pushed.iter().map(|c| c.bytes.len() as u64).sum::<u64>()
    );
    assert_exact(&d, &pushed).await;
    let stored = decode.svc.store.stats().chunks;
    // The same id again: nothing is sent, nothing is stored twice.
    let again = p
        .push_transfer(1, &keys(&pushed), &decode.tcp, 2, 3)
        .await
        .unwrap();
    assert_eq!(again.calls, 0);
    assert_eq!(decode.svc.store.stats().chunks, stored);

    let pulled = chunks("a", 2000, 3);
    put_all(&p, &pulled).await;
    let r = d
        .pull_transfer(2, &keys(&pulled), &prefill.tcp, 3, 1)
        .await
        .unwrap();
    assert_eq!((r.chunks, r.calls), (3, LAYERS), "{r:?}");
    assert_exact(&d, &pulled).await;

    // A missing chunk fails the push by name; nothing is reserved on the receiver.
    let err = p
        .push_transfer(3, &[ChunkKey(424242)], &decode.tcp, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_layers_returns_early_and_partial_chunks_stay_invisible() {
    let decode = server(|_| {});
    let d = connect(&decode.tcp, Some(TOKEN), "a").await;
    let sender = connect(&decode.tcp, Some(TOKEN), "a").await;
    let c = chunks("a", 3000, 4);
    let t = Duration::from_secs(10);
    let b = transfer::begin(&sender, 9, &c, LAYERS, t).await.unwrap();
    assert_eq!((b.layers_done, b.complete), (0, false));
    transfer::send_layers(&sender, 9, &c, LAYERS, 0..2)
        .await
        .unwrap();
    let p = d.wait_layers(9, 2, t).await.unwrap();
    assert!(p.layers_done >= 2 && !p.complete && !p.timed_out, "{p:?}");
    // Layers 2.. are missing: no chunk of the transfer is visible yet.
    assert!(
        d.get(&keys(&c), false)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    let lookup = decode.svc.store.stats().chunks;
    assert_eq!(lookup, 0);
    // A wait for more than arrived times out with the progress so far.
    let p = d
        .wait_layers(9, LAYERS, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(p.timed_out && p.layers_done == 2, "{p:?}");
    // Out-of-order runs and a duplicate (a retry) are fine.
    transfer::send_layers(&sender, 9, &c, LAYERS, 5..8)
        .await
        .unwrap();
    transfer::send_layers(&sender, 9, &c, LAYERS, 0..2)
        .await
        .unwrap();
    assert_eq!(
        d.wait_layers(9, 3, Duration::from_millis(50))
            .await
            .unwrap()
            .layers_done,
        2
    );
    // The rest through a full push with the same id: it resumes from the first missing layer.
    let r = transfer::push(
        std::slice::from_ref(&sender),
        9,
        &c,
        transfer::PushOptions {
            layers: LAYERS,
            layers_per_run: 8,
            timeout: t,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.calls, 1);
    let p = d.wait_layers(9, LAYERS, t).await.unwrap();
    assert!(p.complete && p.layers_done == LAYERS, "{p:?}");
    assert_exact(&d, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_credentials_are_checked() {
    let prefill = server(|_| {});
    let decode = server(|_| {});
    let a = connect(&prefill.tcp, Some(TOKEN), "a").await;
    let c = chunks("a", 4000, 2);
    put_all(&a, &c).await;
    // Tenant b cannot push a's chunks: they are not there for it.
    let b = connect(&prefill.tcp, Some(TOKEN), "b").await;
    let err = b
        .push_transfer(1, &keys(&c), &decode.tcp, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    a.push_transfer(1, &keys(&c), &decode.tcp, 1, 4)
        .await
        .unwrap();
    let db = connect(&decode.tcp, Some(TOKEN), "b").await;
    assert!(
        db.get(&keys(&c), false)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    let err = db
        .wait_layers(1, 1, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert_exact(&connect(&decode.tcp, Some(TOKEN), "a").await, &c).await;

    // A receiver with another token refuses the prefill server's connections.
    let other = server(|cfg| cfg.token = Some("another-secret".into()));
    let err = a
        .push_transfer(2, &keys(&c), &other.tcp, 1, 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid token"), "{err}");
    // And a client with a wrong token cannot begin anything.
    let wrong = Client::connect(
        &decode.tcp,
        ClientOptions {
            token: Some("wrong-token".into()),
            tenant: Some("a".into()),
            client_name: String::new(),
        },
    )
    .await;
    assert!(wrong.is_err());
    // Peers outside transfer_peers (here: not loopback) are refused before connecting.
    let err = a
        .push_transfer(3, &keys(&c), "10.1.2.3:7070", 1, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
}

/// Opens an authenticated TCP connection and writes `frame` after the hello.
async fn raw_send(addr: &str, frame: &[u8]) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let hello = wire::HelloHeader {
        protocol_version: wire::VERSION,
        auth_token: TOKEN.into(),
        tenant: "a".into(),
        client_name: "raw".into(),
    };
    let head = wire::frame_head(Opcode::Hello, 1, 0, &hello, 0).unwrap();
    s.write_all(&head).await.unwrap();
    s.write_all(frame).await.unwrap();
    s
}

/// Writes one raw frame on a fresh authenticated TCP connection and reads the answer.
async fn raw_exchange(addr: &str, frame: &[u8]) -> Option<(Opcode, String)> {
    let mut s = raw_send(addr, frame).await;
    let limits = Limits::default();
    let mut buf = AlignedVec::new();
    let stall = Duration::from_secs(5);
    let pre = wire::read_frame_head(&mut s, &limits, stall, &mut buf)
        .await
        .ok()??;
    assert_eq!(pre.opcode, Opcode::HelloOk);
    let pre = wire::read_frame_head(&mut s, &limits, stall, &mut buf)
        .await
        .ok()??;
    let msg = match pre.opcode {
        Opcode::Error => {
            wire::decode_header::<wire::ErrorHeader>(pre.opcode, &buf)
                .unwrap()
                .message
        }
        _ => String::new(),
    };
    Some((pre.opcode, msg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_and_oversized_transfers_get_clear_errors() {
    let decode = server(|c| c.transfer_bytes = 1 << 20);
    let c = chunks("a", 5000, 2);
    let bad = wire::TransferBeginHeader {
        transfer_id: 1,
        layers: 0,
        timeout_ms: 1000,
        chunks: vec![],
    };
    let frame = wire::frame_head(Opcode::TransferBegin, 2, 0, &bad, 0).unwrap();
    let (op, msg) = raw_exchange(&decode.tcp, &frame).await.unwrap();
    assert_eq!(op, Opcode::Error);
    assert!(
        msg.contains("at least one chunk") || msg.contains("layers"),
        "{msg}"
    );
    // A preamble announcing a header past the bound.
    let mut huge = frame.clone();
    huge[16..20].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let (op, msg) = raw_exchange(&decode.tcp, &huge[..wire::PREAMBLE_LEN])
        .await
        .unwrap();
    assert_eq!(op, Opcode::Error);
    assert!(msg.contains("exceeds the limit"), "{msg}");

    let d = connect(&decode.tcp, Some(TOKEN), "a").await;
    let t = Duration::from_secs(5);
    // Bigger than the whole transfer region.
    let big: Vec<OutgoingChunk> = (0..3)
        .map(|i| OutgoingChunk {
            key: ChunkKey(900 + i),
            meta: ChunkMeta::raw(0, 1, 1, 0, 512 << 10),
            bytes: Bytes::from(vec![0u8; 512 << 10]),
        })
        .collect();
    let err = transfer::begin(&d, 3, &big, 1, t).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    // Fits the region but not what is free of it.
    transfer::begin(&d, 4, &big[..1], 1, t).await.unwrap();
    let err = transfer::begin(&d, 5, &big[1..], 1, t).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TierFull), "{err}");
    assert!(err.to_string().contains("bytes free"), "{err}");
    // A frame whose payload does not match its layer range is refused; the connection serves on.
    transfer::begin(&d, 6, &c, LAYERS, t).await.unwrap();
    let err = transfer::send_layers(&d, 6, &c[..1], LAYERS, 0..1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("carry"), "{err}");
    // Layers of a transfer never begun.
    let err = transfer::send_layers(&d, 77, &c, LAYERS, 0..1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    // The same id with another manifest is refused.
    let err = transfer::begin(&d, 6, &c[..1], LAYERS, t)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different manifest"), "{err}");
    assert!(d.stats().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_vanishes_mid_frame_frees_the_reservation() {
    let decode = server(|c| c.transfer_timeout_ms = 300);
    let d = connect(&decode.tcp, Some(TOKEN), "a").await;
    let c = chunks("a", 6000, 3);
    let t = Duration::from_secs(60);
    transfer::begin(&d, 11, &c, LAYERS, t).await.unwrap();
    let (free_before, cap, known) = decode.svc.transfers.stats();
    assert!(free_before < cap && known == 1);
    // A raw connection announces layers 0..4 and sends half of them, then disappears.
    let run: u64 = c
        .iter()
        .map(|ch| ch.bytes.len() as u64 / LAYERS as u64 * 4)
        .sum();
    let h = wire::TransferLayersHeader {
        transfer_id: 11,
        layer_start: 0,
        layer_end: 4,
    };
    let mut frame = wire::frame_head(Opcode::TransferLayers, 7, 0, &h, run).unwrap();
    frame.extend(std::iter::repeat_n(1u8, run as usize / 2));
    drop(raw_send(&decode.tcp, &frame).await);
    // The claim is dropped at once; the reservation goes when the (capped) deadline passes.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (free, cap, known) = decode.svc.transfers.stats();
        if free == cap && known == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "reservation still held: {free}/{cap}, {known} transfers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        d.get(&keys(&c), false)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    assert_eq!(decode.svc.store.stats().chunks, 0);
    let err = d
        .wait_layers(11, 1, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    // A retry with the same id starts over and completes byte-exact.
    let r = transfer::push(
        std::slice::from_ref(&d),
        11,
        &c,
        transfer::PushOptions {
            layers: LAYERS,
            layers_per_run: 4,
            timeout: t,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.calls, 2);
    assert_exact(&d, &c).await;
}
