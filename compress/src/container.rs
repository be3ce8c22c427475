//! The self-describing envelope around every encoded chunk (and every xKV basis).
//!
//! ```text
//! 0..4    magic  b"KVTC"
//! 4..6    format version (u16 LE)
//! 6..8    codec id (u16 LE)
//! 8..12   params length (u32 LE)
//! 12..20  raw (decoded) length (u64 LE)
//! 20..28  body length (u64 LE)
//! 28..32  CRC32C of bytes 0..28, the params and the body
//! 32..    params, then body
//! ```
//!
//! The checksum covers the header too, so a flipped codec id or length is caught as a checksum
//! error rather than decoded as something else. The writer reserves the header up front so the
//! body is produced in place, never copied.

use crate::error::{CompressError, Result};

pub const MAGIC: [u8; 4] = *b"KVTC";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
/// Params are a few dozen bytes; anything larger is corruption, not data.
const MAX_PARAMS: usize = 1 << 16;
/// No chunk or basis comes close to 1 TiB; the bound keeps length arithmetic far from overflow.
const MAX_LEN: u64 = 1 << 40;

/// A parsed, checksum-verified container borrowing from the encoded bytes.
#[derive(Debug, Clone, Copy)]
pub struct Container<'a> {
    pub codec: u16,
    pub params: &'a [u8],
    pub raw_len: u64,
    pub body: &'a [u8],
}

/// Starts a container: header placeholder plus params. Append the body, then call [`finish`].
pub fn begin(codec: u16, params: &[u8], body_capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + params.len() + body_capacity);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&codec.to_le_bytes());
    out.extend_from_slice(&(params.len() as u32).to_le_bytes());
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(params);
    out
}

/// Fills in the lengths and the checksum of a container started with [`begin`].
pub fn finish(mut out: Vec<u8>, raw_len: u64) -> Vec<u8> {
    let params_len = u32::from_le_bytes(out[8..12].try_into().expect("4 bytes")) as usize;
    let body_len = (out.len() - HEADER_LEN - params_len) as u64;
    out[12..20].copy_from_slice(&raw_len.to_le_bytes());
    out[20..28].copy_from_slice(&body_len.to_le_bytes());
    let crc = checksum(&out);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

fn checksum(container: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&container[..28]), &container[HEADER_LEN..])
}

/// The codec id a container's header names, checked only for magic and length. Decoders parse
/// (and checksum) the container themselves; use [`parse`] before trusting anything else.
pub fn peek_codec(bytes: &[u8]) -> Result<u16> {
    if bytes.len() < HEADER_LEN {
        return Err(CompressError::BadLength(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..4] != MAGIC {
        return Err(CompressError::BadMagic);
    }
    Ok(u16::from_le_bytes([bytes[6], bytes[7]]))
}

/// Parses and verifies a container: magic, version, exact lengths, checksum.
pub fn parse(bytes: &[u8]) -> Result<Container<'_>> {
    if bytes.len() < HEADER_LEN {
        return Err(CompressError::BadLength(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0..4] != MAGIC {
        return Err(CompressError::BadMagic);
    }
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u16_at(4);
    if version != VERSION {
        return Err(CompressError::UnsupportedVersion(version));
    }
    let params_len = u32_at(8) as usize;
    let raw_len = u64_at(12);
    let body_len = u64_at(20);
    if params_len > MAX_PARAMS || body_len > MAX_LEN || raw_len > MAX_LEN {
        return Err(CompressError::BadLength(format!(
            "params {params_len}, body {body_len} or raw {raw_len} exceeds the format limits"
        )));
    }
    let expected = HEADER_LEN as u64 + params_len as u64 + body_len;
    if expected != bytes.len() as u64 {
        return Err(CompressError::BadLength(format!(
            "header announces {expected} bytes, container has {}",
            bytes.len()
        )));
    }
    let stored = u32_at(28);
    let computed = checksum(bytes);
    if stored != computed {
        return Err(CompressError::ChecksumMismatch { stored, computed });
    }
    let params_end = HEADER_LEN + params_len;
    Ok(Container {
        codec: u16_at(6),
        params: &bytes[HEADER_LEN..params_end],
        raw_len,
        body: &bytes[params_end..],
    })
}

/// Little-endian writer for codec params.
#[derive(Default)]
pub struct ParamWriter(pub Vec<u8>);

impl ParamWriter {
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f64(mut self, v: f64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// Little-endian reader over params or a body; running off the end is a [`CompressError::BadLength`].
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| {
                CompressError::BadLength(format!(
                    "wanted {n} bytes at offset {}, only {} present",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// Fails unless every byte was consumed: trailing bytes mean the writer and reader disagree.
    pub fn done(&self) -> Result<()> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(CompressError::BadLength(format!(
                "{} trailing bytes",
                self.bytes.len() - self.pos
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut c = begin(7, &[1, 2, 3], 16);
        c.extend_from_slice(b"hello body");
        finish(c, 99)
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let p = parse(&c).unwrap();
        assert_eq!(
            (p.codec, p.params, p.raw_len, p.body),
            (7, &[1u8, 2, 3][..], 99, &b"hello body"[..])
        );
    }

    #[test]
    fn bad_magic_version_length_and_checksum_are_refused() {
        let mut c = sample();
        c[0] = b'X';
        assert_eq!(parse(&c).unwrap_err(), CompressError::BadMagic);

        let mut c = sample();
        c[4] = 9;
        assert_eq!(parse(&c).unwrap_err(), CompressError::UnsupportedVersion(9));

        let c = sample();
        assert!(matches!(
            parse(&c[..c.len() - 1]),
            Err(CompressError::BadLength(_))
        ));
        assert!(matches!(parse(&c[..10]), Err(CompressError::BadLength(_))));

        // Every single-bit flip outside magic/version/lengths must be caught by the checksum.
        let c = sample();
        for byte in (6..12).chain(28..c.len()) {
            let mut bad = c.clone();
            bad[byte] ^= 0x10;
            assert!(parse(&bad).is_err(), "flip at byte {byte} was accepted");
        }
        let mut bad = c.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(matches!(
            parse(&bad),
            Err(CompressError::ChecksumMismatch { .. })
        ));
    }
}
