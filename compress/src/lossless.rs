//! Lossless codecs: byte planes + lz4, and plain lz4 (the baseline it has to beat).
//!
//! lz4 finds repeated byte strings; raw f16/bf16 has almost none (ratio ~1.0), because the low
//! (mantissa) byte of every element is noise interleaved with the structured high byte. Splitting
//! the elements into byte planes puts the sign/exponent bytes next to each other, where runs and
//! repeats appear. Optionally the high plane is XOR-ed with the same channel of the previous token
//! (`row` elements earlier): a channel's magnitude drifts slowly along tokens, so the XOR is mostly
//! zero or a few low bits. Optionally each byte plane is further bit-shuffled (eight bit planes,
//! as HDF5/Blosc's bitshuffle does): lz4 has no entropy coder, so a byte plane whose values are
//! skewed but not repetitive barely shrinks, while its top bit planes (exponent MSBs) are long
//! runs that lz4 collapses. Each stream is lz4-compressed, or stored when lz4 does not shrink it
//! (mantissa bits usually), so a stream never costs more than its size plus five bytes.

use kvtier_cache::Fidelity;

use crate::codec::{CODEC_LZ4, CODEC_PLANES_LZ4, Codec};
use crate::container::{self, ParamWriter, Reader};
use crate::error::{CompressError, Result};

/// Byte-plane split (+ optional token XOR of the top plane) followed by lz4 per plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanesLz4 {
    /// Bytes per element: 2 for f16/bf16, 4 for f32, 1 disables the split.
    pub elem_size: usize,
    /// Elements between one token and the next in the same channel (`kv_heads * head_dim`);
    /// 0 disables the XOR of the top plane.
    pub xor_stride: usize,
    /// Split the upper half of the byte planes (sign and exponent bytes) further into their
    /// eight bit planes. The lower planes are mantissa noise that no shuffle makes compressible.
    pub bitshuffle: bool,
}

impl PlanesLz4 {
    /// The default for a layout: bit-shuffled planes, no XOR. On real SmolLM2 KV (f16) the token
    /// XOR made every variant worse (1.074 -> 1.054 with bitshuffle), so it is off by default;
    /// [`PlanesLz4::token_stride`] gives the stride for callers that want to try it.
    pub fn for_layout(layout: &kvtier_cache::ModelLayout) -> Self {
        PlanesLz4 {
            elem_size: layout.dtype.size(),
            xor_stride: 0,
            bitshuffle: true,
        }
    }

    /// Elements between one token and the next in the same channel of a layout's K/V rows.
    pub fn token_stride(layout: &kvtier_cache::ModelLayout) -> usize {
        match layout.attention {
            kvtier_cache::AttentionKind::Mha => layout.kv_heads as usize * layout.head_dim as usize,
            kvtier_cache::AttentionKind::Mla { .. } => 0,
        }
    }
}

const PLANE_STORED: u8 = 0;
const PLANE_LZ4: u8 = 1;

fn push_plane(out: &mut Vec<u8>, plane: &[u8]) {
    let start = out.len();
    out.push(PLANE_LZ4);
    out.extend_from_slice(&0u32.to_le_bytes());
    let bound = lz4_flex::block::get_maximum_output_size(plane.len());
    out.resize(start + 5 + bound, 0);
    let n = lz4_flex::block::compress_into(plane, &mut out[start + 5..])
        .expect("buffer sized by lz4 bound");
    if n < plane.len() {
        out.truncate(start + 5 + n);
        out[start + 1..start + 5].copy_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.truncate(start);
        out.push(PLANE_STORED);
        out.extend_from_slice(&(plane.len() as u32).to_le_bytes());
        out.extend_from_slice(plane);
    }
}

/// Transposes an 8x8 bit matrix held as eight bytes (byte i = row i): afterwards byte j holds
/// bit j of every input byte. It is its own inverse (Hacker's Delight, 7-3).
fn transpose8(mut x: u64) -> u64 {
    let t = (x ^ (x >> 7)) & 0x00aa_00aa_00aa_00aa;
    x ^= t ^ (t << 7);
    let t = (x ^ (x >> 14)) & 0x0000_cccc_0000_cccc;
    x ^= t ^ (t << 14);
    let t = (x ^ (x >> 28)) & 0x0000_0000_f0f0_f0f0;
    x ^= t ^ (t << 28);
    x
}

