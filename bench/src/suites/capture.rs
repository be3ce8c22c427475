//! `capture`: runs SmolLM2-135M-Instruct over real prose and writes its KV cache as a dump
//! (DESIGN.md "Real KV data"): post-RoPE and pre-RoPE keys, values, post-RoPE queries, per-layer
//! residual cosine and the token ids.
//!
//! It also scores the model on the same text (perplexity, top-1 next-token accuracy): a correct
//! forward pass lands in the teens on English prose or lower, a broken one (wrong RoPE pairing,
//! bad dequantisation) in the hundreds, so the figures vouch for the dump.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use crate::dump::KvDump;
use crate::model::forward::{Logits, PREFILL_CHUNK};
use crate::model::{LayerObserver, LayerTrace, MODEL_ID, Model};
use crate::report::Figures;

/// Real prose every Debian/Ubuntu machine has. Duplicates (GPL = GPL-3, LGPL = LGPL-3,
/// GFDL = GFDL-1.3) are left out: a repeated document would be copied, not predicted.
const DEFAULT_TEXTS: &[&str] = &[
    "/usr/share/common-licenses/Apache-2.0",
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/MPL-2.0",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/common-licenses/LGPL-2.1",
    "/usr/share/common-licenses/Artistic",
    "/usr/share/common-licenses/CC0-1.0",
    "/usr/share/common-licenses/MPL-1.1",
];

#[derive(clap::Args)]
pub struct Args {
    /// Text file(s) to run, concatenated (default: license texts under /usr/share/common-licenses).
    #[arg(long = "text")]
    pub text: Vec<PathBuf>,
    /// Tokens to capture (at most the model's context, 8192).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Output dump (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Capture at most 256 tokens (a quick smoke run).
    #[arg(long)]
    pub quick: bool,
}

/// A finished capture: the dump and how well the model predicted the text.
pub struct Capture {
    pub dump: KvDump,
    pub perplexity: f64,
    pub top1_acc: f64,
    pub seconds: f64,
}

pub fn run(a: Args) -> Result<()> {
    let tokens = if a.quick { a.tokens.min(256) } else { a.tokens };
    let files: Vec<PathBuf> = match a.text.is_empty() {
        true => default_texts(),
        false => a.text.clone(),
    };
    ensure!(
        !files.is_empty(),
        "no text: pass --text FILE (the default license texts are not on this machine)"
    );
    let t0 = Instant::now();
    let model = Model::load_default()?;
    println!(
        "model {MODEL_ID} loaded in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let ids = tokenize_files(&model, &files, tokens)?;
    let text_bytes: usize = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len() as usize)
        .sum();
    println!(
        "{} tokens from the start of {} file(s) ({text_bytes} bytes available)",
        ids.len(),
        files.len()
    );
    let cap = capture(&model, &ids, true)?;
    cap.dump.save(&a.out)?;
    let c = &model.config;
    println!();
    println!("{:<28} {}", "dump", a.out.display());
    println!(
        "{:<28} {} x {} kv heads x {} x {}",
        "k/v shape (layers, ..)",
        c.layers,
        c.kv_heads,
        ids.len(),
        c.head_dim
    );
    println!("{:<28} {:.3}", "perplexity", cap.perplexity);
    println!("{:<28} {:.4}", "top-1 next-token accuracy", cap.top1_acc);
    println!(
        "{:<28} {:.1} ({:.0} tokens/s)",
        "forward seconds",
        cap.seconds,
        ids.len() as f64 / cap.seconds
    );
    let mean_cos = cap.dump.layer_cos.iter().sum::<f32>() / c.layers as f32;
    println!(
        "{:<28} {:.4} (min {:.4})",
        "mean layer_cos",
        mean_cos,
        cap.dump.layer_cos.iter().copied().fold(1.0, f32::min)
    );
    let mut f = Figures::new("capture");
    f.set("tokens", ids.len());
    f.num("perplexity", cap.perplexity);
    f.num("top1_acc", cap.top1_acc);
    f.num("seconds", cap.seconds);
    f.print();
    Ok(())
}

