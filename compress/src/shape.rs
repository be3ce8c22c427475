//! Element access and the chunk shape the lossy codecs work on.
//!
//! A chunk payload (MHA layouts) is `[layer][K|V][token][kv_head][head_dim]`; the number of tokens
//! is not stored in the layout, so it is derived from the payload length and written into every
//! container's params together with the rest of the shape. That makes a container decodable on its
//! own and lets decode refuse a payload that does not match.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kvtier_cache::{AttentionKind, Dtype, ModelLayout};

use crate::container::{ParamWriter, Reader};
use crate::error::{CompressError, Result};

/// Element types the lossy codecs read and write (fp8 payloads are not re-quantised).
pub fn check_float_dtype(dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::F16 | Dtype::Bf16 | Dtype::F32 => Ok(()),
        Dtype::Fp8E4m3 => Err(CompressError::LayoutMismatch(
            "fp8 payloads cannot be re-quantised".into(),
        )),
    }
}

/// Elements converted per batch by the 16-bit paths: `half`'s slice conversions use the CPU's
/// conversion instructions (F16C) on whole blocks, where converting element by element pays a
/// feature check and a call per value (they were the largest cost of quantised and xKV codecs).
const BATCH: usize = 4096;

/// Widens a raw payload of `dtype` elements to f32.
pub fn to_f32(dtype: Dtype, raw: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => widen16::<f16>(raw),
        Dtype::Bf16 => widen16::<bf16>(raw),
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::Fp8E4m3 => raw.iter().map(|b| crate::fp8::e4m3_to_f32(*b)).collect(),
    }
}

/// A 16-bit float type `half` converts in bulk.
trait Half16: Copy + Default + bytemuck::Pod
where
    [Self]: HalfFloatSliceExt,
{
}
impl Half16 for f16 {}
impl Half16 for bf16 {}

fn widen16<H: Half16>(raw: &[u8]) -> Vec<f32>
where
    [H]: HalfFloatSliceExt,
{
    let n = raw.len() / 2;
    let mut out = vec![0f32; n];
    let mut halves = vec![H::default(); BATCH.min(n)];
    for (src, dst) in raw.chunks(2 * BATCH).zip(out.chunks_mut(BATCH)) {
        let h = &mut halves[..dst.len()];
        for (x, b) in h.iter_mut().zip(src.chunks_exact(2)) {
            *x = bytemuck::cast(u16::from_le_bytes([b[0], b[1]]));
        }
        h.convert_to_f32_slice(dst);
    }
    out
}

fn narrow16<H: Half16>(values: &[f32], out: &mut Vec<u8>)
where
    [H]: HalfFloatSliceExt,
{
    let mut halves = vec![H::default(); BATCH.min(values.len())];
    for src in values.chunks(BATCH) {
        let h = &mut halves[..src.len()];
        h.convert_from_f32_slice(src);
        for x in h.iter() {
            out.extend_from_slice(&bytemuck::cast::<H, u16>(*x).to_le_bytes());
        }
    }
}

/// Narrows f32 values into `out` as `dtype` elements (round to nearest even).
pub fn from_f32(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        Dtype::F16 => narrow16::<f16>(values, out),
        Dtype::Bf16 => narrow16::<bf16>(values, out),
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::Fp8E4m3 => values
            .iter()
            .for_each(|v| out.push(crate::fp8::f32_to_e4m3(*v))),
    }
}

/// Rounds `x` to the nearest `dtype` value, then steps one ulp if that went the wrong way, so the
/// result is representable in `dtype` and `<= x` (`down`) or `>= x` (`!down`).
pub fn round_directed(dtype: Dtype, x: f32, down: bool) -> f32 {
    // Steps a 16-bit float one representable value towards +inf (`up`) or -inf.
    fn step16(bits: u16, up: bool) -> u16 {
        let negative = bits & 0x8000 != 0;
        let magnitude = bits & 0x7fff;
        match (negative, up) {
            (false, true) => bits + 1,
            (true, false) => bits + 1,
            // Moving towards zero; -0/+0 cross to the smallest value of the other sign.
            (false, false) if magnitude == 0 => 0x8001,
            (true, true) if magnitude == 0 => 0x0001,
            _ => bits - 1,
        }
    }
    let wrong = |r: f32| if down { r > x } else { r < x };
    match dtype {
        Dtype::F16 => {
            let h = f16::from_f32(x);
            if wrong(h.to_f32()) {
                f16::from_bits(step16(h.to_bits(), !down)).to_f32()
            } else {
                h.to_f32()
            }
        }
        Dtype::Bf16 => {
            let h = bf16::from_f32(x);
            if wrong(h.to_f32()) {
                bf16::from_bits(step16(h.to_bits(), !down)).to_f32()
            } else {
                h.to_f32()
            }
        }
        Dtype::F32 | Dtype::Fp8E4m3 => x,
    }
}

