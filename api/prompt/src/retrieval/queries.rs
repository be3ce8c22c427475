//! Query vectors an engine uploaded for a stored prompt's prefill: kept (within the retrieval
//! memory budget) until the prompt is rebuilt with the attention-aware graph, and dropped with
//! the prompt's tip chunk.

use std::sync::Arc;
use std::time::Instant;

use kvtier_cache::{ChunkKey, TieredStore};

use super::{Retrieval, check_grouping, require_mha};
use crate::error::{PromptError, Result};

/// Uploaded queries of the prompt of (tenant, tip chunk).
pub(super) type QueryEntry = ((u64, ChunkKey), Arc<PromptQueries>);

/// Query vectors an engine uploaded for a prompt: `[layer][query head][n][head_dim]` f32.
pub(super) struct PromptQueries {
    pub(super) heads: usize,
    pub(super) n: usize,
    pub(super) data: Vec<f32>,
}

impl PromptQueries {
    /// The rows of query heads `heads` of `layer`: contiguous in the upload's layout. The
    /// aware build subsamples them itself (`max_build_queries`).
    pub(super) fn group_rows(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        dim: usize,
    ) -> &[f32] {
        let row = |h: usize| (layer * self.heads + h) * self.n * dim;
        &self.data[row(heads.start)..row(heads.end)]
    }

    pub(super) fn bytes(&self) -> u64 {
        self.data.len() as u64 * 4
    }
}

impl Retrieval {
    /// Keeps query vectors of the prompt ending at chunk `tip`, `[layer][query head][n]
    /// [head_dim]` f32 with `heads` query heads, and has the prompt (re)built with the
    /// attention-aware index once it settles. Returns `n`, the query positions per head.
    /// Replaces earlier queries of that prompt.
    pub fn set_queries(
        &self,
        store: &TieredStore,
        tenant: u64,
        tip: ChunkKey,
        heads: u32,
        data: Vec<f32>,
    ) -> Result<usize> {
        let info = store.info(tenant, tip).ok_or(PromptError::NotStored(tip))?;
        let layout = self.layouts.get(info.meta.layout).ok_or_else(|| {
            PromptError::Invalid("the prompt's layout is not registered (see `layouts`)".into())
        })?;
        require_mha(layout)?;
        let (layers, kv_heads, dim) = (
            layout.num_layers as usize,
            layout.kv_heads as usize,
            layout.head_dim as usize,
        );
        let heads = heads as usize;
        check_grouping(heads, kv_heads)?;
        let per_position = layers * heads * dim;
        if data.is_empty() || !data.len().is_multiple_of(per_position) {
            return Err(PromptError::Invalid(format!(
                "queries must be whole [layers={layers}][heads={heads}][n][head_dim={dim}] f32 arrays ({} floats given)",
                data.len()
            )));
        }
        if !data.iter().all(|x| x.is_finite()) {
            return Err(PromptError::Invalid("queries must be finite".into()));
        }
        let n = data.len() / per_position;
        // Held queries stay inside the retrieval memory budget; a refused upload leaves the
        // prompt's earlier queries in place.
        let new_bytes = data.len() as u64 * 4;
        if new_bytes > self.config.max_bytes {
            return Err(PromptError::QueriesOverBudget {
                bytes: new_bytes,
                budget: self.config.max_bytes,
            });
        }
        let id = (tenant, tip);
        {
            let mut queries = self.queries.lock();
            queries.retain(|(k, _)| *k != id);
            // The oldest make room first.
            while queries.iter().map(|(_, q)| q.bytes()).sum::<u64>() + new_bytes
                > self.config.max_bytes
            {
                queries.remove(0);
            }
            queries.push((id, Arc::new(PromptQueries { heads, n, data })));
            let excess = queries.len().saturating_sub(self.config.max_prompts.max(1));
            queries.drain(..excess);
        }
        // Rebuild: drop the prompt's current index and let the builder pick the tip up again.
        self.built
            .lock()
            .retain(|p| !(p.tenant == tenant && p.keys.last() == Some(&tip)));
        self.tips.lock().insert(id, Instant::now());
        Ok(n)
    }

    /// The queries uploaded for the prompt ending at `tip`, if any.
    pub(super) fn queries_for(&self, tenant: u64, tip: ChunkKey) -> Option<Arc<PromptQueries>> {
        self.queries
            .lock()
            .iter()
            .find(|(id, _)| *id == (tenant, tip))
            .map(|(_, q)| q.clone())
    }
}
