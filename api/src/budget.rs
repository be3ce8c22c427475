//! Applying a layer-wise token budget (SqueezeAttention) to a stored prompt.
//!
//! The caller names a prompt by its chunk keys, a total budget as a fraction of the prompt's
//! tokens (per layer on average), optionally the layers' importance (`layer_cos`: the cosine
//! similarity of the residual stream before and after attention) and a token selection policy.
//! With `layer_cos`, the layers are clustered into three groups and the least important group
//! gets `p` times the uniform share (the rest split equally, total conserved); without it every
//! layer gets the uniform share. Each layer then keeps the tokens its policy selects over the
//! whole prompt (sinks + recent window, or H2O with the caller's accumulated attention scores),
//! and every chunk is rewritten in place as a pruned chunk ([`kvtier_index::encode_pruned`]):
//! codec [`CODEC_PRUNED`], fidelity lossy. Exact readers are refused such chunks from then on;
//! lossy readers receive the pruned form and parse it with [`kvtier_index::decode_pruned`].
//!
//! Only tenants listed in `lossy_tenants` may have their prompts pruned.

use kvtier_cache::tier::CODEC_RAW;
use kvtier_cache::{ChunkKey, Fidelity, TierKind, TieredStore};
use kvtier_index::{
    CODEC_PRUNED, SelectionPolicy, cap_budgets, encode_pruned, kmeans_layers, prune_kv,
    select_tokens, squeezed_budgets, uniform_budgets,
};

use crate::error::ApiError;
use crate::prompt::{Layouts, StoredChunk, read_prompt};

/// How each layer picks the tokens it keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// StreamingLLM: the first `sinks` tokens and the most recent ones.
    Streaming { sinks: usize },
    /// H2O: sinks, a recent window of `recent_ratio` of the rest, then the highest `scores`
    /// (`[layer][token]` accumulated attention, supplied by the engine).
    HeavyHitters {
        sinks: usize,
        recent_ratio: f32,
        scores: Vec<Vec<f32>>,
    },
}

/// A budget to apply to one stored prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRequest {
    /// The prompt's chunk keys, first chunk first.
    pub keys: Vec<ChunkKey>,
    /// Tokens kept per layer on average, as a fraction of the prompt's tokens, in `(0, 1]`.
    pub fraction: f64,
    /// Per-layer importance; `None` allocates uniformly.
    pub layer_cos: Option<Vec<f32>>,
    /// Share of the uniform budget the least important group keeps, in `[0, 1]`.
    pub p: f64,
    pub selection: Selection,
}

/// What applying a budget did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetOutcome {
    pub tokens: usize,
    /// Tokens kept per layer.
    pub budgets: Vec<usize>,
    /// Layers of the least important group (empty for a uniform allocation).
    pub squeezed_layers: Vec<usize>,
    pub chunks: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The fidelity of a pruned chunk: lossy with no stated error bound (dropping tokens has none).
