//! The background builder: settled prompt tips are walked back to their first chunk and indexed,
//! one graph per (layer, KV head): HNSW, or the attention-aware graph when the engine uploaded
//! queries for the prompt.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvtier_cache::{ChunkKey, TieredStore};
use kvtier_index::{
    AwareConfig, AwareIndex, BuildInput, HeadIndexes, HnswConfig, HnswRetriever, MatrixView,
    Retriever, SearchResult,
};

use super::memory::{index_bytes, trim_indexes};
use super::{IndexUsed, PromptIndex, Retrieval};
use crate::error::{PromptError, Result};
use crate::periodic::spawn_periodic;
use crate::read::chain;

/// Build queries an attention-aware graph uses at most per KV head (evenly spaced).
const AWARE_BUILD_QUERIES: usize = 8192;

/// The graphs of one prompt, `[layer][kv_head]`.
pub(super) enum Graphs {
    Hnsw(HeadIndexes<HnswRetriever>),
    Aware(HeadIndexes<AwareIndex>),
}

impl Graphs {
    pub(super) fn search(
        &self,
        layer: usize,
        kv_head: usize,
        q: &[f32],
        k: usize,
    ) -> kvtier_index::Result<SearchResult> {
        match self {
            Graphs::Hnsw(g) => g.search(layer, kv_head, q, k),
            Graphs::Aware(g) => g.search(layer, kv_head, q, k),
        }
    }

    pub(super) fn kind(&self) -> IndexUsed {
        match self {
            Graphs::Hnsw(_) => IndexUsed::Hnsw,
            Graphs::Aware(_) => IndexUsed::Aware,
        }
    }
}

impl Retrieval {
    /// Builds the indexes of prompts whose tips have settled. Returns how many were built.
    /// CPU heavy: runs on the builder thread.
    pub fn build_settled(&self, store: &TieredStore) -> usize {
        let now = Instant::now();
        let ready: Vec<(u64, ChunkKey)> = {
            let mut tips = self.tips.lock();
            let ready: Vec<_> = tips
                .iter()
                .filter(|(_, t)| now.duration_since(**t) >= self.config.settle)
                .map(|(k, _)| *k)
                .collect();
            for k in &ready {
                tips.remove(k);
            }
            ready
        };
        let mut built = 0;
        for (tenant, tip) in ready {
            let Some(keys) = chain(store, tenant, tip) else {
                continue;
            };
            match self.build(store, tenant, &keys) {
                Ok(true) => built += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!("retrieval index for prompt ending at {tip}: {e}"),
            }
        }
        built
    }

    /// Builds (or refreshes) the index of one prompt. `Ok(false)` when it is too short, of an
    /// unregistered layout, or already indexed.
    pub(super) fn build(
        &self,
        store: &TieredStore,
        tenant: u64,
        keys: &[ChunkKey],
    ) -> Result<bool> {
        if self
            .built
            .lock()
            .iter()
            .any(|p| p.tenant == tenant && p.keys == keys)
        {
            return Ok(false);
        }
        let tokens: u64 = keys
            .iter()
            .filter_map(|k| store.info(tenant, *k))
            .map(|i| i.meta.tokens as u64)
            .sum();
        if tokens < self.config.min_tokens {
            return Ok(false);
        }
        let Some(layout) = keys
            .first()
            .and_then(|k| store.info(tenant, *k))
            .and_then(|i| self.layouts.get(i.meta.layout))
        else {
            return Ok(false);
        };
        let queries = keys.last().and_then(|tip| self.queries_for(tenant, *tip));
        let bytes = index_bytes(layout, tokens, queries.as_deref());
        if bytes > self.config.max_bytes {
            tracing::info!(
                "prompt of {tokens} tokens not indexed: its index (~{} MiB) exceeds retrieval_index_bytes",
                bytes >> 20
            );
            return Ok(false);
        }
        let prompt = match self.read_prompt(store, tenant, keys, true) {
            Ok(p) => p,
            // Prompts that cannot be indexed (unregistered or mixed layouts, not raw, not MHA).
            Err(
                PromptError::Invalid(_)
                | PromptError::UnknownLayout { .. }
                | PromptError::OnlyLossy { .. },
            ) => return Ok(false),
            Err(e) => return Err(e),
        };
        let layers = prompt.layout.num_layers as usize;
        let kv_heads = prompt.layout.kv_heads as usize;
        let dim = prompt.layout.head_dim as usize;
        let failed = PromptError::IndexBuild;
        let graphs = match queries {
            // Uploaded queries shaped for another layout are ignored (HNSW instead).
            Some(q) if q.data.len() == layers * q.heads * q.n * dim => {
                let group = q.heads / kv_heads;
                let cfg = AwareConfig {
                    // The graph links what decode steps retrieve: about 2% of the prompt.
                    k_build: (prompt.tokens / 50).max(32),
                    max_build_queries: AWARE_BUILD_QUERIES,
                    // Searches scan 10% of the keys (at least this many).
                    min_scan: 64,
                    ..AwareConfig::default()
                };
                Graphs::Aware(
                    HeadIndexes::build(layers, kv_heads, kv_heads, |layer, kvh| {
                        let keys = prompt.keys_f32(layer, kvh);
                        let rows = q.group_rows(layer, kvh * group..(kvh + 1) * group, dim);
                        AwareIndex::build(
                            BuildInput {
                                keys: MatrixView::new(&keys, dim)?,
                                queries: Some(MatrixView::new(rows, dim)?),
                            },
                            &cfg,
                        )
                    })
                    .map_err(failed)?,
                )
            }
            _ => {
                let cfg = HnswConfig {
                    max_connections: self.config.hnsw_links.clamp(2, 256),
                    ..HnswConfig::default()
                };
                Graphs::Hnsw(
                    HeadIndexes::build(layers, kv_heads, kv_heads, |layer, kvh| {
                        let keys = prompt.keys_f32(layer, kvh);
                        HnswRetriever::build(BuildInput::keys(MatrixView::new(&keys, dim)?), &cfg)
                    })
                    .map_err(failed)?,
                )
            }
        };
        let mut built = self.built.lock();
        built.retain(|p| !(p.tenant == tenant && p.keys == keys));
        built.push(Arc::new(PromptIndex {
            tenant,
            keys: keys.to_vec(),
            tokens: prompt.tokens as u64,
            bytes,
            graphs,
        }));
        trim_indexes(&mut built, self.config.max_prompts, self.config.max_bytes);
        Ok(true)
    }
}

/// Starts the background builder: every `settle / 2` it builds the settled prompts, until the
/// store is gone.
pub fn spawn_builder(retrieval: Arc<Retrieval>, store: Weak<TieredStore>) -> std::io::Result<()> {
    if retrieval.config.min_tokens == 0 {
        return Ok(());
    }
    let tick = (retrieval.config.settle / 2).max(Duration::from_millis(20));
    spawn_periodic("kvtier-index-builder", tick, store, move |store| {
        retrieval.build_settled(store);
    })
}
