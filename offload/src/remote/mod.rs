//! The remote tier: chunks in a Redis Cluster (or Valkey) shared by many kvtier nodes.
//!
//! See ARCHITECTURE.md, "Remote tier", for the record format, key names, TTL, budget, timeouts
//! and reconnection. In short: one value per chunk (`record`), keys `{ns}:c:{key hex}` spread
//! over all slots, multi-key reads grouped by slot and sent concurrently, every call bounded by
//! `timeout`, a nil reply a miss and anything else that fails a clear `Backend` error.
//!
//! - [`RemoteTier`]: the [`Tier`]; `get_many`/`probe_many`/`put_many` for a prompt's chunks;
//! - [`cluster::LocalCluster`]: a real 3+3 cluster on loopback for tests and benchmarks.
//!
//! **Bridging sync to async.** [`Tier`] is synchronous and is called from blocking threads and,
//! for cheap calls, from async workers. The tier owns a small tokio runtime; a call spawns its
//! future there and waits on a std channel with `recv_timeout`. That works from any thread
//! (`Runtime::block_on` would panic inside another runtime) and never waits past the timeout.

mod batch;
pub mod cluster;
mod record;
mod stats;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use kvtier_cache::key::ChunkKey;
use kvtier_cache::tier::{ChunkMeta, Tier, TierKind, TierUsage};
use kvtier_cache::{CacheError, Result};
use parking_lot::Mutex;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;

pub use stats::{LATENCY_BOUNDS_US, RemoteStats};

use stats::Counters;

/// At most one connection attempt per this interval; calls in between fail at once.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// How the remote tier reaches its cluster.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Seed nodes, `redis://host:port` (`rediss://` is refused: this build has no TLS).
    pub seeds: Vec<String>,
    /// Key prefix shared by every node of one fleet.
    pub namespace: String,
    /// Bytes of records this node may have written and not yet seen expire or vanish.
    pub budget: u64,
    /// Expiry of every chunk written (`None`: keep until the cluster evicts it).
    pub ttl: Option<Duration>,
    /// Bound on every call, connection included.
    pub timeout: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RemoteConfig {
    /// Defaults for `seeds`: namespace `kvtier`, 1 GiB, TTL one day, 2 s timeout, no auth.
    pub fn new(seeds: Vec<String>) -> Self {
        RemoteConfig {
            seeds,
            namespace: "kvtier".into(),
            budget: 1 << 30,
            ttl: Some(Duration::from_secs(86_400)),
            timeout: Duration::from_secs(2),
            username: None,
            password: None,
        }
    }

    /// Splits the `remote` config value: seed URLs separated by commas; a bare `host:port`
    /// gets `redis://`.
    pub fn parse_seeds(value: &str) -> Vec<String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.contains("://") {
                true => s.to_string(),
                false => format!("redis://{s}"),
            })
            .collect()
    }
}

pub(super) fn backend(message: impl Into<String>) -> CacheError {
    CacheError::Backend {
        tier: TierKind::Remote,
        message: message.into(),
    }
}

/// A chunk read back: its stored metadata and payload.
pub type Chunk = (ChunkMeta, Bytes);

/// What this node knows about a chunk in the cluster.
#[derive(Clone, Copy)]
struct Known {
    meta: ChunkMeta,
    payload_len: u64,
    /// Record bytes charged to this node's budget (0 for chunks other nodes wrote).
    charged: u64,
    expires: Option<Instant>,
}

impl Known {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

/// State shared with the futures running on the tier's runtime.
struct Inner {
    client: ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    last_attempt: Mutex<Option<Instant>>,
    healthy: AtomicBool,
    counters: Counters,
}

impl Inner {
    /// The shared multiplexed connection, connecting when there is none (rate-limited).
    async fn conn(&self) -> Result<ClusterConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        {
            let mut last = self.last_attempt.lock();
            if let Some(t) = *last
                && t.elapsed() < RECONNECT_EVERY
            {
                return Err(backend(
                    "remote cluster unreachable (last connection attempt failed; retrying shortly)",
                ));
            }
            *last = Some(Instant::now());
        }
        match self.client.get_async_connection().await {
            Ok(c) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => Err(backend(format!("remote cluster unreachable: {e}"))),
        }
    }

    /// Maps a client error, dropping the connection when it is one a reconnect may cure.
    async fn fail(&self, what: &str, e: redis::RedisError) -> CacheError {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            || e.is_timeout()
        {
            *self.conn.lock().await = None;
        }
        backend(format!("remote {what}: {e}"))
    }
}

/// The remote tier; see the module docs.
pub struct RemoteTier {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
    namespace: String,
    budget: u64,
    ttl: Option<Duration>,
    timeout: Duration,
    known: DashMap<ChunkKey, Known>,
    charged: Mutex<u64>,
}

