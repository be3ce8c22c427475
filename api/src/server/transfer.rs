//! Data-plane handlers of prefill→decode transfers: the receiving side (`TransferBegin`,
//! `TransferLayers`, `WaitLayers`) over [`crate::transfer::Transfers`], and the moves a client
//! asks of a server (`TransferPush`: send chunks it holds to a peer; `TransferPull`: have a
//! peer send chunks to it).
//!
//! Peers are reached with this server's own credentials (the tenant's token in tenant-token
//! mode, else the shared token) and the caller's tenant, so tenants stay isolated across the
//! hop. Because that presents a credential, a peer must be listed in `transfer_peers`, or, when
//! the list is empty, be a loopback address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_cache::ChunkKey;
use kvtier_client::transfer::{OutgoingChunk, PushOptions, TransferReport, push};
use kvtier_client::{Client, ClientError, ClientOptions};

use super::context::{Ctx, header, keys_of, read_chunk};
use super::reply::{Fatal, Outgoing, Reply, frame, later, ok_frame};
use crate::error::ApiError;
use crate::transfer::{Claimed, ManifestChunk, Piece};
use crate::transport::Reader;
use crate::wire::{
    self, AlignedVec, Preamble, TransferBeginHeader, TransferBeginOkHeader, TransferLayersHeader,
    TransferOkHeader, TransferPullHeader, TransferPushHeader, WaitLayersHeader, WaitLayersOkHeader,
    WireError,
};

