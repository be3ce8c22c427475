//! The error type of the core store.

use crate::tier::TierKind;

/// Everything that can go wrong inside `kvtier-cache` and the tiers that implement its traits.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A tier has no room for `needed` more bytes even after eviction.
    #[error("{tier} tier full: {needed} bytes needed, budget {budget} bytes")]
    TierFull {
        tier: TierKind,
        needed: u64,
        budget: u64,
    },
    /// A payload is larger than any slot or record the tier can hold.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: u64, max: u64 },
    /// The payload length does not match what the layout says a chunk of that many tokens holds.
    #[error("payload of {got} bytes does not match the {expected} bytes the layout expects")]
    LengthMismatch { expected: u64, got: u64 },
    /// A payload length that is not a whole, non-zero number of tokens of its layout.
    #[error("{len} bytes is not a whole number of {per_token}-byte tokens")]
    NotWholeTokens { len: usize, per_token: usize },
    /// A layout parameter is out of range.
    #[error("invalid layout: {0}")]
    InvalidLayout(String),
    /// The chunk does not exist, or belongs to another tenant (the two are indistinguishable).
    #[error("chunk {0} not found")]
    NotFound(String),
    /// A lease id that is unknown or already expired.
    #[error("lease {0} not found or expired")]
    LeaseNotFound(u64),
    /// A stored record failed its checksum or structural checks; it is never served.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// An on-disk format version this build does not understand.
    #[error("unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    /// A client tried to put a payload tagged with one of the store's own codec ids.
    #[error(
        "codec {0} is reserved for encodings the store applies itself; put raw chunks (codec 0) or use a private codec id"
    )]
    ReservedCodec(u16),
    /// A codec failed to encode a chunk.
    #[error("codec error: {0}")]
    Codec(String),
    /// An I/O error from a tier backend, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A backend-specific failure (remote server unreachable, device error, ...).
    #[error("{tier} tier backend error: {message}")]
    Backend { tier: TierKind, message: String },
}

impl CacheError {
    /// Wraps an I/O error with a short description of the operation that failed.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CacheError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
