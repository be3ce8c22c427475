//! How data-plane requests are answered: the frame on its way to the writer ([`Outgoing`]), a
//! reply now or later ([`Reply`]), and why a connection ends early ([`Fatal`]).
//!
//! A leaf of `server`: the connection loop (`conn`) and the request handlers (`handlers`,
//! `retrieve`) both build on it, and it imports neither.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;

use bytes::Bytes;

use crate::error::ApiError;
use crate::wire::{self, OkHeader, WireError, WireHeader};

/// A response on its way to the writer task.
pub(crate) struct Outgoing {
    pub head: Vec<u8>,
    pub payload: Vec<Bytes>,
    /// Descriptors sent right after the frame (Unix sockets only).
    pub fds: Vec<OwnedFd>,
    /// Close the connection after this frame.
    pub close: bool,
}

impl Outgoing {
    pub fn frame(head: Vec<u8>) -> Self {
        Outgoing {
            head,
            payload: Vec::new(),
            fds: Vec::new(),
            close: false,
        }
    }

    pub fn error(request_id: u64, err: &ApiError) -> Self {
        Outgoing::frame(wire::error_frame(
            request_id,
            err.kind().wire_code(),
            &err.to_string(),
        ))
    }
}

type Work = Pin<Box<dyn Future<Output = Result<Outgoing, ApiError>> + Send>>;

/// How a request is answered.
pub(crate) enum Reply {
    Now(Result<Outgoing, ApiError>),
    Later(Work),
}

/// A reply computed on a blocking thread (work that may touch disk or copy large buffers).
pub(super) fn later(f: impl FnOnce() -> Result<Outgoing, ApiError> + Send + 'static) -> Reply {
    Reply::Later(Box::pin(async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::Internal(format!("request task failed: {e}")))?
    }))
}

/// The head of a response frame (request id 0: the connection stamps the real one).
pub(super) fn frame<T: WireHeader>(header: &T, payload_len: u64) -> Result<Vec<u8>, ApiError> {
    wire::frame_head(T::OPCODE, 0, 0, header, payload_len)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// A bare `Ok` response.
pub(super) fn ok_frame() -> Result<Outgoing, ApiError> {
    Ok(Outgoing::frame(frame(&OkHeader {}, 0)?))
}

/// Why a connection ends early.
pub(crate) enum Fatal {
    /// A frame broke a rule: answer with an error frame (for this request id) and close.
    Wire(u64, WireError),
    /// Authentication failed.
    Denied(ApiError),
    /// The peer went away.
    Closed,
}

impl From<WireError> for Fatal {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(_) => Fatal::Closed,
            e => Fatal::Wire(0, e),
        }
    }
}