pub fn pruned_fidelity() -> Fidelity {
    Fidelity::Lossy {
        codec: CODEC_PRUNED,
        error_bound: f32::INFINITY,
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// Prunes the prompt `req.keys` of `tenant` to the requested budget, rewriting every chunk.
/// CPU work and store writes: call from a blocking thread.
pub fn apply_budget(
    store: &TieredStore,
    layouts: &Layouts,
    tenant: u64,
    req: &BudgetRequest,
) -> Result<BudgetOutcome, ApiError> {
    if !(req.fraction > 0.0 && req.fraction <= 1.0) {
        return Err(bad(format!("fraction {} is not in (0, 1]", req.fraction)));
    }
    // Read every chunk first, exact: nothing is rewritten unless the whole prompt is usable.
    let prompt = read_prompt(store, layouts, tenant, &req.keys, false)?;
    let layout = &prompt.layout;
    let layers = layout.num_layers as usize;
    let tokens = prompt.tokens;
    let total = ((req.fraction * (tokens * layers) as f64).round() as usize).max(layers);
    let (budgets, squeezed_layers) = match &req.layer_cos {
        Some(cos) => {
            if cos.len() != layers {
                return Err(bad(format!(
                    "layer_cos has {} values for {layers} layers",
                    cos.len()
                )));
            }
            let groups = kmeans_layers(cos).map_err(|e| bad(e.to_string()))?;
            let squeezed = groups.least_important();
            let b = squeezed_budgets(total, layers, &squeezed, req.p)
                .map_err(|e| bad(e.to_string()))?;
            (cap_budgets(&b, tokens), squeezed)
        }
        None => (
            uniform_budgets(total, layers).map_err(|e| bad(e.to_string()))?,
            Vec::new(),
        ),
    };
    // Per layer, the kept positions of the whole prompt.
    let keep: Vec<Vec<u32>> = (0..layers)
        .map(|l| {
            let (policy, scores) = match &req.selection {
                Selection::Streaming { sinks } => {
                    (SelectionPolicy::Streaming { sinks: *sinks }, None)
                }
                Selection::HeavyHitters {
                    sinks,
                    recent_ratio,
                    scores,
                } => {
                    let s = scores.get(l).filter(|s| s.len() == tokens).ok_or_else(|| {
                        bad(format!("scores must be [{layers}][{tokens}] (layer {l})"))
                    })?;
                    (
                        SelectionPolicy::HeavyHitters {
                            sinks: *sinks,
                            recent_ratio: *recent_ratio,
                        },
                        Some(s.as_slice()),
                    )
                }
            };
            select_tokens(policy, tokens, budgets[l], scores).map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<_, ApiError>>()?;
    // Split every layer's selection by chunk and rewrite the chunks.
    let mut out = BudgetOutcome {
        tokens,
        budgets,
        squeezed_layers,
        chunks: prompt.chunks.len(),
        bytes_before: 0,
        bytes_after: 0,
    };
    let mut start = 0u32;
    for StoredChunk { key, meta, bytes } in &prompt.chunks {
        let end = start + meta.tokens;
        let local: Vec<Vec<u32>> = keep
            .iter()
            .map(|k| {
                k.iter()
                    .filter(|&&p| p >= start && p < end)
                    .map(|p| p - start)
                    .collect()
            })
            .collect();
        let pruned = prune_kv(layout, meta.tokens as usize, bytes, &local)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let payload = encode_pruned(meta.tokens, &pruned);
        let mut m = *meta;
        m.codec = CODEC_PRUNED;
        m.fidelity = pruned_fidelity();
        store.put(*key, m, &payload)?;
        out.bytes_before += bytes.len() as u64;
        out.bytes_after += payload.len() as u64;
        start = end;
    }
    Ok(out)
}

/// Squeezing under memory pressure: when the host tier fills past a watermark, prompts of
/// tenants that accept lossy data are pruned to a layer budget (their least important layers
/// keep `p` of the uniform share) before whole chunks have to be evicted.
#[derive(Debug, Clone)]
pub struct SqueezeConfig {
    /// Host usage (fraction of its budget) above which prompts are squeezed; 0 disables.
    pub watermark: f64,
    /// Tokens kept per layer on average, as a fraction of the prompt.
    pub fraction: f64,
    /// Share of the uniform budget the least important layers keep.
    pub p: f64,
    /// Attention sinks every layer keeps.
    pub sinks: usize,
}

/// Layer importance per layout fingerprint, learned from budget requests (engines send
/// `layer_cos` there); squeezing uses it and squeezes nothing of a layout it has not seen.
#[derive(Debug, Default)]
pub struct Importance(parking_lot::Mutex<std::collections::HashMap<u64, Vec<f32>>>);

impl Importance {
    pub fn remember(&self, fingerprint: u64, layer_cos: &[f32]) {
        self.0.lock().insert(fingerprint, layer_cos.to_vec());
    }

    pub fn get(&self, fingerprint: u64) -> Option<Vec<f32>> {
        self.0.lock().get(&fingerprint).cloned()
    }
}

/// One squeeze pass: while host usage is above the watermark, prunes the least recently used
/// raw prompt (in host memory, of a lossy tenant, of a layout whose importance is known).
/// Returns the number of prompts squeezed.
pub fn squeeze_pass(
    store: &TieredStore,
    layouts: &Layouts,
    importance: &Importance,
    lossy_tenants: &[u64],
    cfg: &SqueezeConfig,
) -> usize {
    let over = || {
        let u = store
            .tier_stats(TierKind::Host)
            .map(|t| t.usage)
            .unwrap_or_default();
        u.budget > 0 && u.bytes as f64 > cfg.watermark * u.budget as f64
    };
    let mut squeezed = 0;
    let mut tried = std::collections::HashSet::new();
    while cfg.watermark > 0.0 && over() {
        let Some((tenant, tip, cos)) = lru_tip(store, importance, lossy_tenants, &tried) else {
            break;
        };
        tried.insert(tip);
        let Some(keys) = crate::retrieval::chain(store, tenant, tip) else {
            continue;
        };
        let req = BudgetRequest {
            keys,
            fraction: cfg.fraction,
            layer_cos: Some(cos),
            p: cfg.p,
            selection: Selection::Streaming { sinks: cfg.sinks },
        };
        match apply_budget(store, layouts, tenant, &req) {
            Ok(_) => squeezed += 1,
            Err(e) => tracing::debug!("squeeze skipped a prompt: {e}"),
        }
    }
    squeezed
}

/// The last chunk of the least recently used raw prompt in host memory among `tenants` whose
/// layout has a known importance: `(tenant, tip, layer_cos)`.
fn lru_tip(
    store: &TieredStore,
    importance: &Importance,
    tenants: &[u64],
    skip: &std::collections::HashSet<ChunkKey>,
) -> Option<(u64, ChunkKey, Vec<f32>)> {
    let mut best: Option<(u64, u64, ChunkKey, Vec<f32>)> = None; // (last access, tenant, tip)
    for &tenant in tenants {
        let chunks = store.list(tenant, Some(kvtier_cache::TierKind::Host), None, usize::MAX);
        let parents: std::collections::HashSet<ChunkKey> =
            chunks.iter().filter_map(|c| c.meta.parent).collect();
        for tip in chunks.iter().filter(|c| {
            !parents.contains(&c.key) && c.meta.codec == CODEC_RAW && !skip.contains(&c.key)
        }) {
            let Some(cos) = importance.get(tip.meta.layout) else {
                continue;
            };
            if best.as_ref().is_none_or(|b| tip.last_access < b.0) {
                best = Some((tip.last_access, tenant, tip.key, cos));
            }
        }
    }
    let (_, tenant, tip, cos) = best?;
    Some((tenant, tip, cos))
}

/// Starts the squeezer: [`squeeze_pass`] every 200 ms until the store is gone.
pub fn spawn_squeezer(
    store: std::sync::Weak<TieredStore>,
    layouts: std::sync::Arc<Layouts>,
    importance: std::sync::Arc<Importance>,
    lossy_tenants: Vec<u64>,
    cfg: SqueezeConfig,
) -> std::io::Result<()> {
    if cfg.watermark <= 0.0 || lossy_tenants.is_empty() {
        return Ok(());
    }
    let every = std::time::Duration::from_millis(200);
    crate::service::spawn_periodic("kvtier-squeezer", every, store, move |store| {
        let n = squeeze_pass(store, &layouts, &importance, &lossy_tenants, &cfg);
        if n > 0 {
            tracing::info!("host tier over its squeeze watermark: squeezed {n} prompts");
        }
    })
}
