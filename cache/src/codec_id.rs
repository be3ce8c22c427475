//! The one table of codec ids: what [`crate::ChunkMeta::codec`] (and an encoded container) may
//! say about a payload, and the name each id is shown with.
//!
//! The codecs themselves live above this crate (`kvtier-compress` implements 1–6 and the xKV
//! basis, `kvtier-index` the pruned form 7); they take their ids from here so that no two places
//! can disagree. Ids not in [`CHUNK_CODECS`] are a client's private encodings, stored as given.

/// A payload stored as the engine produced it.
pub const RAW: u16 = 0;
/// Plain lz4 block over the raw bytes (lossless baseline).
pub const LZ4: u16 = 1;
/// Byte planes (+ token XOR of the top plane) + lz4 (lossless).
pub const PLANES_LZ4: u16 = 2;
/// KIVI int8: keys per channel, values per token.
pub const KIVI_INT8: u16 = 3;
/// KIVI int4: keys per channel, values per token.
pub const KIVI_INT4: u16 = 4;
/// FP8 E4M3 with per-token-row scales.
pub const FP8_E4M3: u16 = 5;
/// xKV cross-layer SVD chunk (needs its basis to decode).
pub const XKV: u16 = 6;
/// A chunk pruned to per-layer token budgets (cannot be expanded back).
pub const PRUNED: u16 = 7;
/// An xKV basis record: a container, but never a chunk's codec.
pub const XKV_BASIS: u16 = 0x100;

/// Every chunk codec of this build with its name.
pub const CHUNK_CODECS: [(u16, &str); 8] = [
    (RAW, "raw"),
    (LZ4, "lz4"),
    (PLANES_LZ4, "lossless"),
    (KIVI_INT8, "int8"),
    (KIVI_INT4, "int4"),
    (FP8_E4M3, "fp8"),
    (XKV, "xkv"),
    (PRUNED, "pruned"),
];

/// The name of a chunk codec id; `"private"` for ids this build does not define.
pub fn name(id: u16) -> &'static str {
    CHUNK_CODECS
        .iter()
        .find(|(c, _)| *c == id)
        .map_or("private", |(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_named() {
        for (i, (a, _)) in CHUNK_CODECS.iter().enumerate() {
            assert!(CHUNK_CODECS[i + 1..].iter().all(|(b, _)| a != b));
        }
        assert_eq!(name(RAW), "raw");
        assert_eq!(name(PLANES_LZ4), "lossless");
        assert_eq!(name(PRUNED), "pruned");
        assert_eq!(name(XKV_BASIS), "private", "a basis is not a chunk codec");
        assert_eq!(name(900), "private");
    }
}
