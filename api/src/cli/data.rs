//! CLI commands over the data plane: lookup, put, get, bench.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use kvtier_cache::{ChunkKey, ChunkMeta, ModelLayout};

use super::Remote;
use crate::client::{Client, ClientOptions, fidelity_name};
use crate::config::parse_size;

pub(super) async fn connect(r: &Remote) -> Result<Client> {
    let opts = ClientOptions {
        token: r.token.clone(),
        tenant: r.tenant.clone(),
        client_name: "kvtier-cli".into(),
    };
    Client::connect(&r.server, opts)
        .await
        .with_context(|| format!("is a kvtier server running at {}?", r.server))
}

#[derive(Args)]
pub struct LookupArgs {
    #[command(flatten)]
    remote: Remote,
    /// Token ids, comma or space separated.
    #[arg(long, conflicts_with = "tokens_file")]
    tokens: Option<String>,
    /// File of token ids (whitespace or comma separated).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Layout fingerprint the engine stored under (decimal or 0x-hex).
    #[arg(long, value_parser = parse_u64, conflicts_with = "model")]
    layout_fingerprint: Option<u64>,
    /// A known model layout instead of a fingerprint: llama-3.1-8b or smollm2-135m.
    #[arg(long)]
    model: Option<String>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    chunk_tokens: u32,
    /// Namespace salt (LoRA id, cache salt).
    #[arg(long)]
    salt: Option<String>,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("invalid number {s:?}: {e}"))
}

/// The layout named on the command line.
pub(super) fn known_layout(name: &str) -> Result<ModelLayout> {
    let builtin = kvtier_prompt::builtin_layouts();
    match builtin.iter().find(|(n, _)| *n == name) {
        Some((_, l)) => Ok(l.clone()),
        None => {
            let names: Vec<&str> = builtin.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown model {name:?} ({}); pass --layout-fingerprint instead",
                names.join(", ")
            )
        }
    }
}

fn parse_tokens(text: &str) -> Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("invalid token id {t:?}"))
        })
        .collect()
}

