//! The header of every opcode: plain structs archived with rkyv and validated with bytecheck.
//!
//! Fields are plain integers, byte strings and vectors so that the archived form is a fixed
//! little-endian layout any language can read. Keys are `u128` (archived as a 16-byte-aligned
//! little-endian integer; headers are always read into a 16-byte-aligned buffer). Tenant is never
//! on the wire past `Hello`: the server takes it from the connection, so a client cannot touch
//! another tenant's chunks by naming it.

use kvtier_cache::{ChunkKey, ChunkMeta, Fidelity};
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use super::{MAX_KEYS, Opcode};
use crate::transfer::*;

/// A header type: archivable, validatable in place, and bound to exactly one opcode.
pub trait WireHeader:
    Sized
    + std::fmt::Debug
    + PartialEq
    + Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + Deserialize<Self, HighDeserializer<rancor::Error>>,
    > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
{
    /// The opcode whose frames carry this header.
    const OPCODE: Opcode;

    /// Checks bytecheck cannot express (list lengths, enum tags), run by
    /// [`super::access_header`] after structural validation so that handlers may index freely.
    fn check(_archived: &Self::Archived) -> Result<(), String> {
        Ok(())
    }
}

/// A computation generic over header types, run by [`visit_header_type`] with the header type of
/// an opcode known only at run time (decoders, fuzzers, logging).
pub trait HeaderVisitor {
    type Out;
    fn visit<T: WireHeader>(self) -> Self::Out;
}

/// Runs `v` with the header type of `op`: the one table from opcodes to header types.
pub fn visit_header_type<V: HeaderVisitor>(op: Opcode, v: V) -> V::Out {
    match op {
        Opcode::Hello => v.visit::<HelloHeader>(),
        Opcode::Put => v.visit::<PutHeader>(),
        Opcode::Get => v.visit::<GetHeader>(),
        Opcode::Lookup => v.visit::<LookupHeader>(),
        Opcode::Lease => v.visit::<LeaseHeader>(),
        Opcode::Release => v.visit::<ReleaseHeader>(),
        Opcode::Delete => v.visit::<DeleteHeader>(),
        Opcode::Stats => v.visit::<StatsHeader>(),
        Opcode::ShmRegister => v.visit::<ShmRegisterHeader>(),
        Opcode::ShmPut => v.visit::<ShmPutHeader>(),
        Opcode::ShmGet => v.visit::<ShmGetHeader>(),
        Opcode::MapArenas => v.visit::<MapArenasHeader>(),
        Opcode::GetLocated => v.visit::<GetLocatedHeader>(),
        Opcode::Retrieve => v.visit::<RetrieveHeader>(),
        Opcode::HelloOk => v.visit::<HelloOkHeader>(),
        Opcode::Ok => v.visit::<OkHeader>(),
        Opcode::GetOk => v.visit::<GetOkHeader>(),
        Opcode::LookupOk => v.visit::<LookupOkHeader>(),
        Opcode::LeaseOk => v.visit::<LeaseOkHeader>(),
        Opcode::DeleteOk => v.visit::<DeleteOkHeader>(),
        Opcode::StatsOk => v.visit::<StatsOkHeader>(),
        Opcode::ShmRegisterOk => v.visit::<ShmRegisterOkHeader>(),
        Opcode::MapArenasOk => v.visit::<MapArenasOkHeader>(),
        Opcode::GetLocatedOk => v.visit::<GetLocatedOkHeader>(),
        Opcode::RetrieveOk => v.visit::<RetrieveOkHeader>(),
        Opcode::Error => v.visit::<ErrorHeader>(),
        Opcode::TransferBegin => v.visit::<TransferBeginHeader>(),
        Opcode::TransferBeginOk => v.visit::<TransferBeginOkHeader>(),
        Opcode::TransferLayers => v.visit::<TransferLayersHeader>(),
        Opcode::WaitLayers => v.visit::<WaitLayersHeader>(),
        Opcode::WaitLayersOk => v.visit::<WaitLayersOkHeader>(),
        Opcode::TransferPush => v.visit::<TransferPushHeader>(),
        Opcode::TransferPull => v.visit::<TransferPullHeader>(),
        Opcode::TransferOk => v.visit::<TransferOkHeader>(),
    }
}

macro_rules! wire_header {
    ($t:ident, $op:ident) => {
        impl WireHeader for $t {
            const OPCODE: Opcode = Opcode::$op;
        }
    };
    ($t:ident, $op:ident, |$a:ident| $check:expr) => {
        impl WireHeader for $t {
            const OPCODE: Opcode = Opcode::$op;
            fn check($a: &Self::Archived) -> Result<(), String> {
                $check
            }
        }
    };
}

