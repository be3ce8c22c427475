//! kvtier-compress: codecs over chunk payloads.
//!
//! - [`lossless`]: byte planes + lz4 ([`PlanesLz4`]) and plain lz4 ([`PlainLz4`]); bit-exact.
//! - [`quant`]: KIVI int8/int4 (keys per channel, values per token); [`fp8`]: E4M3 per token row.
//! - [`xkv`]: cross-layer SVD with a basis shared by a span of chunks.
//! - [`parallel`]: encode/decode many chunks at once on rayon's pool (call it from a blocking
//!   thread, never from an async worker).
//! - [`policy`]: which codec a tier uses, and the rule that exact callers never get lossy data;
//! - [`store_codec`]: [`StoreCodec`], the store's codec hook applying that policy.
//!
//! Every encoded chunk is a [`container`]: magic, version, codec id, params, lengths and a
//! CRC32C, so a chunk always says how to decode it and what fidelity it has ([`inspect`]).
//! Pure, synchronous CPU code; depends only on `kvtier-cache`.

pub mod codec;
pub mod container;
pub mod error;
pub mod fp8;
pub mod lossless;
pub mod parallel;
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
pub use parallel::{decode_many, encode_many, xkv_decode_many, xkv_encode_many};
pub use policy::{CodecChoice, NamespaceFidelity, choose_codec, serves};
pub use quant::Kivi;
pub use store_codec::StoreCodec;
pub use xkv::{RankRule, XkvBasis, XkvFit, XkvParams, xkv_decode, xkv_encode};

#[cfg(test)]
mod testdata;
