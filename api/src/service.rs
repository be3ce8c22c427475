//! The running service: the store built from configuration, credentials and the event feed that
//! both planes share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use kvtier_cache::host::ArenaAllocator;
use kvtier_cache::{
    EncodingTier, HostConfig, HostTier, StoreConfig, StoreEvent, Tier, TieredStore, Transcoder,
};
use kvtier_offload::{DiskConfig, DiskTier, Durability, MemfdArenas, RemoteConfig, RemoteTier};

use kvtier_compress::StoreCodec;
use kvtier_compress::policy::{CodecPolicy, TierCodecs};

use kvtier_prompt::Layouts;
use kvtier_prompt::retrieval::{Retrieval, RetrievalConfig};
use kvtier_prompt::squeeze::{Importance, SqueezeConfig};

use crate::auth::Auth;
use crate::config::{DurabilityMode, ServeConfig};
use crate::error::ApiError;

/// Events buffered per subscriber before a slow one starts missing them (it is told how many).
pub const EVENT_BUFFER: usize = 4096;

/// Everything a request handler needs. Shared behind an `Arc`.
pub struct Service {
    pub config: ServeConfig,
    pub store: Arc<TieredStore>,
    pub auth: Auth,
    pub events: broadcast::Sender<StoreEvent>,
    /// RETRIEVE and its background index builds.
    pub retrieval: Arc<Retrieval>,
    /// Layer importance per layout, learned from budget requests (used by the squeezer).
    pub importance: Arc<Importance>,
    /// Layouts known by fingerprint: the built-in SmolLM2-135M and Llama-3.1-8B, and the
    /// configured ones.
    pub layouts: Arc<Layouts>,
    /// Tenant ids of `config.lossy_tenants`: the tenants whose prompts budgets may prune.
    pub lossy_tenants: Vec<u64>,
    /// Why the disk tier is not in use, when it was configured but could not be opened.
    pub disk_error: Option<String>,
    /// Whether host arenas are shareable memfd regions (same-host zero-copy reads).
    pub shared_arenas: bool,
    /// Page-locking of host arenas with the CUDA driver, when a GPU was found (`pin_host_gpu`).
    pub pinned_host: Option<Arc<kvtier_offload::gpu::pinned::PinStats>>,
    pub started: Instant,
    /// Prefill→decode transfers being received.
    pub transfers: Arc<crate::transfer::Transfers>,
    /// The data-plane address actually bound (set by `Listeners::bind`; port 0 resolved).
    pub data_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// The remote tier (below disk), when `remote` is configured: for health and its stats.
    pub remote: Option<Arc<RemoteTier>>,
}

