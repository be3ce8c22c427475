//! [`EncodingTier`]: a decorator tier that stores chunks encoded by a [`Transcoder`] in the tier
//! it wraps, and decodes them on the way back.
//!
//! Encoding is a property of a tier, not a flag inside the store: a disk (or remote) tier that
//! should hold compressed chunks is passed to the store wrapped in an `EncodingTier`. Contract:
//!
//! - only raw puts ([`CODEC_RAW`]) are encoded; a payload a client encoded itself is stored as
//!   it came;
//! - [`Tier::get`] decodes every record whose codec the transcoder owns and hands back a raw
//!   record: codec raw, the encoding's fidelity when it is lossy, exact otherwise, and exactly
//!   `raw_len` bytes. A record that does not decode is [`CacheError::Corrupt`], never data;
//! - [`Tier::stat`] and [`Tier::entries`] describe the records as stored (codec, fidelity,
//!   stored size), which is what `show` reports and what rebuilds the index after a restart.
//!
//! With a lossless transcoder the tier passes the conformance suite like any other. Encoding and
//! decoding are CPU-bound: the store calls tiers from blocking threads only.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::{CacheError, Result};
use crate::key::ChunkKey;
use crate::tier::{CODEC_RAW, ChunkMeta, Fidelity, Tier, TierKind, TierUsage, put_retrying};
use crate::transcode::{Transcoder, compose};

/// A tier whose records are encoded by a [`Transcoder`] before they reach `inner`.
pub struct EncodingTier {
    inner: Arc<dyn Tier>,
    transcoder: Arc<dyn Transcoder>,
}

impl EncodingTier {
    /// Wraps `inner`; chunks are encoded for `inner.kind()`.
    pub fn new(inner: Arc<dyn Tier>, transcoder: Arc<dyn Transcoder>) -> Self {
        EncodingTier { inner, transcoder }
    }

    /// The record `meta`/`payload` becomes in the inner tier, when the transcoder encodes it.
    fn encode(&self, meta: &ChunkMeta, payload: &[u8]) -> Result<Option<(ChunkMeta, Vec<u8>)>> {
        if meta.codec != CODEC_RAW {
            return Ok(None);
        }
        let Some(enc) = self.transcoder.encode(self.inner.kind(), meta, payload)? else {
            return Ok(None);
        };
        let rec = ChunkMeta {
            codec: enc.codec,
            fidelity: compose(meta.fidelity, enc.fidelity),
            ..*meta
        };
        Ok(Some((rec, enc.payload)))
    }

    /// Decodes a record of one of the transcoder's codecs back to the raw chunk.
    fn decode(&self, key: ChunkKey, rec: ChunkMeta, bytes: &[u8]) -> Result<(ChunkMeta, Bytes)> {
        let raw = self
            .transcoder
            .decode(&rec, bytes)
            .map_err(|e| CacheError::Corrupt(format!("chunk {key} does not decode: {e}")))?;
        if raw.len() as u64 != rec.raw_len {
            return Err(CacheError::Corrupt(format!(
                "chunk {key} decodes to {} bytes, its record says {}",
                raw.len(),
                rec.raw_len
            )));
        }
        let fidelity = match rec.fidelity.is_exact() {
            true => Fidelity::Exact,
            false => rec.fidelity,
        };
        let meta = ChunkMeta {
            codec: CODEC_RAW,
            fidelity,
            ..rec
        };
        Ok((meta, Bytes::from(raw)))
    }
}