pub(crate) use wire_header;

pub(crate) fn check_len(what: &str, len: usize) -> Result<(), String> {
    if len > MAX_KEYS {
        return Err(format!("{what}: {len} entries, at most {MAX_KEYS}"));
    }
    Ok(())
}

/// Fidelity tags, as [`Fidelity::tag`] numbers them.
pub const FIDELITY_EXACT: u8 = 0;
pub const FIDELITY_LOSSLESS: u8 = 1;
pub const FIDELITY_LOSSY: u8 = 2;

/// [`ChunkMeta`] without the tenant (implied by the connection) and with the fidelity enum
/// flattened to a tag plus the lossy fields, which are zero unless the tag is
/// [`FIDELITY_LOSSY`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct ChunkMetaWire {
    pub layout: u64,
    pub tokens: u32,
    pub depth: u32,
    pub parent: Option<u128>,
    pub codec: u16,
    pub fidelity: u8,
    pub lossy_codec: u16,
    pub error_bound: f32,
    pub raw_len: u64,
}

impl ChunkMetaWire {
    pub fn from_meta(m: &ChunkMeta) -> Self {
        let (lossy_codec, error_bound) = match m.fidelity {
            Fidelity::Lossy { codec, error_bound } => (codec, error_bound),
            _ => (0, 0.0),
        };
        ChunkMetaWire {
            layout: m.layout,
            tokens: m.tokens,
            depth: m.depth,
            parent: m.parent.map(|k| k.0),
            codec: m.codec,
            fidelity: m.fidelity.tag(),
            lossy_codec,
            error_bound,
            raw_len: m.raw_len,
        }
    }
}

impl ArchivedChunkMetaWire {
    /// The store's metadata for this chunk, owned by `tenant` (the connection's tenant).
    pub fn to_meta(&self, tenant: u64) -> Result<ChunkMeta, String> {
        let fidelity = match self.fidelity {
            FIDELITY_EXACT => Fidelity::Exact,
            FIDELITY_LOSSLESS => Fidelity::Lossless,
            FIDELITY_LOSSY => Fidelity::Lossy {
                codec: self.lossy_codec.to_native(),
                error_bound: self.error_bound.to_native(),
            },
            t => return Err(format!("unknown fidelity tag {t}")),
        };
        Ok(ChunkMeta {
            tenant,
            layout: self.layout.to_native(),
            tokens: self.tokens.to_native(),
            depth: self.depth.to_native(),
            parent: self.parent.as_ref().map(|p| ChunkKey(p.to_native())),
            codec: self.codec.to_native(),
            fidelity,
            raw_len: self.raw_len.to_native(),
        })
    }

    /// Rejects tags this version does not know and error bounds that are not finite and >= 0.
    pub fn check(&self) -> Result<(), String> {
        if self.fidelity > FIDELITY_LOSSY {
            return Err(format!("unknown fidelity tag {}", self.fidelity));
        }
        let eb = self.error_bound.to_native();
        if !(eb.is_finite() && eb >= 0.0) {
            return Err(format!("error bound {eb} is not finite and >= 0"));
        }
        Ok(())
    }
}

/// First frame of a connection, client to server.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct HelloHeader {
    pub protocol_version: u8,
    pub auth_token: String,
    pub tenant: String,
    pub client_name: String,
}
wire_header!(HelloHeader, Hello);

/// The server's answer to `Hello`: who it is and the limits the client must respect.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct HelloOkHeader {
    pub server_id: String,
    pub protocol_version: u8,
    pub max_header_len: u32,
    pub max_payload_len: u64,
    /// [`super::Limits::max_keys`] of the server's limits: batch key lists by this.
    pub max_keys: u32,
    /// Requests the server accepts in flight on this connection before answering `Busy`.
    pub max_in_flight: u32,
}
wire_header!(HelloOkHeader, HelloOk);

/// Store one chunk; the payload is the chunk's bytes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct PutHeader {
    pub key: u128,
    pub meta: ChunkMetaWire,
}
wire_header!(PutHeader, Put, |a| a.meta.check());

/// Success with nothing to report (`Put`, `Release`, `ShmPut`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct OkHeader {}
wire_header!(OkHeader, Ok);

/// Fetch chunks by key.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct GetHeader {
    pub keys: Vec<u128>,
    /// Whether lossy-encoded copies may be returned.
    pub accept_lossy: bool,
}
wire_header!(GetHeader, Get, |a| check_len("keys", a.keys.len()));

/// One requested key of a `GetOk`, in request order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct GetEntry {
    pub found: bool,
    pub meta: ChunkMetaWire,
    /// Bytes of this chunk (0 when not found).
    pub len: u64,
    /// Where the bytes start: in the frame payload for `Get`, in the shared region for `ShmGet`.
    pub offset: u64,
}

