//! A stored prompt read back: its chunk chain walked by parent links, and its chunks read raw
//! from whichever tier holds them. What RETRIEVE, budgets and the squeezer all start from.

use bytes::Bytes;
use kvtier_cache::tier::CODEC_RAW;
use kvtier_cache::{ChunkKey, ChunkMeta, GetOutcome, ModelLayout, TieredStore};

use crate::error::{PromptError, Result};
use crate::layouts::Layouts;

/// Longest prompt (in chunks) one request or background job walks.
pub const MAX_PROMPT_CHUNKS: usize = 4096;

/// One chunk of a prompt as read from the store (decoded, raw).
pub struct StoredChunk {
    pub key: ChunkKey,
    pub meta: ChunkMeta,
    pub bytes: Bytes,
}

/// A prompt's chunks, first first, all raw chunks of one registered layout.
pub struct StoredPrompt {
    pub layout: ModelLayout,
    pub chunks: Vec<StoredChunk>,
    pub tokens: usize,
    /// Whether any chunk came from a lossy copy (only when the caller accepted lossy data).
    pub lossy: bool,
}

/// Reads every chunk of a prompt of `tenant` from whichever tier holds it, and checks that they
/// are raw chunks of one registered layout. Store reads may hit disk: call from a blocking
/// thread.
pub fn read_prompt(
    store: &TieredStore,
    layouts: &Layouts,
    tenant: u64,
    keys: &[ChunkKey],
    accept_lossy: bool,
) -> Result<StoredPrompt> {
    if keys.is_empty() || keys.len() > MAX_PROMPT_CHUNKS {
        return Err(PromptError::Invalid(format!(
            "a prompt has 1..={MAX_PROMPT_CHUNKS} chunks (got {})",
            keys.len()
        )));
    }
    let mut layout: Option<&ModelLayout> = None;
    let mut chunks = Vec::with_capacity(keys.len());
    for key in keys {
        let read = match store.get(tenant, *key, accept_lossy)? {
            GetOutcome::Hit(r) => r,
            GetOutcome::Miss => return Err(PromptError::NotStored(*key)),
            GetOutcome::FidelityRejected(fidelity) => {
                return Err(PromptError::OnlyLossy {
                    key: *key,
                    fidelity,
                });
            }
        };
        let l = layouts
            .get(read.meta.layout)
            .ok_or(PromptError::UnknownLayout {
                key: *key,
                layout: read.meta.layout,
            })?;
        if layout.is_some_and(|first| first != l) {
            return Err(PromptError::Invalid(format!(
                "chunk {key} has another layout than the prompt's first chunk"
            )));
        }
        let n = read.meta.tokens as usize;
        if read.meta.codec != CODEC_RAW || read.bytes.len() != l.chunk_bytes(n) {
            return Err(PromptError::Invalid(format!(
                "chunk {key} is not a raw chunk of its layout (codec {}, {} bytes for {n} tokens)",
                read.meta.codec,
                read.bytes.len()
            )));
        }
        layout = Some(l);
        chunks.push(StoredChunk {
            key: *key,
            meta: read.meta,
            bytes: read.bytes,
        });
    }
    Ok(StoredPrompt {
        layout: layout.expect("at least one chunk").clone(),
        tokens: chunks.iter().map(|c| c.meta.tokens as usize).sum(),
        lossy: chunks.iter().any(|c| !c.meta.fidelity.is_exact()),
        chunks,
    })
}

/// The chunk keys of the prompt ending at `tip`, first chunk first, by parent links; `None`
/// when a link is missing or the depths do not count down to 0.
pub fn chain(store: &TieredStore, tenant: u64, tip: ChunkKey) -> Option<Vec<ChunkKey>> {
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
