//! Helpers the network suites share: a kvtier server running in this process on loopback, and
//! deterministic incompressible payloads.

use std::sync::Arc;

use anyhow::{Context, Result};
use kvtier::config::ServeConfig;
use kvtier::server::{Listeners, run};
use kvtier::service::Service;

/// A server on 127.0.0.1 (ephemeral ports) and a Unix socket in a temporary directory. It runs
/// on its own runtime and threads, as a separate server process would, so that clients measured
/// against it do not share worker threads with it.
pub struct InProcessServer {
    pub svc: Arc<Service>,
    /// Data-plane TCP address.
    pub tcp: String,
    /// Data-plane Unix socket address (`unix:/path`).
    pub unix: String,
    /// The server's runtime, for baselines that must run on the same side (raw sockets).
    pub handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<()>>,
    _dir: tempfile::TempDir,
}

type Started = (Arc<Service>, String, String, tokio::runtime::Handle);

impl InProcessServer {
    /// Starts a host-memory-only server; `tune` adjusts the configuration first.
    pub fn start(host_bytes: u64, tune: impl FnOnce(&mut ServeConfig)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = ServeConfig {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse()?,
            http: "127.0.0.1:0".parse()?,
            host_bytes,
            disk_bytes: 0,
            ..ServeConfig::default()
        };
        tune(&mut config);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<Started>>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let rt = runtime()?;
            rt.block_on(async move {
                let bound = async {
                    let svc = Service::open(config)?;
                    let listeners = Listeners::bind(&svc).await?;
                    let tcp = listeners.data.local_addr()?.to_string();
                    let unix = format!(
                        "unix:{}",
                        listeners.unix.as_ref().context("unix socket")?.1.display()
                    );
                    anyhow::Ok((svc, listeners, tcp, unix))
                }
                .await;
                let (svc, listeners, tcp, unix) = match bound {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let _ = started_tx.send(Ok((
                    svc.clone(),
                    tcp,
                    unix,
                    tokio::runtime::Handle::current(),
                )));
                run(svc, listeners, async move {
                    let _ = stop_rx.await;
                })
                .await?;
                Ok(())
            })
        });
        let (svc, tcp, unix, handle) = started_rx
            .recv()
            .context("server thread ended before it started")??;
        Ok(InProcessServer {
            svc,
            tcp,
            unix,
            handle,
            stop,
            thread,
            _dir: dir,
        })
    }

    /// Stops the server and waits for its shutdown (flush included).
    pub fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?
    }
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
