//! End-to-end tests of the data plane: a real server on loopback (TCP and Unix socket) and the
//! Rust client. Covers every request kind, auth, tenant isolation, shared memory, and a flood of
//! malformed connections interleaved with valid clients.

use std::time::Duration;

use kvtier::client::{BlockingClient, ClientError, ClientOptions, PromptCache};
use kvtier::testing::TestServer;
use kvtier::wire::ErrorCode;
use kvtier_cache::{ChunkKey, ChunkMeta, Fidelity, ModelLayout, Namespace, TierKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shared test server with a `host_bytes` host tier, a `disk_bytes` disk tier and a short
/// stall timeout.
fn start(token: Option<&str>, host_bytes: u64, disk_bytes: u64) -> TestServer {
    TestServer::start(|c| {
        c.token = token.map(str::to_string);
        c.host_bytes = host_bytes;
        c.disk_bytes = disk_bytes;
        c.stall_timeout_secs = 2;
    })
    .unwrap()
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8)
        .collect()
}

fn meta(len: usize, depth: u32) -> ChunkMeta {
    ChunkMeta::raw(0, 42, 256, depth, len as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_lookup_lease_delete_over_tcp_and_unix() {
    let srv = start(None, 64 << 20, 0);
    for addr in [srv.tcp.clone(), srv.unix.clone()] {
        let c = srv.client(&addr, None, "alice").await.unwrap();
        let layout = ModelLayout::smollm2_135m();
        let ns = Namespace::new(layout.fingerprint(), "alice");
        let tokens: Vec<u32> = (0..1000).collect();
        let keys = ns.chunk_keys(&tokens);
        assert_eq!(keys.len(), 3);
        for (i, k) in keys.iter().enumerate() {
            let data = payload(i as u64, 100_000 + i);
            c.put(*k, &meta(data.len(), i as u32), &data).await.unwrap();
        }
        let r = c
            .lookup(layout.fingerprint(), None, 256, &tokens)
            .await
            .unwrap();
        assert_eq!(r.hit_tokens, 768);
        assert_eq!(r.hits.iter().map(|h| h.key).collect::<Vec<_>>(), keys);
        assert!(r.hits[0].tiers.contains(TierKind::Host));
        // Batch get, one key missing in the middle.
        let got = c
            .get(&[keys[0], ChunkKey(1), keys[2]], false)
            .await
            .unwrap();
        assert_eq!(
            &got[0].as_ref().unwrap().bytes[..],
            &payload(0, 100_000)[..]
        );
        assert!(got[1].is_none());
        assert_eq!(
            &got[2].as_ref().unwrap().bytes[..],
            &payload(2, 100_002)[..]
        );
        assert_eq!(got[2].as_ref().unwrap().meta.depth, 2);
        // Buffer reuse.
        let (entries, buf) = c
            .get_into(&[keys[1]], false, vec![9u8; 1 << 20])
            .await
            .unwrap();
        let range = entries[0].clone().unwrap().1;
        assert_eq!(&buf[range], &payload(1, 100_001)[..]);
        // Leases.
        let ids = c
            .lease(&[keys[0], ChunkKey(5)], Duration::from_secs(5))
            .await
            .unwrap();
        assert!(ids[0] != 0 && ids[1] == 0);
        c.release(&[ids[0]]).await.unwrap();
        let err = c.release(&[ids[0]]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound));
        // Stats and delete.
        let stats = c.stats().await.unwrap();
        assert_eq!(stats["chunks"], 3);
        assert_eq!(c.delete(&keys).await.unwrap(), 3);
        assert_eq!(
            c.lookup(layout.fingerprint(), None, 256, &tokens)
                .await
                .unwrap()
                .hit_tokens,
            0
        );
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let srv = start(None, 64 << 20, 0);
    let c = srv.client(&srv.tcp, None, "t").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = payload(i, 10_000 + i as usize);
            c.put(ChunkKey(i as u128 + 1), &meta(data.len(), 0), &data)
                .await
                .unwrap();
            let got = c.get(&[ChunkKey(i as u128 + 1)], false).await.unwrap();
            assert_eq!(&got[0].as_ref().unwrap().bytes[..], &data[..]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_and_tenants_are_isolated() {
    let srv = start(Some("s3cret-token"), 64 << 20, 0);
    let err = srv.client(&srv.tcp, None, "a").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    let err = srv
        .client(&srv.tcp, Some("wrong-token!"), "a")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    let a = srv
        .client(&srv.tcp, Some("s3cret-token"), "alice")
        .await
        .unwrap();
    let b = srv
        .client(&srv.unix, Some("s3cret-token"), "bob")
        .await
        .unwrap();
    let layout = ModelLayout::smollm2_135m();
    let tokens: Vec<u32> = (0..256).collect();
    let ka = Namespace::new(layout.fingerprint(), "alice").chunk_keys(&tokens)[0];
    let kb = Namespace::new(layout.fingerprint(), "bob").chunk_keys(&tokens)[0];
    assert_ne!(ka, kb, "identical prefixes hash apart per tenant");
    a.put(ka, &meta(1000, 0), &payload(1, 1000)).await.unwrap();
    // Bob cannot find, read or delete Alice's chunk, even by its raw key.
    assert_eq!(
        b.lookup(layout.fingerprint(), None, 256, &tokens)
            .await
            .unwrap()
            .hit_tokens,
        0
    );
    assert!(b.get(&[ka], true).await.unwrap()[0].is_none());
    assert_eq!(b.delete(&[ka]).await.unwrap(), 0);
    assert_eq!(
        b.lease(&[ka], Duration::from_secs(1)).await.unwrap(),
        vec![0]
    );
    assert!(a.get(&[ka], false).await.unwrap()[0].is_some());
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_chunks_are_not_served_to_exact_readers() {
    let srv = start(None, 64 << 20, 0);
    let c = srv.client(&srv.tcp, None, "t").await.unwrap();
    let mut m = meta(500, 0);
    m.codec = 7;
    m.fidelity = Fidelity::Lossy {
        codec: 7,
        error_bound: 0.01,
    };
    c.put(ChunkKey(9), &m, &payload(3, 500)).await.unwrap();
    assert!(c.get(&[ChunkKey(9)], false).await.unwrap()[0].is_none());
    let got = c.get(&[ChunkKey(9)], true).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().meta.fidelity, m.fidelity);
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_paths_move_exact_bytes() {
    let srv = start(None, 64 << 20, 0);
    let c = srv.client(&srv.unix, None, "t").await.unwrap();
    let data = payload(5, 3 << 20);
    c.put(ChunkKey(77), &meta(data.len(), 0), &data)
        .await
        .unwrap();
    // Zero-copy: map the arenas, read by location.
    assert!(c.map_arenas().await.unwrap() >= 1);
    let mut dst = Vec::new();
    let got = c
        .read_located(&[ChunkKey(77), ChunkKey(78)], false, &mut dst)
        .await
        .unwrap();
    assert_eq!(&dst[got[0].clone().unwrap().1], &data[..]);
    assert!(got[1].is_none());
    assert_eq!(
        srv.svc.store.stats().leases,
        0,
        "read_located releases its leases"
    );
    // Registered region: put from it, get into it.
    let mut region = c.register_region(8 << 20).await.unwrap();
    region.map[..data.len()].copy_from_slice(&data);
    c.shm_put(
        &region,
        0,
        data.len() as u64,
        ChunkKey(80),
        &meta(data.len(), 0),
    )
    .await
    .unwrap();
    let entries = c
        .shm_get(&region, 4 << 20, 4 << 20, &[ChunkKey(80)], false)
        .await
        .unwrap();
    let r = entries[0].clone().unwrap().1;
    assert_eq!(r.start, 4 << 20);
    assert_eq!(&region.map[r], &data[..]);
    // Out-of-range windows are refused, not served.
    let err = c
        .shm_get(&region, 7 << 20, 4 << 20, &[ChunkKey(80)], false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    // Over TCP, shared memory is refused with a clear error.
    let t = srv.client(&srv.tcp, None, "t").await.unwrap();
    assert!(t.map_arenas().await.is_err());
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_host_tier_evicts_and_reports() {
    // 4 MiB host, no disk: 1 MiB chunks; the oldest go.
    let srv = start(None, 4 << 20, 0);
    let c = srv.client(&srv.tcp, None, "t").await.unwrap();
    for i in 0..10u128 {
        let d = payload(i as u64, 1 << 20);
        c.put(ChunkKey(i + 1), &meta(d.len(), 0), &d).await.unwrap();
    }
    let got = c
        .get(&(1..=10).map(ChunkKey).collect::<Vec<_>>(), false)
        .await
        .unwrap();
    assert!(got[0].is_none(), "oldest evicted");
    assert!(got[9].is_some(), "newest kept");
    let stats = c.stats().await.unwrap();
    assert!(stats["tiers"][0]["evictions"].as_u64().unwrap() >= 6);
    assert!(stats["tiers"][0]["usage"]["bytes"].as_u64().unwrap() <= 4 << 20);
    srv.shutdown().await.unwrap();
}

/// Sends raw bytes on a fresh connection and returns whatever the server answers before closing.
async fn garbage(addr: &str, bytes: Vec<u8>, then_stall: bool) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&bytes).await;
    if !then_stall {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

fn valid_hello() -> Vec<u8> {
    let h = kvtier::wire::HelloHeader {
        protocol_version: kvtier::wire::VERSION,
        auth_token: String::new(),
        tenant: "x".into(),
        client_name: "raw".into(),
    };
    kvtier::wire::frame_head(kvtier::wire::Opcode::Hello, 1, 0, &h, 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_connections_never_disturb_valid_clients() {
    let srv = start(None, 64 << 20, 0);
    let addr = srv.tcp.clone();
    // Error frames come back for rule breaks (bad magic, bad version, unknown opcode, oversize).
    let mut bad_magic = valid_hello();
    bad_magic[0] = b'X';
    let reply = garbage(&addr, bad_magic, false).await;
    assert_eq!(&reply[..4], b"KVTW", "an error frame answers a bad magic");
    assert_eq!(reply[5], kvtier::wire::Opcode::Error as u8);

    let mut kinds: Vec<Vec<u8>> = Vec::new();
    let hello = valid_hello();
    let mut v = hello.clone();
    v[4] = 9; // version
    kinds.push(v);
    let mut v = hello.clone();
    v[5] = 0x55; // opcode
    kinds.push(v);
    let mut v = hello.clone();
    v[16..20].copy_from_slice(&u32::MAX.to_le_bytes()); // header length
    kinds.push(v);
    let mut v = hello.clone();
    v[28] ^= 0xff; // header checksum
    kinds.push(v);
    kinds.push(hello[..20].to_vec()); // truncated
    let mut v = hello.clone();
    // After a valid hello: a put announcing 2 GiB of payload.
    let put = kvtier::wire::PutHeader {
        key: 1,
        meta: kvtier::wire::ChunkMetaWire::default(),
    };
    let mut head = kvtier::wire::frame_head(kvtier::wire::Opcode::Put, 2, 0, &put, 0).unwrap();
    head[20..28].copy_from_slice(&(2u64 << 30).to_le_bytes());
    v.extend_from_slice(&head);
    kinds.push(v);
    kinds.push((0..200u32).map(|i| (i * 37) as u8).collect()); // noise

    let good = srv.client(&addr, None, "good").await.unwrap();
    let mut handles = Vec::new();
    for i in 0..1000usize {
        let bytes = kinds[i % kinds.len()].clone();
        let a = addr.clone();
        handles.push(tokio::spawn(async move { garbage(&a, bytes, false).await }));
        if i % 50 == 0 {
            let d = payload(i as u64, 4096);
            good.put(ChunkKey(i as u128 + 1), &meta(d.len(), 0), &d)
                .await
                .unwrap();
            let got = good.get(&[ChunkKey(i as u128 + 1)], false).await.unwrap();
            assert_eq!(&got[0].as_ref().unwrap().bytes[..], &d[..]);
        }
    }
    for h in handles {
        h.await.unwrap();
    }
    // A slow sender that stalls mid-frame is cut off after the stall timeout.
    let mut stalled = valid_hello();
    stalled.truncate(40);
    let t = std::time::Instant::now();
    let reply = garbage(&addr, stalled, true).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stalled connection was closed by the server"
    );
    assert!(reply.is_empty() || &reply[..4] == b"KVTW");
    // The valid client still works.
    let fresh = srv.client(&addr, None, "good").await.unwrap();
    assert!(fresh.get(&[ChunkKey(1)], false).await.unwrap()[0].is_some());
    srv.shutdown().await.unwrap();
}

/// The engine's sequence through `PromptCache`: a miss stores every full chunk, a prompt sharing
/// the prefix finds and fetches exactly those bytes under a lease (released after), a gap ends
/// the prefix, and the blocking facade sees the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_cache_stores_finds_and_fetches_a_prefix() {
    let srv = start(None, 64 << 20, 0);
    let layout = ModelLayout::smollm2_135m();
    let ns = Namespace::new(layout.fingerprint(), "eng").with_chunk_tokens(256);
    let pc = PromptCache::new(
        srv.client(&srv.unix, None, "eng").await.unwrap(),
        ns.clone(),
    );
    let tokens: Vec<u32> = (0..1000).collect();
    let first = pc.lookup(&tokens).await.unwrap();
    assert_eq!((first.keys.len(), first.hit_chunks), (3, 0));
    for i in 0..3 {
        pc.put_chunk(&first.keys, i, &payload(i as u64, 5000 + i))
            .await
            .unwrap();
    }
    // A longer prompt with the same 768-token prefix hits its three chunks.
    let longer: Vec<u32> = (0..1100).collect();
    let hit = pc.lookup(&longer).await.unwrap();
    assert_eq!(hit.keys[..3], first.keys[..]);
    assert_eq!((hit.hit_chunks, hit.hit_tokens(256)), (3, 768));
    let got = pc
        .fetch(&hit.keys[..hit.hit_chunks], vec![7u8; 1 << 16])
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    for i in 0..3 {
        assert_eq!(got.payload(i), &payload(i as u64, 5000 + i)[..]);
        let meta = &got.chunks[i].0;
        assert_eq!((meta.depth, meta.tokens), (i as u32, 256));
        assert_eq!(meta.parent, i.checked_sub(1).map(|p| first.keys[p]));
    }
    assert_eq!(srv.svc.store.stats().leases, 0, "fetch releases its leases");
    // The middle chunk goes away: the prefix ends before it.
    assert_eq!(pc.client().delete(&[first.keys[1]]).await.unwrap(), 1);
    let got = pc.fetch(&first.keys, Vec::new()).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got.payload(0), &payload(0, 5000)[..]);
    // A namespace of another tenant than the connection's is refused at lookup.
    let wrong = PromptCache::new(
        pc.client().clone(),
        Namespace::new(layout.fingerprint(), "other").with_chunk_tokens(256),
    );
    let err = wrong.lookup(&tokens).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");

    // The blocking facade, from a thread without a runtime.
    let addr = srv.tcp.clone();
    let keys = first.keys.clone();
    tokio::task::spawn_blocking(move || {
        let b = BlockingClient::connect(
            &addr,
            ClientOptions {
                tenant: Some("eng".into()),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let got = b.get(&keys, false).unwrap();
        assert_eq!(&got[0].as_ref().unwrap().bytes[..], &payload(0, 5000)[..]);
        assert!(got[1].is_none());
        let bpc = b.prompt_cache(ns);
        let hit = bpc.lookup(&tokens).unwrap();
        assert_eq!(hit.hit_chunks, 1);
        bpc.put_chunk(&hit.keys, 1, &payload(1, 5001)).unwrap();
        assert_eq!(bpc.lookup(&tokens).unwrap().hit_chunks, 3);
        let got = bpc.fetch(&hit.keys, Vec::new()).unwrap();
        assert_eq!(got.payload(1), &payload(1, 5001)[..]);
    })
    .await
    .unwrap();
    srv.shutdown().await.unwrap();
}

/// Puts of many different sizes into a small host tier, from four clients at once, with a disk
/// tier written through: every put is answered (stored, or refused with a named error) instead of
/// hanging when a new size class cannot get an arena.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_of_many_sizes_into_a_small_host_tier_are_all_answered() {
    let srv = TestServer::start(|c| {
        c.host_bytes = 2 << 20;
        c.disk_bytes = 256 << 20;
        c.write_mode = kvtier_cache::WriteMode::WriteThrough;
        c.stall_timeout_secs = 2;
    })
    .unwrap();
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let c = srv.client(&srv.tcp, None, "alice").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let (mut stored, mut refused) = (0, 0);
            for i in 0..100u64 {
                let n = w * 1000 + i;
                let len = 4096 + (n as usize * 7919) % (32 << 10);
                let data = payload(n, len);
                let m = meta(len, 0);
                let put = c.put(ChunkKey(1000 + n as u128), &m, &data);
                match tokio::time::timeout(Duration::from_secs(20), put).await {
                    Err(_) => panic!("put {n} of {len} bytes got no answer within 20 s"),
                    Ok(Ok(())) => stored += 1,
                    Ok(Err(ClientError::Server { code, .. })) => {
                        assert_eq!(code, Some(ErrorCode::TierFull), "put {n}");
                        refused += 1;
                    }
                    Ok(Err(e)) => panic!("put {n}: {e}"),
                }
            }
            (stored, refused)
        }));
    }
    for t in tasks {
        let (stored, refused) = t.await.unwrap();
        assert!(stored > 0, "stored {stored}, refused {refused}");
    }
}
