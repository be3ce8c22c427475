//! Service configuration: defaults < TOML file < environment (`KVTIER_*`) < command-line flags.
//!
//! Raw inputs are parsed into [`ServeConfig`], which is validated once and then trusted by the
//! rest of the program.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kvtier_cache::{ModelLayout, WriteMode};
use kvtier_compress::CodecChoice;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The config file is not valid TOML for [`ServeConfig`].
    #[error("parsing config file {}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    /// A value out of range, or a combination that would fail later in confusing ways.
    #[error("{0}")]
    Invalid(String),
}

/// Returns early with [`ConfigError::Invalid`].
macro_rules! invalid {
    ($($arg:tt)*) => { return Err(ConfigError::Invalid(format!($($arg)*))) };
}

/// Durability of acknowledged writes to the disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityMode {
    /// fdatasync before every disk write is acknowledged.
    Always,
    /// Group commit: writes are acknowledged after the fdatasync of their batch.
    Batch,
    /// Page cache only (benchmarks; a power loss may lose acknowledged disk writes).
    None,
}

/// A codec name in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CodecName {
    /// The engine's bytes, untouched.
    Raw,
    /// Byte planes + lz4: bit-exact, a few percent smaller on real KV.
    Lossless,
    /// KIVI int8 (lossy, about 2x).
    Int8,
    /// KIVI int4 (lossy, about 4x).
    Int4,
    /// FP8 E4M3 (lossy, about 2x).
    Fp8,
}

impl CodecName {
    pub fn choice(self) -> CodecChoice {
        match self {
            CodecName::Raw => CodecChoice::Raw,
            CodecName::Lossless => CodecChoice::Lossless,
            CodecName::Int8 => CodecChoice::Int8,
            CodecName::Int4 => CodecChoice::Int4,
            CodecName::Fp8 => CodecChoice::Fp8,
        }
    }
}

