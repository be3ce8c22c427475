//! CLI commands over the HTTP control plane: stat, ls, show, rm.

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use kvtier_cache::ChunkKey;

use super::Remote;

fn base_url(r: &Remote) -> String {
    let h = r.http.trim_end_matches('/');
    if h.starts_with("http://") || h.starts_with("https://") {
        h.to_string()
    } else {
        format!("http://{h}")
    }
}

async fn request(r: &Remote, method: reqwest::Method, path: &str) -> Result<Option<Value>> {
    let url = format!("{}{path}", base_url(r));
    let mut req = reqwest::Client::new().request(method, &url);
    if let Some(t) = &r.token {
        req = req.bearer_auth(t);
    }
    if let Some(t) = &r.tenant {
        req = req.header("x-kvtier-tenant", t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("is a kvtier server running at {}?", base_url(r)))?;
    let status = resp.status();
    let body = resp.text().await.context("reading the server's answer")?;
    if !status.is_success() {
        let msg = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("server answered {status}: {msg}");
    }
    if body.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(&body).context("the server's answer is not JSON")?,
    ))
}

fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

pub(super) async fn stat(r: &Remote) -> Result<()> {
    let v = request(r, reqwest::Method::GET, "/v1/stats")
        .await?
        .unwrap_or_default();
    if r.json {
        println!("{v}");
        return Ok(());
    }
    let s = if v.get("store").is_some() {
        &v["store"]
    } else {
        &v
    };
    println!("chunks {}   leases {}", s["chunks"], s["leases"]);
    println!(
        "{:<7} {:>8} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "tier", "chunks", "bytes", "budget", "hits", "misses", "evicted", "promoted", "demoted"
    );
    for t in s["tiers"].as_array().into_iter().flatten() {
        // Tier figures are flat in the HTTP stats; the wire's StoreStats nests them in `usage`.
        let u = if t.get("usage").is_some() {
            &t["usage"]
        } else {
            t
        };
        println!(
            "{:<7} {:>8} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
            t["tier"].as_str().unwrap_or("?"),
            u["chunks"].to_string(),
            human_bytes(num(&u["bytes"])),
            human_bytes(num(&u["budget"])),
            t["hits"].to_string(),
            t["misses"].to_string(),
            t["evictions"].to_string(),
            t["promotions"].to_string(),
            t["demotions"].to_string()
        );
    }
    print_gpus(&v);
    Ok(())
}

/// The `gpus` part of `/v1/stats`: one line per GPU, or why there is none.
fn print_gpus(v: &Value) {
    let gpus = v["gpus"].as_array().map(Vec::as_slice).unwrap_or_default();
    if gpus.is_empty() {
        if let Some(why) = v["gpus_unavailable"].as_str() {
            println!("gpus: none ({why})");
        }
        return;
    }
    println!(
        "{:<4} {:<24} {:>11} {:>11} {:>6} {:>12} {:>12}",
        "gpu", "name", "used", "free", "util", "pcie rx/s", "pcie tx/s"
    );
    let kb = |x: &Value| {
        x.as_f64()
            .map_or("-".to_string(), |k| human_bytes(k * 1024.0))
    };
    for g in gpus {
        println!(
            "{:<4} {:<24} {:>11} {:>11} {:>6} {:>12} {:>12}",
            g["index"].to_string(),
            g["name"].as_str().unwrap_or("?"),
            human_bytes(num(&g["memory_used_bytes"])),
            human_bytes(num(&g["memory_free_bytes"])),
            g["utilization_gpu_pct"]
                .as_u64()
                .map_or("-".to_string(), |u| format!("{u}%")),
            kb(&g["pcie_rx_kbps"]),
            kb(&g["pcie_tx_kbps"]),
        );
    }
}

#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    remote: Remote,
    /// Only chunks present in this tier (host, disk).
    #[arg(long)]
    tier: Option<String>,
    /// Continue after this key (the previous page's last key).
    #[arg(long)]
    after: Option<ChunkKey>,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