/// Concatenates the files (blank line between them), tokenises, and keeps the first `limit`
/// tokens. Fails when the text is shorter than `limit`.
pub fn tokenize_files(model: &Model, files: &[PathBuf], limit: usize) -> Result<Vec<u32>> {
    ensure!(
        limit >= 2,
        "need at least 2 tokens to score next-token prediction"
    );
    ensure!(
        limit <= model.config.context_length,
        "{limit} tokens exceed the model's context of {}",
        model.config.context_length
    );
    let mut ids = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading text {}", f.display()))?;
        let text = if i == 0 { text } else { format!("\n\n{text}") };
        ids.extend(model.tokenizer.encode(&text)?);
        if ids.len() >= limit {
            ids.truncate(limit);
            return Ok(ids);
        }
    }
    anyhow::bail!(
        "the text gives only {} tokens, fewer than the {limit} asked for",
        ids.len()
    )
}

/// Copies every layer's Q/K/V into the dump's `[layer][head][token][dim]` tensors and sums the
/// residual cosine per layer.
struct DumpFiller<'a> {
    dump: &'a mut KvDump,
    cos_sum: Vec<f64>,
}

impl LayerObserver for DumpFiller<'_> {
    fn observe(&mut self, t: &LayerTrace<'_>) {
        let d = &mut *self.dump;
        let hd = d.head_dim;
        for i in 0..t.tokens {
            let pos = t.first_pos + i;
            for h in 0..d.heads {
                let at = d.q_index(t.layer, h, pos);
                d.q[at..at + hd].copy_from_slice(&t.q[(i * d.heads + h) * hd..][..hd]);
            }
            for g in 0..d.kv_heads {
                let at = d.kv_index(t.layer, g, pos);
                let src = (i * d.kv_heads + g) * hd;
                d.k[at..at + hd].copy_from_slice(&t.k[src..src + hd]);
                d.k_prerope[at..at + hd].copy_from_slice(&t.k_prerope[src..src + hd]);
                d.v[at..at + hd].copy_from_slice(&t.v[src..src + hd]);
            }
        }
        self.cos_sum[t.layer] += t.residual_cos.iter().map(|c| *c as f64).sum::<f64>();
    }
}

/// Runs the model over `ids` (from position 0) and captures the dump; scores next-token
/// prediction on the way (`ids.len() - 1` predictions).
pub fn capture(model: &Model, ids: &[u32], progress: bool) -> Result<Capture> {
    ensure!(ids.len() >= 2, "need at least 2 tokens");
    let c = &model.config;
    let n = ids.len();
    let mut dump = KvDump {
        model: MODEL_ID.to_string(),
        arch: "llama".to_string(),
        rope_base: c.rope_base,
        layers: c.layers,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        tokens: n,
        k: vec![0.0; c.layers * c.kv_heads * n * c.head_dim],
        k_prerope: vec![0.0; c.layers * c.kv_heads * n * c.head_dim],
        v: vec![0.0; c.layers * c.kv_heads * n * c.head_dim],
        q: vec![0.0; c.layers * c.heads * n * c.head_dim],
        layer_cos: vec![0.0; c.layers],
        token_ids: ids.iter().map(|t| *t as i32).collect(),
    };
    let bar = match progress {
        true => ProgressBar::new(n as u64),
        false => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template("capture {bar:40} {pos}/{len} tokens {per_sec} eta {eta}")
            .context("progress template")?,
    );
    let mut filler = DumpFiller {
        dump: &mut dump,
        cos_sum: vec![0.0; c.layers],
    };
    let mut cache = model.new_cache();
    let (mut nll, mut correct, mut scored) = (0.0f64, 0usize, 0usize);
    let t0 = Instant::now();
    for (s, step) in ids.chunks(PREFILL_CHUNK).enumerate() {
        let logits = model.forward_observed(step, &mut cache, Logits::All, Some(&mut filler))?;
        for (i, row) in logits.chunks_exact(c.vocab).enumerate() {
            let Some(&target) = ids.get(s * PREFILL_CHUNK + i + 1) else {
                break;
            };
            let (lp, top) = log_prob_and_argmax(row, target as usize);
            nll -= lp;
            correct += usize::from(top == target as usize);
            scored += 1;
        }
        bar.inc(step.len() as u64);
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let cos_sum = std::mem::take(&mut filler.cos_sum);
    dump.layer_cos = cos_sum.iter().map(|s| (s / n as f64) as f32).collect();
    Ok(Capture {
        dump,
        perplexity: (nll / scored as f64).exp(),
        top1_acc: correct as f64 / scored as f64,
        seconds,
    })
}

/// `log softmax(row)[target]` (in f64, max-shifted) and the arg-max of the row.
fn log_prob_and_argmax(row: &[f32], target: usize) -> (f64, usize) {
    let (top, max) =
        row.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
        );
    let lse = row
        .iter()
        .map(|v| ((*v - max) as f64).exp())
        .sum::<f64>()
        .ln()
        + max as f64;
    (row[target] as f64 - lse, top)
}