impl Service {
    /// Builds the store: host tier (memfd arenas when the kernel offers them) and, when
    /// `disk_bytes > 0`, the disk tier under `data_dir`. A disk tier that cannot be opened is
    /// reported and the service runs on host memory alone.
    pub fn open(config: ServeConfig) -> Result<Arc<Service>, ApiError> {
        config.validate()?;
        let host_cfg = HostConfig::with_budget(config.host_bytes);
        // One small probe arena tells whether memfd works here (it can be missing in sandboxes).
        let (allocator, shared_arenas): (Box<dyn ArenaAllocator>, bool) = match MemfdArenas
            .allocate(4096)
        {
            Ok(_) => (Box::new(MemfdArenas), true),
            Err(e) => {
                tracing::warn!(
                    "memfd arenas unavailable ({e}); host tier uses the heap and same-host zero-copy is off"
                );
                (Box::new(kvtier_cache::host::HeapArenas), false)
            }
        };
        let gpu_device = open_gpu(&config);
        let (allocator, pinned_host) = pin_host_arenas(&config, gpu_device.as_ref(), allocator);
        let host = HostTier::with_allocator(host_cfg, allocator);
        let mut lower: Vec<Arc<dyn Tier>> = Vec::new();
        let mut disk_error = None;
        if config.disk_bytes > 0 {
            let mut dc = DiskConfig::new(config.data_dir.join("segments"), config.disk_bytes);
            dc.durability = match config.durability {
                DurabilityMode::Always => Durability::Always,
                DurabilityMode::Batch => Durability::Batch {
                    max_delay: Duration::from_millis(2),
                },
                DurabilityMode::None => Durability::None,
            };
            match DiskTier::open(dc) {
                Ok(d) => lower.push(Arc::new(d)),
                Err(e) => {
                    tracing::error!("disk tier unavailable, serving from host memory only: {e}");
                    disk_error = Some(e.to_string());
                }
            }
        }
        let remote = match &config.remote {
            Some(seeds) => {
                let r = Arc::new(RemoteTier::open(remote_config(&config, seeds))?);
                lower.push(r.clone());
                Some(r)
            }
            None => None,
        };
        let store_cfg = StoreConfig {
            write_mode: config.write_mode,
            admit_after: config.admit_after,
            max_lease_ttl: Duration::from_secs(config.max_lease_secs),
            ..StoreConfig::default()
        };
        let layouts = Arc::new(Layouts::new(
            kvtier_prompt::builtin_layouts()
                .into_iter()
                .map(|(_, l)| l)
                .chain(config.layouts.iter().cloned()),
        ));
        // Slower tiers store chunks encoded by the codec policy.
        let codec: Arc<dyn Transcoder> = Arc::new(store_codec(&config, &layouts));
        let lower = lower
            .into_iter()
            .map(|t| Arc::new(EncodingTier::new(t, codec.clone())) as Arc<dyn Tier>)
            .collect();
        let mut store = TieredStore::new(store_cfg, Arc::new(host), lower);
        if let Some(device) = gpu_tier(&config, gpu_device.as_ref()) {
            store = store.with_device(device);
        }
        let store = Arc::new(store);
        if store.has_device() {
            spawn_device_promoter(Arc::downgrade(&store))
                .map_err(|e| ApiError::io("starting the gpu promotion thread", e))?;
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let tx = events.clone();
        store.subscribe(move |e| {
            // No subscriber is not an error: events are best-effort notifications.
            let _ = tx.send(e.clone());
        });
        let retrieval = Arc::new(Retrieval::new(
            layouts.clone(),
            RetrievalConfig {
                min_tokens: config.retrieval_min_tokens,
                max_prompts: config.retrieval_max_prompts,
                max_bytes: config.retrieval_index_bytes,
                hnsw_links: config.retrieval_hnsw_links,
                ..RetrievalConfig::default()
            },
        ));
        let observer = retrieval.clone();
        store.subscribe(move |e| observer.observe(e));
        kvtier_prompt::retrieval::spawn_builder(retrieval.clone(), Arc::downgrade(&store))
            .map_err(|e| ApiError::io("starting the index builder thread", e))?;
        let importance = Arc::new(Importance::default());
        let lossy_tenants: Vec<u64> = config
            .lossy_tenants
            .iter()
            .map(|t| kvtier_cache::key::tenant_id(t))
            .collect();
        kvtier_prompt::squeeze::spawn_squeezer(
            Arc::downgrade(&store),
            layouts.clone(),
            importance.clone(),
            lossy_tenants.clone(),
            SqueezeConfig {
                watermark: config.squeeze_watermark,
                fraction: config.squeeze_fraction,
                p: config.squeeze_p,
                sinks: 4,
            },
        )
        .map_err(|e| ApiError::io("starting the squeezer thread", e))?;
        let auth = Auth::new(config.token.clone(), &config.tenant_tokens);
        let transfers = Arc::new(crate::transfer::Transfers::new(
            config.transfer_bytes,
            Duration::from_millis(config.transfer_timeout_ms),
        ));
        crate::transfer::spawn_reaper(Arc::downgrade(&transfers))
            .map_err(|e| ApiError::io("starting the transfer reaper thread", e))?;
        Ok(Arc::new(Service {
            transfers,
            data_addr: std::sync::OnceLock::new(),
            config,
            store,
            auth,
            events,
            retrieval,
            importance,
            layouts,
            lossy_tenants,
            disk_error,
            shared_arenas,
            pinned_host,
            started: Instant::now(),
            remote,
        }))
    }

    /// Flushes every tier (called on graceful shutdown).
    pub fn shutdown(&self) -> Result<(), ApiError> {
        self.store.flush()?;
        Ok(())
    }
}

/// The store's codec hook: the configured disk codecs, the known layouts, and the tenants
/// allowed lossy copies.
pub fn store_codec(config: &ServeConfig, layouts: &Layouts) -> StoreCodec {
    let policy = CodecPolicy {
        disk: TierCodecs {
            exact: config.disk_codec.choice(),
            lossy: config.lossy_disk_codec.choice(),
        },
        remote: TierCodecs {
            exact: config.remote_codec.choice(),
            lossy: config.lossy_remote_codec.choice(),
        },
        ..CodecPolicy::default()
    };
    let mut hook = StoreCodec::new(policy);
    for l in layouts.iter() {
        hook.register(l.clone());
    }
    for t in &config.lossy_tenants {
        hook.allow_lossy(kvtier_cache::key::tenant_id(t));
    }
    hook
}

/// Opens GPU 0 when something configured wants it (pinned host arenas, the GPU tier); one log
/// line says why not when it cannot.
fn open_gpu(config: &ServeConfig) -> Option<Arc<kvtier_offload::gpu::GpuDevice>> {
    let wants_tier = config.gpu_bytes > 0 || config.gpu_fraction > 0.0;
    if !config.pin_host_gpu && !wants_tier {
        return None;
    }
    match kvtier_offload::gpu::GpuDevice::open(0) {
        Ok(dev) => Some(dev),
        Err(e) if wants_tier => {
            tracing::error!("{e}; the gpu tier is off, serving from host memory and below");
            None
        }
        Err(e) => {
            tracing::info!("{e}; host arenas stay pageable");
            None
        }
    }
}

/// Wraps the host tier's allocator so that its arenas are page-locked with the CUDA driver,
/// when `pin_host_gpu` is on and a GPU opened; otherwise returns it unchanged.
fn pin_host_arenas(
    config: &ServeConfig,
    dev: Option<&Arc<kvtier_offload::gpu::GpuDevice>>,
    allocator: Box<dyn ArenaAllocator>,
) -> (
    Box<dyn ArenaAllocator>,
    Option<Arc<kvtier_offload::gpu::pinned::PinStats>>,
) {
    match dev.filter(|_| config.pin_host_gpu) {
        Some(dev) => {
            tracing::info!("gpu found: host arenas are page-locked for device copies");
            let pinned = kvtier_offload::gpu::PinnedArenas::new(allocator, dev.clone());
            let stats = pinned.stats();
            (Box::new(pinned), Some(stats))
        }
        None => (allocator, None),
    }
}

/// The GPU tier above host, when `gpu_bytes` or `gpu_fraction` asks for one and GPU 0 opened.
fn gpu_tier(
    config: &ServeConfig,
    dev: Option<&Arc<kvtier_offload::gpu::GpuDevice>>,
) -> Option<Arc<dyn Tier>> {
    use kvtier_offload::gpu::{GpuBudget, GpuConfig, GpuTier};
    let budget = match (config.gpu_bytes, config.gpu_fraction) {
        (0, f) if f > 0.0 => GpuBudget::FractionOfFree(f),
        (0, _) => return None,
        (n, _) => GpuBudget::Bytes(n),
    };
    match GpuTier::on_device(dev?.clone(), &GpuConfig::with_budget(budget)) {
        Ok(t) => {
            tracing::info!(
                "gpu tier on: {} bytes of device memory above host",
                t.usage().budget
            );
            Some(Arc::new(t))
        }
        Err(e) => {
            tracing::error!("gpu tier unavailable, serving from host memory and below: {e}");
            None
        }
    }
}

/// Copies hot host chunks up to the GPU tier off the request path: a plain thread (device
/// copies block) that holds the store weakly and ends with it.
fn spawn_device_promoter(store: std::sync::Weak<TieredStore>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("kvtier-gpu-promote".into())
        .spawn(move || {
            loop {
                let Some(s) = store.upgrade() else { return };
                let busy = s.promote_to_device(64) > 0 || s.device_queue_len() > 0;
                drop(s);
                if !busy {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
        .map(|_| ())
}

/// The remote tier's settings from the service configuration.
fn remote_config(config: &ServeConfig, seeds: &str) -> RemoteConfig {
    let mut r = RemoteConfig::new(RemoteConfig::parse_seeds(seeds));
    r.namespace = config.remote_namespace.clone();
    r.budget = config.remote_bytes;
    r.ttl = (config.remote_ttl_secs > 0).then(|| Duration::from_secs(config.remote_ttl_secs));
    r.timeout = Duration::from_millis(config.remote_timeout_ms);
    r.username = config.remote_user.clone();
    r.password = config.remote_password.clone();
    r
}
