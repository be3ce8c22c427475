//! The model's KV cache and its conversion to and from kvtier chunk payloads.
//!
//! The cache holds, per layer, post-RoPE keys and values as `[token][kv_head][head_dim]` f32;
//! token `i` sits at position `i` (the cache always starts at position 0). A chunk payload is the
//! layout of DESIGN.md "Chunk": `[layer][K|V][token][kv_head][head_dim]`, little-endian, in the
//! chosen dtype (located with [`PayloadLayout`]), so a prefix exported here, stored by kvtier and imported into a fresh cache
//! lets the model continue as if it had prefilled that prefix itself.

use std::ops::Range;

use anyhow::{Result, bail, ensure};
use half::{bf16, f16};
use kvtier_cache::chunk::{self, to_f32};
use kvtier_cache::{Dtype, PayloadLayout};

/// One layer's keys and values, `[token][kv_head][head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Positions attention may use, when the layer was pruned to a budget: `keep[p]` for the
    /// first `keep.len()` positions; later positions are always visible.
    pub keep: Option<Vec<bool>>,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    pub kv_heads: usize,
    pub head_dim: usize,
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> KvCache {
        KvCache {
            kv_heads,
            head_dim,
            layers: vec![LayerKv::default(); layers],
            len: 0,
        }
    }

    /// Tokens held; also the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Elements of K (or V) per token in one layer.
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// A layer's keys and values, `[len][kv_head][head_dim]`.
    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    /// Appends one layer's rows for the tokens being processed; [`KvCache::commit`] then
    /// advances `len` once every layer has them.
    pub(crate) fn push_layer(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        l.k.extend_from_slice(k);
        l.v.extend_from_slice(v);
    }

    /// Restricts attention in `layer` to the positions in `kept` among the first `len()`
    /// (tokens appended later stay visible): a budget applied to the cached prompt.
    pub fn keep_only(&mut self, layer: usize, kept: &[u32]) {
        let mut keep = vec![false; self.len];
        for &p in kept {
            if let Some(k) = keep.get_mut(p as usize) {
                *k = true;
            }
        }
        self.layers[layer].keep = Some(keep);
    }

    pub(crate) fn commit(&mut self, tokens: usize) {
        self.len += tokens;
        let want = self.len * self.row();
        debug_assert!(
            self.layers
                .iter()
                .all(|l| l.k.len() == want && l.v.len() == want)
        );
    }

    /// Drops every token from position `len` on.
    #[cfg(test)]
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let keep = len * self.row();
        for l in &mut self.layers {
            l.k.truncate(keep);
            l.v.truncate(keep);
        }
        self.len = len;
    }

    /// Rounds every stored value through `dtype`, which is what storing the cache in that dtype
    /// and loading it back does; the reference for "reuse is exact up to the storage dtype".
    #[cfg(test)]
    pub fn round_through(&mut self, dtype: Dtype) -> Result<()> {
        for l in &mut self.layers {
            for x in l.k.iter_mut().chain(l.v.iter_mut()) {
                *x = round(*x, dtype)?;
            }
        }
        Ok(())
    }

    /// Where everything sits in a chunk payload of `tokens` tokens in `dtype`.
    fn payload(&self, tokens: usize, dtype: Dtype) -> PayloadLayout {
        PayloadLayout::mha(
            self.layers.len(),
            self.kv_heads,
            self.head_dim,
            tokens,
            dtype,
        )
    }

    /// Bytes of a chunk payload of `tokens` tokens in `dtype`.
    pub fn chunk_bytes(&self, tokens: usize, dtype: Dtype) -> usize {
        self.payload(tokens, dtype).len()
    }

    /// Serialises tokens `range` as one payload `[layer][K|V][token][kv_head][head_dim]`.
    pub fn export_chunk(&self, range: Range<usize>, dtype: Dtype) -> Result<Vec<u8>> {
        ensure!(
            range.start <= range.end && range.end <= self.len,
            "range {range:?} is outside the cache (0..{})",
            self.len
        );
        check_dtype(dtype)?;
        let row = self.row();
        let mut out = Vec::with_capacity(self.chunk_bytes(range.len(), dtype));
        for l in &self.layers {
            for src in [&l.k, &l.v] {
                for &x in &src[range.start * row..range.end * row] {
                    write(&mut out, x, dtype);
                }
            }
        }
        Ok(out)
    }

    /// Appends a payload made by [`KvCache::export_chunk`] for `tokens` tokens that started at
    /// position `first_pos`. Keys carry RoPE for their original positions, so a chunk may only
    /// be appended where it came from: `first_pos` must equal the cache's length.
    pub fn import_chunk(
        &mut self,
        payload: &[u8],
        first_pos: usize,
        tokens: usize,
        dtype: Dtype,
    ) -> Result<()> {
        ensure!(
            first_pos == self.len,
            "chunk starts at position {first_pos} but the cache holds {} tokens; KV with RoPE cannot be moved",
            self.len
        );
        check_dtype(dtype)?;
        let want = self.chunk_bytes(tokens, dtype);
        ensure!(
            payload.len() == want,
            "chunk payload is {} bytes, expected {want} for {tokens} tokens",
            payload.len()
        );
        let geometry = self.payload(tokens, dtype);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.k.extend(to_f32(dtype, &payload[geometry.plane_range(i, chunk::K)]));
            l.v.extend(to_f32(dtype, &payload[geometry.plane_range(i, chunk::V)]));
        }
        self.len += tokens;
        Ok(())
    }
}

