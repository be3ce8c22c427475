//! The service's error type and its kinds. Every error has one [`ErrorKind`], and the kind alone
//! decides the HTTP status, the JSON `code` of the control plane and the wire error code of the
//! data plane, in one table ([`ErrorKind::mapping`]). Errors of the lower crates
//! (`CacheError`, `PromptError`) become `ApiError`s here, and nowhere else.

use kvtier_cache::CacheError;
use kvtier_prompt::PromptError;

use crate::config::ConfigError;
use crate::wire::ErrorCode;

/// Errors a request can end with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("store full: {0}")]
    Full(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The configuration cannot be used (the service does not start).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An I/O failure starting or stopping the service (binding a listener, a socket file, a
    /// background thread), with what was being done. The cause is part of the message, not a
    /// `source`, so a printed chain does not repeat it.
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        let msg = e.to_string();
        match e {
            CacheError::TierFull { .. } => ApiError::Full(msg),
            CacheError::PayloadTooLarge { .. } => ApiError::TooLarge(msg),
            CacheError::LengthMismatch { .. }
            | CacheError::NotWholeTokens { .. }
            | CacheError::InvalidLayout(_)
            | CacheError::ReservedCodec(_) => ApiError::BadRequest(msg),
            CacheError::Codec(_) => ApiError::Internal(msg),
            CacheError::NotFound(_) | CacheError::LeaseNotFound(_) => ApiError::NotFound(msg),
            CacheError::Corrupt(_) | CacheError::UnsupportedVersion { .. } => {
                ApiError::Corrupt(msg)
            }
            CacheError::Io { .. } | CacheError::Backend { .. } => ApiError::Unavailable(msg),
        }
    }
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> Self {
        let msg = e.to_string();
        match e {
            PromptError::Invalid(_)
            | PromptError::OnlyLossy { .. }
            | PromptError::UnknownLayout { .. }
            | PromptError::LossyNotAllowed { .. } => ApiError::BadRequest(msg),
            PromptError::NotStored(_) => ApiError::NotFound(msg),
            PromptError::QueriesOverBudget { .. } => ApiError::Full(msg),
            PromptError::IndexBuild(_) | PromptError::Index(_) => ApiError::Internal(msg),
            PromptError::Store(e) => e.into(),
        }
    }
}

/// What kind of failure an error is, independent of its wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Unauthorized,
    NotFound,
    BadRequest,
    TooLarge,
    Full,
    Corrupt,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::BadRequest,
        ErrorKind::TooLarge,
        ErrorKind::Full,
        ErrorKind::Corrupt,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    /// The one table: HTTP status, control-plane JSON code (stable across message wording
    /// changes) and data-plane wire code of each kind.
    const fn mapping(self) -> (u16, &'static str, ErrorCode) {
        match self {
            ErrorKind::Unauthorized => (401, "unauthorized", ErrorCode::Unauthorized),
            ErrorKind::NotFound => (404, "not_found", ErrorCode::NotFound),
            ErrorKind::BadRequest => (400, "bad_request", ErrorCode::InvalidArgument),
            ErrorKind::TooLarge => (413, "too_large", ErrorCode::TooLarge),
            ErrorKind::Full => (507, "full", ErrorCode::TierFull),
            ErrorKind::Corrupt => (500, "corrupt", ErrorCode::Corrupt),
            ErrorKind::Unavailable => (503, "unavailable", ErrorCode::Busy),
            ErrorKind::Internal => (500, "internal", ErrorCode::Internal),
        }
    }

    /// The HTTP status of this kind.
    pub const fn http_status(self) -> u16 {
        self.mapping().0
    }

    /// The machine-readable `code` of control-plane error bodies.
    pub const fn code(self) -> &'static str {
        self.mapping().1
    }

    /// The code of data-plane error frames.
    pub const fn wire_code(self) -> ErrorCode {
        self.mapping().2
    }
}

impl ApiError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Unauthorized(_) => ErrorKind::Unauthorized,
            ApiError::NotFound(_) => ErrorKind::NotFound,
            ApiError::BadRequest(_) => ErrorKind::BadRequest,
            ApiError::TooLarge(_) => ErrorKind::TooLarge,
            ApiError::Full(_) => ErrorKind::Full,
            ApiError::Corrupt(_) => ErrorKind::Corrupt,
            ApiError::Unavailable(_) => ErrorKind::Unavailable,
            ApiError::Internal(_) => ErrorKind::Internal,
            ApiError::Config(_) => ErrorKind::BadRequest,
            ApiError::Io { .. } => ErrorKind::Unavailable,
        }
    }

    /// Wraps an I/O error with a short description of what was being done.
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        ApiError::Io {
            context: context.into(),
            error,
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        self.kind().http_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_cache::ChunkKey;

    #[test]
    fn every_error_kind_has_a_distinct_code() {
        let all = [
            ApiError::Unauthorized(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::BadRequest(String::new()),
            ApiError::TooLarge(String::new()),
            ApiError::Full(String::new()),
            ApiError::Corrupt(String::new()),
            ApiError::Unavailable(String::new()),
            ApiError::Internal(String::new()),
        ];
        let kinds: std::collections::BTreeSet<_> = all.iter().map(|e| e.kind().code()).collect();
        assert_eq!(kinds.len(), all.len());
        assert_eq!(all.len(), ErrorKind::ALL.len());
        let wire: std::collections::HashSet<_> =
            ErrorKind::ALL.iter().map(|k| k.wire_code()).collect();
        assert_eq!(wire.len(), ErrorKind::ALL.len(), "one wire code per kind");
    }

    #[test]
    fn prompt_errors_map_to_the_kinds_their_callers_saw_before() {
        let cases = [
            (PromptError::Invalid("x".into()), 400),
            (PromptError::NotStored(ChunkKey(1)), 404),
            (PromptError::LossyNotAllowed { tenant: 1 }, 400),
            (
                PromptError::QueriesOverBudget {
                    bytes: 2 << 20,
                    budget: 1 << 20,
                },
                507,
            ),
            (PromptError::Store(CacheError::Corrupt("x".into())), 500),
        ];
        for (e, status) in cases {
            let msg = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.http_status(), status, "{api}");
            assert!(api.to_string().ends_with(&msg), "{api}");
        }
    }
}
