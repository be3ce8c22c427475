//! Support for the cross-crate integration tests in `tests/tests/`: seeds that a failing run
//! prints and a later run replays, and a real `kvtier serve` process to kill and restart. (The in-process server they share is `kvtier::testing`, in
//! the library, so the api package's own tests reach it too.)

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvtier_client::{Client, ClientOptions};

/// The seed of a randomised test: the value of the environment variable `var` when set (to
/// replay a run), otherwise taken from the clock. Printed either way, with the line that
/// replays it; cargo shows it when the test fails.
pub fn seed(var: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{var}={v:?} is not a u64: {e}")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    } | 1;
    eprintln!("seed {seed} (replay with {var}={seed})");
    seed
}

/// The next value of a xorshift64 stream (`state` must be non-zero, as [`seed`]s are).
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `bin serve` (the `kvtier` entry point) on `dir`, data plane on loopback `port`, every
/// put written through to a 1 GiB disk tier with `durability`, a `host_bytes` host tier.
pub fn spawn_serve(bin: &str, dir: &Path, port: u16, host_bytes: &str, durability: &str) -> Child {
    Command::new(bin)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .args(["--host-bytes", host_bytes, "--disk-bytes", "1GiB"])
        .args(["--write-mode", "write-through", "--durability", durability])
        .args(["--log", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kvtier serve")
}

/// Connects to `addr`, retrying for up to 30 s while the server starts.
pub async fn connect_when_up(addr: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(addr, ClientOptions::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("server did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
