//! `budget` suite: layer-wise KV budgets (SqueezeAttention) on a real KV dump.
//!
//! The last `--eval` positions of the dump are decode steps; the prompt before them
//! (`prompt = tokens − eval`) is cut to a total budget of 10/20/30/50% of its tokens summed
//! over layers, allocated in three ways:
//!
//! - `uniform`: the same budget in every layer;
//! - `fixed`: SqueezeAttention with the given `--p` (layers clustered by `layer_cos` into three
//!   groups; the highest-cosine group gets `p` × the uniform share, the rest is spread over the
//!   other layers);
//! - `squeeze` (the headline): SqueezeAttention with `p` calibrated per policy and budget on
//!   separate splits the test never sees — the prompt cut 1, 4 and 16 blocks of `--calibrate`
//!   positions before the decode steps, each scored on the block after its cut. A candidate of
//!   `P_CANDIDATES` is chosen only if it beats uniform per query (errors averaged over layers,
//!   paired) by more than two standard errors over all splits together and on every split alone
//!   (consecutive positions are correlated, so one split's evidence is weaker than its count
//!   suggests); of those, the lowest mean error wins; with none, the allocation stays uniform
//!   (p = 1). A `calibration` line per setting prints each candidate's pooled and per-split z.
//!   Whether the choice holds on the decode positions is what the figures show.
//!
//! Each layer keeps its tokens by one of two policies:
//!
//! - `streaming` (StreamingLLM): `--sinks` first tokens plus the most recent prompt tokens;
//! - `h2o`: sinks, a recent window of half the remaining budget, and the heavy hitters by
//!   accumulated attention: each prompt key's softmax weight summed over the query heads and
//!   over prompt query positions (causal), every `stride`-th position to bound the cost.
//!
//! The figure is the relative L2 error of each head's attention output at each decode position
//! (attending to the kept prompt tokens plus the decode tokens so far) against full attention,
//! averaged over heads and positions per layer, then over layers. Headline figures
//! (`uniform_err_10`, `squeeze_err_10`, `squeeze_p_10` the calibrated p, `fixed_err_10`, ...)
//! use the h2o policy; `_streaming` figures the
//! other; `_w` figures weight layers by `1 − layer_cos` (how much attention moves the residual
//! stream), a proxy for how much a layer's error matters downstream.
//!
//! `squeeze_gain_z_*` is the squeezed allocation's paired improvement over uniform on the decode
//! positions in batch-means standard errors (blocks of 8 consecutive positions over all heads,
//! since neighbouring positions err alike; positive: better; |z| < 2 is within noise).
//!
//! `--model-eval` also runs the real model over the decode positions with each setting's pruned
//! cache (every layer's attention masked to its kept prompt positions) and reports the mean KL
//! divergence of its next-token distributions from the full cache's, top-1 agreement and the
//! perplexity of the actual text (`uniform_kl_20`, `squeeze_kl_20`, ...).
//!
//! `--write-selection FILE` writes `{"tokens", "prompt", "fixed_p", "p_candidates", "groups":
//! [label per layer], "settings": [{"fraction", "allocation", "policy", "p", "budgets": [per
//! layer], "kept": [[positions] per layer]}]}` (`p` null for uniform).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use kvtier_index::{
    AttnPartial, SelectionPolicy, cap_budgets, dot, kmeans_layers, relative_error, select_tokens,
    squeezed_budgets, uniform_budgets,
};
use rayon::prelude::*;
use serde_json::json;

use crate::dump::KvDump;
use crate::report::Figures;

#[derive(clap::Args)]
pub struct Args {
    /// KV dump (safetensors, DESIGN.md format).
    #[arg(long)]
    pub kv: PathBuf,
    /// Short run (under a minute on 2 cores): fewer decode positions, sparser H2O scores.
    #[arg(long)]
    pub quick: bool,
    /// Fixed fraction of the uniform share given to the least important layer group, reported
    /// beside the calibrated allocation (`fixed_*` figures).
    #[arg(long, default_value_t = 0.5)]
    pub p: f64,
    /// Attention sinks every policy keeps.
    #[arg(long, default_value_t = 4)]
    pub sinks: usize,
    /// Trailing positions used as decode queries (quick: at most 8).
    #[arg(long, default_value_t = 64)]
    pub eval: usize,
    /// Positions before the decode steps on which `p` is calibrated (quick: at most 16).
    #[arg(long, default_value_t = 64)]
    pub calibrate: usize,
    /// Writes every setting's per-layer budgets and kept positions as JSON.
    #[arg(long)]
    pub write_selection: Option<PathBuf>,
    /// Also run the real model (SmolLM2, fetched if missing) over the decode positions with
    /// each setting's pruned cache and compare its next-token distributions with the full
    /// cache's (KL divergence, top-1 agreement, perplexity of the actual text).
    #[arg(long)]
    pub model_eval: bool,
}