impl Tier for EncodingTier {
    fn kind(&self) -> TierKind {
        self.inner.kind()
    }

    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        match self.encode(meta, payload)? {
            Some((rec, enc)) => self.inner.put(key, &rec, &enc),
            None => self.inner.put(key, meta, payload),
        }
    }

    fn put_making_room(
        &self,
        key: ChunkKey,
        meta: &ChunkMeta,
        payload: &[u8],
        make_room: &mut dyn FnMut() -> Result<bool>,
    ) -> Result<ChunkMeta> {
        // Encoded once; only the write into the inner tier is retried.
        let encoded = self.encode(meta, payload)?;
        let (rec, bytes) = match &encoded {
            Some((rec, enc)) => (*rec, enc.as_slice()),
            None => (*meta, payload),
        };
        put_retrying(&*self.inner, key, &rec, bytes, make_room)?;
        Ok(rec)
    }

    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>> {
        match self.inner.get(key)? {
            Some((rec, bytes)) if self.owns_codec(rec.codec) => {
                self.decode(key, rec, &bytes).map(Some)
            }
            other => Ok(other),
        }
    }

    fn contains(&self, key: ChunkKey) -> bool {
        self.inner.contains(key)
    }

    fn remove(&self, key: ChunkKey) -> Result<bool> {
        self.inner.remove(key)
    }

    fn usage(&self) -> TierUsage {
        self.inner.usage()
    }

    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)> {
        self.inner.entries()
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn stat(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, u64)>> {
        self.inner.stat(key)
    }

    fn verify(&self, key: ChunkKey) -> Result<Option<bool>> {
        self.inner.verify(key)
    }

    fn owns_codec(&self, codec: u16) -> bool {
        codec != CODEC_RAW && (self.transcoder.owns(codec) || self.inner.owns_codec(codec))
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    fn probe(&self, keys: &[ChunkKey]) -> Result<Vec<Option<ChunkMeta>>> {
        self.inner.probe(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTier;
    use crate::transcode::Encoded;

    const REVERSED: u16 = 60;

    /// Lossless test codec: the bytes reversed, behind one marker byte.
    struct Reverse;

    impl Transcoder for Reverse {
        fn owns(&self, codec: u16) -> bool {
            codec == REVERSED
        }

        fn encode(&self, _: TierKind, _: &ChunkMeta, raw: &[u8]) -> Result<Option<Encoded>> {
            let payload = std::iter::once(0xa5).chain(raw.iter().rev().copied());
            Ok(Some(Encoded {
                codec: REVERSED,
                fidelity: Fidelity::Lossless,
                payload: payload.collect(),
            }))
        }

        fn decode(&self, _: &ChunkMeta, payload: &[u8]) -> Result<Vec<u8>> {
            match payload.split_first() {
                Some((0xa5, rest)) => Ok(rest.iter().rev().copied().collect()),
                _ => Err(CacheError::Codec("no marker".into())),
            }
        }
    }

    fn wrapped(budget: u64) -> (Arc<MemoryTier>, EncodingTier) {
        let inner = Arc::new(MemoryTier::new(TierKind::Disk, budget));
        let tier = EncodingTier::new(inner.clone(), Arc::new(Reverse));
        (inner, tier)
    }

    #[test]
    fn conformance_with_a_lossless_transcoder() {
        crate::conformance::run_all(&|budget| Box::new(wrapped(budget).1));
    }

    #[test]
    fn stores_encoded_serves_raw_and_refuses_undecodable_records() {
        let (inner, tier) = wrapped(1 << 20);
        let meta = ChunkMeta::raw(1, 2, 3, 0, 4);
        let mut retries = 0;
        let rec = tier
            .put_making_room(ChunkKey(1), &meta, b"abcd", &mut || {
                retries += 1;
                Ok(false)
            })
            .unwrap();
        assert_eq!((rec.codec, rec.fidelity), (REVERSED, Fidelity::Lossless));
        assert_eq!(retries, 0);
        let (stored, bytes) = inner.get(ChunkKey(1)).unwrap().unwrap();
        assert_eq!((stored, &bytes[..]), (rec, &b"\xa5dcba"[..]));
        assert_eq!(tier.stat(ChunkKey(1)).unwrap(), Some((rec, 5)));
        assert_eq!(
            tier.get(ChunkKey(1)).unwrap(),
            Some((meta, Bytes::from_static(b"abcd")))
        );
        assert!(tier.owns_codec(REVERSED) && !tier.owns_codec(CODEC_RAW));
        // A client's own encoding is stored and served untouched.
        let private = ChunkMeta { codec: 900, ..meta };
        tier.put(ChunkKey(2), &private, b"wxyz").unwrap();
        assert_eq!(&inner.get(ChunkKey(2)).unwrap().unwrap().1[..], b"wxyz");
        // A record of the transcoder's codec that does not decode is corrupt.
        inner.put(ChunkKey(3), &rec, b"garbage").unwrap();
        assert!(matches!(tier.get(ChunkKey(3)), Err(CacheError::Corrupt(_))));
        // So is one that decodes to another length than its record says.
        inner
            .put(ChunkKey(4), &ChunkMeta { raw_len: 9, ..rec }, b"\xa5dcba")
            .unwrap();
        assert!(matches!(tier.get(ChunkKey(4)), Err(CacheError::Corrupt(_))));
    }
}
