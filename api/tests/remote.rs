//! Two kvtier nodes on one real Redis Cluster (3 masters + 3 replicas on loopback, started by
//! the test): a prompt put through node A is found by LOOKUP and read bit-exact through node B,
//! tenants stay isolated across nodes, a lossy chunk never reaches an exact reader, and
//! `/healthz` says degraded once the cluster is gone.

use kvtier::testing::TestServer;
use kvtier_cache::{ChunkMeta, Fidelity, ModelLayout, Namespace, TierKind, WriteMode};
use kvtier_offload::remote::cluster::LocalCluster;

fn node(cluster: &LocalCluster) -> TestServer {
    let seeds = cluster.config_value();
    TestServer::start(|c| {
        c.remote = Some(seeds);
        c.remote_bytes = 256 << 20;
        c.remote_timeout_ms = 1500;
        c.remote_namespace = "crossnode".into();
        c.write_mode = WriteMode::WriteThrough;
    })
    .unwrap()
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    kvtier_cache::conformance::payload(seed, len)
}

async fn healthz(srv: &TestServer) -> serde_json::Value {
    let url = format!("{}/healthz", srv.http_url());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-s", &url])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_put_on_node_a_is_read_bit_exact_on_node_b() {
    let cluster = LocalCluster::start().expect("local redis cluster");
    let a = node(&cluster);
    let b = node(&cluster);
    let layout = ModelLayout::smollm2_135m();
    let fp = layout.fingerprint();
    let ns = Namespace::new(fp, "alice");
    let tokens: Vec<u32> = (0..256 * 6).collect();
    let keys = ns.chunk_keys(&tokens);
    assert_eq!(keys.len(), 6);
    let ca = a.client(&a.tcp, None, "alice").await.unwrap();
    let data: Vec<Vec<u8>> = (0..6).map(|i| payload(i, 50_000 + i as usize)).collect();
    for (i, k) in keys.iter().enumerate() {
        let mut m = ChunkMeta::raw(0, 42, 256, i as u32, data[i].len() as u64);
        m.parent = i.checked_sub(1).map(|p| keys[p]);
        ca.put(*k, &m, &data[i]).await.unwrap();
    }
    assert_eq!(a.svc.store.stats().tiers[1].tier, TierKind::Remote);

    // Node B has never seen these chunks: LOOKUP finds all six in the remote tier.
    let cb = b.client(&b.tcp, None, "alice").await.unwrap();
    let r = cb.lookup(fp, None, 256, &tokens).await.unwrap();
    assert_eq!(r.hit_tokens, 256 * 6);
    assert_eq!(r.hits.iter().map(|h| h.key).collect::<Vec<_>>(), keys);
    assert!(r.hits.iter().all(|h| h.tiers.contains(TierKind::Remote)));
    let got = cb.get(&keys, false).await.unwrap();
    for (g, d) in got.iter().zip(&data) {
        assert_eq!(&g.as_ref().expect("read on b").bytes[..], &d[..]);
    }
    // Promoted into B's host memory by the read.
    let r = cb.lookup(fp, None, 256, &tokens).await.unwrap();
    assert!(r.hits.iter().all(|h| h.tiers.contains(TierKind::Host)));

    // Another tenant on B finds nothing of alice's, by lookup or by raw key.
    let cbob = b.client(&b.tcp, None, "bob").await.unwrap();
    assert_eq!(
        cbob.lookup(fp, None, 256, &tokens)
            .await
            .unwrap()
            .hit_tokens,
        0
    );
    assert!(
        cbob.get(&keys, true)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );

    // A chunk its client labelled lossy is never served to an exact reader on either node.
    let lossy_tokens: Vec<u32> = (5000..5256).collect();
    let lk = ns.chunk_keys(&lossy_tokens)[0];
    let mut m = ChunkMeta::raw(0, 42, 256, 0, 4096);
    m.codec = 200;
    m.fidelity = Fidelity::Lossy {
        codec: 200,
        error_bound: 0.1,
    };
    ca.put(lk, &m, &payload(9, 4096)).await.unwrap();
    let r = cb.lookup(fp, None, 256, &lossy_tokens).await.unwrap();
    assert_eq!(r.hit_tokens, 256);
    assert!(cb.get(&[lk], false).await.unwrap()[0].is_none());
    assert!(ca.get(&[lk], false).await.unwrap()[0].is_none());
    let lossy = cb.get(&[lk], true).await.unwrap();
    assert_eq!(&lossy[0].as_ref().unwrap().bytes[..], &payload(9, 4096)[..]);

    // A value flipped in Redis (SETRANGE) is found by B's lookup (its header is intact), then
    // dropped as corrupt on read and counted, never served.
    let ct: Vec<u32> = (7000..7256).collect();
    let ck = ns.chunk_keys(&ct)[0];
    ca.put(ck, &ChunkMeta::raw(0, 42, 256, 0, 8000), &payload(12, 8000))
        .await
        .unwrap();
    let name = format!("crossnode:c:{:032x}", ck.0);
    cluster
        .cli_key(&["SETRANGE", &name, "4000", "oops"])
        .unwrap();
    assert_eq!(cb.lookup(fp, None, 256, &ct).await.unwrap().hit_tokens, 256);
    assert!(cb.get(&[ck], false).await.unwrap()[0].is_none());
    assert_eq!(b.svc.store.stats().tiers[1].corrupt, 1);
    assert_eq!(cb.lookup(fp, None, 256, &ct).await.unwrap().hit_tokens, 0);

    assert_eq!(healthz(&b).await["status"], "ok");
    // The cluster gone: degraded, while chunks in B's host memory still serve.
    drop(cluster);
    let h = healthz(&b).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["remote"]["up"], false);
    let got = cb.get(&keys[..1], false).await.unwrap();
    assert_eq!(&got[0].as_ref().unwrap().bytes[..], &data[0][..]);
    // Puts still succeed locally (the write-through to the pool fails and is counted).
    let ek = ns.chunk_keys(&(9000..9256).collect::<Vec<u32>>())[0];
    let em = ChunkMeta::raw(0, 42, 256, 0, 1000);
    ca.put(ek, &em, &payload(11, 1000)).await.unwrap();
    let got = ca.get(&[ek], false).await.unwrap();
    assert_eq!(&got[0].as_ref().unwrap().bytes[..], &payload(11, 1000)[..]);
    assert!(a.svc.store.stats().tiers[1].errors >= 1);
    // A lookup past the local prefix does not stall: the probe fails within the timeout.
    let more: Vec<u32> = (0..256 * 8).collect();
    let t = std::time::Instant::now();
    let r = cb.lookup(fp, None, 256, &more).await.unwrap();
    assert_eq!(r.hit_tokens, 256 * 6);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kvtier serve` process on `seeds`, killed when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &std::path::Path, data: u16, seeds: &str) -> Serve {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{data}")])
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--host-bytes",
            "64MiB",
            "--disk-bytes",
            "0",
            "--write-mode",
            "write-through",
        ])
        .args(["--remote", seeds, "--log", "warn"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn kvtier serve");
    Serve(child)
}

async fn connect(addr: &str, tenant: &str) -> kvtier::client::Client {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = kvtier::client::ClientOptions {
            tenant: Some(tenant.into()),
            ..Default::default()
        };
        match kvtier::client::Client::connect(addr, o).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => panic!("server did not start: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_share_a_prompt_through_the_cluster() {
    let cluster = LocalCluster::start().expect("local redis cluster");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pa, pb) = (free_port(), free_port());
    let _a = serve(da.path(), pa, &cluster.config_value());
    let _b = serve(db.path(), pb, &cluster.config_value());
    let fp = ModelLayout::smollm2_135m().fingerprint();
    let ns = Namespace::new(fp, "carol");
    let tokens: Vec<u32> = (0..256 * 3).collect();
    let keys = ns.chunk_keys(&tokens);
    let ca = connect(&format!("127.0.0.1:{pa}"), "carol").await;
    for (i, k) in keys.iter().enumerate() {
        let d = payload(40 + i as u64, 20_000);
        ca.put(*k, &ChunkMeta::raw(0, 42, 256, i as u32, 20_000), &d)
            .await
            .unwrap();
    }
    let cb = connect(&format!("127.0.0.1:{pb}"), "carol").await;
    let r = cb.lookup(fp, None, 256, &tokens).await.unwrap();
    assert_eq!(r.hit_tokens, 256 * 3);
    for (i, g) in cb.get(&keys, false).await.unwrap().iter().enumerate() {
        assert_eq!(
            &g.as_ref().unwrap().bytes[..],
            &payload(40 + i as u64, 20_000)[..]
        );
    }
    let other = connect(&format!("127.0.0.1:{pb}"), "dave").await;
    assert_eq!(
        other
            .lookup(fp, None, 256, &tokens)
            .await
            .unwrap()
            .hit_tokens,
        0
    );
}
