//! The error type of `kvtier-index`.

/// Everything that can go wrong while building or searching an index, or allocating budgets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IndexError {
    /// A flat buffer is not a whole number of rows of the stated width.
    #[error("buffer of {len} values is not a whole number of rows of width {dim}")]
    RaggedMatrix { len: usize, dim: usize },
    /// A query (or build query set) has a different dimension than the keys.
    #[error("dimension mismatch: index has {expected}, got {got}")]
    DimensionMismatch { expected: usize, got: usize },
    /// An index was asked to build over zero keys, or a width of zero.
    #[error("cannot build an index over an empty key set")]
    EmptyKeys,
    /// The attention-aware index needs the prompt's query vectors and none were given.
    #[error("the attention-aware index needs build queries")]
    MissingQueries,
    /// A value that must be finite was NaN or infinite.
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    /// A configuration parameter is out of its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    /// A token budget cannot hold the tokens a policy always keeps.
    #[error("budget of {budget} tokens is below the {required} tokens the policy always keeps")]
    BudgetTooSmall { budget: usize, required: usize },
    /// A position list names a token outside the prompt, or is not strictly increasing.
    #[error("invalid positions: {0}")]
    InvalidPositions(String),
    /// A KV payload does not have the length its layout and token count imply.
    #[error("kv payload of {got} bytes does not match the {expected} bytes the layout expects")]
    PayloadLength { expected: usize, got: usize },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, IndexError>;

/// Builds an [`IndexError::InvalidParameter`].
pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> IndexError {
    IndexError::InvalidParameter {
        name,
        reason: reason.into(),
    }
}
