//! The tier abstraction: one storage level (GPU, host, disk, remote) with a byte budget.
//!
//! A tier is a dumb keyed byte store with a budget; policy (what to evict, when to promote or
//! demote, admission) lives in [`crate::store::TieredStore`]. Every backend passes the shared
//! conformance suite in [`crate::conformance`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{CacheError, Result};
use crate::key::ChunkKey;

/// The storage levels, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierKind {
    Gpu,
    Host,
    Disk,
    Remote,
}

impl TierKind {
    pub const ALL: [TierKind; 4] = [
        TierKind::Gpu,
        TierKind::Host,
        TierKind::Disk,
        TierKind::Remote,
    ];

    /// Bit of this tier in a [`TierSet`].
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub const fn name(self) -> &'static str {
        match self {
            TierKind::Gpu => "gpu",
            TierKind::Host => "host",
            TierKind::Disk => "disk",
            TierKind::Remote => "remote",
        }
    }
}

impl std::fmt::Display for TierKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The set of tiers a chunk lives in, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct TierSet(pub u8);

impl TierSet {
    pub const EMPTY: TierSet = TierSet(0);

    pub fn contains(self, t: TierKind) -> bool {
        self.0 & t.bit() != 0
    }

    pub fn with(self, t: TierKind) -> TierSet {
        TierSet(self.0 | t.bit())
    }

    pub fn without(self, t: TierKind) -> TierSet {
        TierSet(self.0 & !t.bit())
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = TierKind> {
        TierKind::ALL.into_iter().filter(move |t| self.contains(*t))
    }

    /// The fastest tier in the set.
    pub fn fastest(self) -> Option<TierKind> {
        self.iter().next()
    }
}

impl std::fmt::Display for TierSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.iter().map(TierKind::name).collect();
        f.write_str(&names.join("+"))
    }
}

/// What a stored payload is, relative to the KV the engine produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Fidelity {
    /// The engine's bytes, untouched.
    Exact,
    /// Encoded, but decodes bit-exact.
    Lossless,
    /// Encoded with loss; `error_bound` is the codec's stated bound on relative error.
    Lossy { codec: u16, error_bound: f32 },
}

impl Fidelity {
    /// Whether a caller that demands exact data may receive this payload (after decoding).
    pub fn is_exact(self) -> bool {
        !matches!(self, Fidelity::Lossy { .. })
    }

    /// Stable tag for records.
    pub fn tag(self) -> u8 {
        match self {
            Fidelity::Exact => 0,
            Fidelity::Lossless => 1,
            Fidelity::Lossy { .. } => 2,
        }
    }
}

impl std::fmt::Display for Fidelity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fidelity::Exact => f.write_str("exact"),
            Fidelity::Lossless => f.write_str("lossless"),
            Fidelity::Lossy { codec, error_bound } => {
                write!(f, "lossy(codec {codec}, err<={error_bound})")
            }
        }
    }
}

/// Codec tag of a payload stored as the engine produced it ([`crate::codec_id::RAW`]).
pub const CODEC_RAW: u16 = crate::codec_id::RAW;

/// Everything the store knows about a chunk besides its bytes. Small and `Copy` so it can sit in
/// the index and travel with every record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Owner; see [`crate::key::tenant_id`].
    pub tenant: u64,
    /// [`crate::layout::ModelLayout::fingerprint`] of the data.
    pub layout: u64,
    /// Tokens in this chunk.
    pub tokens: u32,
    /// Position of the chunk in its prompt (0 = first chunk). Eviction drops deeper chunks first.
    pub depth: u32,
    /// Key of the previous chunk of the prompt, for routers that rebuild prefix trees.
    pub parent: Option<ChunkKey>,
    /// How the payload is encoded ([`CODEC_RAW`] when untouched).
    pub codec: u16,
    pub fidelity: Fidelity,
    /// Size of the decoded (raw) chunk; equals the payload length for raw chunks.
    pub raw_len: u64,
}

impl ChunkMeta {
    /// Metadata of a raw, exact chunk.
    pub fn raw(tenant: u64, layout: u64, tokens: u32, depth: u32, raw_len: u64) -> Self {
        ChunkMeta {
            tenant,
            layout,
            tokens,
            depth,
            parent: None,
            codec: CODEC_RAW,
            fidelity: Fidelity::Exact,
            raw_len,
        }
    }
}

