//! `kvtier-wire`: the frame layer of the binary data plane (TCP and Unix sockets), shared by the
//! server, the client and anything else that speaks the protocol. Pure framing: it reads and
//! writes through tokio's I/O traits and owns no sockets or runtime.
//!
//! # Frame
//! Every frame is a fixed 32-byte preamble, then `header_len` bytes of rkyv-archived header, then
//! `payload_len` payload bytes. The preamble, little-endian:
//!
//! | offset | size | field                                          |
//! |--------|------|------------------------------------------------|
//! | 0      | 4    | magic `b"KVTW"`                                |
//! | 4      | 1    | version, [`VERSION`] = 1                       |
//! | 5      | 1    | opcode ([`Opcode`])                            |
//! | 6      | 2    | flags (only bits in [`Limits::allowed_flags`]) |
//! | 8      | 8    | request id                                     |
//! | 16     | 4    | header_len                                     |
//! | 20     | 8    | payload_len                                    |
//! | 28     | 4    | header_crc: CRC32C of the header bytes         |
//!
//! The header is length-prefixed (by the preamble) because rkyv puts the root object at the *end*
//! of its buffer: a header followed by a payload could not be accessed as one slice. Headers are
//! read into a 16-byte-aligned [`AlignedVec`] and validated in place with bytecheck
//! ([`access_header`]); nothing is deserialised on the hot path. The payload is left in the
//! stream by [`read_frame_head`] so the caller reads it straight into its destination slot
//! ([`read_payload_into`]); senders write it from the chunk's memory with vectored writes
//! ([`write_frame`]). Neither side copies payload bytes through an intermediate buffer.
//!
//! # Requests and responses
//! A connection carries many requests at once. A response carries its request's id and may come
//! back in any order. Every request opcode has one success opcode (see [`Opcode::response`]),
//! and any request may instead be answered by [`Opcode::Error`]. Every opcode has exactly one
//! header type ([`WireHeader::OPCODE`]); `ShmGet` is answered by `GetOk` with no payload.
//!
//! # Limits
//! [`Limits`] bounds every length field. A frame breaking a rule is a distinct [`WireError`]; the
//! server answers with an error frame and closes that connection only. Beyond the global payload
//! bound, each opcode has its own payload cap ([`Opcode::max_payload`]): only `Put`, `Lookup`
//! (token ids, little-endian `u32`, at most [`MAX_LOOKUP_TOKENS`]), `GetOk`, `Retrieve`,
//! `RetrieveOk` and `TransferLayers` carry a payload.
//!
//! # Transfers
//! Prefill→decode transfers ([`transfer`](crate::TransferBeginHeader) headers) move one request
//! as a manifest (`TransferBegin`) and one `TransferLayers` frame per run of layers whose payload
//! is, for each chunk in manifest order, that layer range of the chunk's layer-major payload;
//! `WaitLayers` reports the arrived prefix of layers; `TransferPush`/`TransferPull` ask a server
//! to move chunks it holds to (or fetch them from) a peer.
//!
//! Key lists are capped at [`MAX_KEYS`], but with the default 64 KiB header bound the real cap is
//! lower: 4096 16-byte keys alone fill 64 KiB, and a `GetOk` entry is far larger than a key.
//! [`Limits::max_keys`] gives the largest key count whose request *and* response headers both fit;
//! the server advertises it in `HelloOk` and clients batch by it. A `LookupOk` lists at most that
//! many hits (the server reports the shorter prefix).

mod frame;
mod headers;
#[cfg(test)]
mod io_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
mod transfer;

pub use frame::{
    PREAMBLE_LEN, Preamble, access_header, check_header_crc, decode_frame, decode_header,
    discard_payload, encode_header, error_frame, frame_head, read_frame_head, read_payload_into,
    validate_header, write_frame,
};
pub use headers::*;
pub use rkyv::util::AlignedVec;
pub use transfer::*;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"KVTW";
/// Protocol version carried in every preamble and in `Hello`.
pub const VERSION: u8 = 1;