/// Writes a byte plane as eight bit-plane streams plus its `len % 8` tail bytes.
fn push_bitshuffled(out: &mut Vec<u8>, plane: &[u8], scratch: &mut Vec<u8>) {
    let groups = plane.len() / 8;
    scratch.clear();
    scratch.resize(groups * 8, 0);
    for (g, bytes) in plane.chunks_exact(8).enumerate() {
        let t = transpose8(u64::from_le_bytes(bytes.try_into().expect("8 bytes"))).to_le_bytes();
        for (j, b) in t.iter().enumerate() {
            scratch[j * groups + g] = *b;
        }
    }
    for stream in scratch.chunks(groups.max(1)) {
        push_plane(out, stream);
    }
    push_plane(out, &plane[groups * 8..]);
}

fn read_bitshuffled(r: &mut Reader<'_>, plane: &mut [u8], scratch: &mut Vec<u8>) -> Result<()> {
    let groups = plane.len() / 8;
    scratch.clear();
    scratch.resize(groups * 8, 0);
    if groups > 0 {
        for stream in scratch.chunks_mut(groups) {
            read_plane(r, stream)?;
        }
    }
    for (g, bytes) in plane.chunks_exact_mut(8).enumerate() {
        let mut t = [0u8; 8];
        for (j, b) in t.iter_mut().enumerate() {
            *b = scratch[j * groups + g];
        }
        bytes.copy_from_slice(&transpose8(u64::from_le_bytes(t)).to_le_bytes());
    }
    read_plane(r, &mut plane[groups * 8..])
}

fn read_plane(r: &mut Reader<'_>, dst: &mut [u8]) -> Result<()> {
    let mode = r.u8()?;
    let len = r.u32()? as usize;
    let bytes = r.take(len)?;
    match mode {
        PLANE_STORED if len == dst.len() => dst.copy_from_slice(bytes),
        PLANE_LZ4 => {
            let n = lz4_flex::block::decompress_into(bytes, dst)
                .map_err(|e| CompressError::CorruptBody(format!("lz4: {e}")))?;
            if n != dst.len() {
                return Err(CompressError::CorruptBody(format!(
                    "plane decoded to {n} bytes, expected {}",
                    dst.len()
                )));
            }
        }
        _ => {
            return Err(CompressError::CorruptBody(format!(
                "plane mode {mode} with length {len}"
            )));
        }
    }
    Ok(())
}

impl Codec for PlanesLz4 {
    fn id(&self) -> u16 {
        CODEC_PLANES_LZ4
    }

    fn fidelity(&self) -> Fidelity {
        Fidelity::Lossless
    }

    fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        let es = self.elem_size;
        if !matches!(es, 1 | 2 | 4) {
            return Err(CompressError::InvalidParams(format!(
                "element size {es} is not 1, 2 or 4"
            )));
        }
        let n = raw.len() / es;
        let params = ParamWriter::default()
            .u8(es as u8)
            .u64(self.xor_stride as u64)
            .u8(self.bitshuffle as u8)
            .0;
        let mut scratch = Vec::new();
        let mut out = container::begin(CODEC_PLANES_LZ4, &params, raw.len() / 2);
        let mut plane = vec![0u8; n];
        for p in 0..es {
            for (dst, el) in plane.iter_mut().zip(raw.chunks_exact(es)) {
                *dst = el[p];
            }
            // Only the top plane (sign + exponent) is XOR-ed: lower planes are mantissa noise
            // that XOR would not make more compressible. Walk backwards so every XOR reads the
            // untouched previous token.
            if p == es - 1 && self.xor_stride > 0 && es > 1 {
                for i in (self.xor_stride..n).rev() {
                    plane[i] ^= plane[i - self.xor_stride];
                }
            }
            if self.bitshuffle && 2 * p >= es {
                push_bitshuffled(&mut out, &plane, &mut scratch);
            } else {
                push_plane(&mut out, &plane);
            }
        }
        out.extend_from_slice(&raw[n * es..]);
        Ok(container::finish(out, raw.len() as u64))
    }

    fn decode(&self, encoded: &[u8]) -> Result<Vec<u8>> {
        decode_planes(encoded)
    }
}