fn check_dtype(dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::F16 | Dtype::Bf16 | Dtype::F32 => Ok(()),
        other => bail!(
            "chunk dtype {other:?} is not supported by the reference model (use f16, bf16 or f32)"
        ),
    }
}

#[cfg(test)]
fn round(x: f32, dtype: Dtype) -> Result<f32> {
    Ok(match dtype {
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::Bf16 => bf16::from_f32(x).to_f32(),
        Dtype::F32 => x,
        other => bail!("cannot round through {other:?}"),
    })
}

fn write(out: &mut Vec<u8>, x: f32, dtype: Dtype) {
    match dtype {
        Dtype::F16 => out.extend(f16::from_f32(x).to_le_bytes()),
        Dtype::Bf16 => out.extend(bf16::from_f32(x).to_le_bytes()),
        _ => out.extend(x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(tokens: usize) -> KvCache {
        let mut c = KvCache::new(2, 2, 4);
        for layer in 0..2 {
            let k: Vec<f32> = (0..tokens * 8).map(|i| (layer * 1000 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            c.push_layer(layer, &k, &v);
        }
        c.commit(tokens);
        c
    }

    #[test]
    fn export_layout_is_layer_kv_token_head_dim() {
        let c = filled(3);
        let p = c.export_chunk(1..3, Dtype::F32).unwrap();
        assert_eq!(p.len(), c.chunk_bytes(2, Dtype::F32));
        let at = |i: usize| f32::from_le_bytes(p[i * 4..i * 4 + 4].try_into().unwrap());
        // layer 0, K, token 1 (first of the range), head 0, dim 0
        assert_eq!(at(0), 8.0);
        // layer 0, V starts after 2 tokens * 8 elements
        assert_eq!(at(16), -8.0);
        // layer 1, K
        assert_eq!(at(32), 1008.0);
    }

    #[test]
    fn import_appends_and_refuses_wrong_position_or_size() {
        let c = filled(4);
        let mut d = KvCache::new(2, 2, 4);
        d.import_chunk(&c.export_chunk(0..2, Dtype::F16).unwrap(), 0, 2, Dtype::F16)
            .unwrap();
        assert!(
            d.import_chunk(&c.export_chunk(3..4, Dtype::F16).unwrap(), 3, 1, Dtype::F16)
                .is_err()
        );
        assert!(d.import_chunk(&[0u8; 10], 2, 1, Dtype::F16).is_err());
        d.import_chunk(&c.export_chunk(2..4, Dtype::F16).unwrap(), 2, 2, Dtype::F16)
            .unwrap();
        assert_eq!(d.len(), 4);
        // Small integers are exact in f16.
        assert_eq!(d.layer(1).k, c.layer(1).k);
        assert_eq!(d.layer(0).v, c.layer(0).v);
        d.truncate(1);
        assert_eq!(d.layer(0).k.len(), 8);
    }
}