/// The default text files that exist on this machine (tests use the first).
pub fn default_texts() -> Vec<PathBuf> {
    DEFAULT_TEXTS
        .iter()
        .map(Path::new)
        .filter(|p| p.is_file())
        .map(Path::to_path_buf)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::forward::apply_rope;
    use crate::model::testutil::model;

    fn short_capture(tokens: usize) -> Capture {
        let texts = default_texts();
        assert!(
            !texts.is_empty(),
            "the capture test needs /usr/share/common-licenses texts"
        );
        let ids = tokenize_files(model(), &texts, tokens).unwrap();
        capture(model(), &ids, false).unwrap()
    }

    #[test]
    fn model_capture_has_shapes_metadata_and_low_perplexity() {
        let cap = short_capture(256);
        let d = &cap.dump;
        assert_eq!(
            (d.layers, d.heads, d.kv_heads, d.head_dim, d.tokens),
            (30, 9, 3, 64, 256)
        );
        assert_eq!(d.k.len(), 30 * 3 * 256 * 64);
        assert_eq!(d.q.len(), 30 * 9 * 256 * 64);
        assert_eq!(
            (d.arch.as_str(), d.rope_base, d.model.as_str()),
            ("llama", 100_000.0, MODEL_ID)
        );
        assert!(
            cap.perplexity < 30.0,
            "perplexity {} says the forward pass is broken",
            cap.perplexity
        );
        assert!(cap.top1_acc > 0.3, "top-1 accuracy {}", cap.top1_acc);
        assert!(
            d.layer_cos.iter().all(|c| *c > 0.0 && *c <= 1.0 + 1e-6),
            "layer_cos {:?}",
            d.layer_cos
        );
        assert!(d.v.iter().any(|x| *x != 0.0) && d.q.iter().all(|x| x.is_finite()));

        // Through the file and back: f16 tensors within half-precision rounding.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cap.safetensors");
        d.save(&p).unwrap();
        let back = KvDump::load(&p).unwrap();
        assert_eq!(back.token_ids, d.token_ids);
        assert_eq!(back.layer_cos, d.layer_cos);
        for (a, b) in back.k.iter().zip(&d.k) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn model_capture_keys_follow_rotate_half_rope() {
        let cap = short_capture(64);
        let d = &cap.dump;
        let mut max_err = 0.0f32;
        for l in [0, 7, 29] {
            for g in 0..d.kv_heads {
                for pos in [0, 1, 17, 63] {
                    let at = d.kv_index(l, g, pos);
                    let mut row = d.k_prerope[at..at + d.head_dim].to_vec();
                    apply_rope(&mut row, pos, 1, d.head_dim, d.rope_base);
                    for (a, b) in row.iter().zip(&d.k[at..at + d.head_dim]) {
                        max_err = max_err.max((a - b).abs());
                    }
                }
            }
        }
        assert!(
            max_err < 1e-4,
            "k differs from rope(k_prerope) by {max_err}"
        );
        // Position 0 is the identity rotation; later positions really rotate.
        let at = d.kv_index(3, 1, 0);
        assert_eq!(d.k[at..at + 64], d.k_prerope[at..at + 64]);
        let at = d.kv_index(3, 1, 40);
        assert_ne!(d.k[at..at + 64], d.k_prerope[at..at + 64]);
    }
}
