//! `retrieval` suite: top-k key retrieval for long-context decoding on a real KV dump.
//!
//! The last `--decode` positions of the dump play the decode steps; every index is built over
//! the keys before them (`indexed = tokens − decode`), the attention-aware index from the
//! queries of those earlier positions (all query heads of the KV head's GQA group). For every
//! evaluated (layer, query head, decode position) and every index:
//!
//! - recall@k against the exact top-k of the indexed keys by attention score (inner product);
//! - mass: the softmax weight (over the indexed keys) of the returned keys ÷ that of the exact
//!   top-k, i.e. how much of the top-k's attention the answer carries (misses near the k-th
//!   score cost little mass);
//! - the relative L2 error of the attention output when attending to the static tokens (sinks
//!   and recent window, which covers the decode positions themselves) plus the retrieved keys,
//!   merged by log-sum-exp, against full causal attention;
//! - the fraction of indexed keys whose inner product the search computed;
//! - the search latency.
//!
//! HNSW is swept over `ef` (below k it returns only the best `ef` keys it found, which is how
//! it reaches low scanned fractions); the aware index over its budget of inner products
//! (`AWARE_BUDGET` fractions of the indexed keys). The headline aware point is the smallest
//! budget whose mean recall reaches 0.9 (else the best one);
//! the headline HNSW recall is HNSW's recall curve interpolated at that same scanned fraction
//! (`hnsw_at_equal_scan` false when the curve does not reach it and the nearest point is used).
//! `equal_scan_*` compare the curves at every HNSW sweep point the aware sweep spans (the aware
//! recall interpolated at that point's scanned fraction minus HNSW's): how many points, at how
//! many the aware index is ahead, and the smallest margin with its fraction.
//! `*_recall_at_5pct` interpolate both curves at the 5% scanned target (`*_reaches_5pct` false
//! when the sweep does not reach 5% and the nearest point is reported).
//!
//! The `bound` rows (and `aware_bound_recall_at_5pct`) are a diagnostic of the aware index, not
//! a search: the same graph and entry points, expanded in the order of the true scores, which a
//! real search cannot know before it scores a key (`AwareIndex::ordering_bound`). The gap from
//! the aware rows is what the search's ordering loses; the gap from 1, what the graph loses.
//!
//! `--write-results FILE` writes one JSON object: `{"tokens", "indexed", "k", "sinks",
//! "window", "ef_hnsw": [..], "budget_aware": [..], "queries": [{"layer", "head", "kv_head",
//! "position", "exact": [..], "hnsw": [[..] per ef_hnsw], "aware": [[..] per budget_aware]}]}`,
//! where every list of positions is best first and positions index the token axis.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use kvtier_index::{
    AwareConfig, AwareIndex, BruteForce, BuildInput, HeadIndexes, HnswConfig, HnswRetriever,
    MatrixView, Retriever, StaticTokens, full_attention, matrix::scores_into, relative_error,
    top_k_of_scores,
};
use rayon::prelude::*;
use serde_json::json;

use crate::dump::KvDump;
use crate::report::{Figures, median};

#[derive(clap::Args)]
pub struct Args {
    /// KV dump (safetensors, DESIGN.md format).
    #[arg(long)]
    pub kv: PathBuf,
    /// Short run (under a minute on 2 cores): fewer layers, positions and build queries.
    #[arg(long)]
    pub quick: bool,
    /// Keys to retrieve (default 2% of the indexed tokens).
    #[arg(long)]
    pub k: Option<usize>,
    /// Trailing positions used as decode queries.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Attention sinks always attended to.
    #[arg(long, default_value_t = 4)]
    pub sinks: usize,
    /// Recent window always attended to.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Evaluates this many evenly spaced layers (default: all; 4 with --quick). Builds cost
    /// about a second per (layer, KV head) graph per thousand keys on 2 cores.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Keys each build query links in the aware index (default: k, at least 32).
    #[arg(long)]
    pub k_build: Option<usize>,
    /// Out-degree bound of the aware key graph.
    #[arg(long, default_value_t = 12)]
    pub aware_degree: usize,
    /// Popularity exponent of the aware graph's partner ranking (see `AwareConfig`).
    #[arg(long, default_value_t = 0.6)]
    pub aware_lift: f32,
    /// Builds one aware graph per query head from that head's queries alone, instead of one
    /// per KV head from the whole GQA group's queries (3× the graphs and, at the same
    /// `--aware-build-queries`, the same build cost).
    #[arg(long)]
    pub aware_per_head: bool,
    /// Build queries per aware graph, evenly spaced (default 8192; 4096 with --quick).
    #[arg(long)]
    pub aware_build_queries: Option<usize>,
    /// Writes every evaluated query's returned positions as JSON.
    #[arg(long)]
    pub write_results: Option<PathBuf>,
}

