//! RETRIEVE: the top-k keys of a stored prompt for decode queries, with their K/V rows.
//!
//! - **Background builds.** The store's events feed [`Retrieval::observe`]: every newly stored
//!   chunk becomes a prompt tip (its parent stops being one). A builder thread
//!   ([`spawn_builder`]) waits until a tip has been quiet for `settle`, walks the parent chain
//!   back to the first chunk, and when the prompt has at least `min_tokens` tokens of a
//!   registered MHA layout, builds one HNSW graph per (layer, KV head) over its post-RoPE keys.
//!   At most `max_prompts` prompts stay indexed (least recently used dropped); an index is
//!   dropped as soon as any of its chunks is removed.
//! - **Attention-aware indexes.** An engine may upload query vectors of a stored prompt's
//!   prefill ([`Retrieval::set_queries`], `PUT /v1/prompts/{tip}/queries`). The prompt is then
//!   (re)built with RetrievalAttention's attention-aware graph instead of HNSW: built from those
//!   queries, it scans far fewer keys for the same recall and costs a fraction of HNSW's memory.
//!   The uploaded queries are kept for at most `max_prompts` prompts and dropped with them.
//! - **Retrieve.** A request names the prompt's chunk keys (as a lookup returned them), a
//!   layer, the number of query heads, one or more decode steps' queries and `k`. The chunks
//!   are read from whichever tier holds them (decoded if compressed; lossy copies only when the
//!   caller accepts them). With a built index for exactly those chunks the search walks the
//!   graph; otherwise it is an exact scan over the layer's keys (always correct, and the reply
//!   says which was used). Query head `h` searches KV head `h / (heads / kv_heads)`.
//! - **Reply.** For each query vector and head: `k` token positions (best first), then the K
//!   and V rows of those tokens in the layout's dtype.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use kvtier_cache::{AttentionKind, ChunkKey, ModelLayout, StoreEvent, TieredStore};
use kvtier_index::{
    AwareConfig, AwareIndex, BuildInput, HeadIndexes, HnswConfig, HnswRetriever, MatrixView,
    Retriever, SearchResult, exact_top_k,
};

use crate::error::ApiError;
use crate::prompt::{Layouts, MAX_PROMPT_CHUNKS, read_prompt};

/// Largest `k` a request may ask for.
pub const MAX_K: u32 = 4096;
/// Resident bytes one indexed key costs (HNSW graph with M = 24 plus the f32 copy it keeps for
/// exact fallbacks), as measured by `kvtier-bench retrieve` (2,232 B on SmolLM2 keys, d = 64).
/// Used to keep the indexes inside `max_bytes`.
pub const INDEX_BYTES_PER_KEY: u64 = 2300;
/// Resident bytes of one key in an attention-aware index besides its f32 copy: at most 12
/// links of 4 bytes (`AwareConfig`'s default degree), an offset and slack.
pub const AWARE_LINK_BYTES_PER_KEY: u64 = 64;
/// Build queries an attention-aware graph uses at most per KV head (evenly spaced).
const AWARE_BUILD_QUERIES: usize = 8192;

/// Background build policy.
#[derive(Debug, Clone)]
pub struct RetrievalConfig {
    /// Prompts shorter than this are not indexed in the background (0 disables builds).
    pub min_tokens: u64,
    /// Prompts kept indexed at once.
    pub max_prompts: usize,
    /// Memory the indexes may use, estimated at [`INDEX_BYTES_PER_KEY`] per (token, layer, KV
    /// head); least recently used indexes are dropped to stay under it, and a prompt whose
    /// index alone would exceed it is not indexed (RETRIEVE then scans exactly).
    pub max_bytes: u64,
    /// How long a prompt's last chunk must go unextended before its index is built.
    pub settle: Duration,
    /// Links per node of the HNSW graphs (memory and build time grow with it).
    pub hnsw_links: usize,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            min_tokens: 16384,
            max_prompts: 4,
            max_bytes: 4 << 30,
            settle: Duration::from_millis(500),
            hnsw_links: 24,
        }
    }
}