/// The validated configuration of `kvtier serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Directory of the disk tier (segment files) and the default Unix socket.
    pub data_dir: PathBuf,
    /// Data-plane TCP address.
    pub listen: SocketAddr,
    /// Data-plane Unix socket path; empty disables it. Relative paths are under `data_dir`.
    pub socket: PathBuf,
    /// HTTP control-plane address.
    pub http: SocketAddr,
    /// Bearer token guarding both planes; `None` leaves them open (loopback-only by default).
    pub token: Option<String>,
    /// Tokens that also fix the caller's tenant: `token -> tenant`. A caller presenting one of
    /// these can only ever act as that tenant.
    pub tenant_tokens: BTreeMap<String, String>,
    /// Host-memory tier budget in bytes.
    #[serde(with = "size")]
    pub host_bytes: u64,
    /// Disk tier budget in bytes; 0 disables the disk tier.
    #[serde(with = "size")]
    pub disk_bytes: u64,
    pub write_mode: WriteMode,
    pub durability: DurabilityMode,
    /// Accesses a chunk needs before it is admitted to disk.
    pub admit_after: u8,
    /// Longest lease, in seconds.
    pub max_lease_secs: u64,
    /// Concurrent requests in flight per data-plane connection.
    pub max_in_flight: u32,
    /// Seconds a sender may stall in the middle of a frame before the connection is dropped.
    pub stall_timeout_secs: u64,
    /// Codec of disk copies in exact-only namespaces: `raw` or `lossless`.
    pub disk_codec: CodecName,
    /// Codec of disk copies for tenants in `lossy_tenants`.
    pub lossy_disk_codec: CodecName,
    /// Tenants whose chunks may be stored lossy (lossy copies are never served to a caller that
    /// asks for exact data).
    pub lossy_tenants: Vec<String>,
    /// Layouts, besides the built-in SmolLM2-135M and Llama-3.1-8B, whose chunks may be encoded.
    /// Chunks of an unknown layout fingerprint are stored raw.
    pub layouts: Vec<ModelLayout>,
    /// Prompts of at least this many tokens get retrieval indexes built in the background once
    /// their chunks are stored; 0 disables background builds (RETRIEVE then scans exactly).
    pub retrieval_min_tokens: u64,
    /// Prompts kept indexed at once (least recently used dropped).
    pub retrieval_max_prompts: usize,
    /// Memory the retrieval indexes may use (about 2.3 KB per token, layer and KV head).
    #[serde(with = "size")]
    pub retrieval_index_bytes: u64,
    /// Links per node of the retrieval HNSW graphs.
    pub retrieval_hnsw_links: usize,
    /// Host usage (fraction of `host_bytes`) above which prompts of `lossy_tenants` are squeezed
    /// to a layer budget before whole chunks are evicted; 0 disables.
    pub squeeze_watermark: f64,
    /// Tokens a squeezed prompt keeps per layer on average, as a fraction of its tokens.
    pub squeeze_fraction: f64,
    /// Share of the uniform budget the least important layers keep when squeezed (also the
    /// default `p` of `POST /v1/prompts/budget`). 1.0 is uniform: on SmolLM2 captures
    /// SqueezeAttention's p = 0.5 raised attention error over uniform in 14 of 16 settings
    /// (`kvtier-bench budget`), so reallocation is opt-in.
    pub squeeze_p: f64,
    /// Page-lock the host tier's arenas with the CUDA driver when one is present, so copies
    /// between them and GPU memory run at full PCIe speed. Without a driver this does nothing.
    pub pin_host_gpu: bool,
    /// Device memory of GPU 0 for the GPU tier above host (copies of the hottest host chunks);
    /// 0 with `gpu_fraction` 0 keeps the tier off (the engine owns the GPU by default).
    #[serde(with = "size")]
    pub gpu_bytes: u64,
    /// The GPU tier's budget as a fraction (0, 0.95] of the device's free memory at start;
    /// 0 means `gpu_bytes` decides.
    pub gpu_fraction: f64,
    /// Host memory reserved for incoming prefill→decode transfers (each transfer takes one
    /// contiguous segment of it); 0 refuses transfers.
    #[serde(with = "size")]
    pub transfer_bytes: u64,
    /// Longest a transfer may take before the receiver frees its reservation (milliseconds).
    pub transfer_timeout_ms: u64,
    /// Parallel connections a push or pull uses when the request does not say.
    pub transfer_connections: u32,
    /// Layers per frame a push or pull uses when the request does not say.
    pub transfer_layers_per_run: u32,
    /// This server's data-plane address as peers reach it (for pulls); default `listen`.
    pub transfer_advertise: Option<String>,
    /// Peers (`host:port`, as requests name them) this server may push to or pull from with its
    /// credentials; empty allows loopback addresses only.
    pub transfer_peers: Vec<String>,
    /// Remote tier: Redis Cluster seed nodes, `redis://host:port,host:port`; `None` disables.
    pub remote: Option<String>,
    /// Bytes of records this node may keep written to the remote tier.
    #[serde(with = "size")]
    pub remote_bytes: u64,
    /// Expiry of every chunk written to the remote tier, in seconds; 0 keeps them until the
    /// cluster's own eviction drops them.
    pub remote_ttl_secs: u64,
    /// Codec of remote copies in exact-only namespaces: `raw` or `lossless`.
    pub remote_codec: CodecName,
    /// Codec of remote copies for tenants in `lossy_tenants`.
    pub lossy_remote_codec: CodecName,
    /// Bound on every remote call, connection included, in milliseconds.
    pub remote_timeout_ms: u64,
    /// Key prefix shared by the kvtier nodes of one fleet.
    pub remote_namespace: String,
    /// ACL user of the cluster, when it has one.
    pub remote_user: Option<String>,
    /// Password of the cluster (`requirepass`, or the ACL user's).
    pub remote_password: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("./kvtier-data"),
            listen: "127.0.0.1:7070".parse().expect("valid literal"),
            socket: PathBuf::from("kvtier.sock"),
            http: "127.0.0.1:7071".parse().expect("valid literal"),
            token: None,
            tenant_tokens: BTreeMap::new(),
            host_bytes: 4 << 30,
            disk_bytes: 16 << 30,
            write_mode: WriteMode::WriteBack,
            durability: DurabilityMode::Batch,
            admit_after: 2,
            max_lease_secs: 300,
            max_in_flight: 64,
            stall_timeout_secs: 10,
            // Raw by default: lossless saves 4-8% on real KV but costs a decode on every disk
            // read (bench/RESULTS.md, compress suite).
            disk_codec: CodecName::Raw,
            lossy_disk_codec: CodecName::Int8,
            lossy_tenants: Vec::new(),
            layouts: Vec::new(),
            // On CPU an exact scan of 8k keys costs about what an HNSW search does (bench:
            // retrieve, retrieval); indexes pay off only for longer prompts, and cost ~9x the KV.
            retrieval_min_tokens: 16384,
            retrieval_max_prompts: 4,
            retrieval_index_bytes: 4 << 30,
            retrieval_hnsw_links: 24,
            squeeze_watermark: 0.9,
            squeeze_fraction: 0.5,
            squeeze_p: 1.0,
            pin_host_gpu: true,
            gpu_bytes: 0,
            gpu_fraction: 0.0,
            // Zero pages are mapped lazily: an idle region costs address space only.
            transfer_bytes: 1 << 30,
            transfer_timeout_ms: 30_000,
            // Measured (bench/RESULTS.md, transfer): on the shared 2-core machine one and four
            // loopback connections were within run-to-run noise (1.05-2.17 vs 1.38-2.42 GB/s for
            // 512 MiB); four, because real NICs need several streams to fill.
            transfer_connections: 4,
            // 16 frames for a 32-layer model; the first (sent alone) is 1/16 of the request, so
            // layer 0 is usable after well under 10% of the transfer.
            transfer_layers_per_run: 2,
            transfer_advertise: None,
            transfer_peers: Vec::new(),
            remote: None,
            remote_bytes: 64 << 30,
            remote_ttl_secs: 86_400,
            // Raw like disk: lossless saves 4-8% of the bytes on real KV for a decode per read.
            remote_codec: CodecName::Raw,
            lossy_remote_codec: CodecName::Int8,
            remote_timeout_ms: 2000,
            remote_namespace: "kvtier".into(),
            remote_user: None,
            remote_password: None,
        }
    }
}

