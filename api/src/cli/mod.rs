//! The `kvtier` command line: `serve` runs the service; every other command talks to a running
//! server (data plane at `--server`, control plane at `--http`). Human tables by default,
//! `--json` for scripts.

mod control;
mod data;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{ServeConfig, ServeOverrides};

#[derive(Parser)]
#[command(
    name = "kvtier",
    version,
    about = "KV-cache tiering sidecar for LLM serving",
    long_about = "kvtier keeps attention KV caches across host memory and disk, finds them again by \
token prefix, and serves them to engines over a binary data plane (TCP or Unix socket) with an \
HTTP control plane for operators.\n\nStart a server with `kvtier serve`, then inspect it with \
`kvtier stat`, `kvtier ls` and `kvtier show KEY`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a running server is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub struct Remote {
    /// Data-plane address: host:port, or unix:/path for the Unix socket.
    #[arg(
        long,
        env = "KVTIER_SERVER",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    pub server: String,
    /// Control-plane address (host:port or http://host:port).
    #[arg(
        long = "http",
        env = "KVTIER_HTTP_URL",
        default_value = "127.0.0.1:7071",
        global = true
    )]
    pub http: String,
    /// Bearer token, when the server requires one.
    #[arg(long, env = "KVTIER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Tenant to act as [default: default].
    #[arg(long, env = "KVTIER_TENANT", global = true)]
    pub tenant: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (host memory + local disk by default; see the README's config table).
    Serve(ServeArgs),
    /// Store statistics per tier: chunks, bytes, budget, hits, misses, evictions.
    Stat(Remote0),
    /// List chunks in key order, a page at a time (--after <last key> continues).
    Ls(control::LsArgs),
    /// Show one chunk: layout, tiers, size, fidelity, leases; --verify checks its checksums.
    Show(control::ShowArgs),
    /// Delete chunks by key.
    Rm(control::RmArgs),
    /// How many leading tokens of a prompt are cached (token ids from a list or file).
    Lookup(data::LookupArgs),
    /// Store a file as one chunk under a key.
    Put(data::PutArgs),
    /// Fetch chunks by key into files (or print their sizes).
    Get(data::GetArgs),
    /// Measure put/get throughput against a running server.
    Bench(data::BenchArgs),
}

#[derive(Args)]
struct Remote0 {
    #[command(flatten)]
    remote: Remote,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    overrides: ServeOverrides,
    /// Log filter (tracing env-filter syntax), e.g. info or kvtier=debug.
    #[arg(long, env = "KVTIER_LOG", default_value = "info")]
    log: String,
}

/// Parses arguments, runs the command, and turns errors into a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve(a).await,
            Command::Stat(r) => control::stat(&r.remote).await,
            Command::Ls(a) => control::ls(a).await,
            Command::Show(a) => control::show(a).await,
            Command::Rm(a) => control::rm(a).await,
            Command::Lookup(a) => data::lookup(a).await,
            Command::Put(a) => data::put(a).await,
            Command::Get(a) => data::get(a).await,
            Command::Bench(a) => data::bench(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&a.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let config = ServeConfig::load(&a.overrides)?;
    let exposed = !config.listen.ip().is_loopback() || !config.http.ip().is_loopback();
    if exposed && config.token.is_none() && config.tenant_tokens.is_empty() {
        tracing::warn!(
            "listening beyond loopback without a token: anyone who can reach the ports can read and write"
        );
    }
    let svc = crate::service::Service::open(config)?;
    if let Some(e) = &svc.disk_error {
        eprintln!("warning: disk tier unavailable, serving from host memory only: {e}");
    }
    let listeners = crate::server::Listeners::bind(&svc).await?;
    crate::server::run(svc, listeners, crate::server::shutdown_signal()).await?;
    Ok(())
}