pub(super) async fn lookup(a: LookupArgs) -> Result<()> {
    let text = match (&a.tokens, &a.tokens_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give the prompt's token ids with --tokens or --tokens-file"),
    };
    let tokens = parse_tokens(&text)?;
    let fp = match (a.layout_fingerprint, &a.model) {
        (Some(fp), _) => fp,
        (None, Some(m)) => known_layout(m)?.fingerprint(),
        (None, None) => bail!("give --layout-fingerprint or --model"),
    };
    let c = connect(&a.remote).await?;
    let r = c
        .lookup(fp, a.salt.as_deref(), a.chunk_tokens, &tokens)
        .await?;
    if a.remote.json {
        let hits: Vec<_> = r
            .hits
            .iter()
            .map(|h| serde_json::json!({"key": h.key.to_string(), "tiers": h.tiers.to_string(), "fidelity": fidelity_name(h.fidelity_tag)}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"tokens": tokens.len(), "hit_tokens": r.hit_tokens, "hits": hits})
        );
        return Ok(());
    }
    println!(
        "{} of {} tokens cached ({} chunks)",
        r.hit_tokens,
        tokens.len(),
        r.hits.len()
    );
    if !r.hits.is_empty() {
        println!("{:<6} {:<34} {:<12} fidelity", "chunk", "key", "tiers");
        for (i, h) in r.hits.iter().enumerate() {
            println!(
                "{:<6} {:<34} {:<12} {}",
                i,
                h.key,
                h.tiers.to_string(),
                fidelity_name(h.fidelity_tag)
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct PutArgs {
    #[command(flatten)]
    remote: Remote,
    /// Chunk key (32 hex digits).
    key: ChunkKey,
    /// File holding the chunk's bytes.
    file: PathBuf,
    /// Layout fingerprint recorded with the chunk [default: 0, no layout].
    #[arg(long, value_parser = parse_u64, conflicts_with = "model")]
    layout_fingerprint: Option<u64>,
    /// A known model layout instead of a fingerprint (llama-3.1-8b or smollm2-135m): the file
    /// must then be exactly one chunk of that layout, and the server can compress it.
    #[arg(long)]
    model: Option<String>,
    /// Tokens in the chunk.
    #[arg(long, default_value_t = 256)]
    tokens: u32,
    /// Position of the chunk in its prompt.
    #[arg(long, default_value_t = 0)]
    depth: u32,
}

pub(super) async fn put(a: PutArgs) -> Result<()> {
    let data = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let fingerprint = match (&a.model, a.layout_fingerprint) {
        (Some(m), _) => {
            let layout = known_layout(m)?;
            let want = layout.chunk_bytes(a.tokens as usize);
            if data.len() != want {
                bail!(
                    "{} holds {} bytes; one {m} chunk of {} tokens is {want} bytes",
                    a.file.display(),
                    data.len(),
                    a.tokens
                );
            }
            layout.fingerprint()
        }
        (None, fp) => fp.unwrap_or(0),
    };
    let c = connect(&a.remote).await?;
    let meta = ChunkMeta::raw(0, fingerprint, a.tokens, a.depth, data.len() as u64);
    let t = Instant::now();
    c.put(a.key, &meta, &data).await?;
    let secs = t.elapsed().as_secs_f64();
    if a.remote.json {
        println!(
            "{}",
            serde_json::json!({"key": a.key.to_string(), "bytes": data.len(), "seconds": secs})
        );
    } else {
        println!(
            "stored {} ({} bytes) in {:.1} ms",
            a.key,
            data.len(),
            secs * 1e3
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    remote: Remote,
    /// Chunk keys (32 hex digits each).
    #[arg(required = true)]
    keys: Vec<ChunkKey>,
    /// Directory to write each chunk to, as <key>.bin; without it, only sizes are printed.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Also return lossy-compressed chunks.
    #[arg(long)]
    accept_lossy: bool,
}

pub(super) async fn get(a: GetArgs) -> Result<()> {
    let c = connect(&a.remote).await?;
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bar = progress(a.keys.len() as u64, a.remote.json || a.keys.len() < 4);
    let mut rows = Vec::new();
    let mut missing = 0;
    for key in &a.keys {
        let got = c.get(&[*key], a.accept_lossy).await?.pop().flatten();
        match got {
            Some(g) => {
                if let Some(dir) = &a.out {
                    let p = dir.join(format!("{key}.bin"));
                    std::fs::write(&p, &g.bytes)
                        .with_context(|| format!("writing {}", p.display()))?;
                }
                rows.push(serde_json::json!({"key": key.to_string(), "found": true, "bytes": g.bytes.len(), "fidelity": g.meta.fidelity.to_string()}));
            }
            None => {
                missing += 1;
                rows.push(serde_json::json!({"key": key.to_string(), "found": false}));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if a.remote.json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        for r in &rows {
            match r["found"].as_bool() {
                Some(true) => println!(
                    "{}  {} bytes  {}",
                    r["key"].as_str().unwrap_or(""),
                    r["bytes"],
                    r["fidelity"].as_str().unwrap_or("")
                ),
                _ => println!("{}  not found", r["key"].as_str().unwrap_or("")),
            }
        }
    }
    if missing > 0 {
        bail!("{missing} of {} chunks not found", a.keys.len());
    }
    Ok(())
}

fn progress(n: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]")
    {
        bar.set_style(style);
    }
    bar
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    remote: Remote,
    /// Chunk size, e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    size: u64,
    /// Chunks to put and then get.
    #[arg(long, default_value_t = 16)]
    count: u32,
}

pub(super) async fn bench(a: BenchArgs) -> Result<()> {
    let c = connect(&a.remote).await?;
    let len = a.size as usize;
    let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
    let base = u128::from(std::process::id()) << 64 | 0xbe_0000;
    let keys: Vec<ChunkKey> = (0..a.count as u128).map(|i| ChunkKey(base + i)).collect();
    let meta = ChunkMeta::raw(0, 0, 256, 0, len as u64);
    let bar = progress(u64::from(a.count) * 2, a.remote.json);
    bar.set_message("put");
    let t = Instant::now();
    for k in &keys {
        c.put(*k, &meta, &data).await?;
        bar.inc(1);
    }
    let put_s = t.elapsed().as_secs_f64();
    bar.set_message("get");
    let mut buf = Vec::new();
    let t = Instant::now();
    for k in &keys {
        let (entries, b) = c.get_into(&[*k], false, buf).await?;
        buf = b;
        if entries[0].is_none() {
            bail!(
                "chunk {k} was evicted before it could be read back; lower --count or raise the host budget"
            );
        }
        bar.inc(1);
    }
    let get_s = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if buf != data {
        bail!("the last chunk read back differs from what was written");
    }
    c.delete(&keys).await?;
    let total = (len as f64) * f64::from(a.count);
    let (put_gbps, get_gbps) = (total / put_s / 1e9, total / get_s / 1e9);
    if a.remote.json {
        println!(
            "{}",
            serde_json::json!({"chunk_bytes": len, "count": a.count, "put_gbps": put_gbps, "get_gbps": get_gbps})
        );
    } else {
        println!(
            "{} chunks of {} bytes: put {:.2} GB/s, get {:.2} GB/s",
            a.count, len, put_gbps, get_gbps
        );
    }
    Ok(())
}
