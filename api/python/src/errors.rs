//! Python exceptions for kvtier's errors: `KvtierError` is the base; every wire error code has
//! its own subclass (`NotFoundError` for `NotFound`, ...), and failures that never reached the
//! server are `ConnectError`, `ClosedError` or `ProtocolError`. The mapping is one match over
//! [`ErrorCode`], so a new code fails to compile here until it has a class.

use kvtier_client::ClientError;
use kvtier_wire::ErrorCode;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _kvtier,
    KvtierError,
    PyException,
    "Base class of every kvtier error."
);
create_exception!(
    _kvtier,
    ConnectError,
    KvtierError,
    "The server could not be reached."
);
create_exception!(
    _kvtier,
    ClosedError,
    KvtierError,
    "The connection to kvtier closed."
);
create_exception!(
    _kvtier,
    ProtocolError,
    KvtierError,
    "The server's reply broke the protocol, or keys disagree."
);
create_exception!(
    _kvtier,
    BadFrameError,
    KvtierError,
    "The server refused a malformed frame (code 1)."
);
create_exception!(
    _kvtier,
    UnauthorizedError,
    KvtierError,
    "Missing or wrong token, or another tenant's chunk (code 2)."
);
create_exception!(
    _kvtier,
    NotFoundError,
    KvtierError,
    "No such chunk (code 3)."
);
create_exception!(
    _kvtier,
    TierFullError,
    KvtierError,
    "The store has no room for the chunk (code 4)."
);
create_exception!(
    _kvtier,
    TooLargeError,
    KvtierError,
    "A request or chunk is over a limit (code 5)."
);
create_exception!(
    _kvtier,
    CorruptError,
    KvtierError,
    "Stored data failed its checksum and was not served (code 6)."
);
create_exception!(
    _kvtier,
    UnsupportedError,
    KvtierError,
    "The server does not support the request (code 7)."
);
create_exception!(
    _kvtier,
    BusyError,
    KvtierError,
    "The server is overloaded; retry later (code 8)."
);
create_exception!(
    _kvtier,
    InternalError,
    KvtierError,
    "The server failed internally (code 9)."
);
create_exception!(
    _kvtier,
    InvalidArgumentError,
    KvtierError,
    "The request's arguments are invalid (code 10)."
);

/// The Python exception for a client error.
pub(crate) fn to_py(e: ClientError) -> PyErr {
    let msg = e.to_string();
    match &e {
        ClientError::Connect { .. } => ConnectError::new_err(msg),
        ClientError::Closed => ClosedError::new_err(msg),
        ClientError::Io(_) => ClosedError::new_err(msg),
        ClientError::Protocol(_) | ClientError::Wire(_) => ProtocolError::new_err(msg),
        ClientError::Server { code, .. } => match code {
            Some(ErrorCode::BadFrame) => BadFrameError::new_err(msg),
            Some(ErrorCode::Unauthorized) => UnauthorizedError::new_err(msg),
            Some(ErrorCode::NotFound) => NotFoundError::new_err(msg),
            Some(ErrorCode::TierFull) => TierFullError::new_err(msg),
            Some(ErrorCode::TooLarge) => TooLargeError::new_err(msg),
            Some(ErrorCode::Corrupt) => CorruptError::new_err(msg),
            Some(ErrorCode::Unsupported) => UnsupportedError::new_err(msg),
            Some(ErrorCode::Busy) => BusyError::new_err(msg),
            Some(ErrorCode::InvalidArgument) => InvalidArgumentError::new_err(msg),
            // Codes this version does not know are treated as internal (kvtier-wire's rule).
            Some(ErrorCode::Internal) | None => InternalError::new_err(msg),
        },
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KvtierError", py.get_type::<KvtierError>())?;
    m.add("ConnectError", py.get_type::<ConnectError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("BadFrameError", py.get_type::<BadFrameError>())?;
    m.add("UnauthorizedError", py.get_type::<UnauthorizedError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("TierFullError", py.get_type::<TierFullError>())?;
    m.add("TooLargeError", py.get_type::<TooLargeError>())?;
    m.add("CorruptError", py.get_type::<CorruptError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("BusyError", py.get_type::<BusyError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    Ok(())
}