/// Decodes a [`PlanesLz4`] container; every parameter comes from the container itself.
pub fn decode_planes(encoded: &[u8]) -> Result<Vec<u8>> {
    let c = container::parse(encoded)?;
    if c.codec != CODEC_PLANES_LZ4 {
        return Err(CompressError::CodecMismatch {
            expected: CODEC_PLANES_LZ4,
            found: c.codec,
        });
    }
    let mut pr = Reader::new(c.params);
    let es = pr.u8()? as usize;
    let stride = pr.u64()? as usize;
    let bitshuffle = pr.u8()? != 0;
    pr.done()?;
    if !matches!(es, 1 | 2 | 4) {
        return Err(CompressError::InvalidParams(format!(
            "element size {es} is not 1, 2 or 4"
        )));
    }
    let raw_len = c.raw_len as usize;
    let n = raw_len / es;
    let mut out = vec![0u8; raw_len];
    let mut r = Reader::new(c.body);
    let mut plane = vec![0u8; n];
    let mut scratch = Vec::new();
    for p in 0..es {
        if bitshuffle && 2 * p >= es {
            read_bitshuffled(&mut r, &mut plane, &mut scratch)?;
        } else {
            read_plane(&mut r, &mut plane)?;
        }
        if p == es - 1 && stride > 0 && es > 1 {
            for i in stride..n {
                plane[i] ^= plane[i - stride];
            }
        }
        for (el, src) in out.chunks_exact_mut(es).zip(&plane) {
            el[p] = *src;
        }
    }
    let tail = r.take(raw_len - n * es)?;
    out[n * es..].copy_from_slice(tail);
    r.done()?;
    Ok(out)
}

/// Plain lz4 over the raw bytes: the baseline, and the fallback for payloads of unknown shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlainLz4;

impl Codec for PlainLz4 {
    fn id(&self) -> u16 {
        CODEC_LZ4
    }

    fn fidelity(&self) -> Fidelity {
        Fidelity::Lossless
    }

    fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        let mut out = container::begin(CODEC_LZ4, &[], raw.len());
        push_plane(&mut out, raw);
        Ok(container::finish(out, raw.len() as u64))
    }

    fn decode(&self, encoded: &[u8]) -> Result<Vec<u8>> {
        decode_plain(encoded)
    }
}

/// Decodes a [`PlainLz4`] container.
pub fn decode_plain(encoded: &[u8]) -> Result<Vec<u8>> {
    let c = container::parse(encoded)?;
    if c.codec != CODEC_LZ4 {
        return Err(CompressError::CodecMismatch {
            expected: CODEC_LZ4,
            found: c.codec,
        });
    }
    let mut out = vec![0u8; c.raw_len as usize];
    let mut r = Reader::new(c.body);
    read_plane(&mut r, &mut out)?;
    r.done()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn planes_round_trip_bit_exact(raw in proptest::collection::vec(any::<u8>(), 0..4000),
                                       es in prop_oneof![Just(1usize), Just(2), Just(4)],
                                       stride in 0usize..70, bitshuffle in any::<bool>()) {
            let codec = PlanesLz4 { elem_size: es, xor_stride: stride, bitshuffle };
            let enc = codec.encode(&raw).unwrap();
            prop_assert_eq!(codec.decode(&enc).unwrap(), raw.clone());
            prop_assert_eq!(PlainLz4.decode(&PlainLz4.encode(&raw).unwrap()).unwrap(), raw);
        }
    }

    #[test]
    fn smooth_f16_compresses_better_than_plain_lz4() {
        // Channels with slowly drifting magnitudes, as in real keys: planes must beat plain lz4.
        let (tokens, row) = (256, 192);
        let raw: Vec<u8> = (0..tokens * row)
            .flat_map(|i| {
                let (t, c) = (i / row, i % row);
                let v = ((c as f32 * 0.37).sin() * 4.0 + 0.01 * t as f32)
                    * (1.0 + 0.1 * ((i * 7919) % 13) as f32);
                half::f16::from_f32(v).to_le_bytes()
            })
            .collect();
        let planes = PlanesLz4 {
            elem_size: 2,
            xor_stride: row,
            bitshuffle: true,
        }
        .encode(&raw)
        .unwrap();
        let plain = PlainLz4.encode(&raw).unwrap();
        assert!(
            planes.len() < plain.len(),
            "planes {} vs plain {}",
            planes.len(),
            plain.len()
        );
        assert_eq!(decode_planes(&planes).unwrap(), raw);
    }

    #[test]
    fn transpose8_is_a_bit_transpose_and_an_involution() {
        let x = 0x0123_4567_89ab_cdefu64;
        let t = transpose8(x);
        for i in 0..8 {
            for j in 0..8 {
                assert_eq!((x >> (8 * i + j)) & 1, (t >> (8 * j + i)) & 1);
            }
        }
        assert_eq!(transpose8(t), x);
    }

    #[test]
    fn wrong_codec_is_refused() {
        let enc = PlainLz4.encode(b"abcdabcdabcd").unwrap();
        assert!(matches!(
            decode_planes(&enc),
            Err(CompressError::CodecMismatch { .. })
        ));
    }
}
