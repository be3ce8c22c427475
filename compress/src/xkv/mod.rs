//! xKV: cross-layer SVD of the KV cache (Chang et al. 2025), with a basis shared by a span of
//! chunks.
//!
//! Adjacent layers' keys (and values) share a dominant subspace. For a group of `G` adjacent
//! layers the pre-RoPE keys are laid side by side as a `[tokens x (G * kv_heads * head_dim)]`
//! matrix `A`; its top-`k` right singular vectors `W` (columns split per layer: one right factor
//! per layer) form the basis, and a chunk stores only its token-side rows `C = (A - mean) W`
//! (`[tokens x k]`), from which `A ~ C W^T + mean`. Values are treated the same way, without RoPE.
//!
//! The basis is fitted once over a span of consecutive chunks of one prompt
//! ([`XkvFit::new`], [`XkvBasis::fit`]), stored once as its own checksummed record with a
//! content-derived id, and every chunk names that id. Centering by the column mean is an addition
//! to xKV: keys carry large per-channel offsets that would otherwise spend a singular vector.
//!
//! Right singular vectors come from the eigen-decomposition of the f64 Gram matrix `AᵀA` (faer's
//! self-adjoint solver): for `tokens >> columns` this is several times cheaper than a thin SVD
//! of `A`, and in f64 it resolves singular values down to ~1e-8 of the largest, far below the f16
//! noise floor. FIELD-NOTES' warning about faer's f32 SVD is why nothing here runs in f32 until
//! the basis is fixed; tests check reconstruction error, not just orthogonality.

mod chunk;
mod fit;
mod rope;

use kvtier_cache::Dtype;

pub use chunk::{chunk_fidelity, xkv_decode, xkv_encode};
pub use fit::XkvFit;
pub use rope::RopeTable;

use crate::codec::CODEC_XKV_BASIS;
use crate::container::{self, ParamWriter, Reader};
use crate::error::{CompressError, Result};
use crate::shape::{from_f32, to_f32};

/// How many singular vectors each group keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// Choose the rank so that a chunk (plus its share of the basis) is this many times smaller
    /// than raw, per group.
    Ratio(f32),
    /// Smallest rank keeping this fraction (0..=1) of the centered energy.
    Energy(f32),
    /// This rank, capped at the matrix width.
    Fixed(usize),
}

/// xKV parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XkvParams {
    /// Adjacent layers per group (1 = plain per-layer SVD). xKV uses 4.
    pub group_layers: usize,
    pub rank: RankRule,
    /// false keeps values uncompressed and compresses keys only (as ShadowKV does).
    pub compress_values: bool,
}

impl Default for XkvParams {
    fn default() -> Self {
        XkvParams {
            group_layers: 4,
            rank: RankRule::Ratio(4.0),
            compress_values: true,
        }
    }
}

/// Default number of chunks one basis is fitted over.
pub const DEFAULT_SPAN_CHUNKS: usize = 16;

/// Which half of a layer a basis part covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    Key,
    Value,
}

/// The basis of one group of layers for keys or values.
#[derive(Debug, Clone, PartialEq)]
pub struct BasisPart {
    pub first_layer: usize,
    pub layers: usize,
    pub kind: KvKind,
    /// Column means (`layers * kv_heads * head_dim`).
    pub mean: Vec<f32>,
    /// Right factor, row-major `[columns x rank]`; rows `l*row..(l+1)*row` are layer `l`'s
    /// factor. Stored as f16 (orthonormal columns are well scaled) and held here already rounded,
    /// so encoder and decoder use bit-identical factors.
    pub right: Vec<f32>,
    pub rank: usize,
}

impl BasisPart {
    pub fn columns(&self) -> usize {
        self.mean.len()
    }
}

/// A fitted xKV basis: everything a chunk needs besides its own token-side rows.
#[derive(Debug, Clone, PartialEq)]
pub struct XkvBasis {
    /// Content-derived id (two CRC32Cs of the serialised basis); chunks refer to it.
    pub id: u64,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: Dtype,
    pub rope_base: f64,
    pub params: XkvParams,
    pub parts: Vec<BasisPart>,
}

impl XkvBasis {
    /// Fits a basis over `chunks` (`(first token position, raw payload)`, consecutive chunks of
    /// one prompt) of `layout`, whose keys are post-RoPE with base `rope_base`.
    pub fn fit(
        layout: &kvtier_cache::ModelLayout,
        rope_base: f64,
        chunks: &[(u64, &[u8])],
        params: XkvParams,
    ) -> Result<XkvBasis> {
        XkvFit::new(
            layout,
            rope_base,
            chunks,
            params.group_layers,
            params.compress_values,
        )?
        .basis(params.rank)
    }