impl RemoteTier {
    /// Builds the tier. Does not contact the cluster: the first call connects, so a node starts
    /// (degraded) while its cluster is down.
    pub fn open(config: RemoteConfig) -> Result<RemoteTier> {
        if config.seeds.is_empty() {
            return Err(backend("no remote seed nodes configured"));
        }
        if let Some(s) = config.seeds.iter().find(|s| !s.starts_with("redis://")) {
            return Err(backend(format!(
                "remote seed {s:?} is not a redis:// url (TLS is not built in)"
            )));
        }
        if config.timeout.is_zero() {
            return Err(backend("remote timeout must be positive"));
        }
        let mut b = ClusterClientBuilder::new(config.seeds.clone())
            .connection_timeout(config.timeout.min(Duration::from_secs(1)))
            .response_timeout(config.timeout)
            .retries(3);
        if let Some(u) = &config.username {
            b = b.username(u);
        }
        if let Some(p) = &config.password {
            b = b.password(p);
        }
        let client = b
            .build()
            .map_err(|e| backend(format!("remote seeds: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvtier-remote")
            .enable_all()
            .build()
            .map_err(|e| CacheError::io("starting the remote tier's runtime", e))?;
        Ok(RemoteTier {
            inner: Arc::new(Inner {
                client,
                conn: tokio::sync::Mutex::new(None),
                last_attempt: Mutex::new(None),
                healthy: AtomicBool::new(true),
                counters: Counters::default(),
            }),
            runtime: Some(runtime),
            namespace: config.namespace,
            budget: config.budget,
            ttl: config.ttl,
            timeout: config.timeout,
            known: DashMap::new(),
            charged: Mutex::new(0),
        })
    }

    /// The Redis key of a chunk.
    pub fn key_name(&self, key: ChunkKey) -> String {
        format!("{}:c:{:032x}", self.namespace, key.0)
    }

    /// Counters, latency histogram and health.
    pub fn stats(&self) -> RemoteStats {
        self.inner
            .counters
            .snapshot(self.inner.healthy.load(Ordering::Relaxed))
    }

    /// Whether the last call reached the cluster.
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Pings the cluster (within the timeout) and records the result as the tier's health.
    pub fn check_health(&self) -> bool {
        let r = self.call("ping", |inner| async move {
            let mut c = inner.conn().await?;
            let r: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
            match r {
                Ok(_) => Ok(()),
                Err(e) => Err(inner.fail("ping", e).await),
            }
        });
        r.is_ok()
    }

    /// Runs `f` on the tier's runtime, bounded by the timeout; counts latency and errors.
    fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.timeout;
        let fut = f(self.inner.clone());
        let Some(rt) = &self.runtime else {
            return Err(backend("remote tier is shut down"));
        };
        rt.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(backend(format!(
                    "remote {what} timed out after {timeout:?}"
                ))),
            };
            let _ = tx.send(r);
        });
        // The margin lets the runtime's own timeout answer first with its clearer message.
        let r = rx
            .recv_timeout(timeout + Duration::from_millis(100))
            .unwrap_or_else(|_| {
                Err(backend(format!(
                    "remote {what} timed out after {timeout:?}"
                )))
            });
        let c = &self.inner.counters;
        c.observe(start.elapsed());
        match &r {
            Err(CacheError::Backend { .. }) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                self.inner.healthy.store(false, Ordering::Relaxed);
            }
            _ => self.inner.healthy.store(true, Ordering::Relaxed),
        }
        r
    }

    fn expiry(&self) -> Option<Instant> {
        self.ttl.map(|t| Instant::now() + t)
    }

    fn forget(&self, key: ChunkKey) {
        if let Some((_, k)) = self.known.remove(&key) {
            self.release(k.charged);
        }
    }

    /// Charges `len` bytes, first uncharging expired chunks when the budget is short.
    fn reserve(&self, len: u64) -> Result<()> {
        let mut charged = self.charged.lock();
        if *charged + len > self.budget {
            let now = Instant::now();
            let mut freed = 0;
            self.known.retain(|_, k| {
                let live = k.live(now);
                if !live {
                    freed += k.charged;
                }
                live
            });
            *charged -= freed.min(*charged);
        }
        if *charged + len > self.budget {
            return Err(CacheError::TierFull {
                tier: TierKind::Remote,
                needed: len,
                budget: self.budget,
            });
        }
        *charged += len;
        Ok(())
    }

    fn release(&self, len: u64) {
        let mut c = self.charged.lock();
        *c -= len.min(*c);
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Drop for RemoteTier {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's thread would panic; this never blocks.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Tier for RemoteTier {
    fn kind(&self) -> TierKind {
        TierKind::Remote
    }

    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        self.put_many(&[(key, *meta, payload)])
            .pop()
            .unwrap_or_else(|| Err(backend("remote put: no result")))
    }

    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        self.get_many(&[key])?
            .pop()
            .unwrap_or_else(|| Err(backend("remote get: no result")))
    }

    fn contains(&self, key: ChunkKey) -> bool {
        let now = Instant::now();
        self.known.get(&key).is_some_and(|k| k.live(now))
    }

    fn remove(&self, key: ChunkKey) -> Result<bool> {
        let name = self.key_name(key);
        let n: i64 = self.call("delete", move |inner| async move {
            let mut c = inner.conn().await?;
            let r: redis::RedisResult<i64> = redis::cmd("DEL").arg(&name).query_async(&mut c).await;
            match r {
                Ok(n) => Ok(n),
                Err(e) => Err(inner.fail("delete", e).await),
            }
        })?;
        self.forget(key);
        Ok(n > 0)
    }

    fn usage(&self) -> TierUsage {
        TierUsage {
            chunks: self.known.len() as u64,
            bytes: *self.charged.lock(),
            budget: self.budget,
        }
    }

    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        let now = Instant::now();
        self.known
            .iter()
            .filter(|e| e.live(now))
            .map(|e| (*e.key(), e.meta))
            .collect()
    }

    fn stat(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, u64)>> {
        if let Some(k) = self.known.get(&key) {
            return Ok(Some((k.meta, k.payload_len)));
        }
        Ok(self.probe_many(&[key])?.pop().flatten())
    }

    fn verify(&self, key: ChunkKey) -> Result<Option<bool>> {
        match self.get(key) {
            Ok(v) => Ok(v.map(|_| true)),
            Err(CacheError::Corrupt(_)) => Ok(Some(false)),
            Err(e) => Err(e),
        }
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn probe(&self, keys: &[ChunkKey]) -> Result<Vec<Option<ChunkMeta>>> {
        Ok(self
            .probe_many(keys)?
            .into_iter()
            .map(|p| p.map(|(m, _)| m))
            .collect())
    }
}
