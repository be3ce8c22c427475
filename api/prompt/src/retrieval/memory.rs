//! Memory estimates of retrieval indexes and uploaded queries: what keeps them inside
//! `RetrievalConfig::max_bytes`.

use std::sync::Arc;

use kvtier_cache::ModelLayout;

use super::PromptIndex;
use super::queries::PromptQueries;

/// Resident bytes one indexed key costs (HNSW graph with M = 24 plus the f32 copy it keeps for
/// exact fallbacks), as measured by `kvtier-bench retrieve` (2,232 B on SmolLM2 keys, d = 64).
/// Used to keep the indexes inside `max_bytes`.
pub const INDEX_BYTES_PER_KEY: u64 = 2300;
/// Resident bytes of one key in an attention-aware index besides its f32 copy: at most 12
/// links of 4 bytes (`AwareConfig`'s default degree), an offset and slack.
pub const AWARE_LINK_BYTES_PER_KEY: u64 = 64;

/// Estimated resident bytes of the index of a prompt of `tokens` tokens: HNSW graphs, or the
/// attention-aware graphs built from `queries` (which stay held with it).
pub(super) fn index_bytes(
    layout: &ModelLayout,
    tokens: u64,
    queries: Option<&PromptQueries>,
) -> u64 {
    let per_token = layout.num_layers as u64 * layout.kv_heads as u64;
    match queries {
        Some(q) => {
            tokens * per_token * (4 * layout.head_dim as u64 + AWARE_LINK_BYTES_PER_KEY) + q.bytes()
        }
        None => tokens * per_token * INDEX_BYTES_PER_KEY,
    }
}

/// Drops the least recently used indexes (first) until at most `max_prompts` remain and their
/// estimated bytes fit `max_bytes`; the newest index always stays.
pub(super) fn trim_indexes(built: &mut Vec<Arc<PromptIndex>>, max_prompts: usize, max_bytes: u64) {
    let excess = built.len().saturating_sub(max_prompts.max(1));
    built.drain(..excess);
    while built.len() > 1 && built.iter().map(|p| p.bytes).sum::<u64>() > max_bytes {
        built.remove(0);
    }
}
