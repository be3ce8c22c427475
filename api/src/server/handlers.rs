//! Request handlers of the data plane. Each returns a [`Reply`]: answered now (cheap, in-memory
//! work done on the connection's task) or later (a future, for work that may touch disk or copy
//! large buffers, which runs on a blocking thread).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use kvtier_cache::{CacheError, ChunkKey};

use super::context::{Ctx, Region, header, keys_of, namespace, read_chunk};
use super::reply::{Fatal, Outgoing, Reply, frame, later, ok_frame};
use crate::error::ApiError;
use crate::transport::Reader;
use crate::wire::{
    self, AlignedVec, ArenaInfo, ChunkMetaWire, DeleteHeader, DeleteOkHeader, GetEntry, GetHeader,
    GetLocatedHeader, GetLocatedOkHeader, GetOkHeader, LeaseHeader, LeaseOkHeader, LocatedEntry,
    LookupHeader, LookupHit, LookupOkHeader, MapArenasOkHeader, Preamble, PutHeader, ReleaseHeader,
    ShmGetHeader, ShmPutHeader, ShmRegisterHeader, ShmRegisterOkHeader, StatsOkHeader, WireError,
};

static NEXT_REGION: AtomicU64 = AtomicU64::new(1);
/// Largest shared region a client may register (64 GiB).
const MAX_REGION: u64 = 64 << 30;
/// Regions one connection may register.
const MAX_REGIONS: usize = 64;

/// `Put`: the payload is read straight into a reserved host slot, then published.
pub(crate) async fn put(
    ctx: &Arc<Ctx>,
    pre: Preamble,
    buf: &AlignedVec,
    reader: &mut Reader,
    stall: Duration,
) -> Result<Reply, Fatal> {
    let (key, meta) = {
        let a = header::<PutHeader>(buf)
            .map_err(|e| Fatal::Wire(pre.request_id, WireError::InvalidHeader(e.to_string())))?;
        (ChunkKey(a.key.to_native()), a.meta.to_meta(ctx.tenant_id))
    };
    let len = pre.payload_len as usize;
    let meta = match meta {
        Ok(m) => m,
        Err(msg) => {
            wire::discard_payload(reader, pre.payload_len, stall).await?;
            return Ok(Reply::Now(Err(ApiError::BadRequest(msg))));
        }
    };
    let store = ctx.svc.store.clone();
    // Fast path: a free slot without evicting. Otherwise eviction (which may write to disk) runs
    // on a blocking thread.
    let slot = match store.host().reserve(len) {
        Err(CacheError::TierFull { .. }) => {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.reserve(len))
                .await
                .map_err(|_| Fatal::Closed)?
        }
        other => other,
    };
    let mut slot = match slot {
        Ok(slot) => slot,
        Err(e) => {
            wire::discard_payload(reader, pre.payload_len, stall).await?;
            return Ok(Reply::Now(Err(e.into())));
        }
    };
    wire::read_payload_into(reader, &mut slot, stall).await?;
    let through = store.put_may_block();
    let publish = move || {
        store.put_slot(key, meta, slot)?;
        ok_frame()
    };
    Ok(if through {
        later(publish)
    } else {
        Reply::Now(publish())
    })
}

/// `Get`: found chunks are sent from their slots (reference-counted views, no copy).
pub(crate) fn get(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let (keys, accept_lossy) = match header::<GetHeader>(buf) {
        Ok(a) => (keys_of(&a.keys), a.accept_lossy),
        Err(e) => return Reply::Now(Err(e)),
    };
    let io = ctx.svc.store.read_may_block(ctx.tenant_id, &keys);
    let c = ctx.clone();
    let work = move || {
        let mut entries = Vec::with_capacity(keys.len());
        let mut payload: Vec<Bytes> = Vec::new();
        let mut offset = 0u64;
        for key in keys {
            match read_chunk(&c.svc, c.tenant_id, key, accept_lossy)? {
                Some(r) => {
                    let len = r.bytes.len() as u64;
                    entries.push(GetEntry {
                        found: true,
                        meta: ChunkMetaWire::from_meta(&r.meta),
                        len,
                        offset,
                    });
                    offset += len;
                    payload.push(r.bytes);
                }
                None => entries.push(GetEntry::default()),
            }
        }
        if offset > c.limits.max_payload_len {
            return Err(ApiError::TooLarge(format!(
                "{offset} bytes in one get; ask for fewer keys at a time"
            )));
        }
        let head = frame(&GetOkHeader { entries }, offset)?;
        Ok(Outgoing {
            payload,
            ..Outgoing::frame(head)
        })
    };
    if io { later(work) } else { Reply::Now(work()) }
}

