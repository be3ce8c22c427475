//! Encoding, decoding, reading and writing frames.
//!
//! Reading is split in two so payloads never pass through a staging buffer: [`read_frame_head`]
//! reads and checks the preamble and header, then the caller reads the payload with
//! [`read_payload_into`] straight into wherever it belongs (a host-tier slot, a client buffer).

use std::io::IoSlice;
use std::time::Duration;

use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::headers::{ErrorHeader, HeaderVisitor, WireHeader, visit_header_type};
use super::{ErrorCode, Limits, MAGIC, Opcode, VERSION, WireError};

/// Bytes in a preamble.
pub const PREAMBLE_LEN: usize = 32;

/// The fixed part of a frame. Only a preamble that passed [`Preamble::decode`] exists on the
/// receiving side, so its lengths are within limits and its opcode and flags are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub opcode: Opcode,
    pub flags: u16,
    pub request_id: u64,
    pub header_len: u32,
    pub payload_len: u64,
    pub header_crc: u32,
}

impl Preamble {
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.opcode as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.header_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.payload_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.header_crc.to_le_bytes());
        b
    }

    /// Parses and checks a preamble, in field order, so the first broken rule is reported.
    pub fn decode(b: &[u8; PREAMBLE_LEN], limits: &Limits) -> Result<Preamble, WireError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(std::array::from_fn(|k| b[i + k]));
        if b[0..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[4] != VERSION {
            return Err(WireError::UnsupportedVersion(b[4]));
        }
        let opcode = Opcode::from_u8(b[5]).ok_or(WireError::UnknownOpcode(b[5]))?;
        let flags = u16_at(6);
        if flags & !limits.allowed_flags != 0 {
            return Err(WireError::UnknownFlags(flags & !limits.allowed_flags));
        }
        let header_len = u32_at(16);
        if header_len > limits.max_header_len {
            return Err(WireError::HeaderTooLarge {
                len: header_len.into(),
                max: limits.max_header_len.into(),
            });
        }
        let payload_len = u64_at(20);
        let max = opcode.max_payload(limits);
        if payload_len > max {
            return Err(WireError::PayloadTooLarge {
                len: payload_len,
                max,
            });
        }
        Ok(Preamble {
            opcode,
            flags,
            request_id: u64_at(8),
            header_len,
            payload_len,
            header_crc: u32_at(28),
        })
    }
}

/// Archives a header. The result is what goes on the wire between preamble and payload.
pub fn encode_header<T: WireHeader>(header: &T) -> Result<AlignedVec, WireError> {
    rkyv::to_bytes::<rancor::Error>(header).map_err(|e| WireError::InvalidHeader(e.to_string()))
}

/// Preamble plus archived header, ready to be written (vectored) ahead of the payload slices.
/// Fails if `opcode` is not `T`'s opcode or the header does not fit a `u32` length; the receiver
/// enforces its own [`Limits`], which the sender learns from `HelloOk`.
pub fn frame_head<T: WireHeader>(
    opcode: Opcode,
    request_id: u64,
    flags: u16,
    header: &T,
    payload_len: u64,
) -> Result<Vec<u8>, WireError> {
    if opcode != T::OPCODE {
        return Err(WireError::InvalidHeader(format!(
            "header for {:?} sent as {opcode:?}",
            T::OPCODE
        )));
    }
    let bytes = encode_header(header)?;
    let header_len = u32::try_from(bytes.len()).map_err(|_| WireError::HeaderTooLarge {
        len: bytes.len() as u64,
        max: u32::MAX.into(),
    })?;
    let pre = Preamble {
        opcode,
        flags,
        request_id,
        header_len,
        payload_len,
        header_crc: crc32c::crc32c(&bytes),
    };
    let mut out = Vec::with_capacity(PREAMBLE_LEN + bytes.len());
    out.extend_from_slice(&pre.encode());
    out.extend_from_slice(&bytes);
    Ok(out)
}

/// Longest error message sent; longer ones are cut at a character boundary so an error frame
/// always fits any sane header limit.
const MAX_ERROR_MESSAGE: usize = 1024;

/// A complete `Error` frame (no payload).
pub fn error_frame(request_id: u64, code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut end = msg.len().min(MAX_ERROR_MESSAGE);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let header = ErrorHeader {
        code: code as u16,
        message: msg[..end].to_string(),
    };
    // Archiving a u16 and a short string into a growable buffer has no failure path besides
    // allocation, which aborts anyway.
    frame_head(Opcode::Error, request_id, 0, &header, 0)
        .expect("an error header of bounded size always archives")
}

/// Checks the preamble's CRC32C against the header bytes.
pub fn check_header_crc(pre: &Preamble, header: &[u8]) -> Result<(), WireError> {
    if crc32c::crc32c(header) != pre.header_crc {
        return Err(WireError::HeaderChecksum);
    }
    Ok(())
}

/// Validates `buf` as the archived header of `opcode`, of type `T`, in place: the opcode must
/// be `T`'s, bytecheck must accept the bytes, and `T::check` its contents. `buf` must be the
/// exact header bytes (rkyv finds the root at the end).
pub fn access_header<T: WireHeader>(
    opcode: Opcode,
    buf: &AlignedVec,
) -> Result<&T::Archived, WireError> {
    if opcode != T::OPCODE {
        return Err(WireError::InvalidHeader(format!(
            "{opcode:?} frame read as a {:?} header",
            T::OPCODE
        )));
    }
    let archived = rkyv::access::<T::Archived, rancor::Error>(buf.as_slice())
        .map_err(|e| WireError::InvalidHeader(e.to_string()))?;
    T::check(archived).map_err(WireError::InvalidHeader)?;
    Ok(archived)
}

