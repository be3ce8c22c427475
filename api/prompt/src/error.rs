//! The error type of stored-prompt operations. It says what went wrong in domain terms; `kvtier`
//! (the server) maps it to its error kinds, and from there to HTTP statuses and wire codes.

use kvtier_cache::{CacheError, ChunkKey, Fidelity};
use kvtier_index::IndexError;

/// Everything that can go wrong reading, indexing or pruning a stored prompt.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The request cannot be applied as given: a value out of range, vectors of the wrong
    /// shape, or a prompt of the wrong kind (unregistered or mixed layouts, not raw, not MHA).
    #[error("{0}")]
    Invalid(String),
    /// A chunk the request names is not stored for this tenant.
    #[error("chunk {0} is not stored")]
    NotStored(ChunkKey),
    /// A chunk is only held lossy and the operation needs exact data.
    #[error("chunk {key} is only held lossy ({fidelity}) and this request needs exact data")]
    OnlyLossy { key: ChunkKey, fidelity: Fidelity },
    /// A chunk's layout fingerprint is not among the registered layouts.
    #[error("layout {layout:016x} of chunk {key} is not registered (add it to `layouts`)")]
    UnknownLayout { key: ChunkKey, layout: u64 },
    /// Budgets rewrite chunks lossy: only tenants that accept lossy data may apply them.
    #[error(
        "tenant {tenant:016x} does not accept lossy data; list it in lossy_tenants to prune its prompts"
    )]
    LossyNotAllowed { tenant: u64 },
    /// One upload of queries is larger than the whole retrieval memory budget.
    #[error("{} MiB of queries exceed retrieval_index_bytes ({} MiB)", bytes >> 20, budget >> 20)]
    QueriesOverBudget { bytes: u64, budget: u64 },
    /// Building a retrieval index failed.
    #[error("index build failed: {0}")]
    IndexBuild(IndexError),
    /// An index operation failed on data this crate prepared itself (a bug, not the caller's).
    #[error("{0}")]
    Index(IndexError),
    /// The store refused a read or a write.
    #[error(transparent)]
    Store(#[from] CacheError),
}

/// Results of this crate.
pub type Result<T, E = PromptError> = std::result::Result<T, E>;
