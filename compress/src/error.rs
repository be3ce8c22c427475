//! The crate's error type. Messages are lowercase with no trailing period (DESIGN.md style).

use thiserror::Error;

/// Everything that can go wrong while encoding or decoding a chunk.
#[derive(Debug, Error, PartialEq)]
pub enum CompressError {
    /// The container does not start with the kvtier codec magic.
    #[error("bad magic: not a kvtier encoded chunk")]
    BadMagic,
    /// The container was written by a format version this build does not know.
    #[error("unsupported container version {0}")]
    UnsupportedVersion(u16),
    /// The CRC32C over header and body does not match: the bytes were corrupted.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    /// A length field disagrees with the bytes present, or is out of bounds.
    #[error("bad length: {0}")]
    BadLength(String),
    /// The container names a codec id this build does not implement.
    #[error("unknown codec id {0}")]
    UnknownCodec(u16),
    /// The container holds a different codec than the one asked to decode it.
    #[error("codec mismatch: expected codec {expected}, found {found}")]
    CodecMismatch { expected: u16, found: u16 },
    /// Codec parameters (in a container or given by the caller) are invalid.
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// The raw input does not fit the layout (length, dtype or attention kind).
    #[error("input does not match layout: {0}")]
    LayoutMismatch(String),
    /// The compressed body could not be decompressed.
    #[error("corrupt body: {0}")]
    CorruptBody(String),
    /// A chunk refers to an xKV basis other than the one supplied.
    #[error("basis mismatch: chunk needs basis {expected:#018x}, got {found:#018x}")]
    BasisMismatch { expected: u64, found: u64 },
    /// The codec cannot decode without extra state (an xKV basis).
    #[error("codec {0} needs external state (an xkv basis) to decode")]
    NeedsBasis(u16),
    /// Linear algebra failed (an eigen-decomposition did not converge).
    #[error("linear algebra failed: {0}")]
    Linalg(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, CompressError>;