/// Which search answered a retrieve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IndexUsed {
    /// Exact scan over every key of the layer.
    Exact = 0,
    /// The prompt's background-built HNSW graphs.
    Hnsw = 1,
    /// The prompt's attention-aware graphs, built from uploaded queries.
    Aware = 2,
}

/// The graphs of one prompt, `[layer][kv_head]`.
enum Graphs {
    Hnsw(HeadIndexes<HnswRetriever>),
    Aware(HeadIndexes<AwareIndex>),
}

impl Graphs {
    fn search(
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

    fn kind(&self) -> IndexUsed {
        match self {
            Graphs::Hnsw(_) => IndexUsed::Hnsw,
            Graphs::Aware(_) => IndexUsed::Aware,
        }
    }
}

/// Uploaded queries of the prompt of (tenant, tip chunk).
type QueryEntry = ((u64, ChunkKey), Arc<PromptQueries>);

/// Query vectors an engine uploaded for a prompt: `[layer][query head][n][head_dim]` f32.
struct PromptQueries {
    heads: usize,
    n: usize,
    data: Vec<f32>,
}

impl PromptQueries {
    /// The rows of query heads `heads` of `layer`: contiguous in the upload's layout. The
    /// aware build subsamples them itself (`max_build_queries`).
    fn group_rows(&self, layer: usize, heads: std::ops::Range<usize>, dim: usize) -> &[f32] {
        let row = |h: usize| (layer * self.heads + h) * self.n * dim;
        &self.data[row(heads.start)..row(heads.end)]
    }

    fn bytes(&self) -> u64 {
        self.data.len() as u64 * 4
    }
}

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

/// Graphs of one prompt: `[layer][kv_head]`.
struct PromptIndex {
    tenant: u64,
    keys: Vec<ChunkKey>,
    tokens: u64,
    /// Estimated resident bytes.
    bytes: u64,
    graphs: Graphs,
}

/// Converted layer keys kept for exact scans (most recently used last).
struct LayerKeys {
    tenant: u64,
    keys: Vec<ChunkKey>,
    /// Addresses of the chunk buffers the keys were converted from: a chunk re-put under its
    /// key, or read again from disk, lives elsewhere, so stale keys are never used.
    ids: Vec<usize>,
    layer: u32,
    values: Arc<Vec<Vec<f32>>>,
}

/// Layers whose f32 keys stay cached for exact scans (a few MB each for an 8k-token prompt).
const LAYER_CACHE: usize = 32;

/// The retrieval service state. Shared behind an `Arc`.
pub struct Retrieval {
    layouts: Arc<Layouts>,
    config: RetrievalConfig,
    /// Most recently used last.
    built: Mutex<Vec<Arc<PromptIndex>>>,
    /// Prompt tips not yet extended or built: (tenant, key) -> last change.
    tips: Mutex<HashMap<(u64, ChunkKey), Instant>>,
    layer_cache: Mutex<Vec<LayerKeys>>,
    /// Uploaded queries by (tenant, prompt tip), most recently uploaded last.
    queries: Mutex<Vec<QueryEntry>>,
}

/// A prompt's chunks as read from the store.
struct Prompt {
    layout: ModelLayout,
    /// `(tokens, raw bytes)` per chunk.
    chunks: Vec<(usize, Bytes)>,
    tokens: usize,
    /// Whether any chunk was read from a lossy copy.
    lossy: bool,
}

impl Prompt {
    fn row_bytes(&self) -> usize {
        self.layout.head_dim as usize * self.layout.dtype.size()
    }

    /// Byte offset of the K row of (`layer`, chunk-local token `t`, `kv_head`) in a chunk of
    /// `n` tokens; the V row is `n * kv_heads` rows later.
    fn k_offset(&self, layer: usize, n: usize, t: usize, kv_head: usize) -> usize {
        layer * self.layout.layer_bytes(n)
            + (t * self.layout.kv_heads as usize + kv_head) * self.row_bytes()
    }

