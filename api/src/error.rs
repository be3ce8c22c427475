//! The service's error type, and its mapping to HTTP statuses. (The data plane maps the same
//! variants to wire error codes in `server`.)

use kvtier_cache::CacheError;

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

impl ApiError {
    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::Unauthorized(_) => 401,
            ApiError::NotFound(_) => 404,
            ApiError::BadRequest(_) => 400,
            ApiError::TooLarge(_) => 413,
            ApiError::Full(_) => 507,
            ApiError::Corrupt(_) | ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }
}
