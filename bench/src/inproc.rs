//! Helpers the network suites share: the in-process kvtier server (`kvtier::testing`), a client
//! runtime, and deterministic incompressible payloads.

use anyhow::Result;
use kvtier::config::ServeConfig;
use kvtier::testing::TestServer;

/// The shared in-process server ([`TestServer`]: loopback, a Unix socket, its own runtime and
/// threads) with a `host_bytes` host tier and no disk; `tune` adjusts the configuration first.
pub fn server(host_bytes: u64, tune: impl FnOnce(&mut ServeConfig)) -> Result<TestServer> {
    TestServer::start(|c| {
        c.host_bytes = host_bytes;
        tune(c);
    })
}

/// A tokio runtime with two workers, like the machines the suites run on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `len` bytes of xorshift output seeded by `seed` (len rounded down to a multiple of 8).
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}