/// Sweep multipliers of k for HNSW's ef (below 1, a budgeted walk that returns ef keys).
const HNSW_EF: [f64; 8] = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// Sweep of the aware search's inner-product budget, as fractions of the indexed keys.
const AWARE_BUDGET: [f64; 7] = [0.025, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2];
/// The target: recall of at least this...
const RECALL_TARGET: f64 = 0.9;
/// ...while scanning at most this fraction of the keys.
const SCAN_TARGET: f64 = 0.05;

/// Per-query outcome of one index configuration.
#[derive(Clone)]
struct Outcome {
    positions: Vec<u32>,
    recall: f64,
    mass: f64,
    attn_err: f64,
    scanned_frac: f64,
    micros: f64,
}

/// Mean figures of one configuration over all evaluated queries.
struct Point {
    ef: usize,
    recall: f64,
    mass: f64,
    attn_err: f64,
    scanned_frac: f64,
    micros: f64,
}

fn summarise(ef: usize, outs: &[&Outcome]) -> Point {
    let n = outs.len() as f64;
    Point {
        ef,
        recall: outs.iter().map(|o| o.recall).sum::<f64>() / n,
        mass: outs.iter().map(|o| o.mass).sum::<f64>() / n,
        attn_err: outs.iter().map(|o| o.attn_err).sum::<f64>() / n,
        scanned_frac: outs.iter().map(|o| o.scanned_frac).sum::<f64>() / n,
        micros: median(&outs.iter().map(|o| o.micros).collect::<Vec<_>>()),
    }
}

/// Recall interpolated at `frac` on a (scanned, recall) sweep curve; `false` when `frac` is
/// outside the curve and the nearest point's figures are returned instead.
fn at_scan(points: &[Point], frac: f64) -> (f64, f64, bool) {
    at_scan_of(points, frac, |p| p.recall)
}

/// [`at_scan`] for any per-point figure.
fn at_scan_of(points: &[Point], frac: f64, of: impl Fn(&Point) -> f64) -> (f64, f64, bool) {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| a.scanned_frac.total_cmp(&b.scanned_frac));
    for w in sorted.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.scanned_frac <= frac && frac <= b.scanned_frac {
            let t = if b.scanned_frac > a.scanned_frac {
                (frac - a.scanned_frac) / (b.scanned_frac - a.scanned_frac)
            } else {
                0.0
            };
            return (of(a) + t * (of(b) - of(a)), frac, true);
        }
    }
    let nearest = if frac < sorted[0].scanned_frac {
        sorted[0]
    } else {
        sorted[sorted.len() - 1]
    };
    (of(nearest), nearest.scanned_frac, false)
}

