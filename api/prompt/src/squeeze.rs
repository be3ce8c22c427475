//! Squeezing under memory pressure: when the host tier fills past a watermark, the least
//! recently used raw prompts of tenants that accept lossy data are pruned to a layer budget
//! ([`crate::budget::apply_budget`]) before whole chunks have to be evicted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use kvtier_cache::tier::CODEC_RAW;
use kvtier_cache::{ChunkKey, TierKind, TieredStore};

use crate::budget::{BudgetRequest, Selection, apply_budget};
use crate::layouts::Layouts;
use crate::periodic::spawn_periodic;
use crate::read::chain;

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
pub struct Importance(parking_lot::Mutex<HashMap<u64, Vec<f32>>>);

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
    let mut tried = HashSet::new();
    while cfg.watermark > 0.0 && over() {
        let Some((tenant, tip, cos)) = lru_tip(store, importance, lossy_tenants, &tried) else {
            break;
        };
        tried.insert(tip);
        let Some(keys) = chain(store, tenant, tip) else {
            continue;
        };
        let req = BudgetRequest {
            keys,
            fraction: cfg.fraction,
            layer_cos: Some(cos),
            p: cfg.p,
            selection: Selection::Streaming { sinks: cfg.sinks },
        };
        match apply_budget(store, layouts, lossy_tenants, tenant, &req) {
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
    skip: &HashSet<ChunkKey>,
) -> Option<(u64, ChunkKey, Vec<f32>)> {
    let mut best: Option<(u64, u64, ChunkKey, Vec<f32>)> = None; // (last access, tenant, tip)
    for &tenant in tenants {
        let chunks = store.list(tenant, Some(TierKind::Host), None, usize::MAX);
        let parents: HashSet<ChunkKey> = chunks.iter().filter_map(|c| c.meta.parent).collect();
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
    store: Weak<TieredStore>,
    layouts: Arc<Layouts>,
    importance: Arc<Importance>,
    lossy_tenants: Vec<u64>,
    cfg: SqueezeConfig,
) -> std::io::Result<()> {
    if cfg.watermark <= 0.0 || lossy_tenants.is_empty() {
        return Ok(());
    }
    let every = Duration::from_millis(200);
    spawn_periodic("kvtier-squeezer", every, store, move |store| {
        let n = squeeze_pass(store, &layouts, &importance, &lossy_tenants, &cfg);
        if n > 0 {
            tracing::info!("host tier over its squeeze watermark: squeezed {n} prompts");
        }
    })
}