/// Flag and environment overrides (clap fills these; `None` means "not given").
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeOverrides {
    /// TOML configuration file (keys as in the README's configuration table).
    #[arg(long, env = "KVTIER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the disk tier's segment files [default: ./kvtier-data].
    #[arg(long, env = "KVTIER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Data-plane TCP address [default: 127.0.0.1:7070].
    #[arg(long, env = "KVTIER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data-plane Unix socket ("" disables) [default: <data-dir>/kvtier.sock].
    #[arg(long, env = "KVTIER_SOCKET")]
    pub socket: Option<PathBuf>,
    /// HTTP control-plane address [default: 127.0.0.1:7071].
    #[arg(long, env = "KVTIER_HTTP")]
    pub http: Option<SocketAddr>,
    /// Bearer token required on both planes.
    #[arg(long, env = "KVTIER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Host-memory budget, e.g. 4GiB [default: 4GiB].
    #[arg(long, env = "KVTIER_HOST_BYTES", value_parser = parse_size)]
    pub host_bytes: Option<u64>,
    /// Disk budget, e.g. 16GiB; 0 disables the disk tier [default: 16GiB].
    #[arg(long, env = "KVTIER_DISK_BYTES", value_parser = parse_size)]
    pub disk_bytes: Option<u64>,
    /// When chunks reach disk [default: write-back].
    #[arg(long, env = "KVTIER_WRITE_MODE", value_parser = parse_write_mode)]
    pub write_mode: Option<WriteMode>,
    /// Disk durability [default: batch].
    #[arg(long, env = "KVTIER_DURABILITY")]
    pub durability: Option<DurabilityMode>,
    /// Codec of disk copies for exact-only tenants: raw or lossless [default: raw].
    #[arg(long, env = "KVTIER_DISK_CODEC")]
    pub disk_codec: Option<CodecName>,
    /// Codec of disk copies for tenants allowed lossy data [default: int8].
    #[arg(long, env = "KVTIER_LOSSY_DISK_CODEC")]
    pub lossy_disk_codec: Option<CodecName>,
    /// A tenant whose chunks may be stored lossy (repeat for several).
    #[arg(
        long = "lossy-tenant",
        env = "KVTIER_LOSSY_TENANTS",
        value_delimiter = ','
    )]
    pub lossy_tenants: Option<Vec<String>>,
    /// Remote tier seed nodes, redis://host:port,... [default: none].
    #[arg(long, env = "KVTIER_REMOTE")]
    pub remote: Option<String>,
    /// Password of the remote cluster.
    #[arg(long, env = "KVTIER_REMOTE_PASSWORD", hide_env_values = true)]
    pub remote_password: Option<String>,
}

