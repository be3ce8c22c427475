//! A prompt read back for retrieval: its chunks' bytes and where each (layer, token, KV head)
//! K and V row sits in them, with the keys of one head converted to f32.

use bytes::Bytes;

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

    /// Byte offset of the K row of (`layer`, chunk-local token `t`, `kv_head`) in a chunk of
    /// `n` tokens; the V row is `n * kv_heads` rows later.
    fn k_offset(&self, layer: usize, n: usize, t: usize, kv_head: usize) -> usize {
        layer * self.layout.layer_bytes(n)
            + (t * self.layout.kv_heads as usize + kv_head) * self.row_bytes()
    }

    /// `[tokens × head_dim]` f32 keys of one (layer, KV head).
    pub(super) fn keys_f32(&self, layer: usize, kv_head: usize) -> Vec<f32> {
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