/// Flag: the sender wants no success response (errors are still sent). Lets a client stream
/// `Put`s without a round trip each; the request id still identifies a failure.
pub const FLAG_NO_REPLY: u16 = 0x0001;
/// Every flag bit this version defines.
pub const KNOWN_FLAGS: u16 = FLAG_NO_REPLY;

/// Hard cap on any key or lease-id list in a header (the design's figure). [`Limits::max_keys`]
/// is usually lower.
pub const MAX_KEYS: usize = 4096;
/// Largest `k` one `Retrieve` may ask for (the service's own bound, `kvtier::retrieval::MAX_K`,
/// is asserted equal at compile time).
pub const MAX_RETRIEVE_K: u32 = 4096;
/// Largest query payload of one `Retrieve` (f32 query vectors).
pub const MAX_RETRIEVE_QUERY_BYTES: u64 = 16 << 20;

/// Most token ids one `Lookup` may carry in its payload.
pub const MAX_LOOKUP_TOKENS: u64 = 1 << 20;

/// Bounds on every length field of a frame. Both peers should use the same values; the server
/// sends its own in `HelloOk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest archived header, bytes.
    pub max_header_len: u32,
    /// Largest payload of any frame, bytes (a Llama-3.1-8B chunk is 32 MiB).
    pub max_payload_len: u64,
    /// Flag bits a peer may set; any other bit is [`WireError::UnknownFlags`].
    pub allowed_flags: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_len: 64 << 10,
            max_payload_len: (1 << 30) + (64 << 10),
            allowed_flags: KNOWN_FLAGS,
        }
    }
}

impl Limits {
    /// The most keys one request may name so that the request header and the largest response
    /// header (`GetOk`, `GetLocatedOk`, `LookupOk`, `LeaseOk`) both fit in `max_header_len`.
    /// Archived vectors are contiguous arrays of fixed-size elements, so the size is exact up to
    /// the root struct and alignment padding, which [`HEADER_SLACK`] covers.
    pub fn max_keys(&self) -> usize {
        let per_key = [
            size_of::<ArchivedGetEntry>(),
            size_of::<ArchivedLocatedEntry>(),
            size_of::<ArchivedLookupHit>(),
            size_of::<rkyv::Archived<u128>>(),
        ]
        .into_iter()
        .max()
        .unwrap_or(1);
        let room = (self.max_header_len as usize).saturating_sub(HEADER_SLACK);
        (room / per_key).min(MAX_KEYS)
    }
}

/// Bytes reserved in a header for everything besides its key-sized array: the root struct
/// (under 100 bytes for every header with a list) and up to 16 bytes of alignment padding.
pub const HEADER_SLACK: usize = 256;

/// The message kinds. Requests are `0x01..=0x7f`; their responses set the top bit.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    Hello = 0x01,
    Put = 0x02,
    Get = 0x03,
    Lookup = 0x04,
    Lease = 0x05,
    Release = 0x06,
    Delete = 0x07,
    Stats = 0x08,
    ShmRegister = 0x09,
    ShmPut = 0x0a,
    ShmGet = 0x0b,
    MapArenas = 0x0c,
    GetLocated = 0x0d,
    Retrieve = 0x0e,
    HelloOk = 0x81,
    Ok = 0x82,
    GetOk = 0x83,
    LookupOk = 0x84,
    LeaseOk = 0x85,
    DeleteOk = 0x87,
    StatsOk = 0x88,
    ShmRegisterOk = 0x89,
    MapArenasOk = 0x8c,
    GetLocatedOk = 0x8d,
    RetrieveOk = 0x8e,
    Error = 0xff,
    TransferBegin = 0x0f,
    TransferLayers = 0x10,
    WaitLayers = 0x11,
    TransferPush = 0x12,
    TransferPull = 0x13,
    TransferBeginOk = 0x8f,
    WaitLayersOk = 0x91,
    TransferOk = 0x92,
}