/// Answer to `Get` (payload: the found chunks' bytes, concatenated in entry order) and to
/// `ShmGet` (no payload; bytes were written into the region).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct GetOkHeader {
    pub entries: Vec<GetEntry>,
}
wire_header!(GetOkHeader, GetOk, |a| {
    check_len("entries", a.entries.len())?;
    a.entries.iter().try_for_each(|e| e.meta.check())
});

impl ArchivedGetOkHeader {
    /// Sum of the found entries' lengths, or `None` on overflow. For a socket `GetOk` this must
    /// equal the frame's payload length; the client checks before slicing the payload.
    pub fn payload_total(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter(|e| e.found)
            .try_fold(0u64, |acc, e| acc.checked_add(e.len.to_native()))
    }
}

/// Longest cached prefix of a prompt. The token ids travel in the payload as little-endian
/// `u32`s (see [`tokens_from_payload`]); the tenant is the connection's.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct LookupHeader {
    pub layout_fingerprint: u64,
    pub salt: Option<String>,
    pub chunk_tokens: u32,
}
wire_header!(LookupHeader, Lookup, |a| {
    let ct = a.chunk_tokens.to_native();
    if ct == 0 || ct > kvtier_cache::key::MAX_CHUNK_TOKENS {
        return Err(format!("chunk_tokens {ct} out of range"));
    }
    Ok(())
});

/// One hit chunk of a lookup, in prompt order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[rkyv(derive(Debug))]
pub struct LookupHit {
    pub key: u128,
    /// [`kvtier_cache::TierSet`] bits.
    pub tiers: u8,
    pub fidelity: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct LookupOkHeader {
    pub hit_chunks: u32,
    pub hit_tokens: u64,
    pub hits: Vec<LookupHit>,
}
wire_header!(LookupOkHeader, LookupOk, |a| {
    check_len("hits", a.hits.len())?;
    if a.hits.len() != a.hit_chunks.to_native() as usize {
        return Err("hit_chunks differs from the number of hits".into());
    }
    Ok(())
});

/// Top-k keys of a stored prompt for decode queries. The payload holds `[n][heads][head_dim]`
/// little-endian f32 query vectors (post-RoPE).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RetrieveHeader {
    /// The prompt's chunk keys, first chunk first.
    pub keys: Vec<u128>,
    pub layer: u32,
    /// Query heads per query vector.
    pub heads: u32,
    pub k: u32,
    pub accept_lossy: bool,
}
wire_header!(RetrieveHeader, Retrieve, |a| {
    check_len("keys", a.keys.len())?;
    if a.keys.is_empty() {
        return Err("keys: a prompt has at least one chunk".into());
    }
    let (k, heads) = (a.k.to_native(), a.heads.to_native());
    if k == 0 || k > super::MAX_RETRIEVE_K {
        return Err(format!("k {k} out of 1..={}", super::MAX_RETRIEVE_K));
    }
    if heads == 0 || heads > 1024 {
        return Err(format!("heads {heads} out of 1..=1024"));
    }
    Ok(())
});

/// Answer to `Retrieve`. The payload is `positions` (`[queries][heads][k]` little-endian u32),
/// then the K rows and the V rows of those positions (`[queries][heads][k]` rows of `row_bytes`
/// each, in the layout's dtype).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RetrieveOkHeader {
    /// 0: exact scan, 1: the prompt's HNSW graphs, 2: its attention-aware graphs.
    pub index: u8,
    /// Set when some chunk was read from a lossy copy (only if the request accepted lossy).
    pub lossy: bool,
    /// Tokens in the prompt.
    pub tokens: u64,
    pub k: u32,
    pub queries: u32,
    pub heads: u32,
    pub row_bytes: u32,
}
wire_header!(RetrieveOkHeader, RetrieveOk, |a| {
    if a.index > 2 {
        return Err(format!("unknown index kind {}", a.index));
    }
    Ok(())
});

impl RetrieveOkHeader {
    /// The payload length this header announces, or `None` on overflow.
    pub fn payload_len(&self) -> Option<u64> {
        let entries = (self.queries as u64)
            .checked_mul(self.heads as u64)?
            .checked_mul(self.k as u64)?;
        entries.checked_mul(4 + 2 * self.row_bytes as u64)
    }
}

/// Pin chunks against eviction for `ttl_ms`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct LeaseHeader {
    pub keys: Vec<u128>,
    pub ttl_ms: u64,
}
wire_header!(LeaseHeader, Lease, |a| check_len("keys", a.keys.len()));

