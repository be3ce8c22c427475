//! KIVI-style integer quantisation: keys per channel, values per token, int8 or int4.
//!
//! Keys have outlier *channels* (a few dimensions are large for every token), so their
//! scales run along tokens: one (min, scale) per channel per group of `key_group` tokens. Values
//! have no channel structure but vary per token, so their scales run along channels: one
//! (min, scale) per token per group of `value_group` consecutive channels. This is the
//! asymmetric (zero-point) scheme of KIVI (Liu et al. 2024), without its full-precision residual
//! window: a chunk is already complete when it is stored.
//!
//! min and scale are stored in the payload's own dtype (2 bytes for f16/bf16). To keep the bound
//! exact after that rounding, min is rounded down and scale up before quantising, and the encoder
//! uses the rounded values. Every element then lies within `scale / 2` of its code, and rounding
//! the decoded value back to the dtype at most doubles that (the original is a representable
//! candidate), so `|x' - x| <= scale <= 1.01 * range / (2^bits - 1)` for the group's range
//! `max - min`. [`Kivi::error_bound`] states that fraction of the group range (plus, for f16,
//! one subnormal step 2^-24 when a tiny scale rounds up to a subnormal).

use kvtier_cache::{Fidelity, ModelLayout};

use crate::codec::{CODEC_KIVI_INT4, CODEC_KIVI_INT8, Codec};
use crate::container::{self, ParamWriter, Reader};
use crate::error::{CompressError, Result};
use crate::shape::{ChunkShape, check_float_dtype, from_f32, round_directed, to_f32};

/// KIVI quantisation parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Kivi {
    pub layout: ModelLayout,
    /// 8 or 4.
    pub bits: u8,
    /// Tokens per key scale group (per channel). KIVI uses 32.
    pub key_group: usize,
    /// Channels per value scale group (per token). KIVI uses 32.
    pub value_group: usize,
}

impl Kivi {
    pub fn int8(layout: ModelLayout) -> Self {
        Kivi {
            layout,
            bits: 8,
            key_group: 32,
            value_group: 32,
        }
    }

    pub fn int4(layout: ModelLayout) -> Self {
        Kivi {
            layout,
            bits: 4,
            key_group: 32,
            value_group: 32,
        }
    }

    /// Bound on `|x' - x|` as a fraction of the quantisation group's range (`max - min`).
    pub fn error_bound(bits: u8) -> f32 {
        1.01 / ((1u32 << bits) - 1) as f32
    }

    fn codec_id(bits: u8) -> Result<u16> {
        match bits {
            8 => Ok(CODEC_KIVI_INT8),
            4 => Ok(CODEC_KIVI_INT4),
            b => Err(CompressError::InvalidParams(format!(
                "kivi supports 8 or 4 bits, not {b}"
            ))),
        }
    }
}

/// Iterates the scale groups of one K or V block of `shape` as lists of element offsets
/// (relative to the block): per channel over token groups for keys, per token over channel
/// groups for values. Encoder and decoder share it, so they cannot disagree on the order.
fn for_each_group(
    shape: &ChunkShape,
    is_key: bool,
    group: usize,
    mut f: impl FnMut(&mut dyn Iterator<Item = usize>),
) {
    let (row, tokens) = (shape.row(), shape.tokens);
    if is_key {
        for t0 in (0..tokens).step_by(group) {
            let t1 = (t0 + group).min(tokens);
            for c in 0..row {
                f(&mut (t0..t1).map(|t| t * row + c));
            }
        }
    } else {
        for t in 0..tokens {
            for c0 in (0..row).step_by(group) {
                let c1 = (c0 + group).min(row);
                f(&mut (c0..c1).map(|c| t * row + c));
            }
        }
    }
}

impl Codec for Kivi {
    fn id(&self) -> u16 {
        Kivi::codec_id(self.bits).unwrap_or(0)
    }

    fn fidelity(&self) -> Fidelity {
        Fidelity::Lossy {
            codec: self.id(),
            error_bound: Kivi::error_bound(self.bits),
        }
    }

    fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        let id = Kivi::codec_id(self.bits)?;
        check_float_dtype(self.layout.dtype)?;
        if self.key_group == 0
            || self.value_group == 0
            || self.key_group > 1 << 16
            || self.value_group > 1 << 16
        {
            return Err(CompressError::InvalidParams(
                "group sizes must be in 1..=65536".into(),
            ));
        }
        let shape = ChunkShape::of(&self.layout, raw.len())?;
        let x = to_f32(shape.dtype, raw);
        if x.iter().any(|v| !v.is_finite()) {
            return Err(CompressError::InvalidParams(
                "lossy codecs need finite input".into(),
            ));
        }
        let levels = ((1u32 << self.bits) - 1) as f32;
        let mut minmax: Vec<f32> = Vec::new();
        let mut codes = vec![0u8; x.len()];
        let mut idx: Vec<usize> = Vec::with_capacity(self.key_group.max(self.value_group));
        for layer in 0..shape.layers {
            for kv in 0..2 {
                let base = shape.block_offset(layer, kv);
                let group = if kv == 0 {
                    self.key_group
                } else {
                    self.value_group
                };
                for_each_group(&shape, kv == 0, group, |it| {
                    idx.clear();
                    idx.extend(it.map(|i| base + i));
                    let (lo, hi) = idx
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &i| {
                            (lo.min(x[i]), hi.max(x[i]))
                        });
                    let min = round_directed(shape.dtype, lo, true);
                    let scale = round_directed(shape.dtype, (hi - min) / levels, false);
                    minmax.push(min);
                    minmax.push(scale);
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for &i in &idx {
                        codes[i] = ((x[i] - min) * inv).round().clamp(0.0, levels) as u8;
                    }
                });
            }
        }
        let params = shape
            .write(ParamWriter::default())
            .u8(self.bits)
            .u32(self.key_group as u32)
            .u32(self.value_group as u32)
            .0;
        let mut out = container::begin(id, &params, minmax.len() * 2 + codes.len());
        from_f32(shape.dtype, &minmax, &mut out);
        if self.bits == 8 {
            out.extend_from_slice(&codes);
        } else {
            out.extend(
                codes
                    .chunks(2)
                    .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4)),
            );
        }
        if scale_overflowed(&minmax) {
            return Err(CompressError::InvalidParams(
                "group range overflows the dtype".into(),
            ));
        }
        Ok(container::finish(out, raw.len() as u64))
    }

    fn decode(&self, encoded: &[u8]) -> Result<Vec<u8>> {
        decode_kivi(encoded)
    }
}

fn scale_overflowed(minmax: &[f32]) -> bool {
    minmax.iter().any(|v| !v.is_finite())
}

