//! `compress` suite: every codec of kvtier-compress on real KV from a dump.
//!
//! The dump's post-RoPE keys and values become f16 chunk payloads (256 tokens, layout from the
//! dump's metadata); each setting encodes and decodes every chunk, and is scored by compression
//! ratio (xKV bases included), relative Frobenius error of K and of V, attention-output error
//! (`softmax(q·Kᵀ/√d)·V` with the dump's real queries over the causal context, reconstructed vs
//! original, at sampled positions for every head of the evaluated layers) and per-core encode /
//! decode GB/s. xKV (4 layers per group) runs next to per-layer SVD (`svd1`) at the same target
//! ratios, with values compressed and keys-only, so whether grouping layers helps is measured,
//! not assumed.

pub(crate) mod data;
mod settings;

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use kvtier_cache::{Dtype, Fidelity, ModelLayout};
use kvtier_compress::xkv::{DEFAULT_SPAN_CHUNKS, RopeTable};

use crate::dump::KvDump;
use crate::report::{Figures, round};
use data::{KvArrays, Scope, attention_outputs, chunk_payload, rel_frobenius};
use settings::{FitCache, Inputs, all_settings};

#[derive(clap::Args)]
pub struct Args {
    /// KV dump (safetensors, DESIGN.md format).
    #[arg(long)]
    pub kv: PathBuf,
    /// Short run: 8 layers, at most 4 chunks, fewer query positions (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Write the reconstructed keys/values of `--setting` as a KV dump to this file.
    #[arg(long, requires = "setting")]
    pub write_reconstructed: Option<PathBuf>,
    /// Setting whose reconstruction `--write-reconstructed` writes (a name from the table).
    #[arg(long, requires = "write_reconstructed")]
    pub setting: Option<String>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: usize,
    /// Chunks one xKV basis is fitted over.
    #[arg(long, default_value_t = DEFAULT_SPAN_CHUNKS)]
    pub span: usize,
}

struct Row {
    name: String,
    ratio: f64,
    k_err: f64,
    v_err: f64,
    attn_err: f64,
    enc_gbps: f64,
    dec_gbps: f64,
    enc_ms_chunk: f64,
    fidelity: Fidelity,
}

pub fn run(args: Args) -> Result<()> {
    let dump = KvDump::load(&args.kv)?;
    let settings = all_settings();
    if let Some(name) = &args.setting {
        ensure!(
            settings.iter().any(|s| &s.name == name),
            "unknown setting {name:?}"
        );
    }
    let (max_layers, max_chunks, n_positions) = if args.quick {
        (8, 4, 8)
    } else {
        (usize::MAX, usize::MAX, 24)
    };
    let scope = Scope {
        layers: dump.layers.min(max_layers),
        kv_heads: dump.kv_heads,
        head_dim: dump.head_dim,
        chunk_tokens: args.chunk_tokens,
        chunks: (dump.tokens / args.chunk_tokens).min(max_chunks),
    };
    if scope.chunks == 0 {
        bail!(
            "the dump has {} tokens, fewer than one {}-token chunk",
            dump.tokens,
            args.chunk_tokens
        );
    }
    let layout = ModelLayout::mha(
        &dump.model,
        scope.layers as u32,
        dump.kv_heads as u32,
        dump.head_dim as u32,
        Dtype::F16,
    );
    let chunks: Vec<Vec<u8>> = (0..scope.chunks)
        .map(|c| chunk_payload(&dump, &scope, c))
        .collect();
    let raw_bytes: usize = chunks.iter().map(Vec::len).sum();
    let original = KvArrays::from_chunks(&scope, &chunks);
    let eval_layers: Vec<usize> = (0..scope.layers).collect();
    // Positions spread over the covered tokens, skipping the first few (a handful of keys
    // makes softmax trivially exact).
    let tokens = scope.tokens();
    let positions: Vec<usize> = (1..=n_positions)
        .map(|i| (tokens * i / n_positions).max(16).min(tokens) - 1)
        .collect();
    let reference = attention_outputs(&dump, &scope, &original, &eval_layers, &positions);

    println!(
        "compress suite: {} ({} tokens; evaluating {} layers x {} kv heads x {} chunks of {} tokens, {} query heads x {} positions), span {} chunks",
        args.kv.display(),
        dump.tokens,
        scope.layers,
        scope.kv_heads,
        scope.chunks,
        scope.chunk_tokens,
        dump.heads,
        positions.len(),
        args.span
    );
    println!(
        "{:<16} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}  fidelity",
        "setting", "ratio", "K err", "V err", "attn err", "enc GB/s", "dec GB/s", "enc ms/ch"
    );
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let inputs = Inputs {
        layout: &layout,
        rope_base: dump.rope_base as f64,
        chunks: &chunks,
        chunk_tokens: scope.chunk_tokens,
        span: args.span,
    };
    let mut fits = FitCache::new();
    let mut rows = Vec::new();
    for s in &settings {
        let out = one_thread
            .install(|| settings::run(s, &inputs, &mut fits))
            .with_context(|| format!("setting {}", s.name))?;
        let recon = KvArrays::from_chunks(&scope, &out.decoded);
        let attn = attention_outputs(&dump, &scope, &recon, &eval_layers, &positions);
        let row = Row {
            name: s.name.clone(),
            ratio: raw_bytes as f64 / out.stored_bytes as f64,
            k_err: rel_frobenius(&original.k, &recon.k),
            v_err: rel_frobenius(&original.v, &recon.v),
            attn_err: rel_frobenius(&reference, &attn),
            enc_gbps: raw_bytes as f64 / out.encode_s / 1e9,
            dec_gbps: raw_bytes as f64 / out.decode_s / 1e9,
            enc_ms_chunk: out.encode_s * 1e3 / scope.chunks as f64,
            fidelity: out.fidelity,
        };
        println!(
            "{:<16} {:>7.3} {:>9.5} {:>9.5} {:>9.5} {:>8.3} {:>8.3} {:>9.2}  {}{}",
            row.name,
            row.ratio,
            row.k_err,
            row.v_err,
            row.attn_err,
            row.enc_gbps,
            row.dec_gbps,
            row.enc_ms_chunk,
            row.fidelity,
            if out.fit_s > 0.0 {
                format!(" (fit {:.0} ms of encode)", out.fit_s * 1e3)
            } else {
                String::new()
            }
        );
        if args.setting.as_deref() == Some(s.name.as_str()) {
            let path = args.write_reconstructed.as_ref().expect("clap requires it");
            reconstructed_dump(&dump, &scope, &recon).save(path)?;
            println!("wrote {} reconstruction to {}", s.name, path.display());
        }
        rows.push(row);
    }
    figures(&args, &dump, &scope, &rows).print();
    Ok(())
}

