//! `vllm` suite: time to first token of a real vLLM engine (CPU build, SmolLM2-135M-Instruct)
//! with kvtier's connector (`kvtier.vllm.KvtierConnector`), cold against warm, in one run.
//!
//! An in-process kvtier serves one vLLM process (vLLM's own prefix cache off, fp32) driven by
//! `api/python/tests/vllm/driver.py`, which runs, one request at a time:
//! 0. a short warm-up request (the first request of an engine pays one-off costs);
//! 1. the benchmark prompt with two tokens in front, max_tokens 1: as long, but no chunk key in
//!    common, so kvtier has none of it: `ttft_cold_ms`;
//! 2. the benchmark prompt, 16 greedy tokens, cold (it stores its full chunks);
//! 3. the benchmark prompt with max_tokens 1 again, warm: its prefix is loaded from kvtier:
//!    `ttft_warm_ms`;
//! 4. the benchmark prompt, 16 tokens, warm: `identical` compares its tokens with step 2's.
//!
//! Save and load throughput come from the connector's own log lines (bytes and milliseconds of
//! each load into vLLM's paged blocks, scatter included, and of each chunk put). The Python side
//! is installed by `scripts/test-vllm.sh` (venv `.cache/vllm-venv`, model `.cache/smollm2-hf`);
//! without it the suite stops with that advice. vLLM's start-up alone takes about a minute on
//! two cores, so `--quick` only shortens the prompt; it cannot finish in under a minute.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use kvtier::testing::TestServer;
use serde_json::Value;

use crate::report::Figures;

#[derive(clap::Args)]
pub struct Args {
    /// Shorter shared prefix (about 1,500 instead of 3,000 tokens).
    #[arg(long)]
    pub quick: bool,
    /// The vLLM virtual environment (scripts/install-vllm.sh).
    #[arg(long, env = "KVTIER_VLLM_VENV", default_value = ".cache/vllm-venv")]
    pub venv: PathBuf,
    /// The Hugging Face checkpoint (scripts/test-vllm.sh converts it).
    #[arg(long, env = "KVTIER_VLLM_MODEL", default_value = ".cache/smollm2-hf")]
    pub model: PathBuf,
}

fn document(sections: usize) -> String {
    (0..sections)
        .map(|i| {
            format!(
                "Section {i}: the archive lists item {} beside record {}, filed under topic {}.",
                i * 7 % 101,
                i * 13 % 97,
                i % 17
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sums `(bytes, ms)` over the connector's "kvtier: {verb} N tokens (B bytes) in M ms" lines.
fn throughput(log: &str, verb: &str) -> Option<f64> {
    let (mut bytes, mut ms) = (0f64, 0f64);
    let tag = format!("kvtier: {verb} ");
    for line in log.lines() {
        let Some(rest) = line.split(&tag).nth(1) else {
            continue;
        };
        let b = rest
            .split('(')
            .nth(1)?
            .split(' ')
            .next()?
            .parse::<f64>()
            .ok()?;
        let m = rest
            .split(" in ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse::<f64>()
            .ok()?;
        bytes += b;
        ms += m;
    }
    (ms > 0.0).then(|| bytes / (ms / 1e3) / 1e9)
}

pub fn run(a: Args) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(&a.venv);
    let model = root.join(&a.model);
    let python = venv.join("bin/python");
    if !python.exists() || !model.join("config.json").exists() {
        bail!(
            "no vLLM environment at {} or model at {}: run scripts/test-vllm.sh once first",
            venv.display(),
            model.display()
        );
    }
    let sections = if a.quick { 65 } else { 130 };
    let prompt = format!(
        "{}\nQuestion: which topic is section 5 filed under? Answer:",
        document(sections)
    );
    // Two more tokens in front: every chained key differs, so nothing of it is in kvtier.
    let cold = format!("Note. {prompt}");
    let server = TestServer::start(|c| c.host_bytes = 2 << 30)?;
    let cfg = serde_json::json!({
        "model": model,
        // A short warm-up first: the engine's first request pays one-off costs.
        "prompts": ["Hello", cold, prompt, prompt, prompt],
        "max_tokens": [1, 1, 16, 1, 16],
        "settle_s": 2,
        "kvtier": {"address": server.tcp, "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    });
    println!(
        "vllm: one engine process against an in-process kvtier at {}",
        server.tcp
    );
    let out = Command::new(&python)
        .arg(root.join("api/python/tests/vllm/driver.py"))
        .arg(cfg.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .env("VLLM_CPU_KVCACHE_SPACE", "2")
        .output()
        .context("starting the vLLM driver")?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "the vLLM driver failed:\n{}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let results: Vec<Value> = log
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        results.len() == 5,
        "expected 5 results, got {}",
        results.len()
    );
    let f = |i: usize, k: &str| results[i][k].as_f64().unwrap_or(f64::NAN);
    let (ttft_cold, ttft_warm) = (f(1, "elapsed_s") * 1e3, f(3, "elapsed_s") * 1e3);
    let prefix_tokens = f(3, "num_cached_tokens");
    let identical = results[2]["token_ids"] == results[4]["token_ids"]
        && f(2, "num_cached_tokens") == 0.0
        && prefix_tokens > 0.0;
    let load = throughput(&log, "loaded").unwrap_or(f64::NAN);
    let save = throughput(&log, "stored").unwrap_or(f64::NAN);
    println!("{:<26} {:>10}", "figure", "value");
    println!("{:<26} {:>10}", "prompt tokens", f(3, "prompt_tokens"));
    println!("{:<26} {:>10}", "prefix tokens from kvtier", prefix_tokens);
    println!("{:<26} {:>10.1}", "ttft cold (ms)", ttft_cold);
    println!("{:<26} {:>10.1}", "ttft warm (ms)", ttft_warm);
    println!("{:<26} {:>10.2}", "speedup", ttft_cold / ttft_warm);
    println!("{:<26} {:>10.3}", "load GB/s (connector)", load);
    println!("{:<26} {:>10.3}", "save GB/s (connector)", save);
    println!("{:<26} {:>10}", "identical greedy tokens", identical);
    server.stop()?;
    let mut fig = Figures::new("vllm");
    fig.num("prompt_tokens", f(3, "prompt_tokens"));
    fig.num("prefix_tokens", prefix_tokens);
    fig.num("ttft_cold_ms", ttft_cold);
    fig.num("ttft_warm_ms", ttft_warm);
    fig.num("ttft_speedup", ttft_cold / ttft_warm);
    fig.set("identical", identical);
    fig.num("load_gbps", load);
    fig.num("save_gbps", save);
    fig.print();
    Ok(())
}
