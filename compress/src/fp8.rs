//! FP8 (OCP E4M3) quantisation with one scale per token row.
//!
//! Each (layer, K|V, token) row of `kv_heads * head_dim` elements is divided by
//! `scale = amax / 448` (448 is E4M3's largest finite value) and rounded to the nearest E4M3
//! value. One f32 scale per row costs 4 bytes per 192 elements on SmolLM2, and keeps outlier
//! tokens (attention sinks) from crushing every other token's precision.
//!
//! Error bound: E4M3 has 3 mantissa bits, so a value in the normal range is within 2^-4 of itself
//! relatively; writing back to f16/bf16 adds at most 2^-8. Values below the smallest normal
//! (`2^-6 * scale`) are within `2^-10 * scale` absolutely. [`FP8_REL_BOUND`] states the relative
//! part; the property test checks `|x' - x| <= FP8_REL_BOUND * |x| + 2^-9 * scale`.

use kvtier_cache::chunk::e4m3_to_f32;
use kvtier_cache::{Fidelity, ModelLayout};

use crate::codec::{CODEC_FP8_E4M3, Codec};
use crate::container::{self, ParamWriter, Reader};
use crate::error::{CompressError, Result};
use crate::shape::{ChunkShape, check_float_dtype, from_f32, to_f32};

/// Relative error bound of the fp8 codec for values in E4M3's normal range.
pub const FP8_REL_BOUND: f32 = 0.07;
const E4M3_MAX: f32 = 448.0;

/// Rounds `x` to the nearest E4M3 value (ties to even), saturating at ±448; NaN maps to NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    let code = if a < 2f32.powi(-6) {
        // Subnormals are multiples of 2^-9; code 8 is exactly the smallest normal, so the
        // rounding carry into the exponent needs no special case.
        (a * 512.0).round_ties_even() as u32
    } else if a >= E4M3_MAX {
        0x7e
    } else {
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        // `a / 2^e` is in [1, 2): times 8 gives the mantissa with 3 fraction bits in [8, 16].
        let m = (a * 2f32.powi(3 - e)).round_ties_even() as u32;
        (((e + 7) as u32) << 3) + (m - 8)
    };
    sign | code.min(0x7e) as u8
}

/// FP8-E4M3 with a per-token-row f32 scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8E4m3 {
    pub layout: ModelLayout,
}

impl Codec for Fp8E4m3 {
    fn id(&self) -> u16 {
        CODEC_FP8_E4M3
    }

    fn fidelity(&self) -> Fidelity {
        Fidelity::Lossy {
            codec: CODEC_FP8_E4M3,
            error_bound: FP8_REL_BOUND,
        }
    }

    fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        check_float_dtype(self.layout.dtype)?;
        let shape = ChunkShape::of(&self.layout, raw.len())?;
        let x = to_f32(shape.dtype, raw);
        if x.iter().any(|v| !v.is_finite()) {
            return Err(CompressError::InvalidParams(
                "lossy codecs need finite input".into(),
            ));
        }
        let row = shape.row();
        let rows = x.len() / row;
        let params = shape.write(ParamWriter::default()).0;
        let mut out = container::begin(CODEC_FP8_E4M3, &params, rows * 4 + x.len());
        let mut scales = Vec::with_capacity(rows);
        for r in x.chunks_exact(row) {
            let amax = r.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Round the scale up so `amax / scale` never exceeds 448 and nothing saturates.
            let s = if amax == 0.0 {
                1.0
            } else {
                f32::from_bits((amax / E4M3_MAX).to_bits() + 1)
            };
            out.extend_from_slice(&s.to_le_bytes());
            scales.push(s);
        }
        for (r, s) in x.chunks_exact(row).zip(&scales) {
            let inv = 1.0 / s;
            out.extend(r.iter().map(|v| f32_to_e4m3(v * inv)));
        }
        Ok(container::finish(out, raw.len() as u64))
    }

    fn decode(&self, encoded: &[u8]) -> Result<Vec<u8>> {
        decode_fp8(encoded)
    }
}

/// Decodes an [`Fp8E4m3`] container to its original dtype and layout.
pub fn decode_fp8(encoded: &[u8]) -> Result<Vec<u8>> {
    let c = container::parse(encoded)?;
    if c.codec != CODEC_FP8_E4M3 {
        return Err(CompressError::CodecMismatch {
            expected: CODEC_FP8_E4M3,
            found: c.codec,
        });
    }
    let mut pr = Reader::new(c.params);
    let shape = ChunkShape::read(&mut pr)?;
    pr.done()?;
    if shape.raw_len() as u64 != c.raw_len {
        return Err(CompressError::BadLength(
            "raw length disagrees with the shape".into(),
        ));
    }
    let row = shape.row();
    let rows = shape.elems() / row;
    let mut r = Reader::new(c.body);
    let scales = r.take(rows * 4)?;
    let codes = r.take(shape.elems())?;
    r.done()?;
    let mut x = Vec::with_capacity(shape.elems());
    for (s, rc) in scales.chunks_exact(4).zip(codes.chunks_exact(row)) {
        let s = f32::from_le_bytes(s.try_into().expect("4 bytes"));
        x.extend(rc.iter().map(|b| e4m3_to_f32(*b) * s));
    }
    let mut out = Vec::with_capacity(shape.raw_len());
    from_f32(shape.dtype, &x, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_round_trip_and_round_to_nearest() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // ±0 both decode to 0; everything else must come back bit-identical.
            assert!(back == b || v == 0.0, "code {b:#x} -> {v} -> {back:#x}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0); // tie rounds to even mantissa
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.07)), 1.125);
    }
}