impl Opcode {
    pub const ALL: [Opcode; 34] = [
        Opcode::Hello,
        Opcode::Put,
        Opcode::Get,
        Opcode::Lookup,
        Opcode::Lease,
        Opcode::Release,
        Opcode::Delete,
        Opcode::Stats,
        Opcode::ShmRegister,
        Opcode::ShmPut,
        Opcode::ShmGet,
        Opcode::MapArenas,
        Opcode::GetLocated,
        Opcode::Retrieve,
        Opcode::HelloOk,
        Opcode::Ok,
        Opcode::GetOk,
        Opcode::LookupOk,
        Opcode::LeaseOk,
        Opcode::DeleteOk,
        Opcode::StatsOk,
        Opcode::ShmRegisterOk,
        Opcode::MapArenasOk,
        Opcode::GetLocatedOk,
        Opcode::RetrieveOk,
        Opcode::Error,
        Opcode::TransferBegin,
        Opcode::TransferLayers,
        Opcode::WaitLayers,
        Opcode::TransferPush,
        Opcode::TransferPull,
        Opcode::TransferBeginOk,
        Opcode::WaitLayersOk,
        Opcode::TransferOk,
    ];

    pub fn from_u8(b: u8) -> Option<Opcode> {
        Opcode::ALL.into_iter().find(|o| *o as u8 == b)
    }

    pub fn is_response(self) -> bool {
        self as u8 & 0x80 != 0
    }

    /// The success response of a request (`None` for responses).
    pub fn response(self) -> Option<Opcode> {
        use Opcode::*;
        Some(match self {
            Hello => HelloOk,
            Put | Release | ShmPut => Ok,
            Get | ShmGet => GetOk,
            Lookup => LookupOk,
            Lease => LeaseOk,
            Delete => DeleteOk,
            Stats => StatsOk,
            ShmRegister => ShmRegisterOk,
            MapArenas => MapArenasOk,
            GetLocated => GetLocatedOk,
            Retrieve => RetrieveOk,
            TransferBegin => TransferBeginOk,
            TransferLayers => Ok,
            WaitLayers => WaitLayersOk,
            TransferPush | TransferPull => TransferOk,
            _ => return None,
        })
    }

    /// Largest payload this opcode may carry under `limits`. Opcodes without a payload get 0, so
    /// a peer cannot make the other side drain gigabytes after, say, a `Stats` request.
    pub fn max_payload(self, limits: &Limits) -> u64 {
        match self {
            Opcode::Put | Opcode::GetOk | Opcode::RetrieveOk | Opcode::TransferLayers => {
                limits.max_payload_len
            }
            Opcode::Retrieve => limits.max_payload_len.min(MAX_RETRIEVE_QUERY_BYTES),
            Opcode::Lookup => limits.max_payload_len.min(MAX_LOOKUP_TOKENS * 4),
            _ => 0,
        }
    }
}

/// Everything that can go wrong reading or writing a frame. Each rule has its own variant so the
/// server can count and report them separately.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("unknown flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: u64, max: u64 },
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("connection closed mid-frame")]
    Truncated,
    #[error("peer stalled mid-frame")]
    Timeout,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The error code to send back for this error before closing the connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::HeaderTooLarge { .. } | WireError::PayloadTooLarge { .. } => {
                ErrorCode::TooLarge
            }
            WireError::UnsupportedVersion(_) | WireError::UnknownOpcode(_) => {
                ErrorCode::Unsupported
            }
            WireError::Io(_) => ErrorCode::Internal,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Why a request failed, carried in an `Error` frame as a `u16`.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadFrame = 1,
    Unauthorized = 2,
    NotFound = 3,
    TierFull = 4,
    TooLarge = 5,
    Corrupt = 6,
    Unsupported = 7,
    Busy = 8,
    Internal = 9,
    InvalidArgument = 10,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadFrame,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::TierFull,
        ErrorCode::TooLarge,
        ErrorCode::Corrupt,
        ErrorCode::Unsupported,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::InvalidArgument,
    ];

    /// `None` for codes this version does not know; a client should treat those as `Internal`
    /// rather than reject the frame, so servers can add codes.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u16 == v)
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c as u16
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        ErrorCode::from_u16(v).ok_or(v)
    }
}