fn parse_write_mode(s: &str) -> Result<WriteMode, String> {
    match s {
        "write-back" => Ok(WriteMode::WriteBack),
        "write-through" => Ok(WriteMode::WriteThrough),
        _ => Err(format!(
            "unknown write mode {s:?} (write-back or write-through)"
        )),
    }
}

/// Parses sizes like `4GiB`, `512MiB`, `100MB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let v = n * mult as f64;
    if !(0.0..=u64::MAX as f64 / 2.0).contains(&v) {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(v as u64)
}

mod size {
    //! Sizes in TOML may be integers (bytes) or strings with a unit.
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::parse_size(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl ServeConfig {
    /// Layers defaults, the TOML file, then the overrides (clap already put flags over env).
    pub fn load(o: &ServeOverrides) -> Result<ServeConfig, ConfigError> {
        let mut c = match &o.config {
            Some(p) => Self::from_toml_file(p)?,
            None => ServeConfig::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = &o.$f { c.$f = v.clone(); } )* };
        }
        over!(
            data_dir,
            listen,
            socket,
            http,
            host_bytes,
            disk_bytes,
            write_mode,
            durability,
            disk_codec,
            lossy_disk_codec,
            lossy_tenants
        );
        if o.token.is_some() {
            c.token = o.token.clone();
        }
        if o.remote.is_some() {
            c.remote = o.remote.clone();
        }
        if o.remote_password.is_some() {
            c.remote_password = o.remote_password.clone();
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads a TOML file over the defaults.
    pub fn from_toml_file(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Checks values that would otherwise fail later in confusing ways.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.host_bytes < 1 << 20 {
            invalid!(
                "host_bytes must be at least 1 MiB (got {})",
                self.host_bytes
            );
        }
        if self.token.as_deref().is_some_and(|t| t.len() < 8) {
            invalid!("token must be at least 8 characters");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 4096 {
            invalid!("max_in_flight must be in 1..=4096");
        }
        if self.stall_timeout_secs == 0 {
            invalid!("stall_timeout_secs must be at least 1");
        }
        if self.disk_codec.choice().is_lossy() {
            invalid!(
                "disk_codec applies to tenants that demand exact data, so it must be raw or lossless \
                 (got {:?}); set lossy_disk_codec and lossy_tenants for lossy storage",
                self.disk_codec
            );
        }
        if !(0.0..1.0).contains(&self.squeeze_watermark) {
            invalid!("squeeze_watermark must be in [0, 1) (0 disables)");
        }
        if !(self.squeeze_fraction > 0.0 && self.squeeze_fraction <= 1.0) {
            invalid!("squeeze_fraction must be in (0, 1]");
        }
        if self.gpu_bytes > 0 && self.gpu_fraction > 0.0 {
            invalid!("set gpu_bytes or gpu_fraction, not both");
        }
        if !(0.0..=0.95).contains(&self.gpu_fraction) {
            invalid!("gpu_fraction must be in [0, 0.95] (0 disables; the engine owns the rest)");
        }
        if !(0.0..=1.0).contains(&self.squeeze_p) {
            invalid!("squeeze_p must be in [0, 1]");
        }
        if self.transfer_timeout_ms == 0 || self.transfer_timeout_ms > 600_000 {
            invalid!("transfer_timeout_ms must be in 1..=600000");
        }
        if self.transfer_connections == 0 || self.transfer_connections > 16 {
            invalid!("transfer_connections must be in 1..=16");
        }
        if self.transfer_layers_per_run == 0 || self.transfer_layers_per_run > 1024 {
            invalid!("transfer_layers_per_run must be in 1..=1024");
        }
        if self.remote_codec.choice().is_lossy() {
            invalid!(
                "remote_codec applies to tenants that demand exact data, so it must be raw or \
                 lossless (got {:?}); set lossy_remote_codec for lossy tenants",
                self.remote_codec
            );
        }
        if let Some(r) = &self.remote {
            let seeds = kvtier_offload::RemoteConfig::parse_seeds(r);
            if seeds.is_empty() || seeds.iter().any(|s| !s.starts_with("redis://")) {
                invalid!(
                    "remote must list redis://host:port seed nodes separated by commas (got {r:?})"
                );
            }
        }
        if !(1..=60_000).contains(&self.remote_timeout_ms) {
            invalid!("remote_timeout_ms must be in 1..=60000");
        }
        for l in &self.layouts {
            l.validate()
                .map_err(|e| ConfigError::Invalid(format!("layout {:?}: {e}", l.model_id)))?;
        }
        Ok(())
    }

    /// The Unix socket path, resolved against `data_dir`; `None` when disabled.
    pub fn socket_path(&self) -> Option<PathBuf> {
        if self.socket.as_os_str().is_empty() {
            return None;
        }
        Some(if self.socket.is_absolute() {
            self.socket.clone()
        } else {
            self.data_dir.join(&self.socket)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn layering_defaults_toml_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(
            &p,
            "host_bytes = \"64MiB\"\ndisk_bytes = 0\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let o = ServeOverrides {
            config: Some(p.clone()),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Default::default()
        };
        let c = ServeConfig::load(&o).unwrap();
        assert_eq!(c.host_bytes, 64 << 20, "toml over default");
        assert_eq!(c.disk_bytes, 0);
        assert_eq!(c.listen.port(), 9001, "flag over toml");
        assert_eq!(c.http.port(), 7071, "default kept");
        std::fs::write(&p, "hots_bytes = 1\n").unwrap();
        let err = ServeConfig::load(&ServeOverrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }

    #[test]
    fn defaults_bind_loopback() {
        let c = ServeConfig::default();
        assert!(c.listen.ip().is_loopback() && c.http.ip().is_loopback());
        assert_eq!(
            c.socket_path().unwrap(),
            PathBuf::from("./kvtier-data/kvtier.sock")
        );
    }

    #[test]
    fn the_gpu_tier_is_off_by_default_and_its_budget_is_checked() {
        let c = ServeConfig::default();
        assert_eq!((c.gpu_bytes, c.gpu_fraction), (0, 0.0));
        c.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, "gpu_bytes = \"2GiB\"\n").unwrap();
        let c = ServeConfig::from_toml_file(&p).unwrap();
        assert_eq!(c.gpu_bytes, 2 << 30);
        c.validate().unwrap();
        let both = ServeConfig {
            gpu_fraction: 0.5,
            ..c
        };
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        let too_much = ServeConfig {
            gpu_fraction: 0.99,
            ..ServeConfig::default()
        };
        assert!(
            too_much
                .validate()
                .unwrap_err()
                .to_string()
                .contains("0.95")
        );
    }
}
