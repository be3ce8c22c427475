//! The data plane (TCP and Unix socket) and the process that runs both planes.
//!
//! [`run`] binds every listener first, so a port in use fails fast with a clear error, then
//! serves until `shutdown` resolves; it stops accepting, gives open connections a moment to
//! finish, and flushes the store so everything acknowledged is durable.
//!
//! Modules import in one direction: `conn` (the connection loop) → `handlers`, `retrieve` (one
//! function per request) → `context`, `reply` (leaves: connection state, reply types).

mod conn;
mod context;
mod handlers;
mod reply;
mod retrieve;
mod transfer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::service::Service;
use crate::transport::{Reader, Writer};

/// Bound listeners, before serving. Tests bind to port 0 and read the addresses from here.
pub struct Listeners {
    pub data: TcpListener,
    pub unix: Option<(UnixListener, PathBuf)>,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses. A stale socket file left by a crashed server is replaced;
    /// one a live server still answers on is an error.
    pub async fn bind(svc: &Service) -> Result<Listeners, ApiError> {
        let c = &svc.config;
        let data = TcpListener::bind(c.listen)
            .await
            .map_err(|e| ApiError::io(format!("binding the data plane to {}", c.listen), e))?;
        if let Ok(a) = data.local_addr() {
            let _ = svc.data_addr.set(a);
        }
        let http = TcpListener::bind(c.http).await.map_err(|e| {
            ApiError::io(format!("binding the HTTP control plane to {}", c.http), e)
        })?;
        let unix = match c.socket_path() {
            None => None,
            Some(p) => Some((bind_unix(&p).await?, p)),
        };
        Ok(Listeners { data, unix, http })
    }
}

async fn bind_unix(path: &PathBuf) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            ApiError::io(
                format!("creating the socket directory {}", dir.display()),
                e,
            )
        })?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::Unavailable(format!(
                "another server is listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            ApiError::io(format!("removing the stale socket {}", path.display()), e)
        })?;
    }
    UnixListener::bind(path)
        .map_err(|e| ApiError::io(format!("binding the unix socket {}", path.display()), e))
}

/// Serves both planes on `listeners` until `shutdown` resolves, then flushes the store.
pub async fn run(
    svc: Arc<Service>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let s = svc.clone();
    let mut rx = stop_rx.clone();
    let tcp = listeners.data;
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = rx.changed() => break,
                r = tcp.accept() => match r {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let (r, w) = stream.into_split();
                        tokio::spawn(conn::serve(s.clone(), Reader::Tcp(r), Writer::Tcp(w)));
                    }
                    Err(e) => {
                        tracing::warn!("data-plane accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }));
    let mut socket_path = None;
    if let Some((unix, path)) = listeners.unix {
        socket_path = Some(path);
        let s = svc.clone();
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = rx.changed() => break,
                    r = unix.accept() => match r {
                        Ok((stream, _)) => {
                            let (r, w) = stream.into_split();
                            tokio::spawn(conn::serve(s.clone(), Reader::Unix(r), Writer::Unix(w)));
                        }
                        Err(e) => {
                            tracing::warn!("unix-socket accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }));
    }
    // Leases a crashed client never released stop pinning at their expiry on their own; this
    // forgets their records so the lease table and its count stay bounded.
    let s = svc.clone();
    let mut rx = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = rx.changed() => break,
                _ = tick.tick() => {
                    let _ = s.store.reap_leases();
                }
            }
        }
    }));
    let mut rx = stop_rx.clone();
    let http = crate::http::serve(svc.clone(), listeners.http, async move {
        let _ = rx.changed().await;
    });
    let http_task = tokio::spawn(http);
    tracing::info!(
        "kvtier serving: data {} , http {}{}",
        svc.config.listen,
        svc.config.http,
        socket_path
            .as_ref()
            .map(|p| format!(", unix {}", p.display()))
            .unwrap_or_default()
    );
    shutdown.await;
    tracing::info!("shutting down: no new connections; flushing acknowledged writes");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    let flushed = tokio::task::spawn_blocking({
        let s = svc.clone();
        move || s.shutdown()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("flush task failed: {e}")))?;
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    flushed
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Import direction checks of the sibling modules of `server` and of `http`: a cycle among them
/// fails here, naming it.
#[cfg(test)]
mod tests {
    /// `(module, source)` of the sibling modules of one folder.
    type Modules = [(&'static str, &'static str)];

    /// The sibling modules each module names through `super::<name>`.
    fn imports(modules: &Modules) -> Vec<(&'static str, Vec<&'static str>)> {
        modules
            .iter()
            .map(|(name, src)| {
                let mut to: Vec<_> = modules
                    .iter()
                    .map(|(other, _)| *other)
                    .filter(|other| other != name)
                    .filter(|other| {
                        src.match_indices(&format!("super::{other}"))
                            .any(|(i, _)| !src[..i].ends_with("super::"))
                    })
                    .collect();
                to.sort();
                (*name, to)
            })
            .collect()
    }

    /// Panics naming a cycle if the imports have one.
    fn assert_acyclic(modules: &Modules) {
        let graph = imports(modules);
        fn visit<'a>(
            at: &'a str,
            graph: &[(&'a str, Vec<&'a str>)],
            path: &mut Vec<&'a str>,
            done: &mut Vec<&'a str>,
        ) {
            if done.contains(&at) {
                return;
            }
            assert!(!path.contains(&at), "import cycle: {path:?} -> {at}");
            path.push(at);
            for next in &graph.iter().find(|(n, _)| *n == at).unwrap().1 {
                visit(next, graph, path, done);
            }
            path.pop();
            done.push(at);
        }
        let mut done = Vec::new();
        for (name, _) in &graph {
            visit(name, &graph, &mut Vec::new(), &mut done);
        }
    }

    #[test]
    fn server_modules_import_in_one_direction() {
        let modules: &Modules = &[
            ("conn", include_str!("conn.rs")),
            ("context", include_str!("context.rs")),
            ("handlers", include_str!("handlers.rs")),
            ("reply", include_str!("reply.rs")),
            ("retrieve", include_str!("retrieve.rs")),
        ];
        assert_acyclic(modules);
        let graph = imports(modules);
        let of = |m: &str| &graph.iter().find(|(n, _)| *n == m).unwrap().1;
        assert!(
            of("reply").is_empty() && of("context").is_empty(),
            "{graph:?}"
        );
        assert!(!of("handlers").contains(&"conn"), "{graph:?}");
        // The check sees real imports: conn does use the others.
        assert_eq!(of("conn"), &["context", "handlers", "reply", "retrieve"]);
    }

    #[test]
    fn http_handlers_import_only_the_shared_extractors() {
        let modules: &Modules = &[
            ("budget", include_str!("../http/budget.rs")),
            ("chunks", include_str!("../http/chunks.rs")),
            ("events", include_str!("../http/events.rs")),
            ("extract", include_str!("../http/extract.rs")),
            ("info", include_str!("../http/info.rs")),
            ("lookup", include_str!("../http/lookup.rs")),
            ("openapi", include_str!("../http/openapi.rs")),
            ("queries", include_str!("../http/queries.rs")),
        ];
        assert_acyclic(modules);
        for (name, to) in imports(modules) {
            assert!(to.iter().all(|m| *m == "extract"), "{name} imports {to:?}");
        }
    }
}
