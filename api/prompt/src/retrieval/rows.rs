//! A prompt read back for retrieval: its chunks' bytes and where each (layer, token, KV head)
//! K and V row sits in them, with the keys of one head converted to f32.

use bytes::Bytes;

use kvtier_cache::chunk::{PayloadLayout, to_f32};
use kvtier_cache::{ChunkKey, ModelLayout, TieredStore};

use super::{Retrieval, require_mha};
use crate::error::Result;
use crate::read::read_prompt;

/// A prompt's chunks as read from the store.
pub(super) struct Prompt {
    pub(super) layout: ModelLayout,
    /// `(tokens, raw bytes)` per chunk.
    pub(super) chunks: Vec<(usize, Bytes)>,
    pub(super) tokens: usize,
    /// Whether any chunk was read from a lossy copy.
    pub(super) lossy: bool,
}

impl Prompt {
    pub(super) fn row_bytes(&self) -> usize {
        self.layout.head_dim as usize * self.layout.dtype.size()
    }

    /// Where each row of chunk `i` sits (the store checked every chunk's length on put).
    fn chunk_layout(&self, n: usize) -> PayloadLayout {
        PayloadLayout::new(&self.layout, n)
    }

    /// `[tokens × head_dim]` f32 keys of one (layer, KV head).
    pub(super) fn keys_f32(&self, layer: usize, kv_head: usize) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut raw = Vec::with_capacity(self.tokens * rb);
        for (n, bytes) in &self.chunks {
            let pl = self.chunk_layout(*n);
            for t in 0..*n {
                raw.extend_from_slice(&bytes[pl.k_row(layer, t, kv_head)]);
            }
        }
        to_f32(self.layout.dtype, &raw)
    }

    /// Appends the K and V rows of prompt position `pos`.
    pub(super) fn push_rows(
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
                let pl = self.chunk_layout(*n);
                k.extend_from_slice(&bytes[pl.k_row(layer, p, kv_head)]);
                v.extend_from_slice(&bytes[pl.v_row(layer, p, kv_head)]);
                return;
            }
            p -= n;
        }
    }
}

impl Retrieval {
    /// Reads every chunk of a prompt (any tier); retrieval also needs separate keys per head.
    pub(super) fn read_prompt(
        &self,
        store: &TieredStore,
        tenant: u64,
        keys: &[ChunkKey],
        accept_lossy: bool,
    ) -> Result<Prompt> {
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
}