const FRACTIONS: [f64; 4] = [0.1, 0.2, 0.3, 0.5];
const POLICIES: [&str; 2] = ["h2o", "streaming"];

/// H2O's accumulated attention per prompt token of one layer, summed over query heads and
/// over every `stride`-th prompt query position (causal softmax over the prompt).
fn accumulated_attention(dump: &KvDump, layer: usize, prompt: usize, stride: usize) -> Vec<f32> {
    let d = dump.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let mut acc = vec![0.0f64; prompt];
    for h in 0..dump.heads {
        let keys = &dump.k_rows(layer, dump.kv_head_of(h))[..prompt * d];
        let q = dump.q_rows(layer, h);
        let mut scores = Vec::with_capacity(prompt);
        for i in (0..prompt).step_by(stride) {
            let qi = &q[i * d..(i + 1) * d];
            scores.clear();
            scores.extend((0..=i).map(|j| dot(&keys[j * d..(j + 1) * d], qi) * scale));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            for (a, s) in acc.iter_mut().zip(&scores) {
                *a += ((s - max).exp() / sum) as f64;
            }
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// Relative attention error of one layer per (head, query position in `prompt..end`),
/// head-major, when the prompt keeps only `kept` (each query also attends to the positions
/// from `prompt` up to itself). `full` holds full attention in the same order.
fn layer_errors(
    dump: &KvDump,
    layer: usize,
    (prompt, end): (usize, usize),
    kept: &[u32],
    full: &[Vec<f32>],
) -> Result<Vec<f64>> {
    let d = dump.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = Vec::with_capacity(dump.heads * (end - prompt));
    for h in 0..dump.heads {
        let (keys, values) = dump.kv_views(layer, dump.kv_head_of(h))?;
        for p in prompt..end {
            let q = dump.q_row(layer, h, p);
            let old = AttnPartial::over(q, keys, values, kept.iter().map(|&x| x as usize), scale);
            let new = AttnPartial::over(q, keys, values, prompt..=p, scale);
            out.push(relative_error(
                &old.merge(&new).output(),
                &full[h * (end - prompt) + p - prompt],
            ));
        }
    }
    Ok(out)
}

/// Full causal attention per (layer, head, query position in `prompt..end`).
fn full_attention_at(dump: &KvDump, prompt: usize, end: usize) -> Result<Vec<Vec<Vec<f32>>>> {
    let d = dump.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    (0..dump.layers)
        .into_par_iter()
        .map(|l| -> Result<Vec<Vec<f32>>> {
            let mut out = Vec::new();
            for h in 0..dump.heads {
                let (keys, values) = dump.kv_views(l, dump.kv_head_of(h))?;
                for p in prompt..end {
                    out.push(kvtier_index::full_attention(
                        dump.q_row(l, h, p),
                        keys,
                        values,
                        p + 1,
                        scale,
                    ));
                }
            }
            Ok(out)
        })
        .collect()
}

/// Attention errors per layer, then per (head, query position).
type Errors = Vec<Vec<f64>>;

/// One evaluation context: a prompt cut at `prompt`, queries at `prompt..end`, the prompt's
/// H2O scores per layer and full attention at the query positions.
struct Split {
    prompt: usize,
    end: usize,
    scores: Vec<Vec<f32>>,
    full: Vec<Vec<Vec<f32>>>,
}

impl Split {
    fn new(dump: &KvDump, prompt: usize, end: usize, stride: usize) -> Result<Split> {
        let scores = (0..dump.layers)
            .into_par_iter()
            .map(|l| accumulated_attention(dump, l, prompt, stride))
            .collect();
        Ok(Split {
            prompt,
            end,
            scores,
            full: full_attention_at(dump, prompt, end)?,
        })
    }

    /// Per-layer budgets for a total of `frac` of the prompt's tokens over all layers: uniform
    /// (`p` None) or squeezed with `p`.
    fn budgets(
        &self,
        layers: usize,
        frac: f64,
        squeezed: &[usize],
        p: Option<f64>,
    ) -> Result<Vec<usize>> {
        let total = (frac * (self.prompt * layers) as f64).round() as usize;
        Ok(match p {
            None => uniform_budgets(total, layers)?,
            Some(p) => cap_budgets(&squeezed_budgets(total, layers, squeezed, p)?, self.prompt),
        })
    }

    /// Kept positions per layer under `budgets` and the attention errors per layer, then per
    /// (head, query position).
    fn evaluate(
        &self,
        dump: &KvDump,
        policy_name: &str,
        sinks: usize,
        budgets: &[usize],
    ) -> Result<(Vec<Vec<u32>>, Errors)> {
        let kept: Vec<Vec<u32>> = (0..dump.layers)
            .map(|l| {
                let policy = match policy_name {
                    "h2o" => SelectionPolicy::HeavyHitters {
                        sinks,
                        recent_ratio: 0.5,
                    },
                    _ => SelectionPolicy::Streaming { sinks },
                };
                // A layer squeezed below the sinks keeps just the first tokens it can.
                let b = budgets[l].max(sinks.min(self.prompt));
                select_tokens(policy, self.prompt, b, Some(&self.scores[l]))
                    .context("selecting tokens")
            })
            .collect::<Result<_>>()?;
        let errors = (0..dump.layers)
            .into_par_iter()
            .map(|l| layer_errors(dump, l, (self.prompt, self.end), &kept[l], &self.full[l]))
            .collect::<Result<_>>()?;
        Ok((kept, errors))
    }
}

/// Candidate values of `p` tried by the calibration; 1.0 is the uniform allocation, so the
/// calibrated allocation falls back to uniform where squeezing does not pay.
const P_CANDIDATES: [f64; 6] = [0.3, 0.5, 0.7, 0.8, 0.9, 1.0];

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Mean error of each layer.
fn per_layer(errors: &[Vec<f64>]) -> Vec<f64> {
    errors.iter().map(|e| mean(e)).collect()
}

/// Error of each query (head, position), averaged over layers.
fn per_query(errors: &[Vec<f64>]) -> Vec<f64> {
    (0..errors[0].len())
        .map(|i| errors.iter().map(|e| e[i]).sum::<f64>() / errors.len() as f64)
        .collect()
}

/// Paired comparison of `candidate` against `baseline` per query: the mean improvement
/// (baseline − candidate) and its standard error.
fn paired_gain(baseline: &[f64], candidate: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = baseline.iter().zip(candidate).map(|(b, c)| b - c).collect();
    mean_and_se(&d)
}

/// Mean of `x` and its standard error (sample standard deviation / √n).
fn mean_and_se(x: &[f64]) -> (f64, f64) {
    let m = mean(x);
    let var = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len().max(2) - 1) as f64;
    (m, (var / x.len() as f64).sqrt())
}

/// A (gain, standard error) pair in standard errors; 0 when the error is 0.
fn z_of((gain, se): (f64, f64)) -> f64 {
    if se > 0.0 { gain / se } else { 0.0 }
}

/// Paired comparison like [`paired_gain`], with the standard error from batch means: queries
/// (head-major, `positions` per head) are grouped into blocks of `block` consecutive positions
/// over all heads, and the error is that of the block means. Neighbouring positions of one text
/// err alike, so this is the honest error of a mean over a short stretch of text; with few
/// blocks it is itself noisy.
fn blocked_gain(baseline: &[f64], candidate: &[f64], positions: usize, block: usize) -> (f64, f64) {
    let (positions, block) = (positions.max(1), block.max(1));
    let mut sums = vec![(0.0, 0usize); positions.div_ceil(block)];
    for (i, (b, c)) in baseline.iter().zip(candidate).enumerate() {
        let s = &mut sums[(i % positions) / block];
        s.0 += b - c;
        s.1 += 1;
    }
    let means: Vec<f64> = sums
        .iter()
        .filter(|s| s.1 > 0)
        .map(|s| s.0 / s.1 as f64)
        .collect();
    mean_and_se(&means)
}

/// Consecutive decode positions per block of [`blocked_gain`].
const Z_BLOCK: usize = 8;

/// Calibration splits: prompts cut this many `--calibrate` blocks before the decode steps
/// (cuts before a quarter of the dump are skipped), so a choice must hold at several depths.
const CALIBRATION_CUTS: [usize; 3] = [1, 4, 16];

/// Standard errors by which a candidate `p` must beat uniform on the calibration split to be
/// chosen (about a one-sided 98% test): without clear evidence the allocation stays uniform.
const SIGNIFICANCE: f64 = 2.0;

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let dump = KvDump::load(&args.kv)?;
    let eval = if args.quick {
        args.eval.min(8)
    } else {
        args.eval
    };
    ensure!(
        eval > 0 && eval < dump.tokens / 2,
        "--eval must be in 1..tokens/2"
    );
    let prompt = dump.tokens - eval;
    // Bound the H2O score cost to about 2048 (quick: 256) query positions per head.
    let stride = prompt.div_ceil(if args.quick { 256 } else { 2048 });
    let layers = dump.layers;
    let groups = kmeans_layers(&dump.layer_cos)?;
    let squeezed = groups.least_important();
    println!(
        "budget: {} ({} tokens, prompt {prompt}, {eval} decode positions, {layers} layers), loaded in {:.1}s",
        args.kv.display(),
        dump.tokens,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "layer_cos: {:?}",
        dump.layer_cos
            .iter()
            .map(|c| (c * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    println!(
        "groups (0 = most important): {:?}, centroids {:?}; squeezed layers {squeezed:?}, fixed p {}, calibrated p from {P_CANDIDATES:?}",
        groups.labels,
        groups
            .centroids
            .iter()
            .map(|c| (c * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>(),
        args.p
    );

    let t = Instant::now();
    // The test split: decode positions after the prompt. The calibration split: `calibrate`
    // positions just before them, with the prompt cut there; `p` is chosen on it only.
    let test = Split::new(&dump, prompt, dump.tokens, stride)?;
    let calibrate = if args.quick {
        args.calibrate.min(16)
    } else {
        args.calibrate
    };
    ensure!(
        calibrate > 0 && calibrate + eval < dump.tokens / 2,
        "--calibrate must be in 1..tokens/2 − eval"
    );
    let calibrations: Vec<Split> = CALIBRATION_CUTS
        .iter()
        .map(|m| prompt.saturating_sub(m * calibrate))
        .filter(|&cut| cut >= dump.tokens / 4)
        .map(|cut| Split::new(&dump, cut, cut + calibrate, stride))
        .collect::<Result<_>>()?;
    println!(
        "h2o scores (every {stride}th prompt query) and full attention for the test split and {} calibration splits (prompts cut at {:?}) in {:.1}s",
        calibrations.len(),
        calibrations.iter().map(|c| c.prompt).collect::<Vec<_>>(),
        t.elapsed().as_secs_f64()
    );

    let weights: Vec<f64> = dump
        .layer_cos
        .iter()
        .map(|c| (1.0 - *c as f64).max(0.0))
        .collect();
    let wsum: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let weighted = |errs: &[f64]| errs.iter().zip(&weights).map(|(e, w)| e * w).sum::<f64>() / wsum;
    let mut f = Figures::new("budget");
    let mut settings = Vec::new();
    let mut pruned: Vec<(&str, f64, &str, Vec<Vec<u32>>)> = Vec::new();
    println!(
        "\n{:<10} {:>5} {:>9} {:>9} {:>7} {:>9} {:>6} {:>7} {:>6} {:>10} {:>10}",
        "policy",
        "frac",
        "uniform",
        "fixed_p",
        "ratio",
        "squeeze",
        "p*",
        "ratio",
        "z",
        "uniform_w",
        "squeeze_w"
    );
    for policy_name in POLICIES {
        for frac in FRACTIONS {
            // Calibration: among the candidates that beat uniform per query by more than
            // SIGNIFICANCE standard errors over all calibration splits together and on each split
            // alone, the one with the lowest mean error; uniform (p = 1) when none does.
            let errors_at = |p: Option<f64>| -> Result<Vec<Vec<f64>>> {
                calibrations
                    .iter()
                    .map(|c| {
                        let budgets = c.budgets(layers, frac, &squeezed, p)?;
                        let (_, errs) = c.evaluate(&dump, policy_name, args.sinks, &budgets)?;
                        Ok(per_query(&errs))
                    })
                    .collect()
            };
            let base = errors_at(None)?;
            let pooled_base = base.concat();
            let mut best = (mean(&pooled_base), 1.0);
            let mut trace = Vec::new();
            for p in P_CANDIDATES.into_iter().filter(|&p| p < 1.0) {
                let errs = errors_at(Some(p))?;
                let pooled = paired_gain(&pooled_base, &errs.concat());
                let split_z: Vec<f64> = base
                    .iter()
                    .zip(&errs)
                    .map(|(b, e)| z_of(paired_gain(b, e)))
                    .collect();
                trace.push(format!(
                    "p {p}: z {:.1} [{}]",
                    z_of(pooled),
                    split_z
                        .iter()
                        .map(|z| format!("{z:.1}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
                // Positions within a split are consecutive tokens of one text, so their errors
                // are correlated and a per-query standard error overstates the evidence; the
                // gain must therefore replicate on every split on its own.
                let every_split_gains = split_z.iter().all(|&z| z > SIGNIFICANCE);
                let m = mean(&errs.concat());
                let (gain, se) = pooled;
                if gain > SIGNIFICANCE * se && every_split_gains && m < best.0 {
                    best = (m, p);
                }
            }
            let chosen = best.1;
            println!("calibration {policy_name} {frac}: {}", trace.join("; "));
            // Per setting: per-layer errors and per-query errors (averaged over layers).
            let mut run_setting = |allocation: &'static str,
                                   p: Option<f64>|
             -> Result<(Vec<f64>, Vec<f64>)> {
                let budgets = test.budgets(layers, frac, &squeezed, p)?;
                let (kept, errs) = test.evaluate(&dump, policy_name, args.sinks, &budgets)?;
                let errs = (per_layer(&errs), per_query(&errs));
                if args.write_selection.is_some() {
                    settings.push(json!({"fraction": frac, "allocation": allocation, "policy": policy_name, "p": p, "budgets": budgets, "kept": kept}));
                }
                if args.model_eval {
                    pruned.push((policy_name, frac, allocation, kept));
                }
                Ok(errs)
            };
            let (uniform, uniform_q) = run_setting("uniform", None)?;
            let (fixed, _) = run_setting("fixed", Some(args.p))?;
            let (squeeze, squeeze_q) = run_setting("squeeze", Some(chosen))?;
            let (u, fx, sq) = (mean(&uniform), mean(&fixed), mean(&squeeze));
            let (uw, sw) = (weighted(&uniform), weighted(&squeeze));
            // How far the squeezed result is from uniform on the test split, in batch-means
            // standard errors of the paired difference (positive: squeezed better).
            let z = z_of(blocked_gain(&uniform_q, &squeeze_q, eval, Z_BLOCK));
            println!(
                "{:<10} {:>5.2} {:>9.4} {:>9.4} {:>7.3} {:>9.4} {:>6.2} {:>7.3} {:>6.1} {:>10.4} {:>10.4}",
                policy_name,
                frac,
                u,
                fx,
                fx / u,
                sq,
                chosen,
                sq / u,
                z,
                uw,
                sw
            );
            let pct = (frac * 100.0).round() as usize;
            let suffix = if policy_name == "h2o" {
                String::new()
            } else {
                format!("_{policy_name}")
            };
            f.num(&format!("uniform_err_{pct}{suffix}"), u);
            f.num(&format!("squeeze_err_{pct}{suffix}"), sq);
            f.num(&format!("squeeze_p_{pct}{suffix}"), chosen);
            f.num(&format!("squeeze_vs_uniform_{pct}{suffix}"), sq / u);
            f.num(&format!("squeeze_gain_z_{pct}{suffix}"), z);
            f.num(&format!("fixed_err_{pct}{suffix}"), fx);
            f.num(&format!("fixed_vs_uniform_{pct}{suffix}"), fx / u);
            f.num(&format!("uniform_werr_{pct}{suffix}"), uw);
            f.num(&format!("squeeze_werr_{pct}{suffix}"), sw);
        }
    }
    if let Some(path) = &args.write_selection {
        let doc = json!({"tokens": dump.tokens, "prompt": prompt, "fixed_p": args.p, "p_candidates": P_CANDIDATES, "groups": groups.labels, "settings": settings});
        std::fs::write(path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if args.model_eval {
        model_eval(&dump, prompt, &pruned, &mut f)?;
    }
    f.set("headline_policy", "h2o");
    f.num("fixed_p", args.p);
    f.set("tokens", dump.tokens);
    f.set("prompt", prompt);
    f.set("squeezed_layers", squeezed.len());
    f.set("h2o_score_stride", stride);
    f.num("seconds", t0.elapsed().as_secs_f64());
    f.print();
    Ok(())
}

/// Next-token quality of the real model with each pruned cache against the full cache: the
/// prompt's K/V come from the dump, the decode positions' tokens are run through the model with
/// every layer restricted to its kept prompt positions.
fn model_eval(
    dump: &KvDump,
    prompt: usize,
    pruned: &[(&str, f64, &str, Vec<Vec<u32>>)],
    f: &mut Figures,
) -> Result<()> {
    use crate::model::forward::Logits;
    use crate::model::{KvCache, Model};
    let t = Instant::now();
    let model = Model::load_default()?;
    let (layers, kvh, d) = (dump.layers, dump.kv_heads, dump.head_dim);
    let mut base = KvCache::new(layers, kvh, d);
    for l in 0..layers {
        let rows = |src: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(prompt * kvh * d);
            for tok in 0..prompt {
                for h in 0..kvh {
                    let i = dump.kv_index(l, h, tok);
                    out.extend_from_slice(&src[i..i + d]);
                }
            }
            out
        };
        base.push_layer(l, &rows(&dump.k), &rows(&dump.v));
    }
    base.commit(prompt);
    let tokens: Vec<u32> = dump.token_ids[prompt..].iter().map(|t| *t as u32).collect();
    let reference = model.forward(&tokens, &mut base.clone(), Logits::All)?;
    let vocab = reference.len() / tokens.len();
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row
            .iter()
            .map(|x| (*x as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        row.iter().map(|x| *x as f64 - lse).collect()
    };
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let ref_lp: Vec<Vec<f64>> = reference.chunks_exact(vocab).map(log_softmax).collect();
    // NLL of the actual next token, where the text has one.
    let nll = |lp: &[Vec<f64>]| -> f64 {
        let n = tokens.len() - 1;
        -(0..n).map(|i| lp[i][tokens[i + 1] as usize]).sum::<f64>() / n as f64
    };
    let ref_ppl = nll(&ref_lp).exp();
    println!(
        "\nmodel eval: {} decode tokens after a {prompt}-token prompt, full-cache perplexity {ref_ppl:.2}",
        tokens.len()
    );
    println!(
        "{:<10} {:>5} {:>9} {:>10} {:>8} {:>8}",
        "policy", "frac", "alloc", "KL", "top1", "ppl"
    );
    for (policy, frac, allocation, kept) in pruned {
        let mut cache = base.clone();
        for (l, k) in kept.iter().enumerate() {
            cache.keep_only(l, k);
        }
        let logits = model.forward(&tokens, &mut cache, Logits::All)?;
        let lp: Vec<Vec<f64>> = logits.chunks_exact(vocab).map(log_softmax).collect();
        let kl = ref_lp
            .iter()
            .zip(&lp)
            .map(|(p, q)| p.iter().zip(q).map(|(a, b)| a.exp() * (a - b)).sum::<f64>())
            .sum::<f64>()
            / lp.len() as f64;
        let top1 = reference
            .chunks_exact(vocab)
            .zip(logits.chunks_exact(vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count() as f64
            / tokens.len() as f64;
        let ppl = nll(&lp).exp();
        println!("{policy:<10} {frac:>5.2} {allocation:>9} {kl:>10.5} {top1:>8.3} {ppl:>8.2}");
        let pct = (frac * 100.0).round() as usize;
        let suffix = if *policy == "h2o" {
            String::new()
        } else {
            format!("_{policy}")
        };
        f.num(&format!("{allocation}_kl_{pct}{suffix}"), kl);
        f.num(&format!("{allocation}_top1_{pct}{suffix}"), top1);
    }
    f.num("model_full_ppl", ref_ppl);
    println!("model eval in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_gain_sees_correlated_positions() {
        // Two heads, 16 positions: the difference is +1 on the first 8 positions and −1 on the
        // last 8 (one stretch of text helped, the next hurt), plus tiny per-query noise.
        let positions = 16;
        let base: Vec<f64> = (0..2 * positions)
            .map(|i| 1.0 + (i % 3) as f64 * 1e-3)
            .collect();
        let cand: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, b)| b - if i % positions < 8 { 1.0 } else { -1.0 } + 0.1)
            .collect();
        let (g, se) = paired_gain(&base, &cand);
        let (bg, bse) = blocked_gain(&base, &cand, positions, 8);
        assert!((g - bg).abs() < 1e-12, "same mean gain: {g} vs {bg}");
        assert!((g + 0.1).abs() < 1e-9);
        // Per query the two halves look like 32 independent draws; as two blocks they are
        // two, and the standard error is several times larger.
        assert!(bse > 3.0 * se, "blocked se {bse} vs per-query {se}");
        // Blocks of one position reduce to per-position means over heads.
        let (g1, se1) = blocked_gain(&base, &cand, positions, 1);
        assert!((g1 - g).abs() < 1e-12 && se1 > 0.0);
    }
}
