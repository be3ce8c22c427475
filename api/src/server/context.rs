//! What every data-plane request handler starts from: the connection's state ([`Ctx`]), its
//! validated header, and the store reads and namespaces several handlers share.
//!
//! A leaf of `server` like `reply`: `conn` creates the context, the handlers use it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use kvtier_cache::{CacheError, ChunkKey, ChunkRead, GetOutcome, Namespace};

use crate::error::ApiError;
use crate::service::Service;
use crate::wire::{self, AlignedVec, Limits, WireHeader};

/// Per-connection state handlers share.
pub(crate) struct Ctx {
    pub svc: Arc<Service>,
    pub tenant: String,
    pub tenant_id: u64,
    /// Shared-memory regions this client registered (Unix sockets only).
    pub regions: Mutex<HashMap<u64, Arc<Region>>>,
    pub limits: Limits,
}

/// A client's memfd region mapped into the server.
pub(crate) struct Region {
    pub map: Mutex<memmap2::MmapMut>,
}

/// The archived header of an already validated frame.
pub(super) fn header<T: WireHeader>(buf: &AlignedVec) -> Result<&T::Archived, ApiError> {
    wire::access_header::<T>(T::OPCODE, buf).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Chunk keys of an archived header.
pub(super) fn keys_of(keys: &rkyv::Archived<Vec<u128>>) -> Vec<ChunkKey> {
    keys.iter().map(|k| ChunkKey(k.to_native())).collect()
}

/// Reads one chunk for `tenant`, honouring fidelity; `None` for a miss or an excluded chunk.
pub(crate) fn read_chunk(
    svc: &Service,
    tenant: u64,
    key: ChunkKey,
    accept_lossy: bool,
) -> Result<Option<ChunkRead>, CacheError> {
    Ok(match svc.store.get(tenant, key, accept_lossy)? {
        GetOutcome::Hit(r) => Some(r),
        GetOutcome::Miss | GetOutcome::FidelityRejected(_) => None,
    })
}

/// The namespace a lookup hashes in.
pub(crate) fn namespace(
    tenant: &str,
    fingerprint: u64,
    salt: Option<&str>,
    chunk_tokens: u32,
) -> Namespace {
    let mut ns = Namespace::new(fingerprint, tenant).with_chunk_tokens(chunk_tokens);
    if let Some(s) = salt {
        ns = ns.with_salt(s);
    }
    ns
}
