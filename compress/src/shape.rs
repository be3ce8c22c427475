//! Element access and the chunk shape the lossy codecs work on.
//!
//! A chunk payload (MHA layouts) is `[layer][K|V][token][kv_head][head_dim]`, as
//! [`kvtier_cache::PayloadLayout`] describes it; the number of tokens is not stored in the layout,
//! so it is derived from the payload length and written into every container's params together
//! with the rest of the shape. That makes a container decodable on its own and lets decode refuse
//! a payload that does not match. Widening to f32 is the cache's [`to_f32`]; narrowing back and
//! directed rounding are codec business and live here.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
pub(crate) use kvtier_cache::chunk::to_f32;
use kvtier_cache::{AttentionKind, Dtype, ModelLayout, PayloadLayout};

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

/// Elements narrowed per batch: `half`'s slice conversions use the CPU's conversion
/// instructions (F16C) on whole blocks, where converting element by element pays a feature check
/// and a call per value.
const BATCH: usize = 4096;

/// A 16-bit float type `half` converts in bulk.
trait Half16: Copy + Default + bytemuck::Pod
where
    [Self]: HalfFloatSliceExt,
{
}
impl Half16 for f16 {}
impl Half16 for bf16 {}

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
        let payload = PayloadLayout::for_len(layout, raw_len)
            .map_err(|e| CompressError::LayoutMismatch(e.to_string()))?;
        Ok(ChunkShape {
            layers: payload.layers(),
            kv_heads: payload.heads(),
            head_dim: payload.head_dim(),
            tokens: payload.tokens(),
            dtype: payload.dtype(),
        })
    }

    /// The payload geometry of this shape.
    pub fn payload(&self) -> PayloadLayout {
        PayloadLayout::mha(
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.tokens,
            self.dtype,
        )
    }

    /// Elements in one token row of one layer's K (or V): `kv_heads * head_dim`.
    pub fn row(&self) -> usize {
        self.payload().row_elems()
    }

    /// Elements of one layer's K (or V) block: `tokens * row`.
    pub fn block(&self) -> usize {
        self.payload().plane_elems()
    }

    /// Elements of the whole payload.
    pub fn elems(&self) -> usize {
        self.payload().elems()
    }

    pub fn raw_len(&self) -> usize {
        self.payload().len()
    }

    /// Element offset of layer `l`'s K (`kv = 0`) or V (`kv = 1`) block.
    pub fn block_offset(&self, layer: usize, kv: usize) -> usize {
        self.payload().plane_start(layer, kv)
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
        let tag = r.u8()?;
        let dtype = Dtype::from_tag(tag)
            .ok_or_else(|| CompressError::InvalidParams(format!("unknown dtype tag {tag}")))?;
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
