//! The on-disk record format of the disk tier.
//!
//! A segment file is a sequence of records. Each record is a fixed 128-byte header followed by
//! its payload:
//!
//! | bytes    | field                                                        |
//! | -------- | ------------------------------------------------------------ |
//! | 0..4     | magic `KVTR`                                                 |
//! | 4..8     | format version (u32)                                         |
//! | 8        | kind: 0 = put, 1 = tombstone                                 |
//! | 9        | fidelity tag (0 exact, 1 lossless, 2 lossy)                  |
//! | 10       | has parent (0 or 1)                                          |
//! | 11       | reserved, zero                                               |
//! | 12..14   | codec                                                        |
//! | 14..16   | lossy codec                                                  |
//! | 16..24   | sequence number                                              |
//! | 24..40   | chunk key                                                    |
//! | 40..48   | tenant                                                       |
//! | 48..56   | layout fingerprint                                           |
//! | 56..60   | tokens                                                       |
//! | 60..64   | depth                                                        |
//! | 64..80   | parent key (zero when none)                                  |
//! | 80..84   | lossy error bound (f32 bits)                                 |
//! | 84..88   | CRC32C of the payload                                        |
//! | 88..96   | raw length                                                   |
//! | 96..104  | payload length                                               |
//! | 104..124 | reserved, zero                                               |
//! | 124..128 | CRC32C of bytes 0..124                                       |
//!
//! All integers are little-endian. Every field is validated before it is trusted: a header whose
//! checksum, kind, flags or lengths are out of range is corrupt, never interpreted.

use kvtier_cache::key::ChunkKey;
use kvtier_cache::tier::{ChunkMeta, Fidelity};
use kvtier_cache::{CacheError, Result};

/// Size of every record header.
pub const HEADER_LEN: usize = 128;
/// Record magic, `KVTR`.
pub const MAGIC: [u8; 4] = *b"KVTR";
/// The record format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest payload a record may carry (1 GiB); a header claiming more is corrupt.
pub const MAX_PAYLOAD: u64 = 1 << 30;

const HEADER_CRC_AT: usize = HEADER_LEN - 4;

/// What a record says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The key now holds the payload that follows.
    Put,
    /// The key was removed; no payload.
    Tombstone,
}

/// A decoded, validated record header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    pub kind: RecordKind,
    pub seq: u64,
    pub key: ChunkKey,
    /// Metadata of a put; zeroed for a tombstone.
    pub meta: ChunkMeta,
    pub payload_len: u64,
    pub payload_crc: u32,
}

impl Header {
    /// Header of a put record for `payload`.
    pub fn put(seq: u64, key: ChunkKey, meta: ChunkMeta, payload: &[u8]) -> Self {
        Header {
            kind: RecordKind::Put,
            seq,
            key,
            meta,
            payload_len: payload.len() as u64,
            payload_crc: payload_checksum(payload),
        }
    }

    /// Header of a tombstone for `key`.
    pub fn tombstone(seq: u64, key: ChunkKey) -> Self {
        Header {
            kind: RecordKind::Tombstone,
            seq,
            key,
            meta: ChunkMeta::raw(0, 0, 0, 0, 0),
            payload_len: 0,
            payload_crc: crc32c::crc32c(&[]),
        }
    }

    /// Bytes the whole record occupies on disk.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let m = &self.meta;
        let (lossy_codec, bound) = match m.fidelity {
            Fidelity::Lossy { codec, error_bound } => (codec, error_bound.to_bits()),
            _ => (0, 0),
        };
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[8] = match self.kind {
            RecordKind::Put => 0,
            RecordKind::Tombstone => 1,
        };
        b[9] = m.fidelity.tag();
        b[10] = m.parent.is_some() as u8;
        b[12..14].copy_from_slice(&m.codec.to_le_bytes());
        b[14..16].copy_from_slice(&lossy_codec.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..40].copy_from_slice(&self.key.to_le_bytes());
        b[40..48].copy_from_slice(&m.tenant.to_le_bytes());
        b[48..56].copy_from_slice(&m.layout.to_le_bytes());
        b[56..60].copy_from_slice(&m.tokens.to_le_bytes());
        b[60..64].copy_from_slice(&m.depth.to_le_bytes());
        b[64..80].copy_from_slice(&m.parent.unwrap_or(ChunkKey(0)).to_le_bytes());
        b[80..84].copy_from_slice(&bound.to_le_bytes());
        b[84..88].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[88..96].copy_from_slice(&m.raw_len.to_le_bytes());
        b[96..104].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    ///
    /// Returns `UnsupportedVersion` only for a header that is intact (its checksum holds) but
    /// written by another format version, so that a flipped bit in the version field reads as
    /// corruption rather than making the whole directory unreadable.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        if b[0..4] != MAGIC {
            return Err(corrupt("bad record magic"));
        }
        let stored_crc = u32_at(b, HEADER_CRC_AT);
        if crc32c::crc32c(&b[..HEADER_CRC_AT]) != stored_crc {
            return Err(corrupt("record header checksum mismatch"));
        }
        let version = u32_at(b, 4);
        if version != FORMAT_VERSION {
            return Err(CacheError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let kind = match b[8] {
            0 => RecordKind::Put,
            1 => RecordKind::Tombstone,
            k => return Err(corrupt(&format!("unknown record kind {k}"))),
        };
        let payload_len = u64_at(b, 96);
        if payload_len > MAX_PAYLOAD {
            return Err(corrupt(&format!(
                "payload length {payload_len} over the limit"
            )));
        }
        if kind == RecordKind::Tombstone && payload_len != 0 {
            return Err(corrupt("tombstone with a payload"));
        }
        let codec = u16_at(b, 12);
        let fidelity = match b[9] {
            0 => Fidelity::Exact,
            1 => Fidelity::Lossless,
            2 => Fidelity::Lossy {
                codec: u16_at(b, 14),
                error_bound: f32::from_bits(u32_at(b, 80)),
            },
            t => return Err(corrupt(&format!("unknown fidelity tag {t}"))),
        };
        let parent = match b[10] {
            0 => None,
            1 => Some(ChunkKey(u128_at(b, 64))),
            p => return Err(corrupt(&format!("bad parent flag {p}"))),
        };
        let meta = ChunkMeta {
            tenant: u64_at(b, 40),
            layout: u64_at(b, 48),
            tokens: u32_at(b, 56),
            depth: u32_at(b, 60),
            parent,
            codec,
            fidelity,
            raw_len: u64_at(b, 88),
        };
        Ok(Header {
            kind,
            seq: u64_at(b, 16),
            key: ChunkKey(u128_at(b, 24)),
            meta,
            payload_len,
            payload_crc: u32_at(b, 84),
        })
    }
}