    /// `[tokens × head_dim]` f32 keys of one (layer, KV head).
    fn keys_f32(&self, layer: usize, kv_head: usize) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut raw = Vec::with_capacity(self.tokens * rb);
        for (n, bytes) in &self.chunks {
            for t in 0..*n {
                let off = self.k_offset(layer, *n, t, kv_head);
                raw.extend_from_slice(&bytes[off..off + rb]);
            }
        }
        kvtier_compress::shape::to_f32(self.layout.dtype, &raw)
    }

    /// Appends the K and V rows of prompt position `pos`.
    fn push_rows(
        &self,
        layer: usize,
        kv_head: usize,
        pos: usize,
        k: &mut Vec<u8>,
        v: &mut Vec<u8>,
    ) {
        let mut p = pos;
        for (n, bytes) in &self.chunks {
            if p < *n {
                let rb = self.row_bytes();
                let off = self.k_offset(layer, *n, p, kv_head);
                k.extend_from_slice(&bytes[off..off + rb]);
                let voff = off + n * self.layout.kv_heads as usize * rb;
                v.extend_from_slice(&bytes[voff..voff + rb]);
                return;
            }
            p -= n;
        }
    }
}

impl Retrieval {
    /// Retrieval over chunks of `layouts` (others are refused with a clear error).
    pub fn new(layouts: Arc<Layouts>, config: RetrievalConfig) -> Self {
        Retrieval {
            layouts,
            config,
            built: Mutex::new(Vec::new()),
            tips: Mutex::new(HashMap::new()),
            layer_cache: Mutex::new(Vec::new()),
            queries: Mutex::new(Vec::new()),
        }
    }

    /// Tracks prompt tips and drops indexes whose chunks went away. Cheap: called from store
    /// listeners on the writing thread.
    pub fn observe(&self, ev: &StoreEvent) {
        match ev {
            StoreEvent::Stored { key, meta, .. } if self.config.min_tokens > 0 => {
                let mut tips = self.tips.lock();
                if let Some(parent) = meta.parent {
                    tips.remove(&(meta.tenant, parent));
                }
                tips.insert((meta.tenant, *key), Instant::now());
            }
            StoreEvent::Stored { .. } => {}
            StoreEvent::Removed { key, tenant } => {
                self.built
                    .lock()
                    .retain(|p| p.tenant != *tenant || !p.keys.contains(key));
                self.layer_cache
                    .lock()
                    .retain(|e| e.tenant != *tenant || !e.keys.contains(key));
                self.tips.lock().remove(&(*tenant, *key));
                self.queries.lock().retain(|(id, _)| *id != (*tenant, *key));
            }
            StoreEvent::Cleared { tenant } => {
                self.built.lock().retain(|p| p.tenant != *tenant);
                self.layer_cache.lock().retain(|e| e.tenant != *tenant);
                self.tips.lock().retain(|(t, _), _| t != tenant);
                self.queries.lock().retain(|((t, _), _)| t != tenant);
            }
        }
    }

    /// Prompts indexed now and their estimated memory in bytes.
    pub fn usage(&self) -> (usize, u64) {
        let built = self.built.lock();
        (built.len(), built.iter().map(|p| p.bytes).sum())
    }

    /// Prompts indexed now: (tenant, chunk keys, tokens), least recently used first.
    pub fn indexed(&self) -> Vec<(u64, Vec<ChunkKey>, u64)> {
        self.built
            .lock()
            .iter()
            .map(|p| (p.tenant, p.keys.clone(), p.tokens))
            .collect()
    }

