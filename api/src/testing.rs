//! The one in-process kvtier server that integration tests and benchmark suites start.
//!
//! [`TestServer`] serves both planes on loopback (ephemeral ports) and a Unix socket, on its own
//! thread and runtime, as a separate server process would: clients measured or tested against it
//! share no worker threads with it, and it works the same under a `#[tokio::test]`, a
//! synchronous test or a benchmark. It lives in the library (not in `kvtier-tests`) so the api
//! package's own integration tests, `kvtier-tests` and `kvtier-bench` all reach it without a
//! dev-dependency cycle. Test support: like tests and benches it reports failures with `anyhow`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::client::{Client, ClientError, ClientOptions};
use crate::config::ServeConfig;
use crate::server::{Listeners, run};
use crate::service::Service;

/// A running server. Dropping it without [`TestServer::stop`] leaves its thread serving until
/// the process ends.
pub struct TestServer {
    pub svc: Arc<Service>,
    /// Data-plane TCP address (`host:port`).
    pub tcp: String,
    /// Data-plane Unix socket address (`unix:/path`).
    pub unix: String,
    /// Control-plane address (`host:port`); [`TestServer::http_url`] for a base URL.
    pub http: String,
    /// The server's runtime, for baselines that must run on the server's side (raw sockets).
    pub handle: tokio::runtime::Handle,
    data_dir: PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

type Started = (Arc<Service>, String, String, String, tokio::runtime::Handle);

/// Loopback defaults for a test server on `data_dir`: ephemeral ports, a 64 MiB host tier and no
/// disk tier. Tests override fields with `..loopback_config(dir)`.
pub fn loopback_config(data_dir: &Path) -> ServeConfig {
    ServeConfig {
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("valid literal"),
        http: "127.0.0.1:0".parse().expect("valid literal"),
        host_bytes: 64 << 20,
        disk_bytes: 0,
        ..ServeConfig::default()
    }
}

impl TestServer {
    /// Starts a server on a fresh temporary data directory (removed when the server is stopped)
    /// from [`loopback_config`], adjusted by `tune`.
    pub fn start(tune: impl FnOnce(&mut ServeConfig)) -> Result<TestServer> {
        let dir = tempfile::tempdir()?;
        let mut config = loopback_config(&dir.path().join("data"));
        tune(&mut config);
        let mut srv = TestServer::start_with(config)?;
        srv._dir = Some(dir);
        Ok(srv)
    }

    /// Starts a server from `config` as given (its data directory is the caller's, so a test can
    /// restart on it). Bind port 0, as [`loopback_config`] does, to run tests in parallel.
    pub fn start_with(config: ServeConfig) -> Result<TestServer> {
        let data_dir = config.data_dir.clone();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<Started>>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let bound = async {
                    let svc = Service::open(config)?;
                    let listeners = Listeners::bind(&svc).await?;
                    let tcp = listeners.data.local_addr()?.to_string();
                    let http = listeners.http.local_addr()?.to_string();
                    let unix = format!(
                        "unix:{}",
                        listeners.unix.as_ref().context("unix socket")?.1.display()
                    );
                    anyhow::Ok((svc, listeners, tcp, unix, http))
                }
                .await;
                let (svc, listeners, tcp, unix, http) = match bound {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let handle = tokio::runtime::Handle::current();
                let _ = started_tx.send(Ok((svc.clone(), tcp, unix, http, handle)));
                run(svc, listeners, async move {
                    let _ = stop_rx.await;
                })
                .await
                .map_err(anyhow::Error::from)
            })
        });
        let (svc, tcp, unix, http, handle) = started_rx
            .recv()
            .context("server thread ended before it started")??;
        Ok(TestServer {
            svc,
            tcp,
            unix,
            http,
            handle,
            data_dir,
            stop,
            thread,
            _dir: None,
        })
    }

    /// `http://host:port` of the control plane.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Connects a client for `tenant` to `addr` (one of [`TestServer::tcp`] and
    /// [`TestServer::unix`]).
    pub async fn client(
        &self,
        addr: &str,
        token: Option<&str>,
        tenant: &str,
    ) -> Result<Client, ClientError> {
        Client::connect(
            addr,
            ClientOptions {
                token: token.map(str::to_string),
                tenant: Some(tenant.to_string()),
                client_name: "kvtier-test".into(),
            },
        )
        .await
    }

    /// Stops the server and waits for its shutdown (flush included). Blocks: from async code
    /// use [`TestServer::shutdown`].
    pub fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?
    }

    /// [`TestServer::stop`] on a blocking thread, so the caller's runtime keeps running.
    pub async fn shutdown(self) -> Result<()> {
        tokio::task::spawn_blocking(move || self.stop()).await?
    }
}