/// Occupancy of a tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierUsage {
    pub chunks: u64,
    /// Bytes charged against the budget (slot or record sizes, not just payloads).
    pub bytes: u64,
    pub budget: u64,
}

/// One storage level. Implementations must be safe to call from many threads at once and must
/// never return bytes other than those put under a key (a corrupt record is an error or a miss,
/// never data).
pub trait Tier: Send + Sync {
    fn kind(&self) -> TierKind;

    /// Stores a copy of `payload` under `key`, replacing any previous value. Fails with
    /// [`crate::CacheError::TierFull`] when the budget has no room; the caller evicts and retries.
    fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()>;

    /// The payload and metadata under `key`, or `None`. The returned bytes are a reference-counted
    /// view where the backend can offer one (host memory), an owned buffer otherwise.
    fn get(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, Bytes)>>;

    /// Whether `key` is present (cheap, no I/O).
    fn contains(&self, key: ChunkKey) -> bool;

    /// Removes `key`; returns whether it was present. Space is reclaimed by the backend.
    fn remove(&self, key: ChunkKey) -> Result<bool>;

    /// Current occupancy and budget.
    fn usage(&self) -> TierUsage;

    /// Every key and its metadata (used to rebuild the store index after a restart).
    fn entries(&self) -> Vec<(ChunkKey, ChunkMeta)>;

    /// Makes every acknowledged write durable (no-op for volatile tiers).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The stored metadata and payload length under `key`, without reading the payload where
    /// the backend can avoid it.
    fn stat(&self, key: ChunkKey) -> Result<Option<(ChunkMeta, u64)>> {
        Ok(self.get(key)?.map(|(m, b)| (m, b.len() as u64)))
    }

    /// Re-reads `key` and checks its stored checksum. `Ok(None)` when absent.
    fn verify(&self, key: ChunkKey) -> Result<Option<bool>> {
        Ok(self.get(key)?.map(|_| true))
    }

    /// Whether records tagged `codec` are an encoding this tier applies itself and decodes in
    /// [`Tier::get`] (see [`crate::EncodingTier`]). The store refuses client puts tagged with
    /// such a codec, and knows after a restart that such a record was put raw.
    fn owns_codec(&self, _codec: u16) -> bool {
        false
    }

    /// Whether other processes write to this tier too (a remote pool), so that it may hold
    /// chunks the store's index does not know; the store then asks [`Tier::probe`] for them.
    fn is_shared(&self) -> bool {
        false
    }

    /// The stored metadata of each of `keys`, in one round where the backend can batch. Only
    /// shared tiers need it: for the others the store's index already knows everything.
    fn probe(&self, keys: &[ChunkKey]) -> Result<Vec<Option<ChunkMeta>>> {
        Ok(vec![None; keys.len()])
    }

    /// [`Tier::put`], calling `make_room` and retrying whenever the tier is full, until
    /// `make_room` returns false (then the `TierFull` error is returned). Returns the metadata
    /// the record was stored with: `meta`, unless the tier encodes (then codec and fidelity are
    /// the encoding's). A tier that transforms payloads overrides this to do so once, not once
    /// per retry.
    fn put_making_room(
        &self,
        key: ChunkKey,
        meta: &ChunkMeta,
        payload: &[u8],
        make_room: &mut dyn FnMut() -> Result<bool>,
    ) -> Result<ChunkMeta> {
        put_retrying(self, key, meta, payload, make_room)?;
        Ok(*meta)
    }
}

/// Puts into `tier`, calling `make_room` after every `TierFull` until it returns false.
pub(crate) fn put_retrying<T: Tier + ?Sized>(
    tier: &T,
    key: ChunkKey,
    meta: &ChunkMeta,
    payload: &[u8],
    make_room: &mut dyn FnMut() -> Result<bool>,
) -> Result<()> {
    loop {
        match tier.put(key, meta, payload) {
            Ok(()) => return Ok(()),
            Err(CacheError::TierFull { .. }) if make_room()? => continue,
            Err(e) => return Err(e),
        }
    }
}