/// Shape of one MHA chunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
    pub dtype: Dtype,
}

impl ChunkShape {
    /// The shape of a raw payload of `raw_len` bytes under `layout`; refuses MLA layouts and
    /// lengths that are not a whole number of tokens.
    pub fn of(layout: &ModelLayout, raw_len: usize) -> Result<Self> {
        if layout.attention != AttentionKind::Mha {
            return Err(CompressError::LayoutMismatch(
                "only mha layouts are supported".into(),
            ));
        }
        layout
            .validate()
            .map_err(|e| CompressError::LayoutMismatch(e.to_string()))?;
        let per_token = layout.bytes_per_token();
        if raw_len == 0 || !raw_len.is_multiple_of(per_token) {
            return Err(CompressError::LayoutMismatch(format!(
                "{raw_len} bytes is not a whole number of {per_token}-byte tokens"
            )));
        }
        Ok(ChunkShape {
            layers: layout.num_layers as usize,
            kv_heads: layout.kv_heads as usize,
            head_dim: layout.head_dim as usize,
            tokens: raw_len / per_token,
            dtype: layout.dtype,
        })
    }

    /// Elements in one token row of one layer's K (or V): `kv_heads * head_dim`.
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Elements of one layer's K (or V) block: `tokens * row`.
    pub fn block(&self) -> usize {
        self.tokens * self.row()
    }

    /// Elements of the whole payload.
    pub fn elems(&self) -> usize {
        self.layers * 2 * self.block()
    }

    pub fn raw_len(&self) -> usize {
        self.elems() * self.dtype.size()
    }

    /// Element offset of layer `l`'s K (`kv = 0`) or V (`kv = 1`) block.
    pub fn block_offset(&self, layer: usize, kv: usize) -> usize {
        (layer * 2 + kv) * self.block()
    }

    pub fn write(&self, w: ParamWriter) -> ParamWriter {
        w.u32(self.layers as u32)
            .u32(self.kv_heads as u32)
            .u32(self.head_dim as u32)
            .u32(self.tokens as u32)
            .u8(self.dtype.tag())
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self> {
        let (layers, kv_heads, head_dim, tokens) = (
            r.u32()? as usize,
            r.u32()? as usize,
            r.u32()? as usize,
            r.u32()? as usize,
        );
        let dtype = match r.u8()? {
            1 => Dtype::F16,
            2 => Dtype::Bf16,
            3 => Dtype::F32,
            4 => Dtype::Fp8E4m3,
            t => {
                return Err(CompressError::InvalidParams(format!(
                    "unknown dtype tag {t}"
                )));
            }
        };
        let s = ChunkShape {
            layers,
            kv_heads,
            head_dim,
            tokens,
            dtype,
        };
        // The product must stay far from overflow before anyone allocates from it.
        let ok = [layers, kv_heads, head_dim, tokens]
            .iter()
            .all(|d| (1..=1 << 20).contains(d))
            && (s.elems() as u128) < (1u128 << 38);
        if !ok {
            return Err(CompressError::InvalidParams(format!(
                "implausible chunk shape {s:?}"
            )));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_rounding_brackets_the_value() {
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
            for x in [0.1f32, -0.1, 3.3333, 1e-6, -7.77e3, 0.0] {
                let lo = round_directed(dtype, x, true);
                let hi = round_directed(dtype, x, false);
                assert!(lo <= x && x <= hi, "{dtype} {x}: {lo} {hi}");
                assert!((hi - lo) <= x.abs() * 0.02 + 1e-7, "{dtype} {x}: {lo} {hi}");
            }
        }
    }

    #[test]
    fn shape_from_layout() {
        let l = ModelLayout::smollm2_135m();
        let s = ChunkShape::of(&l, l.chunk_bytes(256)).unwrap();
        assert_eq!(
            (s.tokens, s.row(), s.raw_len()),
            (256, 192, l.chunk_bytes(256))
        );
        assert!(ChunkShape::of(&l, l.chunk_bytes(256) + 2).is_err());
    }
}