/// `TransferBegin`: reserve the request's bytes as one segment (or report a retry's progress).
pub(crate) fn begin(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    Reply::Now((|| {
        let a = header::<TransferBeginHeader>(buf)?;
        let chunks = a
            .chunks
            .iter()
            .map(|c| {
                Ok(ManifestChunk {
                    key: ChunkKey(c.key.to_native()),
                    meta: c
                        .meta
                        .to_meta(ctx.tenant_id)
                        .map_err(ApiError::BadRequest)?,
                    len: c.len.to_native(),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let p = ctx.svc.transfers.begin(
            ctx.tenant_id,
            a.transfer_id.to_native(),
            a.layers.to_native(),
            Duration::from_millis(a.timeout_ms.to_native()),
            chunks,
        )?;
        let ok = TransferBeginOkHeader {
            layers_done: p.layers_done,
            complete: p.complete,
        };
        Ok(Outgoing::frame(frame(&ok, 0)?))
    })())
}

/// `TransferLayers`: the payload is read piece by piece straight into the transfer's segment.
pub(crate) async fn layers(
    ctx: &Arc<Ctx>,
    pre: Preamble,
    buf: &AlignedVec,
    reader: &mut Reader,
    stall: Duration,
) -> Result<Reply, Fatal> {
    let (id, range) = {
        let a = header::<TransferLayersHeader>(buf)
            .map_err(|e| Fatal::Wire(pre.request_id, WireError::InvalidHeader(e.to_string())))?;
        (
            a.transfer_id.to_native(),
            a.layer_start.to_native()..a.layer_end.to_native(),
        )
    };
    let transfers = &ctx.svc.transfers;
    let refuse = |e: ApiError| Ok(Reply::Now(Err(e)));
    let Some(t) = transfers.get(ctx.tenant_id, id) else {
        wire::discard_payload(reader, pre.payload_len, stall).await?;
        return refuse(ApiError::NotFound(format!(
            "transfer {id:#x} (never begun or expired)"
        )));
    };
    if range.end > t.layers() || pre.payload_len != t.run_len(&range) {
        wire::discard_payload(reader, pre.payload_len, stall).await?;
        return refuse(ApiError::BadRequest(format!(
            "layers {}..{} of a {}-layer transfer carry {} bytes, not {}",
            range.start,
            range.end,
            t.layers(),
            if range.end > t.layers() {
                0
            } else {
                t.run_len(&range)
            },
            pre.payload_len
        )));
    }
    let mut claim = match transfers.claim(&t, range) {
        Ok(Claimed::Fresh(c)) => c,
        Ok(Claimed::Duplicate) => {
            wire::discard_payload(reader, pre.payload_len, stall).await?;
            return Ok(Reply::Now(ok_frame()));
        }
        Err(e) => {
            wire::discard_payload(reader, pre.payload_len, stall).await?;
            return refuse(e);
        }
    };
    // A failed read drops the claim, which returns its layers to missing.
    for piece in claim.pieces.iter_mut() {
        match piece {
            Piece::Read(p) => wire::read_payload_into(reader, p, stall).await?,
            Piece::Skip(n) => wire::discard_payload(reader, *n, stall).await?,
        }
    }
    let store = ctx.svc.store.clone();
    // The last run stores every chunk, which may evict (and so write to disk).
    Ok(later(move || {
        claim.finish(&store)?;
        ok_frame()
    }))
}

/// `WaitLayers`: answers once the layers arrived, the transfer completed, or the wait timed out.
pub(crate) fn wait(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let (id, upto, timeout) = match header::<WaitLayersHeader>(buf) {
        Ok(a) => (
            a.transfer_id.to_native(),
            a.upto.to_native(),
            Duration::from_millis(a.timeout_ms.to_native()),
        ),
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    Reply::Later(Box::pin(async move {
        let (p, layers, timed_out) = c.svc.transfers.wait(c.tenant_id, id, upto, timeout).await?;
        let ok = WaitLayersOkHeader {
            layers_done: p.layers_done,
            layers,
            complete: p.complete,
            timed_out,
        };
        Ok(Outgoing::frame(frame(&ok, 0)?))
    }))
}

/// The parameters of a push or a pull.
struct Move {
    id: u128,
    keys: Vec<ChunkKey>,
    peer: String,
    connections: u32,
    per_run: u32,
}

fn move_of(
    ctx: &Ctx,
    id: u128,
    keys: Vec<ChunkKey>,
    peer: &str,
    connections: u32,
    per_run: u32,
) -> Result<Move, ApiError> {
    let cfg = &ctx.svc.config;
    let allowed = if cfg.transfer_peers.is_empty() {
        peer.parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    } else {
        cfg.transfer_peers.iter().any(|p| p == peer)
    };
    if !allowed {
        return Err(ApiError::Unauthorized(format!(
            "peer {peer:?} is not in transfer_peers (only loopback peers when the list is empty)"
        )));
    }
    Ok(Move {
        id,
        keys,
        peer: peer.to_string(),
        connections: if connections == 0 {
            cfg.transfer_connections
        } else {
            connections
        },
        per_run: if per_run == 0 {
            cfg.transfer_layers_per_run
        } else {
            per_run
        },
    })
}

/// Connections to a peer with this server's credentials for the caller's tenant.
async fn connect_peer(ctx: &Ctx, peer: &str, n: u32) -> Result<Vec<Client>, ApiError> {
    let cfg = &ctx.svc.config;
    let token = cfg
        .tenant_tokens
        .iter()
        .find(|(_, t)| **t == ctx.tenant)
        .map(|(tok, _)| tok.clone())
        .or_else(|| cfg.token.clone());
    let opts = ClientOptions {
        token,
        tenant: Some(ctx.tenant.clone()),
        client_name: "kvtier-transfer".into(),
    };
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        out.push(
            Client::connect(peer, opts.clone())
                .await
                .map_err(peer_error)?,
        );
    }
    Ok(out)
}

fn peer_error(e: ClientError) -> ApiError {
    crate::metrics::record_transfer_failure("peer");
    ApiError::Unavailable(format!("transfer peer: {e}"))
}

fn ok_of(r: TransferReport) -> Result<Outgoing, ApiError> {
    let ok = TransferOkHeader {
        bytes: r.bytes,
        chunks: r.chunks,
        layers: r.layers,
        calls: r.calls,
        micros: r.elapsed.as_micros() as u64,
    };
    Ok(Outgoing::frame(frame(&ok, 0)?))
}

/// `TransferPush`: read the chunks exactly for the caller's tenant and send them to the peer.
pub(crate) fn push_to_peer(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let m = match header::<TransferPushHeader>(buf).and_then(|a| {
        move_of(
            ctx,
            a.transfer_id.to_native(),
            keys_of(&a.keys),
            a.peer.as_str(),
            a.connections.to_native(),
            a.layers_per_run.to_native(),
        )
    }) {
        Ok(m) => m,
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    Reply::Later(Box::pin(async move {
        let started = Instant::now();
        let reader = c.clone();
        let keys = m.keys.clone();
        let chunks = tokio::task::spawn_blocking(move || {
            keys.into_iter()
                .map(
                    |key| match read_chunk(&reader.svc, reader.tenant_id, key, false)? {
                        Some(r) => Ok(OutgoingChunk {
                            key,
                            meta: r.meta,
                            bytes: r.bytes,
                        }),
                        None => Err(ApiError::NotFound(format!("chunk {:032x}", key.0))),
                    },
                )
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("reading transfer chunks: {e}")))??;
        let layers = layers_of(&c, &chunks);
        let conns = connect_peer(&c, &m.peer, m.connections).await?;
        let opts = PushOptions {
            layers,
            layers_per_run: m.per_run,
            timeout: Duration::from_millis(c.svc.config.transfer_timeout_ms),
        };
        let mut r = push(&conns, m.id, &chunks, opts)
            .await
            .map_err(peer_error)?;
        r.elapsed = started.elapsed();
        crate::metrics::record_transfer("pushed", r.bytes, r.elapsed);
        ok_of(r)
    }))
}

/// The layer count every chunk's payload splits into: the layout's, when all chunks share a
/// known layout and split evenly; else 1 (each chunk whole, one frame).
fn layers_of(ctx: &Ctx, chunks: &[OutgoingChunk]) -> u32 {
    let Some(first) = chunks.first() else {
        return 1;
    };
    let Some(l) = ctx.svc.layouts.get(first.meta.layout) else {
        return 1;
    };
    let n = l.num_layers.clamp(1, wire::MAX_TRANSFER_LAYERS);
    let even = chunks
        .iter()
        .all(|c| c.meta.layout == first.meta.layout && c.bytes.len().is_multiple_of(n as usize));
    if even { n } else { 1 }
}

/// `TransferPull`: ask the peer to push the chunks here; answers when it reports them stored.
pub(crate) fn pull_from_peer(ctx: &Arc<Ctx>, buf: &AlignedVec) -> Reply {
    let m = match header::<TransferPullHeader>(buf).and_then(|a| {
        move_of(
            ctx,
            a.transfer_id.to_native(),
            keys_of(&a.keys),
            a.peer.as_str(),
            a.connections.to_native(),
            a.layers_per_run.to_native(),
        )
    }) {
        Ok(m) => m,
        Err(e) => return Reply::Now(Err(e)),
    };
    let c = ctx.clone();
    Reply::Later(Box::pin(async move {
        let cfg = &c.svc.config;
        let me = cfg
            .transfer_advertise
            .clone()
            .unwrap_or_else(|| c.svc.data_addr.get().unwrap_or(&cfg.listen).to_string());
        let peer = connect_peer(&c, &m.peer, 1).await?;
        let r = peer[0]
            .push_transfer(m.id, &m.keys, &me, m.connections, m.per_run)
            .await
            .map_err(peer_error)?;
        crate::metrics::record_transfer("pulled", r.bytes, r.elapsed);
        ok_of(r)
    }))
}
