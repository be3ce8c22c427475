//! What one token's KV cache looks like, and where each layer sits inside a chunk payload.
//!
//! A chunk payload is laid out layer-major so that one layer, or a run of layers, is one
//! contiguous byte range:
//! - `Mha`: `[layer][K|V][token][kv_head][head_dim]`
//! - `Mla`: `[layer][token][latent_dim + rope_dim]`
//!
//! Rows inside a layer are found with [`crate::chunk::PayloadLayout`].

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{CacheError, Result};

/// Version of the key-hashing and fingerprint scheme. Bump it when either changes so that old
/// chunks can never be confused with new ones.
pub const HASH_VERSION: u32 = 1;

/// Element type of the cached tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dtype {
    F16,
    Bf16,
    F32,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits (OCP FP8 E4M3).
    Fp8E4m3,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8E4m3 => 1,
        }
    }

    /// Stable numeric tag used in fingerprints and on-disk records.
    pub const fn tag(self) -> u8 {
        match self {
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
            Dtype::F32 => 3,
            Dtype::Fp8E4m3 => 4,
        }
    }

    /// The dtype of a [`Dtype::tag`]; `None` for tags this build does not know.
    pub const fn from_tag(tag: u8) -> Option<Dtype> {
        match tag {
            1 => Some(Dtype::F16),
            2 => Some(Dtype::Bf16),
            3 => Some(Dtype::F32),
            4 => Some(Dtype::Fp8E4m3),
            _ => None,
        }
    }

    /// Every dtype, in tag order.
    pub const ALL: [Dtype; 4] = [Dtype::F16, Dtype::Bf16, Dtype::F32, Dtype::Fp8E4m3];

    /// Parses the names used in configuration and on the command line.
    pub fn parse(name: &str) -> Option<Dtype> {
        match name.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" => Some(Dtype::F16),
            "bf16" | "bfloat16" => Some(Dtype::Bf16),
            "f32" | "fp32" | "float32" => Some(Dtype::F32),
            "fp8" | "fp8-e4m3" | "e4m3" => Some(Dtype::Fp8E4m3),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::Fp8E4m3 => "fp8-e4m3",
        })
    }
}

/// The attention variant, which decides what is cached per token and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AttentionKind {
    /// Separate K and V per KV head (covers MHA and GQA).
    Mha,
    /// One compressed latent vector (plus a decoupled RoPE part) per token and layer, as in
    /// DeepSeek-V2/V3 (latent 512, rope 64).
    Mla { latent_dim: u32, rope_dim: u32 },
}

/// The shape of one token's cache for one model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelLayout {
    /// Model identifier, folded into the fingerprint (for example `HuggingFaceTB/SmolLM2-135M`).
    pub model_id: String,
    pub num_layers: u32,
    /// KV heads per layer (ignored for MLA).
    pub kv_heads: u32,
    /// Dimension of one head (ignored for MLA).
    pub head_dim: u32,
    pub dtype: Dtype,
    pub attention: AttentionKind,
}

/// Upper bounds that keep every size computation far away from overflow.
const MAX_LAYERS: u32 = 1024;
const MAX_HEADS: u32 = 1024;
const MAX_DIM: u32 = 16384;

impl ModelLayout {
    /// A multi-head (or grouped-query) attention layout.
    pub fn mha(
        model_id: &str,
        num_layers: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: Dtype,
    ) -> Self {
        ModelLayout {
            model_id: model_id.to_string(),
            num_layers,
            kv_heads,
            head_dim,
            dtype,
            attention: AttentionKind::Mha,
        }
    }

    /// A multi-head latent attention layout.
    pub fn mla(
        model_id: &str,
        num_layers: u32,
        latent_dim: u32,
        rope_dim: u32,
        dtype: Dtype,
    ) -> Self {
        ModelLayout {
            model_id: model_id.to_string(),
            num_layers,
            kv_heads: 1,
            head_dim: latent_dim + rope_dim,
            dtype,
            attention: AttentionKind::Mla {
                latent_dim,
                rope_dim,
            },
        }
    }

    /// Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, bf16.
    pub fn llama31_8b() -> Self {
        Self::mha("meta-llama/Llama-3.1-8B", 32, 8, 128, Dtype::Bf16)
    }

    /// SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, f16.
    pub fn smollm2_135m() -> Self {
        Self::mha("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 3, 64, Dtype::F16)
    }

    /// Checks that every dimension is non-zero and within bounds.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(CacheError::InvalidLayout(what.to_string()));
        if self.num_layers == 0 || self.num_layers > MAX_LAYERS {
            return bad("num_layers must be in 1..=1024");
        }
        if self.model_id.is_empty() || self.model_id.len() > 256 {
            return bad("model_id must be 1..=256 bytes");
        }
        match self.attention {
            AttentionKind::Mha => {
                if self.kv_heads == 0 || self.kv_heads > MAX_HEADS {
                    return bad("kv_heads must be in 1..=1024");
                }
                if self.head_dim == 0 || self.head_dim > MAX_DIM {
                    return bad("head_dim must be in 1..=16384");
                }
            }
            AttentionKind::Mla {
                latent_dim,
                rope_dim,
            } => {
                if latent_dim == 0 || latent_dim + rope_dim > MAX_DIM {
                    return bad("latent_dim + rope_dim must be in 1..=16384");
                }
            }
        }
        Ok(())
    }

