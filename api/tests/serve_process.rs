//! The `kvtier serve` process: it starts from flags, shuts down cleanly on SIGTERM (exit 0,
//! socket removed), and what it acknowledged is there after a restart.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvtier::client::{Client, ClientOptions};
use kvtier_cache::{ChunkKey, ChunkMeta};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(dir: &Path, data: u16, http: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args([
            "--listen",
            &format!("127.0.0.1:{data}"),
            "--http",
            &format!("127.0.0.1:{http}"),
        ])
        .args(["--host-bytes", "64MiB", "--disk-bytes", "256MiB"])
        .args([
            "--write-mode",
            "write-through",
            "--durability",
            "always",
            "--log",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kvtier serve")
}

async fn connect(addr: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(addr, ClientOptions::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("server did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_restart_keeps_acknowledged_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (data, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{data}");
    let mut child = spawn(dir.path(), data, http);
    let c = connect(&addr).await;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 249) as u8).collect();
    let meta = ChunkMeta::raw(0, 5, 256, 0, payload.len() as u64);
    c.put(ChunkKey(0xabc), &meta, &payload).await.unwrap();
    drop(c);
    let status = sigterm_and_wait(&mut child);
    assert!(status.success(), "clean exit on SIGTERM, got {status}");
    assert!(
        !dir.path().join("kvtier.sock").exists(),
        "the unix socket is removed on shutdown"
    );

    let mut child = spawn(dir.path(), data, http);
    let c = connect(&addr).await;
    let got = c.get(&[ChunkKey(0xabc)], false).await.unwrap();
    assert_eq!(
        &got[0]
            .as_ref()
            .expect("acknowledged chunk survives a restart")
            .bytes[..],
        &payload[..]
    );
    drop(c);
    assert!(sigterm_and_wait(&mut child).success());
}
