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
//!
//! Files by concern: this one holds the registry of built indexes and its lifecycle (tips,
//! removal, LRU); [`memory`] the memory estimates that keep indexes and uploaded queries inside
//! `max_bytes`; [`queries`] the uploaded queries; [`build`] the background builder; [`search`]
//! the retrieve itself; [`rows`] the K/V rows of a prompt read back for retrieval.

mod build;
pub mod memory;
mod queries;
mod rows;
mod search;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use kvtier_cache::{AttentionKind, ChunkKey, ModelLayout, StoreEvent};

use crate::error::{PromptError, Result};
use crate::layouts::Layouts;

pub use build::spawn_builder;
pub use memory::{AWARE_LINK_BYTES_PER_KEY, INDEX_BYTES_PER_KEY};
pub use search::{MAX_K, RetrieveRequest, Retrieved};

use build::Graphs;
use queries::QueryEntry;
use search::LayerKeys;

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

/// Graphs of one prompt: `[layer][kv_head]`.
struct PromptIndex {
    tenant: u64,
    keys: Vec<ChunkKey>,
    tokens: u64,
    /// Estimated resident bytes.
    bytes: u64,
    graphs: Graphs,
}

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
fn require_mha(layout: &ModelLayout) -> Result<()> {
    if layout.attention != AttentionKind::Mha {
        return Err(PromptError::Invalid(
            "retrieval needs separate keys per head (MHA/GQA layouts)".into(),
        ));
    }
    Ok(())
}

/// Query heads must split evenly over the KV heads (GQA groups).
fn check_grouping(heads: usize, kv_heads: usize) -> Result<()> {
    if heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(PromptError::Invalid(format!(
            "{heads} query heads cannot be grouped over {kv_heads} KV heads"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
