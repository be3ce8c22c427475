//! The value stored in Redis for one chunk: the disk tier's 128-byte record header
//! ([`crate::disk::record::Header`]) followed by the payload, and its validation on read.
//!
//! Reusing the disk header keeps one record format (and one set of checks) for every tier that
//! stores bytes outside the process. A value is served only when every check holds; anything
//! else is [`CacheError::Corrupt`], which the store counts, deletes and never serves.

use bytes::Bytes;
use kvtier_cache::key::ChunkKey;
use kvtier_cache::tier::ChunkMeta;
use kvtier_cache::{CacheError, Result};
use redis::{RedisWrite, ToRedisArgs};

use crate::disk::record::{HEADER_LEN, Header, RecordKind, check_payload_len, payload_checksum};

/// A record as one Redis argument: header and payload written straight into the command's
/// argument buffer (no intermediate `Vec` holding the whole record).
pub(crate) struct RecordArg<'a> {
    pub header: [u8; HEADER_LEN],
    pub payload: &'a [u8],
}

impl<'a> RecordArg<'a> {
    /// The record of `payload` under `key`; `written_ms` goes into the header's sequence field.
    pub fn new(
        key: ChunkKey,
        meta: &ChunkMeta,
        payload: &'a [u8],
        written_ms: u64,
    ) -> Result<Self> {
        check_payload_len(payload.len())?;
        let header = Header::put(written_ms, key, *meta, payload).encode();
        Ok(RecordArg { header, payload })
    }

    /// Bytes the record occupies in the cluster (charged against the budget).
    pub fn len(&self) -> u64 {
        (HEADER_LEN + self.payload.len()) as u64
    }
}

impl ToRedisArgs for RecordArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        out.reserve_space_for_args([HEADER_LEN + self.payload.len()]);
        let mut w = out.writer_for_next_arg();
        // Writing into a Vec-backed argument cannot fail.
        let _ = std::io::Write::write_all(&mut w, &self.header);
        let _ = std::io::Write::write_all(&mut w, self.payload);
    }
}

fn corrupt(what: &str) -> CacheError {
    CacheError::Corrupt(format!("remote record: {what}"))
}

/// Decodes and validates a header read on its own (`GETRANGE key 0 127`) for `key`. An empty
/// value (no such key) is `Ok(None)`.
pub(crate) fn decode_header(key: ChunkKey, bytes: &[u8]) -> Result<Option<Header>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let Ok(b) = <&[u8; HEADER_LEN]>::try_from(bytes) else {
        return Err(corrupt(&format!(
            "truncated header of {} bytes",
            bytes.len()
        )));
    };
    let h = Header::decode(b)?;
    if h.kind != RecordKind::Put {
        return Err(corrupt("not a put record"));
    }
    if h.key != key {
        return Err(corrupt(&format!("stored under {key} but names {}", h.key)));
    }
    Ok(Some(h))
}

/// Validates a whole value read for `key` and returns its metadata and payload (a view into
/// `value`, not a copy).
pub(crate) fn decode_value(key: ChunkKey, value: Vec<u8>) -> Result<(ChunkMeta, Bytes)> {
    if value.len() < HEADER_LEN {
        return Err(corrupt(&format!(
            "truncated value of {} bytes",
            value.len()
        )));
    }
    let h = decode_header(key, &value[..HEADER_LEN])?.ok_or_else(|| corrupt("empty value"))?;
    let payload_len = (value.len() - HEADER_LEN) as u64;
    if h.payload_len != payload_len {
        return Err(corrupt(&format!(
            "header says {} payload bytes, value holds {payload_len}",
            h.payload_len
        )));
    }
    if payload_checksum(&value[HEADER_LEN..]) != h.payload_crc {
        return Err(corrupt("payload checksum mismatch"));
    }
    Ok((h.meta, Bytes::from(value).slice(HEADER_LEN..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_cache::conformance::payload;

    fn value(key: ChunkKey, data: &[u8]) -> Vec<u8> {
        let meta = ChunkMeta::raw(3, 4, 16, 0, data.len() as u64);
        let r = RecordArg::new(key, &meta, data, 1).unwrap();
        let mut args = Vec::<Vec<u8>>::new();
        r.write_redis_args(&mut args);
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].len() as u64, r.len());
        args.pop().unwrap()
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let key = ChunkKey(77);
        let data = payload(1, 5000);
        let v = value(key, &data);
        let (m, b) = decode_value(key, v.clone()).unwrap();
        assert_eq!(&b[..], &data[..]);
        assert_eq!(m.tenant, 3);
        // Another key's record under this name.
        assert!(matches!(
            decode_value(ChunkKey(78), v.clone()),
            Err(CacheError::Corrupt(_))
        ));
        // Truncated, extended, flipped anywhere.
        for cut in [0, 10, HEADER_LEN, v.len() - 1] {
            assert!(
                decode_value(key, v[..cut].to_vec()).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = v.clone();
        longer.push(0);
        assert!(decode_value(key, longer).is_err());
        for at in [0, 9, 30, 100, HEADER_LEN, HEADER_LEN + 2500, v.len() - 1] {
            let mut bad = v.clone();
            bad[at] ^= 0x10;
            assert!(decode_value(key, bad).is_err(), "flip at {at}");
        }
        assert!(decode_header(key, &[]).unwrap().is_none());
        assert!(decode_header(key, &v[..HEADER_LEN]).unwrap().is_some());
        assert!(decode_header(key, &v[..50]).is_err());
    }
}
