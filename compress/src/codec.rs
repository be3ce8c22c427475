//! The codec trait, the ids of this crate's codecs, and decoding a container by its own codec id.

use kvtier_cache::tier::CODEC_RAW;
use kvtier_cache::{Fidelity, codec_id};

use crate::container;
use crate::error::{CompressError, Result};

// The ids come from the one table in `kvtier_cache::codec_id`.
/// Plain lz4 block over the raw bytes (lossless baseline).
pub const CODEC_LZ4: u16 = codec_id::LZ4;
/// Byte planes (+ token XOR of the top plane) + lz4 (lossless).
pub const CODEC_PLANES_LZ4: u16 = codec_id::PLANES_LZ4;
/// KIVI int8: keys per channel, values per token.
pub const CODEC_KIVI_INT8: u16 = codec_id::KIVI_INT8;
/// KIVI int4: keys per channel, values per token.
pub const CODEC_KIVI_INT4: u16 = codec_id::KIVI_INT4;
/// FP8 E4M3 with per-token-row scales.
pub const CODEC_FP8_E4M3: u16 = codec_id::FP8_E4M3;
/// xKV cross-layer SVD chunk (needs its basis to decode).
pub const CODEC_XKV: u16 = codec_id::XKV;
/// An xKV basis record (not a chunk).
pub const CODEC_XKV_BASIS: u16 = codec_id::XKV_BASIS;

/// Whether a chunk codec id is known to this build (the raw codec included).
pub fn is_known(id: u16) -> bool {
    matches!(
        id,
        CODEC_RAW
            | CODEC_LZ4
            | CODEC_PLANES_LZ4
            | CODEC_KIVI_INT8
            | CODEC_KIVI_INT4
            | CODEC_FP8_E4M3
            | CODEC_XKV
    )
}

/// A chunk codec. Encoded output is always a [`container`], so it names its codec and carries
/// every parameter decode needs.
pub trait Codec: Send + Sync {
    /// Stable codec id written into every container.
    fn id(&self) -> u16;

    /// What a decoded chunk is relative to the input.
    fn fidelity(&self) -> Fidelity;

    /// Encodes one raw chunk payload.
    fn encode(&self, raw: &[u8]) -> Result<Vec<u8>>;

    /// Decodes a container produced by this codec back to a raw payload.
    fn decode(&self, encoded: &[u8]) -> Result<Vec<u8>>;
}

/// The codec id and fidelity an encoded chunk declares, after verifying the container.
pub fn inspect(encoded: &[u8]) -> Result<(u16, Fidelity)> {
    let c = container::parse(encoded)?;
    let fidelity = match c.codec {
        CODEC_XKV => crate::xkv::chunk_fidelity(&c)?,
        other => static_fidelity(other)?,
    };
    Ok((c.codec, fidelity))
}

/// The fidelity of a codec whose fidelity does not depend on its parameters (all but xKV).
fn static_fidelity(codec: u16) -> Result<Fidelity> {
    Ok(match codec {
        CODEC_LZ4 | CODEC_PLANES_LZ4 => Fidelity::Lossless,
        CODEC_KIVI_INT8 => Fidelity::Lossy {
            codec,
            error_bound: crate::quant::Kivi::error_bound(8),
        },
        CODEC_KIVI_INT4 => Fidelity::Lossy {
            codec,
            error_bound: crate::quant::Kivi::error_bound(4),
        },
        CODEC_FP8_E4M3 => Fidelity::Lossy {
            codec,
            error_bound: crate::fp8::FP8_REL_BOUND,
        },
        other => return Err(CompressError::UnknownCodec(other)),
    })
}

/// Decodes any container whose codec needs no external state. xKV chunks need their basis:
/// use [`crate::xkv::xkv_decode`].
pub fn decode_any(encoded: &[u8]) -> Result<(Fidelity, Vec<u8>)> {
    // Each decoder parses and checksums the container itself: one pass over the bytes, not two.
    let codec = container::peek_codec(encoded)?;
    let fidelity = match codec {
        CODEC_XKV => return Err(CompressError::NeedsBasis(codec)),
        other => static_fidelity(other)?,
    };
    let raw = match codec {
        CODEC_LZ4 => crate::lossless::decode_plain(encoded)?,
        CODEC_PLANES_LZ4 => crate::lossless::decode_planes(encoded)?,
        CODEC_KIVI_INT8 | CODEC_KIVI_INT4 => crate::quant::decode_kivi(encoded)?,
        CODEC_FP8_E4M3 => crate::fp8::decode_fp8(encoded)?,
        CODEC_XKV => return Err(CompressError::NeedsBasis(codec)),
        other => return Err(CompressError::UnknownCodec(other)),
    };
    Ok((fidelity, raw))
}