/// Decodes a KIVI container (int8 or int4) to its original dtype and layout.
pub fn decode_kivi(encoded: &[u8]) -> Result<Vec<u8>> {
    let c = container::parse(encoded)?;
    if c.codec != CODEC_KIVI_INT8 && c.codec != CODEC_KIVI_INT4 {
        return Err(CompressError::CodecMismatch {
            expected: CODEC_KIVI_INT8,
            found: c.codec,
        });
    }
    let mut pr = Reader::new(c.params);
    let shape = ChunkShape::read(&mut pr)?;
    let bits = pr.u8()?;
    let (key_group, value_group) = (pr.u32()? as usize, pr.u32()? as usize);
    pr.done()?;
    if Kivi::codec_id(bits)? != c.codec || key_group == 0 || value_group == 0 {
        return Err(CompressError::InvalidParams(format!(
            "bits {bits}, groups {key_group}/{value_group}"
        )));
    }
    check_float_dtype(shape.dtype)?;
    if shape.raw_len() as u64 != c.raw_len {
        return Err(CompressError::BadLength(
            "raw length disagrees with the shape".into(),
        ));
    }
    let (row, tokens) = (shape.row(), shape.tokens);
    let groups_per_layer = row * tokens.div_ceil(key_group) + tokens * row.div_ceil(value_group);
    let n_params = 2 * shape.layers * groups_per_layer;
    let n = shape.elems();
    let code_bytes = if bits == 8 { n } else { n.div_ceil(2) };
    let mut r = Reader::new(c.body);
    let minmax = to_f32(shape.dtype, r.take(n_params * shape.dtype.size())?);
    let packed = r.take(code_bytes)?;
    r.done()?;
    let code = |i: usize| -> f32 {
        if bits == 8 {
            packed[i] as f32
        } else {
            ((packed[i / 2] >> ((i & 1) * 4)) & 0xf) as f32
        }
    };
    let mut x = vec![0f32; n];
    let mut g = 0;
    for layer in 0..shape.layers {
        for kv in 0..2 {
            let base = shape.block_offset(layer, kv);
            let group = if kv == 0 { key_group } else { value_group };
            for_each_group(&shape, kv == 0, group, |it| {
                let (min, scale) = (minmax[2 * g], minmax[2 * g + 1]);
                g += 1;
                for i in it {
                    x[base + i] = min + code(base + i) * scale;
                }
            });
        }
    }
    let mut out = Vec::with_capacity(shape.raw_len());
    from_f32(shape.dtype, &x, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_any;
    use crate::fp8::{FP8_REL_BOUND, Fp8E4m3};
    use crate::testdata::{Rng, small_layout, synthetic_prompt};
    use kvtier_cache::Dtype;
    use proptest::prelude::*;

    /// Random payload values with outlier channels and a wide magnitude spread.
    fn random_payload(layout: &ModelLayout, tokens: usize, seed: u64, scale: f32) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        let n = layout.chunk_bytes(tokens) / layout.dtype.size();
        let x: Vec<f32> = (0..n)
            .map(|i| rng.uniform() * scale * if i % 13 == 0 { 20.0 } else { 1.0 })
            .collect();
        let mut raw = Vec::new();
        from_f32(layout.dtype, &x, &mut raw);
        raw
    }

    fn check_kivi_bound(codec: &Kivi, raw: &[u8]) -> std::result::Result<(), TestCaseError> {
        let enc = codec.encode(raw).unwrap();
        let (fidelity, dec) = decode_any(&enc).unwrap();
        prop_assert_eq!(fidelity, codec.fidelity());
        prop_assert_eq!(dec.len(), raw.len());
        let shape = ChunkShape::of(&codec.layout, raw.len()).unwrap();
        let (x, y) = (to_f32(shape.dtype, raw), to_f32(shape.dtype, &dec));
        let bound = Kivi::error_bound(codec.bits);
        for layer in 0..shape.layers {
            for kv in 0..2 {
                let base = shape.block_offset(layer, kv);
                let group = if kv == 0 {
                    codec.key_group
                } else {
                    codec.value_group
                };
                let mut worst = None;
                for_each_group(&shape, kv == 0, group, |it| {
                    let idx: Vec<usize> = it.map(|i| base + i).collect();
                    let (lo, hi) = idx.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &i| {
                        (lo.min(x[i]), hi.max(x[i]))
                    });
                    for &i in &idx {
                        // 1e-6 relative slack covers f32 arithmetic in min + code * scale; 2^-24
                        // (f16's smallest subnormal) covers a scale rounded up to a subnormal.
                        let limit = bound * (hi - lo) + 1e-6 * x[i].abs() + 2f32.powi(-24);
                        if (y[i] - x[i]).abs() > limit && worst.is_none() {
                            worst = Some((i, x[i], y[i], lo, hi));
                        }
                    }
                });
                prop_assert!(worst.is_none(), "bound broken: {:?}", worst);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn kivi_stays_inside_its_bound(seed in any::<u64>(), bits in prop_oneof![Just(8u8), Just(4)],
                                       dtype in prop_oneof![Just(Dtype::F16), Just(Dtype::Bf16), Just(Dtype::F32)],
                                       tokens in 1usize..40, kg in 1usize..40, vg in 1usize..40,
                                       scale in prop_oneof![Just(1e-3f32), Just(1.0), Just(300.0)]) {
            let layout = small_layout(dtype);
            let raw = random_payload(&layout, tokens, seed, scale);
            check_kivi_bound(&Kivi { layout, bits, key_group: kg, value_group: vg }, &raw)?;
        }

        #[test]
        fn fp8_stays_inside_its_bound(seed in any::<u64>(), tokens in 1usize..20,
                                      dtype in prop_oneof![Just(Dtype::F16), Just(Dtype::Bf16), Just(Dtype::F32)],
                                      scale in prop_oneof![Just(1e-2f32), Just(1.0), Just(1000.0)]) {
            let layout = small_layout(dtype);
            let raw = random_payload(&layout, tokens, seed, scale);
            let codec = Fp8E4m3 { layout: layout.clone() };
            let (_, dec) = decode_any(&codec.encode(&raw).unwrap()).unwrap();
            let (x, y) = (to_f32(dtype, &raw), to_f32(dtype, &dec));
            let row = (layout.kv_heads * layout.head_dim) as usize;
            for (xr, yr) in x.chunks(row).zip(y.chunks(row)) {
                let s = xr.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0;
                for (a, b) in xr.iter().zip(yr) {
                    prop_assert!((a - b).abs() <= FP8_REL_BOUND * a.abs() + s * 2f32.powi(-9) * 1.001,
                                 "{} -> {} (row scale {})", a, b, s);
                }
            }
        }
    }

    #[test]
    fn int4_is_smaller_than_int8_and_both_beat_raw() {
        let layout = small_layout(Dtype::F16);
        let (_, raw) = synthetic_prompt(&layout, 1, 64, 4, 1).remove(0);
        let e8 = Kivi::int8(layout.clone()).encode(&raw).unwrap();
        let e4 = Kivi::int4(layout).encode(&raw).unwrap();
        assert!(
            e4.len() < e8.len() && e8.len() < raw.len(),
            "{} {} {}",
            e4.len(),
            e8.len(),
            raw.len()
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let layout = small_layout(Dtype::F16);
        let raw = random_payload(&layout, 4, 3, 1.0);
        assert!(matches!(
            Kivi::int8(layout.clone()).encode(&raw[..raw.len() - 2]),
            Err(CompressError::LayoutMismatch(_))
        ));
        let bad_bits = Kivi {
            bits: 3,
            ..Kivi::int8(layout.clone())
        };
        assert!(matches!(
            bad_bits.encode(&raw),
            Err(CompressError::InvalidParams(_))
        ));
        let mut enc = Kivi::int4(layout).encode(&raw).unwrap();
        let last = enc.len() - 1;
        enc[last] ^= 0xff;
        assert!(matches!(
            decode_kivi(&enc),
            Err(CompressError::ChecksumMismatch { .. })
        ));
    }
}