/// `Lookup`: the payload holds the prompt's token ids.
pub(crate) async fn lookup(
    ctx: &Arc<Ctx>,
    pre: Preamble,
    buf: &AlignedVec,
    reader: &mut Reader,
    stall: Duration,
) -> Result<Reply, Fatal> {
    let (fp, salt, chunk_tokens) = {
        let a = header::<LookupHeader>(buf)
            .map_err(|e| Fatal::Wire(pre.request_id, WireError::InvalidHeader(e.to_string())))?;
        (
            a.layout_fingerprint.to_native(),
            a.salt.as_ref().map(|s| s.to_string()),
            a.chunk_tokens.to_native(),
        )
    };
    let mut payload = vec![0u8; pre.payload_len as usize];
    wire::read_payload_into(reader, &mut payload, stall).await?;
    let tokens = match wire::tokens_from_payload(&payload) {
        Ok(t) => t,
        Err(msg) => return Ok(Reply::Now(Err(ApiError::BadRequest(msg)))),
    };
    let ns = namespace(&ctx.tenant, fp, salt.as_deref(), chunk_tokens);
    let store = ctx.svc.store.clone();
    let max_keys = ctx.limits.max_keys();
    let may_block = store.lookup_may_block();
    let work = move || {
        let r = store.lookup(&ns, &tokens);
        // The response header must fit the frame limits: report the longest prefix that does.
        let n = r.chunks.len().min(max_keys);
        let hits: Vec<LookupHit> = r.chunks[..n]
            .iter()
            .map(|c| LookupHit {
                key: c.key.0,
                tiers: c.tiers.0,
                fidelity: c.fidelity.tag(),
            })
            .collect();
        let h = LookupOkHeader {
            hit_chunks: n as u32,
            hit_tokens: (n * chunk_tokens as usize) as u64,
            hits,
        };
        frame(&h, 0).map(Outgoing::frame)
    };
    // A store with a shared (remote) tier probes it for chunks missing locally: network I/O.
    Ok(match may_block {
        true => later(work),
        false => Reply::Now(work()),
    })
}

