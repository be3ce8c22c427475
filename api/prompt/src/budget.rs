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
//! Only tenants that accept lossy data may have their prompts pruned: [`apply_budget`] refuses
//! every other tenant with [`PromptError::LossyNotAllowed`], whoever calls it.

use kvtier_cache::{ChunkKey, Fidelity, TieredStore};
use kvtier_index::{
    CODEC_PRUNED, SelectionPolicy, cap_budgets, encode_pruned, kmeans_layers, prune_kv,
    select_tokens, squeezed_budgets, uniform_budgets,
};

use crate::error::{PromptError, Result};
use crate::layouts::Layouts;
use crate::read::{StoredChunk, read_prompt};

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

fn bad(msg: impl Into<String>) -> PromptError {
    PromptError::Invalid(msg.into())
}

/// Prunes the prompt `req.keys` of `tenant` to the requested budget, rewriting every chunk.
/// `lossy_tenants` are the tenants that accept lossy data; any other tenant is refused before
/// anything is read. CPU work and store writes: call from a blocking thread.
pub fn apply_budget(
    store: &TieredStore,
    layouts: &Layouts,
    lossy_tenants: &[u64],
    tenant: u64,
    req: &BudgetRequest,
) -> Result<BudgetOutcome> {
    if !lossy_tenants.contains(&tenant) {
        return Err(PromptError::LossyNotAllowed { tenant });
    }
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
        .collect::<Result<_>>()?;
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
        let pruned =
            prune_kv(layout, meta.tokens as usize, bytes, &local).map_err(PromptError::Index)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_cache::tier::CODEC_RAW;
    use kvtier_cache::{ChunkMeta, Dtype, HostConfig, HostTier, ModelLayout, StoreConfig};
    use std::sync::Arc;

    const TOKENS: u32 = 16;

    fn layout() -> ModelLayout {
        ModelLayout::mha("budget-unit", 2, 1, 4, Dtype::F16)
    }

    /// A store holding one two-chunk prompt of `tenant`.
    fn store(tenant: u64) -> (TieredStore, Vec<ChunkKey>) {
        let host = Arc::new(HostTier::new(HostConfig::with_budget(16 << 20)));
        let s = TieredStore::new(StoreConfig::default(), host, Vec::new());
        let l = layout();
        let keys = vec![ChunkKey(1), ChunkKey(2)];
        for (i, k) in keys.iter().enumerate() {
            let data: Vec<u8> = (0..l.chunk_bytes(TOKENS as usize))
                .map(|j| (j * 7 + i) as u8)
                .collect();
            let mut m =
                ChunkMeta::raw(tenant, l.fingerprint(), TOKENS, i as u32, data.len() as u64);
            m.parent = i.checked_sub(1).map(|j| keys[j]);
            s.put(*k, m, &data).unwrap();
        }
        (s, keys)
    }

    fn request(keys: Vec<ChunkKey>) -> BudgetRequest {
        BudgetRequest {
            keys,
            fraction: 0.5,
            layer_cos: None,
            p: 1.0,
            selection: Selection::Streaming { sinks: 2 },
        }
    }

    #[test]
    fn a_tenant_that_does_not_accept_lossy_data_is_refused_and_nothing_is_rewritten() {
        let (s, keys) = store(7);
        let layouts = Layouts::new([layout()]);
        let err = apply_budget(&s, &layouts, &[8], 7, &request(keys.clone())).unwrap_err();
        assert!(
            matches!(err, PromptError::LossyNotAllowed { tenant: 7 }),
            "{err}"
        );
        assert!(err.to_string().contains("lossy_tenants"), "{err}");
        for k in &keys {
            assert_eq!(s.info(7, *k).unwrap().meta.codec, CODEC_RAW);
        }
        // The same request for a lossy tenant prunes every chunk.
        let out = apply_budget(&s, &layouts, &[8, 7], 7, &request(keys.clone())).unwrap();
        assert_eq!((out.tokens, out.chunks), (2 * TOKENS as usize, 2));
        for k in &keys {
            assert_eq!(s.info(7, *k).unwrap().meta.codec, CODEC_PRUNED);
        }
    }
}