/// Payloads from this size up are checksummed on several threads.
const PARALLEL_CRC_BYTES: usize = 8 << 20;

/// CRC32C of a payload. Large payloads are split across threads and the partial checksums
/// combined: one thread checksums a few GB/s, slower than the disk path it guards, and the
/// checksum sits on the critical path of every put and get.
pub fn payload_checksum(payload: &[u8]) -> u32 {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    if payload.len() < PARALLEL_CRC_BYTES || threads < 2 {
        return crc32c::crc32c(payload);
    }
    let piece = payload.len().div_ceil(threads);
    let partial: Vec<(u32, usize)> = std::thread::scope(|s| {
        let mut pieces = payload.chunks(piece);
        let first = pieces.next().expect("non-empty payload");
        let others: Vec<_> = pieces
            .map(|p| s.spawn(move || (crc32c::crc32c(p), p.len())))
            .collect();
        let mut out = vec![(crc32c::crc32c(first), first.len())];
        out.extend(
            others
                .into_iter()
                .map(|h| h.join().expect("checksum thread")),
        );
        out
    });
    partial
        .into_iter()
        .fold(None, |acc, (crc, len)| match acc {
            None => Some(crc),
            Some(prev) => Some(crc32c::crc32c_combine(prev, crc, len)),
        })
        .expect("at least one piece")
}

/// Rejects payloads a record cannot carry.
pub fn check_payload_len(len: usize) -> Result<()> {
    if len as u64 > MAX_PAYLOAD {
        return Err(CacheError::PayloadTooLarge {
            len: len as u64,
            max: MAX_PAYLOAD,
        });
    }
    Ok(())
}

fn corrupt(what: &str) -> CacheError {
    CacheError::Corrupt(what.to_string())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("two bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().expect("sixteen bytes"))
}

/// Recomputes the header checksum of an encoded header; lets tests forge headers of other
/// versions that are otherwise intact.
#[cfg(test)]
pub(crate) fn reseal_header(b: &mut [u8; HEADER_LEN]) {
    let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
    b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lossy_meta() -> ChunkMeta {
        ChunkMeta {
            tenant: 0xdead_beef,
            layout: 42,
            tokens: 256,
            depth: 3,
            parent: Some(ChunkKey(77)),
            codec: 9,
            fidelity: Fidelity::Lossy {
                codec: 9,
                error_bound: 0.125,
            },
            raw_len: 1 << 20,
        }
    }

    #[test]
    fn header_round_trips_every_field() {
        let h = Header::put(12345, ChunkKey(u128::MAX - 3), lossy_meta(), b"payload");
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let t = Header::tombstone(7, ChunkKey(5));
        assert_eq!(Header::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn any_flipped_header_bit_is_refused() {
        let enc = Header::put(1, ChunkKey(2), lossy_meta(), b"x").encode();
        for byte in 0..HEADER_LEN {
            let mut b = enc;
            b[byte] ^= 0x10;
            assert!(
                matches!(Header::decode(&b), Err(CacheError::Corrupt(_))),
                "flip at byte {byte} not detected"
            );
        }
    }

    #[test]
    fn intact_header_of_another_version_is_unsupported() {
        let mut b = Header::put(1, ChunkKey(2), lossy_meta(), b"x").encode();
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        reseal_header(&mut b);
        assert!(matches!(
            Header::decode(&b),
            Err(CacheError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        ));
    }

    #[test]
    fn parallel_checksum_matches_the_serial_one() {
        for len in [
            PARALLEL_CRC_BYTES - 1,
            PARALLEL_CRC_BYTES,
            PARALLEL_CRC_BYTES * 2 + 3,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
            assert_eq!(payload_checksum(&data), crc32c::crc32c(&data), "len {len}");
        }
    }

    #[test]
    fn oversized_lengths_are_refused() {
        let mut b = Header::put(1, ChunkKey(2), lossy_meta(), b"x").encode();
        b[96..104].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        reseal_header(&mut b);
        assert!(matches!(Header::decode(&b), Err(CacheError::Corrupt(_))));
        assert!(matches!(
            check_payload_len(MAX_PAYLOAD as usize + 1),
            Err(CacheError::PayloadTooLarge { .. })
        ));
        assert!(check_payload_len(MAX_PAYLOAD as usize).is_ok());
    }
}