/// `Lease`: pins chunks (promoting them to host first when needed).
pub(crate) fn lease(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let (keys, ttl) = match header::<LeaseHeader>(buf) {
        Ok(a) => (
            keys_of(&a.keys),
            Duration::from_millis(a.ttl_ms.to_native()),
        ),
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    later(move || {
        let lease_ids = keys
            .iter()
            .map(|k| {
                c.svc
                    .store
                    .lease(c.tenant_id, *k, ttl)
                    .map(|l| l.id)
                    .unwrap_or(0)
            })
            .collect();
        Ok(Outgoing::frame(frame(&LeaseOkHeader { lease_ids }, 0)?))
    })
}

/// `Release`: ends leases; fails naming how many were unknown or expired.
pub(crate) fn release(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let ids: Vec<u64> = match header::<ReleaseHeader>(buf) {
        Ok(a) => a.lease_ids.iter().map(|i| i.to_native()).collect(),
        Err(e) => return Reply::Now(Err(e)),
    };
    let missing = ids
        .iter()
        .filter(|id| ctx.svc.store.release(**id).is_err())
        .count();
    Reply::Now(if missing == 0 {
        ok_frame()
    } else {
        Err(ApiError::NotFound(format!(
            "{missing} of {} leases unknown or expired",
            ids.len()
        )))
    })
}

/// `Delete`: removes chunks from every tier.
pub(crate) fn delete(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let keys = match header::<DeleteHeader>(buf) {
        Ok(a) => keys_of(&a.keys),
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    later(move || {
        let mut removed = 0u32;
        for k in keys {
            removed += u32::from(c.svc.store.delete(c.tenant_id, k)?);
        }
        Ok(Outgoing::frame(frame(&DeleteOkHeader { removed }, 0)?))
    })
}

/// `Stats`: store statistics as JSON.
pub(crate) fn stats(ctx: &Arc<Ctx>) -> Reply {
    let json = serde_json::to_string(&ctx.svc.store.stats())
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    Reply::Now(frame(&StatsOkHeader { json }, 0).map(Outgoing::frame))
}

/// `MapArenas`: read-only descriptors of every host arena, for zero-copy same-host reads.
pub(crate) fn map_arenas(ctx: &Arc<Ctx>, unix: bool) -> Reply {
    if !unix || !ctx.svc.shared_arenas {
        return Reply::Now(Err(ApiError::BadRequest(
            "arena mapping needs the unix socket and memfd arenas".into(),
        )));
    }
    Reply::Now((|| {
        let arenas = ctx.svc.store.host().arenas()?;
        if arenas.len() > crate::transport::MAX_FDS {
            return Err(ApiError::TooLarge(format!(
                "{} arenas exceed one descriptor message",
                arenas.len()
            )));
        }
        let mut infos = Vec::new();
        let mut fds = Vec::new();
        for a in arenas {
            let fd = a
                .shared_fd
                .ok_or_else(|| ApiError::Internal("arena without a descriptor".into()))?;
            infos.push(ArenaInfo {
                arena_id: a.id,
                len: a.len,
            });
            fds.push(fd);
        }
        let head = frame(&MapArenasOkHeader { arenas: infos }, 0)?;
        Ok(Outgoing {
            fds,
            ..Outgoing::frame(head)
        })
    })())
}

/// `GetLocated`: leases each chunk in host memory and says where it sits in the arenas.
pub(crate) fn get_located(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let (keys, ttl, accept_lossy) = match header::<GetLocatedHeader>(buf) {
        Ok(a) => (
            keys_of(&a.keys),
            Duration::from_millis(a.lease_ttl_ms.to_native()),
            a.accept_lossy,
        ),
        Err(e) => return Reply::Now(Err(e)),
    };
    let io = ctx.svc.store.read_may_block(ctx.tenant_id, &keys);
    let c = ctx.clone();
    let work = move || {
        let store = &c.svc.store;
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(info) = store.info(c.tenant_id, key) else {
                entries.push(LocatedEntry::default());
                continue;
            };
            if !accept_lossy && !info.meta.fidelity.is_exact() {
                entries.push(LocatedEntry::default());
                continue;
            }
            let Ok(lease) = store.lease(c.tenant_id, key, ttl) else {
                entries.push(LocatedEntry::default());
                continue;
            };
            match store.host().locate(key) {
                Some((meta, loc, _view)) => entries.push(LocatedEntry {
                    found: true,
                    arena_id: loc.arena,
                    offset: loc.offset,
                    len: loc.len,
                    lease_id: lease.id,
                    meta: ChunkMetaWire::from_meta(&meta),
                }),
                None => {
                    let _ = store.release(lease.id);
                    entries.push(LocatedEntry::default());
                }
            }
        }
        Ok(Outgoing::frame(frame(&GetLocatedOkHeader { entries }, 0)?))
    };
    if io { later(work) } else { Reply::Now(work()) }
}

/// `ShmRegister`: the descriptor follows the frame as a one-byte `SCM_RIGHTS` message.
pub(crate) async fn shm_register(
    ctx: &Arc<Ctx>,
    buf: &AlignedVec,
    reader: &mut Reader,
) -> Result<Reply, Fatal> {
    let len = match header::<ShmRegisterHeader>(buf) {
        Ok(a) => a.len.to_native(),
        Err(e) => return Ok(Reply::Now(Err(e))),
    };
    if !reader.is_unix() {
        return Ok(Reply::Now(Err(ApiError::BadRequest(
            "shared memory needs the unix socket".into(),
        ))));
    }
    // The descriptor message is part of the request: read it even if we then refuse.
    let fds = reader
        .recv_fds()
        .await
        .map_err(|e| Fatal::Wire(0, WireError::Io(e)))?;
    let reply = (|| {
        let [fd] = <[_; 1]>::try_from(fds).map_err(|v| {
            ApiError::BadRequest(format!("expected one descriptor, got {}", v.len()))
        })?;
        if len == 0 || len > MAX_REGION {
            return Err(ApiError::BadRequest(format!(
                "region length {len} out of range (1..={MAX_REGION})"
            )));
        }
        let mut regions = ctx.regions.lock();
        if regions.len() >= MAX_REGIONS {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_REGIONS} regions per connection"
            )));
        }
        let map = kvtier_offload::shm::map_client_region(&fd, len as usize)?;
        let region_id = NEXT_REGION.fetch_add(1, Ordering::Relaxed);
        regions.insert(
            region_id,
            Arc::new(Region {
                map: Mutex::new(map),
            }),
        );
        Ok(Outgoing::frame(frame(
            &ShmRegisterOkHeader { region_id },
            0,
        )?))
    })();
    Ok(Reply::Now(reply))
}