pub(super) async fn ls(a: LsArgs) -> Result<()> {
    let mut q = format!("/v1/chunks?limit={}", a.limit);
    if let Some(t) = &a.tier {
        q.push_str(&format!("&tier={t}"));
    }
    if let Some(k) = a.after {
        q.push_str(&format!("&after={k}"));
    }
    let v = request(&a.remote, reqwest::Method::GET, &q)
        .await?
        .unwrap_or_default();
    if a.remote.json {
        println!("{v}");
        return Ok(());
    }
    let chunks = v["chunks"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<34} {:>6} {:>7} {:>11} {:<10} {:<10}",
        "key", "depth", "tokens", "size", "tiers", "fidelity"
    );
    for c in &chunks {
        println!(
            "{:<34} {:>6} {:>7} {:>11} {:<10} {:<10}",
            c["key"].as_str().unwrap_or("?"),
            c["depth"].to_string(),
            c["tokens"].to_string(),
            human_bytes(num(&c["size"])),
            tiers_text(&c["tiers"]),
            fidelity_text(&c["fidelity"])
        );
    }
    match v["next"].as_str() {
        Some(next) => println!("({} shown; more with --after {next})", chunks.len()),
        None => println!("({} shown)", chunks.len()),
    }
    Ok(())
}

fn tiers_text(v: &Value) -> String {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("+"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fidelity_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
        other => other.to_string(),
    }
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    remote: Remote,
    /// Chunk key (32 hex digits).
    key: ChunkKey,
    /// Re-read the chunk in every tier and check its checksums.
    #[arg(long)]
    verify: bool,
}

pub(super) async fn show(a: ShowArgs) -> Result<()> {
    let path = format!(
        "/v1/chunks/{}{}",
        a.key,
        if a.verify { "?verify=true" } else { "" }
    );
    let v = request(&a.remote, reqwest::Method::GET, &path)
        .await?
        .unwrap_or_default();
    if a.remote.json {
        println!("{v}");
        return Ok(());
    }
    let Value::Object(map) = &v else {
        println!("{v}");
        return Ok(());
    };
    for (k, val) in map {
        let text = match (k.as_str(), val) {
            ("tiers", v) => tiers_text(v),
            ("fidelity", v) => fidelity_text(v),
            ("verify", v) => verify_text(v),
            ("copies", v) => copies_text(v),
            (_, Value::Null) => "-".to_string(),
            (_, Value::String(s)) => s.clone(),
            (_, other) => other.to_string(),
        };
        println!("{k:<18} {text}");
    }
    Ok(())
}

/// One line per tier copy: codec, stored size and ratio.
fn copies_text(v: &Value) -> String {
    let lines: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}: {} ({}), {} stored, {} raw, ratio {:.3}, {}",
                c["tier"].as_str().unwrap_or("?"),
                c["codec_name"].as_str().unwrap_or("?"),
                c["codec"],
                human_bytes(c["stored_bytes"].as_f64().unwrap_or(0.0)),
                human_bytes(c["raw_bytes"].as_f64().unwrap_or(0.0)),
                c["ratio"].as_f64().unwrap_or(0.0),
                fidelity_text(&c["fidelity"]),
            )
        })
        .collect();
    lines.join(&format!("\n{:<18} ", ""))
}

/// `ok` or `FAILED`, then each tier's result.
fn verify_text(v: &Value) -> String {
    let per_tier: Vec<String> = v["tiers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let ok = if t["ok"].as_bool() == Some(true) {
                "ok"
            } else {
                "CORRUPT"
            };
            format!("{} {ok}", t["tier"].as_str().unwrap_or("?"))
        })
        .collect();
    let overall = if v["ok"].as_bool() == Some(true) {
        "ok"
    } else {
        "FAILED"
    };
    format!("{overall} ({})", per_tier.join(", "))
}

#[derive(Args)]
pub struct RmArgs {
    #[command(flatten)]
    remote: Remote,
    /// Chunk keys (32 hex digits each).
    #[arg(required = true)]
    keys: Vec<ChunkKey>,
}

pub(super) async fn rm(a: RmArgs) -> Result<()> {
    let mut missing = 0;
    for k in &a.keys {
        match request(
            &a.remote,
            reqwest::Method::DELETE,
            &format!("/v1/chunks/{k}"),
        )
        .await
        {
            Ok(_) => {
                if !a.remote.json {
                    println!("removed {k}");
                }
            }
            Err(e) if e.to_string().contains("404") => {
                missing += 1;
                eprintln!("{k}: not found");
            }
            Err(e) => return Err(e),
        }
    }
    if a.remote.json {
        println!(
            "{}",
            serde_json::json!({"requested": a.keys.len(), "removed": a.keys.len() - missing})
        );
    }
    if missing > 0 {
        bail!("{missing} of {} chunks not found", a.keys.len());
    }
    Ok(())
}
