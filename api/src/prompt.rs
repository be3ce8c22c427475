//! The service's layout registry, and a stored prompt read back chunk by chunk: what RETRIEVE,
//! budgets and the squeezer all start from.

use std::collections::HashMap;

use bytes::Bytes;
use kvtier_cache::tier::CODEC_RAW;
use kvtier_cache::{ChunkKey, ChunkMeta, GetOutcome, ModelLayout, TieredStore};

use crate::error::ApiError;

/// Longest prompt (in chunks) one request or background job walks.
pub const MAX_PROMPT_CHUNKS: usize = 4096;

/// The layouts every kvtier knows, by the names the CLI accepts.
pub fn builtin_layouts() -> [(&'static str, ModelLayout); 2] {
    [
        ("llama-3.1-8b", ModelLayout::llama31_8b()),
        ("smollm2-135m", ModelLayout::smollm2_135m()),
    ]
}

/// Layouts the service knows by fingerprint (the store itself only sees fingerprints).
#[derive(Debug, Clone, Default)]
pub struct Layouts(HashMap<u64, ModelLayout>);

impl Layouts {
    pub fn new(layouts: impl IntoIterator<Item = ModelLayout>) -> Self {
        Layouts(layouts.into_iter().map(|l| (l.fingerprint(), l)).collect())
    }

    pub fn get(&self, fingerprint: u64) -> Option<&ModelLayout> {
        self.0.get(&fingerprint)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelLayout> {
        self.0.values()
    }
}

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
) -> Result<StoredPrompt, ApiError> {
    if keys.is_empty() || keys.len() > MAX_PROMPT_CHUNKS {
        return Err(ApiError::BadRequest(format!(
            "a prompt has 1..={MAX_PROMPT_CHUNKS} chunks (got {})",
            keys.len()
        )));
    }
    let mut layout: Option<&ModelLayout> = None;
    let mut chunks = Vec::with_capacity(keys.len());
    for key in keys {
        let read = match store.get(tenant, *key, accept_lossy)? {
            GetOutcome::Hit(r) => r,
            GetOutcome::Miss => {
                return Err(ApiError::NotFound(format!("chunk {key} is not stored")));
            }
            GetOutcome::FidelityRejected(f) => {
                return Err(ApiError::BadRequest(format!(
                    "chunk {key} is only held lossy ({f}) and this request needs exact data"
                )));
            }
        };
        let l = layouts.get(read.meta.layout).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "layout {:016x} of chunk {key} is not registered (add it to `layouts`)",
                read.meta.layout
            ))
        })?;
        if layout.is_some_and(|first| first != l) {
            return Err(ApiError::BadRequest(format!(
                "chunk {key} has another layout than the prompt's first chunk"
            )));
        }
        let n = read.meta.tokens as usize;
        if read.meta.codec != CODEC_RAW || read.bytes.len() != l.chunk_bytes(n) {
            return Err(ApiError::BadRequest(format!(
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