/// [`access_header`] then deserialises into an owned `T`. For cold paths (Hello, Stats) and
/// tests; hot paths should read the archived form in place.
pub fn decode_header<T: WireHeader>(opcode: Opcode, buf: &AlignedVec) -> Result<T, WireError> {
    let archived = access_header::<T>(opcode, buf)?;
    rkyv::deserialize::<T, rancor::Error>(archived)
        .map_err(|e| WireError::InvalidHeader(e.to_string()))
}

/// Validates `buf` as the header of `opcode`, whatever its type (see [`access_header`]).
pub fn validate_header(opcode: Opcode, buf: &AlignedVec) -> Result<(), WireError> {
    struct Validate<'a>(Opcode, &'a AlignedVec);
    impl HeaderVisitor for Validate<'_> {
        type Out = Result<(), WireError>;
        fn visit<T: WireHeader>(self) -> Self::Out {
            access_header::<T>(self.0, self.1).map(|_| ())
        }
    }
    visit_header_type(opcode, Validate(opcode, buf))
}

/// Decodes one whole frame held in memory: preamble, CRC, header validated as its opcode's type.
/// The header is copied into `buf` (rkyv needs it aligned); the payload is returned as the slice
/// of `bytes` that follows it. Bytes past the frame are ignored. Used by the fuzz target and
/// tests; sockets use [`read_frame_head`].
pub fn decode_frame<'b>(
    bytes: &'b [u8],
    limits: &Limits,
    buf: &mut AlignedVec,
) -> Result<(Preamble, &'b [u8]), WireError> {
    let raw: &[u8; PREAMBLE_LEN] = bytes
        .get(..PREAMBLE_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(WireError::Truncated)?;
    let pre = Preamble::decode(raw, limits)?;
    let rest = &bytes[PREAMBLE_LEN..];
    let header = rest
        .get(..pre.header_len as usize)
        .ok_or(WireError::Truncated)?;
    check_header_crc(&pre, header)?;
    buf.clear();
    buf.extend_from_slice(header);
    validate_header(pre.opcode, buf)?;
    let rest = &rest[header.len()..];
    // The preamble decoded, so payload_len is within limits; it may still exceed usize on
    // 32-bit targets, which `try_from` turns into Truncated rather than a wrap.
    let plen = usize::try_from(pre.payload_len).map_err(|_| WireError::Truncated)?;
    let payload = rest.get(..plen).ok_or(WireError::Truncated)?;
    Ok((pre, payload))
}

/// Fills `dst` from `r`, applying `stall_timeout` to every read: a peer that stops sending
/// mid-frame gets [`WireError::Timeout`], while one that sends slowly but steadily is not cut
/// off. EOF before `dst` is full is [`WireError::Truncated`].
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
    stall_timeout: Duration,
) -> Result<(), WireError> {
    let mut done = 0;
    while done < dst.len() {
        let n = tokio::time::timeout(stall_timeout, r.read(&mut dst[done..]))
            .await
            .map_err(|_| WireError::Timeout)??;
        if n == 0 {
            return Err(WireError::Truncated);
        }
        done += n;
    }
    Ok(())
}

/// Reads one frame's preamble and header into `buf`, checking limits and the header CRC. The
/// payload (`payload_len` bytes) is left in the stream. `Ok(None)` on a clean EOF between
/// frames. Waiting for the *first* byte of a frame has no timeout (an idle connection is fine);
/// every later read must make progress within `stall_timeout`.
///
/// The header is not validated as a type here: the caller dispatches on the opcode and calls
/// [`access_header`] with the matching type.
pub async fn read_frame_head<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    stall_timeout: Duration,
    buf: &mut AlignedVec,
) -> Result<Option<Preamble>, WireError> {
    let mut raw = [0u8; PREAMBLE_LEN];
    let first = loop {
        match r.read(&mut raw).await {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if first == 0 {
        return Ok(None);
    }
    fill(r, &mut raw[first..], stall_timeout).await?;
    let pre = Preamble::decode(&raw, limits)?;
    buf.clear();
    buf.resize(pre.header_len as usize, 0);
    fill(r, buf.as_mut_slice(), stall_timeout).await?;
    check_header_crc(&pre, buf.as_slice())?;
    Ok(Some(pre))
}

/// Reads exactly `dst.len()` payload bytes into `dst` (see [`read_frame_head`]).
pub async fn read_payload_into<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
    stall_timeout: Duration,
) -> Result<(), WireError> {
    fill(r, dst, stall_timeout).await
}

/// Reads and drops `len` payload bytes, so a request rejected after its head was read (unknown
/// key, full tier) can be answered without closing the connection.
pub async fn discard_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    mut len: u64,
    stall_timeout: Duration,
) -> Result<(), WireError> {
    let mut scratch = [0u8; 8192];
    while len > 0 {
        let n = len.min(scratch.len() as u64) as usize;
        fill(r, &mut scratch[..n], stall_timeout).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Writes `head` (from [`frame_head`] or [`error_frame`]) and then every payload slice with
/// vectored writes, resuming after partial writes, then flushes. Payload bytes are never
/// concatenated. Works with `bytes::Bytes`, `&[u8]` and `Vec<u8>` slices alike.
pub async fn write_frame<W, P>(w: &mut W, head: &[u8], payload: &[P]) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    P: AsRef<[u8]>,
{
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + payload.len());
    slices.extend(
        std::iter::once(head)
            .chain(payload.iter().map(AsRef::as_ref))
            .filter(|s| !s.is_empty())
            .map(IoSlice::new),
    );
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await?;
    Ok(())
}
