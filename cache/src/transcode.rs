//! The codec hook of the store's slower tiers: a [`Transcoder`] encodes chunks on their way into
//! a tier and decodes them on the way back. [`crate::EncodingTier`] applies it to a tier.
//!
//! `kvtier-compress` implements it (with a layout registry and a per-tier, per-namespace codec
//! policy). Contract:
//!
//! - only chunks that arrived raw ([`CODEC_RAW`]) are ever encoded; payloads a client encoded
//!   itself are stored as they came;
//! - every record whose codec [`Transcoder::owns`] is decoded before it is served or promoted,
//!   so callers always receive the layout's raw bytes, with the record's fidelity;
//! - a decode failure is treated like a checksum failure: the copy is dropped, never served.

use crate::error::Result;
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, TierKind};

/// One chunk encoded for a tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Codec id written into the record's metadata.
    pub codec: u16,
    /// What the decoded payload is relative to the raw chunk.
    pub fidelity: Fidelity,
    pub payload: Vec<u8>,
}

/// Encodes raw chunks for a tier and decodes stored ones. Implementations must be safe to call
/// from many threads at once; the store calls them from blocking threads only.
pub trait Transcoder: Send + Sync {
    /// Whether records tagged `codec` are this transcoder's encodings.
    fn owns(&self, codec: u16) -> bool;

    /// Encodes a raw chunk for `tier`; `Ok(None)` stores it raw (unknown layout, raw policy, or
    /// an encoding that would not be smaller).
    fn encode(&self, tier: TierKind, meta: &ChunkMeta, raw: &[u8]) -> Result<Option<Encoded>>;

    /// Decodes a payload stored under `meta` (whose codec this transcoder owns) back to the
    /// layout's raw bytes; the result is exactly `meta.raw_len` long.
    fn decode(&self, meta: &ChunkMeta, payload: &[u8]) -> Result<Vec<u8>>;
}

/// The fidelity of `original` data after encoding it with a codec of fidelity `codec`: lossless
/// keeps what it was given; a lossy codec on lossy input adds the two error bounds.
pub fn compose(original: Fidelity, codec: Fidelity) -> Fidelity {
    match (original, codec) {
        (o, Fidelity::Exact | Fidelity::Lossless) => match o {
            Fidelity::Exact => codec,
            other => other,
        },
        (
            Fidelity::Lossy { error_bound: a, .. },
            Fidelity::Lossy {
                codec: c,
                error_bound: b,
            },
        ) => Fidelity::Lossy {
            codec: c,
            error_bound: a + b,
        },
        (_, lossy) => lossy,
    }
}

/// The metadata a decoded copy is served with: raw codec, and the record's fidelity unless it
/// is merely lossless (then the chunk is what was put).
pub fn served_meta(logical: &ChunkMeta, record: &ChunkMeta) -> ChunkMeta {
    let mut m = *logical;
    m.codec = CODEC_RAW;
    m.raw_len = record.raw_len;
    if !record.fidelity.is_exact() {
        m.fidelity = record.fidelity;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const L8: Fidelity = Fidelity::Lossy {
        codec: 3,
        error_bound: 0.01,
    };

    #[test]
    fn composition_keeps_the_worst_and_adds_bounds() {
        assert_eq!(
            compose(Fidelity::Exact, Fidelity::Lossless),
            Fidelity::Lossless
        );
        assert_eq!(compose(Fidelity::Exact, L8), L8);
        assert_eq!(compose(L8, Fidelity::Lossless), L8);
        let twice = compose(L8, L8);
        assert!(
            matches!(twice, Fidelity::Lossy { error_bound, .. } if (error_bound - 0.02).abs() < 1e-6)
        );
    }

    #[test]
    fn served_meta_is_raw_and_honest() {
        let logical = ChunkMeta::raw(1, 2, 3, 4, 100);
        let mut rec = logical;
        rec.codec = 2;
        rec.fidelity = Fidelity::Lossless;
        assert_eq!(served_meta(&logical, &rec), logical);
        rec.fidelity = L8;
        let s = served_meta(&logical, &rec);
        assert_eq!((s.codec, s.fidelity), (CODEC_RAW, L8));
    }
}