    /// Bytes of the serialised basis (what a store keeps once per span).
    pub fn encoded_len(&self) -> usize {
        self.to_bytes().len()
    }

    fn header(&self) -> Vec<u8> {
        ParamWriter::default()
            .u32(self.layers as u32)
            .u32(self.kv_heads as u32)
            .u32(self.head_dim as u32)
            .u8(self.dtype.tag())
            .f64(self.rope_base)
            .u32(self.params.group_layers as u32)
            .u8(self.params.compress_values as u8)
            .u32(self.parts.len() as u32)
            .0
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for p in &self.parts {
            b.extend_from_slice(&(p.first_layer as u32).to_le_bytes());
            b.extend_from_slice(&(p.layers as u32).to_le_bytes());
            b.push(matches!(p.kind, KvKind::Value) as u8);
            b.extend_from_slice(&(p.rank as u32).to_le_bytes());
            p.mean
                .iter()
                .for_each(|m| b.extend_from_slice(&m.to_le_bytes()));
            from_f32(Dtype::F16, &p.right, &mut b);
        }
        b
    }

    /// The id a basis with this content gets.
    fn content_id(header: &[u8], body: &[u8]) -> u64 {
        let a = crc32c::crc32c_append(crc32c::crc32c(header), body);
        let b = crc32c::crc32c_append(crc32c::crc32c_append(0x9e37_79b9, body), header);
        (a as u64) << 32 | b as u64
    }

    pub(crate) fn seal_id(mut self) -> Self {
        self.id = Self::content_id(&self.header(), &self.body());
        self
    }

    /// Serialises the basis into a checksummed container (codec [`CODEC_XKV_BASIS`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.body();
        let mut out = container::begin(CODEC_XKV_BASIS, &self.header(), body.len());
        out.extend_from_slice(&body);
        container::finish(out, 0)
    }

    /// Reads a basis written by [`XkvBasis::to_bytes`], refusing corrupt or inconsistent ones.
    pub fn from_bytes(bytes: &[u8]) -> Result<XkvBasis> {
        let c = container::parse(bytes)?;
        if c.codec != CODEC_XKV_BASIS {
            return Err(CompressError::CodecMismatch {
                expected: CODEC_XKV_BASIS,
                found: c.codec,
            });
        }
        let mut h = Reader::new(c.params);
        let (layers, kv_heads, head_dim) =
            (h.u32()? as usize, h.u32()? as usize, h.u32()? as usize);
        let tag = h.u8()?;
        let dtype = Dtype::from_tag(tag)
            .filter(|d| *d != Dtype::Fp8E4m3)
            .ok_or_else(|| CompressError::InvalidParams(format!("dtype tag {tag} in basis")))?;
        let rope_base = h.f64()?;
        let group_layers = h.u32()? as usize;
        let compress_values = h.u8()? != 0;
        let n_parts = h.u32()? as usize;
        h.done()?;
        let row = kv_heads * head_dim;
        if !(1..=1024).contains(&layers) || !(1..=1 << 16).contains(&row) || n_parts > 2 * layers {
            return Err(CompressError::InvalidParams(
                "implausible basis shape".into(),
            ));
        }
        let mut r = Reader::new(c.body);
        let mut parts = Vec::with_capacity(n_parts);
        for _ in 0..n_parts {
            let (first_layer, n_layers) = (r.u32()? as usize, r.u32()? as usize);
            let kind = if r.u8()? == 0 {
                KvKind::Key
            } else {
                KvKind::Value
            };
            let rank = r.u32()? as usize;
            let cols = n_layers * row;
            if n_layers == 0 || first_layer + n_layers > layers || rank == 0 || rank > cols {
                return Err(CompressError::InvalidParams(
                    "basis part out of range".into(),
                ));
            }
            let mean = to_f32(Dtype::F32, r.take(cols * 4)?);
            let right = to_f32(Dtype::F16, r.take(cols * rank * 2)?);
            parts.push(BasisPart {
                first_layer,
                layers: n_layers,
                kind,
                mean,
                right,
                rank,
            });
        }
        r.done()?;
        let basis = XkvBasis {
            id: Self::content_id(c.params, c.body),
            layers,
            kv_heads,
            head_dim,
            dtype,
            rope_base,
            // The rank rule only matters while fitting; a loaded basis carries fixed ranks.
            params: XkvParams {
                group_layers,
                rank: RankRule::Fixed(0),
                compress_values,
            },
            parts,
        };
        Ok(basis)
    }
}

#[cfg(test)]
mod tests;