    /// Elements cached per token in one layer (K and V together for MHA).
    pub fn elems_per_token_layer(&self) -> usize {
        match self.attention {
            AttentionKind::Mha => 2 * self.kv_heads as usize * self.head_dim as usize,
            AttentionKind::Mla {
                latent_dim,
                rope_dim,
            } => (latent_dim + rope_dim) as usize,
        }
    }

    /// Bytes cached per token across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers as usize * self.elems_per_token_layer() * self.dtype.size()
    }

    /// Bytes of one layer of a chunk of `tokens` tokens.
    pub fn layer_bytes(&self, tokens: usize) -> usize {
        tokens * self.elems_per_token_layer() * self.dtype.size()
    }

    /// Bytes of a whole raw chunk of `tokens` tokens.
    pub fn chunk_bytes(&self, tokens: usize) -> usize {
        self.num_layers as usize * self.layer_bytes(tokens)
    }

    /// Byte range of layers `first..first+count` inside a raw chunk of `tokens` tokens.
    pub fn layer_range(
        &self,
        first: u32,
        count: u32,
        tokens: usize,
    ) -> Option<std::ops::Range<usize>> {
        let end = first.checked_add(count)?;
        if end > self.num_layers {
            return None;
        }
        let lb = self.layer_bytes(tokens);
        Some(first as usize * lb..end as usize * lb)
    }

    /// Stable 64-bit fingerprint of the model id, the layout, the dtype and [`HASH_VERSION`].
    /// Chunks with different fingerprints can never share keys.
    pub fn fingerprint(&self) -> u64 {
        let mut buf = Vec::with_capacity(64 + self.model_id.len());
        buf.extend_from_slice(b"kvtier-layout");
        buf.extend_from_slice(&HASH_VERSION.to_le_bytes());
        buf.extend_from_slice(&(self.model_id.len() as u32).to_le_bytes());
        buf.extend_from_slice(self.model_id.as_bytes());
        buf.extend_from_slice(&self.num_layers.to_le_bytes());
        buf.push(self.dtype.tag());
        match self.attention {
            AttentionKind::Mha => {
                buf.push(1);
                buf.extend_from_slice(&self.kv_heads.to_le_bytes());
                buf.extend_from_slice(&self.head_dim.to_le_bytes());
            }
            AttentionKind::Mla {
                latent_dim,
                rope_dim,
            } => {
                buf.push(2);
                buf.extend_from_slice(&latent_dim.to_le_bytes());
                buf.extend_from_slice(&rope_dim.to_le_bytes());
            }
        }
        xxh3_64(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_chunk_is_32_mib() {
        let l = ModelLayout::llama31_8b();
        assert_eq!(l.chunk_bytes(256), 32 << 20);
        assert_eq!(l.layer_range(1, 2, 256), Some(1 << 20..3 << 20));
        assert_eq!(l.layer_range(31, 2, 256), None);
    }

    #[test]
    fn smollm2_chunk_size() {
        let l = ModelLayout::smollm2_135m();
        assert_eq!(l.chunk_bytes(256), 30 * 2 * 256 * 3 * 64 * 2);
    }

    #[test]
    fn mla_layout() {
        let l = ModelLayout::mla("deepseek-v3", 61, 512, 64, Dtype::Bf16);
        assert_eq!(l.elems_per_token_layer(), 576);
        assert_eq!(l.bytes_per_token(), 61 * 576 * 2);
        l.validate().unwrap();
    }

    #[test]
    fn fingerprint_separates_layouts() {
        let a = ModelLayout::llama31_8b();
        let mut b = a.clone();
        b.dtype = Dtype::F16;
        let mut c = a.clone();
        c.model_id.push('x');
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint(), ModelLayout::llama31_8b().fingerprint());
    }

    #[test]
    fn dtype_tags_round_trip_and_unknown_tags_are_refused() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_tag(d.tag()), Some(d));
        }
        for t in [0u8, 5, 0xff] {
            assert_eq!(Dtype::from_tag(t), None, "tag {t}");
        }
    }

    #[test]
    fn validate_rejects_zero_and_huge() {
        let mut l = ModelLayout::llama31_8b();
        l.kv_heads = 0;
        assert!(matches!(l.validate(), Err(CacheError::InvalidLayout(_))));
        l.kv_heads = 8;
        l.num_layers = 5000;
        assert!(l.validate().is_err());
    }
}