fn region(ctx: &Ctx, id: u64) -> Result<Arc<Region>, ApiError> {
    ctx.regions
        .lock()
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("shared region {id}")))
}

fn check_range(
    offset: u64,
    len: u64,
    region_len: usize,
) -> Result<std::ops::Range<usize>, ApiError> {
    match offset.checked_add(len) {
        Some(end) if end <= region_len as u64 => Ok(offset as usize..end as usize),
        _ => Err(ApiError::BadRequest(format!(
            "range {offset}+{len} outside the {region_len}-byte region"
        ))),
    }
}

/// `ShmPut`: copies the chunk from the client's region into a host slot (one copy).
pub(crate) fn shm_put(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let parsed = header::<ShmPutHeader>(buf).and_then(|a| {
        let meta = a
            .meta
            .to_meta(ctx.tenant_id)
            .map_err(ApiError::BadRequest)?;
        Ok((
            a.region_id.to_native(),
            a.offset.to_native(),
            a.len.to_native(),
            ChunkKey(a.key.to_native()),
            meta,
        ))
    });
    let (rid, offset, len, key, meta) = match parsed {
        Ok(v) => v,
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    later(move || {
        let region = region(&c, rid)?;
        let mut slot = c.svc.store.reserve(len as usize)?;
        {
            let map = region.map.lock();
            let range = check_range(offset, len, map.len())?;
            slot.copy_from_slice(&map[range]);
        }
        c.svc.store.put_slot(key, meta, slot)?;
        ok_frame()
    })
}

/// `ShmGet`: copies found chunks into the client's region, packed from `offset`.
pub(crate) fn shm_get(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let parsed = header::<ShmGetHeader>(buf).map(|a| {
        (
            a.region_id.to_native(),
            a.offset.to_native(),
            a.capacity.to_native(),
            keys_of(&a.keys),
            a.accept_lossy,
        )
    });
    let (rid, offset, capacity, keys, accept_lossy) = match parsed {
        Ok(v) => v,
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    later(move || {
        let region = region(&c, rid)?;
        let mut map = region.map.lock();
        check_range(offset, capacity, map.len())?;
        let mut cursor = offset;
        let end = offset + capacity;
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(r) = read_chunk(&c.svc, c.tenant_id, key, accept_lossy)? else {
                entries.push(GetEntry::default());
                continue;
            };
            let len = r.bytes.len() as u64;
            if cursor + len > end {
                return Err(ApiError::TooLarge(format!(
                    "chunks need more than the {capacity}-byte window"
                )));
            }
            map[cursor as usize..(cursor + len) as usize].copy_from_slice(&r.bytes);
            entries.push(GetEntry {
                found: true,
                meta: ChunkMetaWire::from_meta(&r.meta),
                len,
                offset: cursor,
            });
            cursor += len;
        }
        Ok(Outgoing::frame(frame(&GetOkHeader { entries }, 0)?))
    })
}