/// The dump restricted to the evaluated layers and tokens, with `k`, `k_prerope` and `v`
/// replaced by the reconstruction (pre-RoPE keys by undoing RoPE on the reconstructed keys).
fn reconstructed_dump(dump: &KvDump, scope: &Scope, recon: &KvArrays) -> KvDump {
    let (layers, tokens, hd) = (scope.layers, scope.tokens(), scope.head_dim);
    let mut k_prerope = recon.k.clone();
    let table = RopeTable::new(dump.rope_base as f64, hd, 0, tokens);
    for rows in k_prerope.chunks_exact_mut(tokens * hd) {
        table.rotate_block(rows, hd, false);
    }
    let q: Vec<f32> = (0..layers)
        .flat_map(|l| (0..dump.heads).map(move |h| (l, h)))
        .flat_map(|(l, h)| dump.q_rows(l, h)[..tokens * hd].to_vec())
        .collect();
    KvDump {
        layers,
        tokens,
        k: recon.k.clone(),
        k_prerope,
        v: recon.v.clone(),
        q,
        layer_cos: dump.layer_cos[..layers].to_vec(),
        token_ids: dump.token_ids[..tokens].to_vec(),
        ..dump.clone()
    }
}

fn figures(args: &Args, dump: &KvDump, scope: &Scope, rows: &[Row]) -> Figures {
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .expect("every setting ran")
    };
    let mut f = Figures::new("compress");
    f.set(
        "dump",
        args.kv
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    f.set("quick", args.quick);
    f.set("tokens", (scope.chunks * scope.chunk_tokens) as u64);
    f.set("layers", scope.layers as u64);
    let lossless = get("lossless");
    let lz4 = get("lz4");
    f.num("lossless_ratio", lossless.ratio);
    f.num("lz4_plain_ratio", lz4.ratio);
    f.num("lossless_vs_lz4", lossless.ratio / lz4.ratio);
    for (key, name) in [
        ("planes", "planes"),
        ("planes_xor", "planes-xor"),
        ("bitshuf", "bitshuf"),
        ("bitshuf_xor", "bitshuf-xor"),
    ] {
        f.num(&format!("{key}_ratio"), get(name).ratio);
    }
    f.num("lossless_encode_gbps", lossless.enc_gbps);
    f.num("lossless_decode_gbps", lossless.dec_gbps);
    f.num("lz4_decode_gbps", lz4.dec_gbps);
    for (key, name) in [
        ("int8", "int8-g32"),
        ("int4", "int4-g32"),
        ("int4_g64", "int4-g64"),
        ("fp8", "fp8"),
    ] {
        f.num(&format!("{key}_attn_err"), round(get(name).attn_err, 6));
        f.num(&format!("{key}_ratio"), get(name).ratio);
    }
    for x in ["2x", "4x", "8x"] {
        for (key, name) in [
            ("xkv", "xkv"),
            ("svd1", "svd1"),
            ("xkv_konly", "xkv-konly"),
            ("svd1_konly", "svd1-konly"),
        ] {
            let r = get(&format!("{name}-{x}"));
            f.num(&format!("{key}_attn_err_{x}"), r.attn_err);
            f.num(&format!("{key}_ratio_{x}"), r.ratio);
        }
    }
    let xkv4 = get("xkv-4x");
    f.num("xkv_encode_ms_per_chunk", xkv4.enc_ms_chunk);
    f.num("xkv_decode_gbps", xkv4.dec_gbps);
    // Grouping "helps" at a ratio when xKV's attention error is below per-layer SVD's.
    let helps = ["2x", "4x", "8x"]
        .iter()
        .filter(|x| get(&format!("xkv-{x}")).attn_err < get(&format!("svd1-{x}")).attn_err)
        .count();
    f.set("xkv_beats_svd1_at", format!("{helps}/3"));
    f.set("rope_base", dump.rope_base as f64);
    f
}