/// One lease id per requested key, in order; 0 where the key is missing.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct LeaseOkHeader {
    pub lease_ids: Vec<u64>,
}
wire_header!(LeaseOkHeader, LeaseOk, |a| check_len(
    "lease_ids",
    a.lease_ids.len()
));

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ReleaseHeader {
    pub lease_ids: Vec<u64>,
}
wire_header!(ReleaseHeader, Release, |a| check_len(
    "lease_ids",
    a.lease_ids.len()
));

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct DeleteHeader {
    pub keys: Vec<u128>,
}
wire_header!(DeleteHeader, Delete, |a| check_len("keys", a.keys.len()));

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct DeleteOkHeader {
    pub removed: u32,
}
wire_header!(DeleteOkHeader, DeleteOk);

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct StatsHeader {}
wire_header!(StatsHeader, Stats);

/// Store statistics as a JSON document (stats are not on the hot path).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct StatsOkHeader {
    pub json: String,
}
wire_header!(StatsOkHeader, StatsOk);

/// Announces a memfd region the client sends alongside with `SCM_RIGHTS` (Unix sockets only).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ShmRegisterHeader {
    pub name: String,
    pub len: u64,
}
wire_header!(ShmRegisterHeader, ShmRegister);

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ShmRegisterOkHeader {
    pub region_id: u64,
}
wire_header!(ShmRegisterOkHeader, ShmRegisterOk);

/// `Put` whose bytes lie in a registered region at `offset..offset + len` (no payload).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ShmPutHeader {
    pub region_id: u64,
    pub offset: u64,
    pub len: u64,
    pub key: u128,
    pub meta: ChunkMetaWire,
}
wire_header!(ShmPutHeader, ShmPut, |a| a.meta.check());

/// `Get` into a registered region: the server packs found chunks into
/// `offset..offset + capacity` and lists where each went in the `GetOk` entries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ShmGetHeader {
    pub region_id: u64,
    pub offset: u64,
    pub capacity: u64,
    pub keys: Vec<u128>,
    pub accept_lossy: bool,
}
wire_header!(ShmGetHeader, ShmGet, |a| check_len("keys", a.keys.len()));

/// Ask for read-only file descriptors of the server's host arenas (sent with `SCM_RIGHTS`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct MapArenasHeader {}
wire_header!(MapArenasHeader, MapArenas);

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ArenaInfo {
    pub arena_id: u32,
    pub len: u64,
}

/// Arenas in the order their descriptors travel in the ancillary data.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct MapArenasOkHeader {
    pub arenas: Vec<ArenaInfo>,
}
wire_header!(MapArenasOkHeader, MapArenasOk, |a| check_len(
    "arenas",
    a.arenas.len()
));

/// Where chunks sit in the mapped arenas, each pinned by a lease of `lease_ttl_ms`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct GetLocatedHeader {
    pub keys: Vec<u128>,
    pub lease_ttl_ms: u64,
    pub accept_lossy: bool,
}
wire_header!(GetLocatedHeader, GetLocated, |a| check_len(
    "keys",
    a.keys.len()
));

/// One requested key of a `GetLocatedOk`, in request order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct LocatedEntry {
    pub found: bool,
    pub arena_id: u32,
    pub offset: u64,
    pub len: u64,
    /// Release it once the bytes are copied out; 0 when not found.
    pub lease_id: u64,
    pub meta: ChunkMetaWire,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct GetLocatedOkHeader {
    pub entries: Vec<LocatedEntry>,
}
wire_header!(GetLocatedOkHeader, GetLocatedOk, |a| {
    check_len("entries", a.entries.len())?;
    a.entries.iter().try_for_each(|e| e.meta.check())
});

/// A failed request. `code` is an [`super::ErrorCode`]; unknown codes are accepted (read them as
/// `Internal`) so a newer server can add codes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ErrorHeader {
    pub code: u16,
    pub message: String,
}
wire_header!(ErrorHeader, Error);

/// Token ids of a `Lookup` payload. Fails unless the length is a multiple of 4 and within
/// [`super::MAX_LOOKUP_TOKENS`].
pub fn tokens_from_payload(payload: &[u8]) -> Result<Vec<u32>, String> {
    if !payload.len().is_multiple_of(4) {
        return Err(format!(
            "lookup payload of {} bytes is not whole u32s",
            payload.len()
        ));
    }
    if payload.len() as u64 > super::MAX_LOOKUP_TOKENS * 4 {
        return Err(format!(
            "lookup of {} tokens is too long",
            payload.len() / 4
        ));
    }
    Ok(payload
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The `Lookup` payload for `tokens`.
pub fn tokens_to_payload(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}
