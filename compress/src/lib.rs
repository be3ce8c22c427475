//! kvtier-compress: codecs over chunk payloads.
//!
//! - [`lossless`]: byte planes + lz4 ([`PlanesLz4`]) and plain lz4 ([`PlainLz4`]); bit-exact.
//! - [`quant`]: KIVI int8/int4 (keys per channel, values per token); [`fp8`]: E4M3 per token row.
//! - [`xkv`]: cross-layer SVD with a basis shared by a span of chunks.
//! - [`policy`]: which codec a tier uses (never a lossy one for an exact-only namespace);
//! - [`store_codec`]: [`StoreCodec`], the codec hook of the store's encoding tiers applying that
//!   policy. The rule that exact callers never get lossy data is the store's
//!   (`kvtier_cache::TieredStore::get`), which every read passes through.
//!
//! Every encoded chunk is a [`container`]: magic, version, codec id, params, lengths and a
//! CRC32C, so a chunk always says how to decode it and what fidelity it has ([`inspect`]).
//! Pure, synchronous CPU code; depends only on `kvtier-cache`.

pub mod codec;
pub mod container;
pub mod error;
pub mod fp8;
pub mod lossless;
pub mod policy;
pub mod quant;
pub mod shape;
pub mod store_codec;
pub mod xkv;

pub use codec::{
    CODEC_FP8_E4M3, CODEC_KIVI_INT4, CODEC_KIVI_INT8, CODEC_LZ4, CODEC_PLANES_LZ4, CODEC_XKV,
    CODEC_XKV_BASIS, Codec, decode_any, inspect,
};
pub use error::{CompressError, Result};
pub use fp8::Fp8E4m3;
pub use lossless::{PlainLz4, PlanesLz4};
pub use policy::{CodecChoice, NamespaceFidelity};
pub use quant::Kivi;
pub use store_codec::StoreCodec;
pub use xkv::{RankRule, XkvBasis, XkvFit, XkvParams, xkv_decode, xkv_encode};

#[cfg(test)]
mod testdata;