pub fn run(args: Args) -> Result<()> {
    let t_load = Instant::now();
    let dump = KvDump::load(&args.kv)?;
    let (tokens, d) = (dump.tokens, dump.head_dim);
    ensure!(
        args.decode > 0 && args.decode < tokens / 2,
        "--decode must be in 1..tokens/2"
    );
    let indexed = tokens - args.decode;
    let k = args
        .k
        .unwrap_or(((indexed as f64 * 0.02).round() as usize).max(1));
    ensure!(
        k < indexed / 2,
        "k {k} must be below half of the {indexed} indexed keys"
    );
    let group = dump.heads / dump.kv_heads;
    let (layer_count, decode_positions, max_build_queries, ef_construction) = if args.quick {
        (args.layers.unwrap_or(4), args.decode.min(8), 4096, 100)
    } else {
        (args.layers.unwrap_or(dump.layers), args.decode, 8192, 200)
    };
    let max_build_queries = args.aware_build_queries.unwrap_or(max_build_queries);
    let n = layer_count.clamp(1, dump.layers);
    let layers: Vec<usize> = (0..n)
        .map(|i| (2 * i + 1) * dump.layers / (2 * n))
        .collect();
    let positions: Vec<usize> = (tokens - decode_positions..tokens).collect();
    let stat = StaticTokens {
        sinks: args.sinks,
        window: args.window,
    };
    let scale = 1.0 / (d as f32).sqrt();
    println!(
        "retrieval: {} ({} tokens, {} layers × {} heads / {} kv heads, d {d}), loaded in {:.1}s",
        args.kv.display(),
        tokens,
        dump.layers,
        dump.heads,
        dump.kv_heads,
        t_load.elapsed().as_secs_f64()
    );
    println!(
        "indexed {indexed} keys, k {k}, layers {layers:?}, {} decode positions, static {} sinks + {} window",
        positions.len(),
        args.sinks,
        args.window
    );

    // The aware index learns from all query heads of the group at the indexed positions.
    let group_queries = |layer: usize, kv: usize| -> Vec<f32> {
        (kv * group..(kv + 1) * group)
            .flat_map(|h| dump.q_rows(layer, h)[..indexed * d].iter().copied())
            .collect()
    };
    let keys_of =
        |li: usize, kv: usize| MatrixView::new(&dump.k_rows(layers[li], kv)[..indexed * d], d);
    let hnsw_cfg = HnswConfig {
        max_connections: 24,
        ef_construction,
        ef_search: 2 * k,
    };
    let aware_cfg = AwareConfig {
        k_build: args.k_build.unwrap_or(k.max(32)),
        max_degree: args.aware_degree,
        lift_exponent: args.aware_lift,
        max_build_queries,
        ..AwareConfig::default()
    };

    let brute =
        HeadIndexes::<BruteForce>::build(layers.len(), dump.heads, dump.kv_heads, |li, kv| {
            BruteForce::build(BuildInput::keys(keys_of(li, kv)?), &())
        })?;
    let t_hnsw = Instant::now();
    let hnsw =
        HeadIndexes::<HnswRetriever>::build(layers.len(), dump.heads, dump.kv_heads, |li, kv| {
            HnswRetriever::build(BuildInput::keys(keys_of(li, kv)?), &hnsw_cfg)
        })?;
    let hnsw_build_s = t_hnsw.elapsed().as_secs_f64();
    let t_aware = Instant::now();
    // With --aware-per-head the graphs are indexed by query head (`heads` of them per layer,
    // each over its KV head's keys); otherwise by KV head.
    let graph_heads = if args.aware_per_head {
        dump.heads
    } else {
        dump.kv_heads
    };
    let aware =
        HeadIndexes::<AwareIndex>::build(layers.len(), graph_heads, graph_heads, |li, g| {
            let (q, kv) = if args.aware_per_head {
                let rows = &dump.q_rows(layers[li], g)[..indexed * d];
                (rows.to_vec(), dump.kv_head_of(g))
            } else {
                (group_queries(layers[li], g), g)
            };
            AwareIndex::build(
                BuildInput {
                    keys: keys_of(li, kv)?,
                    queries: Some(MatrixView::new(&q, d)?),
                },
                &aware_cfg,
            )
        })?;
    let aware_build_s = t_aware.elapsed().as_secs_f64();
    let mean_degree = (0..layers.len() * graph_heads)
        .filter_map(|i| aware.get(i / graph_heads, i % graph_heads))
        .map(|a| a.mean_degree())
        .sum::<f64>()
        / (layers.len() * graph_heads) as f64;
    println!(
        "builds: hnsw {hnsw_build_s:.1}s (M 24, ef_c {ef_construction}, {} graphs), aware {aware_build_s:.1}s (≤{max_build_queries} queries per graph, k_build {}, degree ≤{}, mean {mean_degree:.1}, {} graphs{})",
        layers.len() * dump.kv_heads,
        aware_cfg.k_build,
        aware_cfg.max_degree,
        layers.len() * graph_heads,
        if args.aware_per_head {
            ", one per query head"
        } else {
            ""
        }
    );

    let ef_of = |m: &f64| ((m * k as f64).round() as usize).max(1);
    let (efs, aware_efs): (Vec<usize>, Vec<usize>) = (
        HNSW_EF.iter().map(ef_of).collect(),
        AWARE_BUDGET
            .iter()
            // Rounded down, so a budget never scans more than its fraction.
            .map(|f| ((f * indexed as f64).floor() as usize).max(k))
            .collect(),
    );
    let items: Vec<(usize, usize, usize)> = (0..layers.len())
        .flat_map(|li| {
            (0..dump.heads)
                .flat_map(move |h| (tokens - decode_positions..tokens).map(move |p| (li, h, p)))
        })
        .collect();
    let t_eval = Instant::now();
    // Per item: exact, static-only error, brute, hnsw per ef, aware per ef, the aware graph's
    // ordering bound per ef (recall, scanned fraction).
    type Row = (
        Vec<u32>,
        f64,
        Outcome,
        Vec<Outcome>,
        Vec<Outcome>,
        Vec<(f64, f64)>,
    );
    let rows: Vec<Row> = items
        .par_iter()
        .map(|&(li, h, p)| -> Result<Row> {
            let layer = layers[li];
            let kv = dump.kv_head_of(h);
            let q = dump.q_row(layer, h, p);
            let (all_k, all_v) = dump.kv_views(layer, kv)?;
            let full = full_attention(q, all_k, all_v, p + 1, scale);
            // One pass of scores over the indexed keys gives the exact top-k and the softmax
            // weights (how much of the top-k's attention mass a returned set carries).
            let mut scores = Vec::with_capacity(indexed);
            scores_into(all_k.prefix(indexed), q, &mut scores);
            let truth = top_k_of_scores(&scores, k);
            let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f64> = scores.iter().map(|&s| (((s - top) * scale) as f64).exp()).collect();
            let mass_of = |ps: &[u32]| ps.iter().map(|&p| weights.get(p as usize).copied().unwrap_or(0.0)).sum::<f64>();
            let truth_mass = mass_of(&truth).max(f64::MIN_POSITIVE);
            let score = |positions: Vec<u32>, scanned: usize, micros: f64| Outcome {
                recall: positions.iter().filter(|x| truth.contains(x)).count() as f64 / k as f64,
                mass: mass_of(&positions) / truth_mass,
                attn_err: relative_error(&stat.attend(q, all_k, all_v, p + 1, &positions, scale), &full),
                scanned_frac: scanned as f64 / indexed as f64,
                micros,
                positions,
            };
            let timed = |f: &dyn Fn() -> kvtier_index::Result<kvtier_index::SearchResult>| -> Result<Outcome> {
                let t = Instant::now();
                let r = f()?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                Ok(score(r.positions, r.scanned, us))
            };
            let static_err = relative_error(&stat.attend(q, all_k, all_v, p + 1, &[], scale), &full);
            let (hnsw_index, aware_index) = (hnsw.get(li, kv).context("hnsw index")?, aware.get(li, if args.aware_per_head { h } else { kv }).context("aware index")?);
            let b = timed(&|| brute.search(li, h, q, k))?;
            let hn = efs.iter().map(|&ef| timed(&|| hnsw_index.search_ef(q, k, ef))).collect::<Result<Vec<_>>>()?;
            let aw = aware_efs.iter().map(|&ef| timed(&|| aware_index.search_budget(q, k, ef))).collect::<Result<Vec<_>>>()?;
            let bound = aware_efs.iter().map(|&ef| {
                let r = aware_index.ordering_bound(&scores, k, ef)?;
                let hits = r.positions.iter().filter(|x| truth.contains(x)).count();
                Ok((hits as f64 / k as f64, r.scanned as f64 / indexed as f64))
            }).collect::<Result<Vec<_>>>()?;
            Ok((truth, static_err, b, hn, aw, bound))
        })
        .collect::<Result<_>>()?;
    println!(
        "evaluated {} queries × {} configurations in {:.1}s",
        items.len(),
        1 + efs.len() + aware_efs.len(),
        t_eval.elapsed().as_secs_f64()
    );

    let brute_pt = summarise(0, &rows.iter().map(|r| &r.2).collect::<Vec<_>>());
    let static_err = rows.iter().map(|r| r.1).sum::<f64>() / rows.len() as f64;
    let hnsw_pts: Vec<Point> = efs
        .iter()
        .enumerate()
        .map(|(i, &ef)| summarise(ef, &rows.iter().map(|r| &r.3[i]).collect::<Vec<_>>()))
        .collect();
    let aware_pts: Vec<Point> = aware_efs
        .iter()
        .enumerate()
        .map(|(i, &ef)| summarise(ef, &rows.iter().map(|r| &r.4[i]).collect::<Vec<_>>()))
        .collect();

    println!(
        "\n{:<8} {:>9} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "index", "ef|budget", "recall", "mass", "scanned", "attn_err", "query_us"
    );
    println!(
        "{:<8} {:>9} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "static",
        "-",
        "-",
        "-",
        "0",
        format!("{static_err:.4}"),
        "-"
    );
    let line = |name: &str, p: &Point| {
        println!(
            "{:<8} {:>9} {:>8.4} {:>8.4} {:>10.4} {:>10.4} {:>10.1}",
            name,
            if p.ef == 0 {
                "-".to_string()
            } else {
                p.ef.to_string()
            },
            p.recall,
            p.mass,
            p.scanned_frac,
            p.attn_err,
            p.micros
        );
    };
    line("exact", &brute_pt);
    hnsw_pts.iter().for_each(|p| line("hnsw", p));
    aware_pts.iter().for_each(|p| line("aware", p));
    // The aware graph searched with the true scores as its order (a bound, not a search): what
    // the same graph and entry points reach when every step scores the best linked candidate.
    // Only recall and the scanned fraction are measured for it.
    let bound_pts: Vec<Point> = aware_efs
        .iter()
        .enumerate()
        .map(|(i, &ef)| {
            let n = rows.len() as f64;
            Point {
                ef,
                recall: rows.iter().map(|r| r.5[i].0).sum::<f64>() / n,
                scanned_frac: rows.iter().map(|r| r.5[i].1).sum::<f64>() / n,
                mass: f64::NAN,
                attn_err: f64::NAN,
                micros: f64::NAN,
            }
        })
        .collect();
    for p in &bound_pts {
        println!(
            "{:<8} {:>9} {:>8.4} {:>8} {:>10.4} {:>10} {:>10}",
            "bound", p.ef, p.recall, "-", p.scanned_frac, "-", "-"
        );
    }

    let head = aware_pts
        .iter()
        .find(|p| p.recall >= RECALL_TARGET)
        .unwrap_or_else(|| {
            aware_pts
                .iter()
                .max_by(|a, b| a.recall.total_cmp(&b.recall))
                .expect("non-empty sweep")
        });
    let (hnsw_recall, hnsw_frac, equal) = at_scan(&hnsw_pts, head.scanned_frac);
    let hnsw_near = hnsw_pts
        .iter()
        .min_by(|a, b| {
            (a.scanned_frac - hnsw_frac)
                .abs()
                .total_cmp(&(b.scanned_frac - hnsw_frac).abs())
        })
        .expect("non-empty sweep");
    println!(
        "\nheadline: aware budget {} recall {:.4} at {:.2}% scanned; hnsw at {:.2}% scanned: recall {:.4}{}",
        head.ef,
        head.recall,
        100.0 * head.scanned_frac,
        100.0 * hnsw_frac,
        hnsw_recall,
        if equal {
            " (interpolated)"
        } else {
            " (nearest sweep point; curve does not reach this fraction)"
        }
    );

    if let Some(path) = &args.write_results {
        let queries: Vec<_> = items
            .iter()
            .zip(&rows)
            .map(|(&(li, h, p), r)| {
                json!({"layer": layers[li], "head": h, "kv_head": dump.kv_head_of(h), "position": p, "exact": r.0,
                       "hnsw": r.3.iter().map(|o| &o.positions).collect::<Vec<_>>(),
                       "aware": r.4.iter().map(|o| &o.positions).collect::<Vec<_>>()})
            })
            .collect();
        let doc = json!({"tokens": tokens, "indexed": indexed, "k": k, "sinks": args.sinks, "window": args.window,
                         "ef_hnsw": efs, "budget_aware": aware_efs, "queries": queries});
        std::fs::write(path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }

    let mut f = Figures::new("retrieval");
    f.set("tokens", tokens);
    f.set("indexed", indexed);
    f.set("k", k);
    f.set("layers_evaluated", layers.len());
    f.set("queries", items.len());
    f.num("static_attn_err", static_err);
    f.num("exact_attn_err", brute_pt.attn_err);
    f.num("exact_query_us", brute_pt.micros);
    f.set("aware_budget", head.ef);
    f.num("aware_recall", head.recall);
    f.num("aware_mass", head.mass);
    f.num("aware_scanned_frac", head.scanned_frac);
    f.num("aware_attn_err", head.attn_err);
    f.num("aware_query_us", head.micros);
    f.num("hnsw_recall", hnsw_recall);
    f.num("hnsw_scanned_frac", hnsw_frac);
    f.set("hnsw_at_equal_scan", equal);
    f.num("hnsw_attn_err", hnsw_near.attn_err);
    f.num("hnsw_query_us", hnsw_near.micros);
    f.num(
        "aware_vs_hnsw_recall",
        if hnsw_recall > 0.0 {
            head.recall / hnsw_recall
        } else {
            0.0
        },
    );
    let best_hnsw = hnsw_pts
        .iter()
        .max_by(|a, b| a.recall.total_cmp(&b.recall))
        .expect("non-empty sweep");
    f.num("hnsw_best_recall", best_hnsw.recall);
    f.num("hnsw_best_scanned_frac", best_hnsw.scanned_frac);
    f.num("hnsw_build_s", hnsw_build_s);
    f.num("aware_build_s", aware_build_s);
    let (aware_at_5, aware_frac_5, aware_reach_5) = at_scan(&aware_pts, SCAN_TARGET);
    let (hnsw_at_5, hnsw_frac_5, hnsw_reach_5) = at_scan(&hnsw_pts, SCAN_TARGET);
    f.num("aware_recall_at_5pct", aware_at_5);
    f.num(
        "aware_mass_at_5pct",
        at_scan_of(&aware_pts, SCAN_TARGET, |p| p.mass).0,
    );
    f.num(
        "hnsw_mass_at_5pct",
        at_scan_of(&hnsw_pts, SCAN_TARGET, |p| p.mass).0,
    );
    f.num("aware_recall_at_5pct_frac", aware_frac_5);
    f.num(
        "aware_bound_recall_at_5pct",
        at_scan(&bound_pts, SCAN_TARGET).0,
    );
    f.set("aware_reaches_5pct", aware_reach_5);
    f.num("hnsw_recall_at_5pct", hnsw_at_5);
    f.num("hnsw_recall_at_5pct_frac", hnsw_frac_5);
    f.set("hnsw_reaches_5pct", hnsw_reach_5);
    // The aware curve against every HNSW sweep point it spans: recall interpolated at that
    // point's scanned fraction minus HNSW's recall there (positive: aware ahead).
    let margins: Vec<(f64, f64)> = hnsw_pts
        .iter()
        .filter_map(|h| {
            let (r, _, inside) = at_scan(&aware_pts, h.scanned_frac);
            inside.then_some((h.scanned_frac, r - h.recall))
        })
        .collect();
    for (frac, m) in &margins {
        println!(
            "equal scan {:.2}%: aware − hnsw recall {m:+.4}",
            100.0 * frac
        );
    }
    if let Some((frac, m)) = margins.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
        f.num("equal_scan_min_margin", *m);
        f.num("equal_scan_min_margin_frac", *frac);
    }
    f.set("equal_scan_points", margins.len());
    f.set(
        "equal_scan_aware_ahead",
        margins.iter().filter(|m| m.1 > 0.0).count(),
    );
    f.set(
        "aware_target_met",
        head.recall >= 0.9 && head.scanned_frac <= SCAN_TARGET && head.recall > hnsw_recall,
    );
    f.print();
    Ok(())
}