    /// Which index answers for exactly these chunks of `tenant`, if one is built.
    pub fn index_kind(&self, tenant: u64, keys: &[ChunkKey]) -> Option<IndexUsed> {
        self.built
            .lock()
            .iter()
            .find(|p| p.tenant == tenant && p.keys == keys)
            .map(|p| p.graphs.kind())
    }

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
    ) -> Result<usize, ApiError> {
        let info = store
            .info(tenant, tip)
            .ok_or_else(|| ApiError::NotFound(format!("chunk {tip} is not stored")))?;
        let layout = self.layouts.get(info.meta.layout).ok_or_else(|| {
            ApiError::BadRequest("the prompt's layout is not registered (see `layouts`)".into())
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
            return Err(ApiError::BadRequest(format!(
                "queries must be whole [layers={layers}][heads={heads}][n][head_dim={dim}] f32 arrays ({} floats given)",
                data.len()
            )));
        }
        if !data.iter().all(|x| x.is_finite()) {
            return Err(ApiError::BadRequest("queries must be finite".into()));
        }
        let n = data.len() / per_position;
        // Held queries stay inside the retrieval memory budget; a refused upload leaves the
        // prompt's earlier queries in place.
        let new_bytes = data.len() as u64 * 4;
        if new_bytes > self.config.max_bytes {
            return Err(ApiError::Full(format!(
                "{} MiB of queries exceed retrieval_index_bytes ({} MiB)",
                new_bytes >> 20,
                self.config.max_bytes >> 20
            )));
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
    fn build(&self, store: &TieredStore, tenant: u64, keys: &[ChunkKey]) -> Result<bool, ApiError> {
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
        let per_token = layout.num_layers as u64 * layout.kv_heads as u64;
        let queries = keys.last().and_then(|tip| {
            self.queries
                .lock()
                .iter()
                .find(|(id, _)| *id == (tenant, *tip))
                .map(|(_, q)| q.clone())
        });
        let bytes = match &queries {
            Some(q) => {
                tokens * per_token * (4 * layout.head_dim as u64 + AWARE_LINK_BYTES_PER_KEY)
                    + q.bytes()
            }
            None => tokens * per_token * INDEX_BYTES_PER_KEY,
        };
        if bytes > self.config.max_bytes {
            tracing::info!(
                "prompt of {tokens} tokens not indexed: its index (~{} MiB) exceeds retrieval_index_bytes",
                bytes >> 20
            );
            return Ok(false);
        }
        let prompt = match self.read_prompt(store, tenant, keys, true) {
            Ok(p) => p,
            Err(ApiError::BadRequest(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let layers = prompt.layout.num_layers as usize;
        let kv_heads = prompt.layout.kv_heads as usize;
        let dim = prompt.layout.head_dim as usize;
        let failed =
            |e: kvtier_index::IndexError| ApiError::Internal(format!("index build failed: {e}"));
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
        let excess = built.len().saturating_sub(self.config.max_prompts.max(1));
        built.drain(..excess);
        while built.len() > 1 && built.iter().map(|p| p.bytes).sum::<u64>() > self.config.max_bytes
        {
            built.remove(0);
        }
        Ok(true)
    }

    /// Reads every chunk of a prompt (any tier); retrieval also needs separate keys per head.
    fn read_prompt(
        &self,
        store: &TieredStore,
        tenant: u64,
        keys: &[ChunkKey],
        accept_lossy: bool,
    ) -> Result<Prompt, ApiError> {
        let p = read_prompt(store, &self.layouts, tenant, keys, accept_lossy)?;
        require_mha(&p.layout)?;
        Ok(Prompt {
            layout: p.layout,
            chunks: p
                .chunks
                .into_iter()
                .map(|c| (c.meta.tokens as usize, c.bytes))
                .collect(),
            tokens: p.tokens,
            lossy: p.lossy,
        })
    }

    /// Answers one retrieve request of `tenant`. CPU and possibly disk work: call it from a
    /// blocking thread.
    pub fn retrieve(
        &self,
        store: &TieredStore,
        tenant: u64,
        req: &RetrieveRequest,
    ) -> Result<Retrieved, ApiError> {
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
            return Err(ApiError::BadRequest(format!(
                "layer {layer} is not below {layers}"
            )));
        }
        check_grouping(heads, kv_heads)?;
        if req.k == 0 || req.k > MAX_K {
            return Err(ApiError::BadRequest(format!("k must be in 1..={MAX_K}")));
        }
        let per_query = heads * dim;
        if req.queries.is_empty() || !req.queries.len().is_multiple_of(per_query) {
            return Err(ApiError::BadRequest(format!(
                "queries must be whole [heads={heads}][head_dim={dim}] f32 vectors ({} floats given)",
                req.queries.len()
            )));
        }
        if !req.queries.iter().all(|x| x.is_finite()) {
            return Err(ApiError::BadRequest("queries must be finite".into()));
        }
        let k = (req.k as usize).min(prompt.tokens);
        let index = self.lookup_index(tenant, &req.keys);
        let group = heads / kv_heads;
        // Exact scans need the layer's keys per KV head as f32: converted on first use and kept
        // in a small cache, since decode steps ask for the same prompt and layer again and again.
        let mut exact_keys: Option<Arc<Vec<Vec<f32>>>> = None;
        let mut exact = |kvh: usize, q: &[f32]| -> Result<Vec<u32>, ApiError> {
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
            let view =
                MatrixView::new(&keys[kvh], dim).map_err(|e| ApiError::Internal(e.to_string()))?;
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
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?
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

    /// The built index for exactly these chunks, marked most recently used.
    fn lookup_index(&self, tenant: u64, keys: &[ChunkKey]) -> Option<Arc<PromptIndex>> {
        let mut built = self.built.lock();
        let i = built
            .iter()
            .position(|p| p.tenant == tenant && p.keys == keys)?;
        let p = built.remove(i);
        built.push(p.clone());
        Some(p)
    }
}

/// Retrieval needs separate keys per head.
fn require_mha(layout: &ModelLayout) -> Result<(), ApiError> {
    if layout.attention != AttentionKind::Mha {
        return Err(ApiError::BadRequest(
            "retrieval needs separate keys per head (MHA/GQA layouts)".into(),
        ));
    }
    Ok(())
}

/// Query heads must split evenly over the KV heads (GQA groups).
fn check_grouping(heads: usize, kv_heads: usize) -> Result<(), ApiError> {
    if heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(ApiError::BadRequest(format!(
            "{heads} query heads cannot be grouped over {kv_heads} KV heads"
        )));
    }
    Ok(())
}

/// The chunk keys of the prompt ending at `tip`, first chunk first, by parent links; `None`
/// when a link is missing or the depths do not count down to 0.
pub(crate) fn chain(store: &TieredStore, tenant: u64, tip: ChunkKey) -> Option<Vec<ChunkKey>> {
    let mut keys = vec![tip];
    let mut info = store.info(tenant, tip)?;
    while let Some(parent) = info.meta.parent {
        if keys.len() >= MAX_PROMPT_CHUNKS {
            return None;
        }
        let p = store.info(tenant, parent)?;
        if p.meta.depth + 1 != info.meta.depth {
            return None;
        }
        keys.push(parent);
        info = p;
    }
    (info.meta.depth == 0).then(|| {
        keys.reverse();
        keys
    })
}

/// Starts the background builder: every `settle / 2` it builds the settled prompts, until the
/// store is gone.
pub fn spawn_builder(retrieval: Arc<Retrieval>, store: Weak<TieredStore>) -> std::io::Result<()> {
    if retrieval.config.min_tokens == 0 {
        return Ok(());
    }
    let tick = (retrieval.config.settle / 2).max(Duration::from_millis(20));
    crate::service::spawn_periodic("kvtier-index-builder", tick, store, move |store| {
        retrieval.build_settled(store);
    })
}

#[cfg(test)]
mod tests;
