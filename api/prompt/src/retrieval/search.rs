//! RETRIEVE: the top-k keys of a stored prompt for decode queries, with their K/V rows; the
//! prompt's built graphs when they cover exactly the named chunks, an exact scan otherwise.

use std::sync::Arc;

use kvtier_cache::{ChunkKey, TieredStore};
use kvtier_index::{MatrixView, exact_top_k};

use super::{IndexUsed, Retrieval, check_grouping};
use crate::error::{PromptError, Result};

/// Largest `k` a request may ask for.
pub const MAX_K: u32 = 4096;

/// One retrieve request (the tenant comes from the connection).
#[derive(Debug, Clone)]
pub struct RetrieveRequest {
    /// The prompt's chunk keys, first chunk first.
    pub keys: Vec<ChunkKey>,
    pub layer: u32,
    /// Query heads per query vector (a multiple of the layout's KV heads).
    pub heads: u32,
    /// `[n][heads][head_dim]` f32 query vectors (post-RoPE), `n >= 1`.
    pub queries: Vec<f32>,
    pub k: u32,
    pub accept_lossy: bool,
}

/// A retrieve's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    pub index: IndexUsed,
    /// Tokens in the prompt.
    pub tokens: u64,
    /// Whether rows (and the keys searched) came from a lossy copy of some chunk; only possible
    /// when the request accepted lossy data.
    pub lossy: bool,
    /// Positions per (query, head): `min(k, tokens)`.
    pub k: u32,
    /// `[n][heads][k]` token positions, best first.
    pub positions: Vec<u32>,
    /// `[n][heads][k][head_dim]` K rows, in the layout's dtype.
    pub k_rows: Vec<u8>,
    /// Same shape, V rows.
    pub v_rows: Vec<u8>,
}

/// Converted layer keys kept for exact scans (most recently used last).
pub(super) struct LayerKeys {
    pub(super) tenant: u64,
    pub(super) keys: Vec<ChunkKey>,
    /// Addresses of the chunk buffers the keys were converted from: a chunk re-put under its
    /// key, or read again from disk, lives elsewhere, so stale keys are never used.
    ids: Vec<usize>,
    layer: u32,
    values: Arc<Vec<Vec<f32>>>,
}

/// Layers whose f32 keys stay cached for exact scans (a few MB each for an 8k-token prompt).
const LAYER_CACHE: usize = 32;

impl Retrieval {
    /// Answers one retrieve request of `tenant`. CPU and possibly disk work: call it from a
    /// blocking thread.
    pub fn retrieve(
        &self,
        store: &TieredStore,
        tenant: u64,
        req: &RetrieveRequest,
    ) -> Result<Retrieved> {
        let prompt = self.read_prompt(store, tenant, &req.keys, req.accept_lossy)?;
        let l = &prompt.layout;
        let (layers, kv_heads, dim) = (
            l.num_layers as usize,
            l.kv_heads as usize,
            l.head_dim as usize,
        );
        let layer = req.layer as usize;
        let heads = req.heads as usize;
        if layer >= layers {
            return Err(PromptError::Invalid(format!(
                "layer {layer} is not below {layers}"
            )));
        }
        check_grouping(heads, kv_heads)?;
        if req.k == 0 || req.k > MAX_K {
            return Err(PromptError::Invalid(format!("k must be in 1..={MAX_K}")));
        }
        let per_query = heads * dim;
        if req.queries.is_empty() || !req.queries.len().is_multiple_of(per_query) {
            return Err(PromptError::Invalid(format!(
                "queries must be whole [heads={heads}][head_dim={dim}] f32 vectors ({} floats given)",
                req.queries.len()
            )));
        }
        if !req.queries.iter().all(|x| x.is_finite()) {
            return Err(PromptError::Invalid("queries must be finite".into()));
        }
        let k = (req.k as usize).min(prompt.tokens);
        let index = self.lookup_index(tenant, &req.keys);
        let group = heads / kv_heads;
        // Exact scans need the layer's keys per KV head as f32: converted on first use and kept
        // in a small cache, since decode steps ask for the same prompt and layer again and again.
        let mut exact_keys: Option<Arc<Vec<Vec<f32>>>> = None;
        let mut exact = |kvh: usize, q: &[f32]| -> Result<Vec<u32>> {
            let keys = exact_keys.get_or_insert_with(|| {
                let ids = prompt
                    .chunks
                    .iter()
                    .map(|(_, b)| b.as_ptr() as usize)
                    .collect();
                self.layer_keys(tenant, &req.keys, ids, req.layer, || {
                    (0..kv_heads).map(|h| prompt.keys_f32(layer, h)).collect()
                })
            });
            let view = MatrixView::new(&keys[kvh], dim).map_err(PromptError::Index)?;
            Ok(exact_top_k(view, q, k))
        };
        let n = req.queries.len() / per_query;
        let mut out = Retrieved {
            index: index.as_ref().map_or(IndexUsed::Exact, |p| p.graphs.kind()),
            tokens: prompt.tokens as u64,
            lossy: prompt.lossy,
            k: k as u32,
            positions: Vec::with_capacity(n * heads * k),
            k_rows: Vec::with_capacity(n * heads * k * prompt.row_bytes()),
            v_rows: Vec::with_capacity(n * heads * k * prompt.row_bytes()),
        };
        for (i, q) in req.queries.chunks_exact(dim).enumerate() {
            let kvh = (i % heads) / group;
            let graph = match &index {
                Some(p) => Some(
                    p.graphs
                        .search(layer, kvh, q, k)
                        .map_err(|e| PromptError::Invalid(e.to_string()))?
                        .positions,
                ),
                None => None,
            };
            // A graph walk that comes back short (rare, tiny graphs) is answered exactly.
            let found = match graph {
                Some(g) if g.len() == k => g,
                _ => exact(kvh, q)?,
            };
            for &pos in &found {
                prompt.push_rows(layer, kvh, pos as usize, &mut out.k_rows, &mut out.v_rows);
            }
            out.positions.extend_from_slice(&found);
        }
        Ok(out)
    }

    /// The f32 keys of one layer of a prompt (`[kv_head][token × head_dim]`), from the cache or
    /// converted by `convert` and cached.
    fn layer_keys(
        &self,
        tenant: u64,
        keys: &[ChunkKey],
        ids: Vec<usize>,
        layer: u32,
        convert: impl FnOnce() -> Vec<Vec<f32>>,
    ) -> Arc<Vec<Vec<f32>>> {
        let mut cache = self.layer_cache.lock();
        if let Some(i) = cache
            .iter()
            .position(|e| e.tenant == tenant && e.layer == layer && e.keys == keys && e.ids == ids)
        {
            let e = cache.remove(i);
            let v = e.values.clone();
            cache.push(e);
            return v;
        }
        drop(cache);
        let values = Arc::new(convert());
        let mut cache = self.layer_cache.lock();
        cache.push(LayerKeys {
            tenant,
            keys: keys.to_vec(),
            ids,
            layer,
            values: values.clone(),
        });
        let excess = cache.len().saturating_sub(LAYER_CACHE);
        cache.drain(..excess);
        values
    }
}
