//! One data-plane connection: a reader loop that parses frames and a writer task that sends
//! responses, so many requests can be in flight and answered out of order.
//!
//! The first frame must be `Hello` (authentication and tenant). After that the reader reads each
//! frame head, reads `Put` payloads straight into a freshly reserved host slot, and hands the
//! request to a task; responses go through a bounded channel to the writer, which writes chunk
//! bytes from slot memory with vectored writes. A frame that breaks a rule gets an error frame
//! and the connection is closed; a request that fails (unknown key, full store) gets an error
//! frame and the connection stays open.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};

use kvtier_cache::key::tenant_id;

use super::context::Ctx;
use super::handlers;
use super::reply::{Fatal, Outgoing, Reply};
use crate::error::ApiError;
use crate::service::Service;
use crate::transport::{Reader, Writer};
use crate::wire::{
    self, AlignedVec, HelloHeader, HelloOkHeader, Limits, Opcode, Preamble, WireError,
};

/// Serves one connection until the peer closes it, breaks a frame rule, or the server stops.
pub(crate) async fn serve(svc: Arc<Service>, mut reader: Reader, writer: Writer) {
    let limits = Limits::default();
    let stall = Duration::from_secs(svc.config.stall_timeout_secs);
    let (tx, rx) = mpsc::channel::<Outgoing>(svc.config.max_in_flight as usize);
    let writer_task = tokio::spawn(write_loop(writer, rx));
    let mut buf = AlignedVec::new();
    let result = async {
        let tenant = hello(&svc, &mut reader, &limits, stall, &mut buf, &tx).await?;
        let ctx = Arc::new(Ctx {
            svc: svc.clone(),
            tenant_id: tenant_id(&tenant),
            tenant,
            regions: Mutex::new(HashMap::new()),
            limits,
        });
        let permits = Arc::new(Semaphore::new(svc.config.max_in_flight as usize));
        loop {
            let Some(pre) = wire::read_frame_head(&mut reader, &limits, stall, &mut buf).await?
            else {
                return Ok::<(), Fatal>(());
            };
            // Backpressure: stop reading until a slot for another in-flight request frees up.
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Fatal::Closed)?;
            let started = Instant::now();
            let reply = dispatch(&ctx, pre, &buf, &mut reader, stall).await?;
            let tx = tx.clone();
            let op = op_name(pre.opcode);
            let no_reply = pre.flags & wire::FLAG_NO_REPLY != 0;
            match reply {
                Reply::Now(r) => send_reply(&tx, pre.request_id, r, no_reply, op, started).await,
                Reply::Later(fut) => {
                    tokio::spawn(async move {
                        let r = fut.await;
                        send_reply(&tx, pre.request_id, r, no_reply, op, started).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    .await;
    if let Err(Fatal::Wire(request_id, e)) = result {
        crate::metrics::record_op("bad_frame", "wire", Duration::ZERO, false);
        tracing::debug!("closing data-plane connection: {e}");
        let out = Outgoing {
            close: true,
            ..Outgoing::frame(wire::error_frame(request_id, e.code(), &e.to_string()))
        };
        let _ = tx.send(out).await;
    } else if let Err(Fatal::Denied(e)) = result {
        let out = Outgoing {
            close: true,
            ..Outgoing::error(0, &e)
        };
        let _ = tx.send(out).await;
    }
    drop(tx);
    let _ = writer_task.await;
}

async fn send_reply(
    tx: &mpsc::Sender<Outgoing>,
    request_id: u64,
    r: Result<Outgoing, ApiError>,
    no_reply: bool,
    op: &'static str,
    started: Instant,
) {
    crate::metrics::record_op(op, "wire", started.elapsed(), r.is_ok());
    let out = match r {
        Ok(_) if no_reply => return,
        Ok(mut o) => {
            patch_request_id(&mut o.head, request_id);
            o
        }
        Err(e) => Outgoing::error(request_id, &e),
    };
    let _ = tx.send(out).await;
}

/// Handlers build frames with request id 0; the id is stamped here, in the preamble.
fn patch_request_id(head: &mut [u8], id: u64) {
    if head.len() >= wire::PREAMBLE_LEN {
        head[8..16].copy_from_slice(&id.to_le_bytes());
    }
}

async fn write_loop(mut w: Writer, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let n: u64 = out.payload.iter().map(|p| p.len() as u64).sum();
        if wire::write_frame(&mut w, &out.head, &out.payload)
            .await
            .is_err()
        {
            return;
        }
        crate::metrics::record_bytes(false, n + out.head.len() as u64);
        if !out.fds.is_empty() {
            let fds: Vec<_> = out.fds.iter().map(|f| f.as_fd()).collect();
            if w.send_fds(&fds).await.is_err() {
                return;
            }
        }
        if out.close {
            return;
        }
    }
}

/// Reads and checks the `Hello` frame; answers `HelloOk` and returns the tenant.
async fn hello(
    svc: &Service,
    reader: &mut Reader,
    limits: &Limits,
    stall: Duration,
    buf: &mut AlignedVec,
    tx: &mpsc::Sender<Outgoing>,
) -> Result<String, Fatal> {
    // The first frame has the stall timeout as a whole: a client that connects and says nothing
    // does not hold a connection forever.
    let pre = tokio::time::timeout(stall, wire::read_frame_head(reader, limits, stall, buf))
        .await
        .map_err(|_| Fatal::Wire(0, WireError::Timeout))??
        .ok_or(Fatal::Closed)?;
    if pre.opcode != Opcode::Hello {
        return Err(Fatal::Denied(ApiError::Unauthorized(
            "the first frame must be hello".into(),
        )));
    }
    let h: HelloHeader =
        wire::decode_header(pre.opcode, buf).map_err(|e| Fatal::Wire(pre.request_id, e))?;
    if h.protocol_version != wire::VERSION {
        return Err(Fatal::Wire(
            pre.request_id,
            WireError::UnsupportedVersion(h.protocol_version),
        ));
    }
    let token = (!h.auth_token.is_empty()).then_some(h.auth_token.as_str());
    let principal = svc
        .auth
        .authorize(token, Some(h.tenant.as_str()))
        .map_err(Fatal::Denied)?;
    let ok = HelloOkHeader {
        server_id: format!("kvtier/{}", env!("CARGO_PKG_VERSION")),
        protocol_version: wire::VERSION,
        max_header_len: limits.max_header_len,
        max_payload_len: limits.max_payload_len,
        max_keys: limits.max_keys() as u32,
        max_in_flight: svc.config.max_in_flight,
    };
    let head = wire::frame_head(Opcode::HelloOk, pre.request_id, 0, &ok, 0)
        .map_err(|e| Fatal::Wire(pre.request_id, e))?;
    tx.send(Outgoing::frame(head))
        .await
        .map_err(|_| Fatal::Closed)?;
    Ok(principal.tenant)
}

fn op_name(op: Opcode) -> &'static str {
    match op {
        Opcode::Put => "put",
        Opcode::Get => "get",
        Opcode::Lookup => "lookup",
        Opcode::Lease => "lease",
        Opcode::Release => "release",
        Opcode::Delete => "delete",
        Opcode::Stats => "stats",
        Opcode::ShmRegister => "shm_register",
        Opcode::ShmPut => "shm_put",
        Opcode::ShmGet => "shm_get",
        Opcode::MapArenas => "map_arenas",
        Opcode::GetLocated => "get_located",
        Opcode::Retrieve => "retrieve",
        Opcode::TransferBegin => "transfer_begin",
        Opcode::TransferLayers => "transfer_layers",
        Opcode::WaitLayers => "wait_layers",
        Opcode::TransferPush => "transfer_push",
        Opcode::TransferPull => "transfer_pull",
        _ => "other",
    }
}

/// Routes one frame. Payload-carrying requests read their payload here, in stream order.
async fn dispatch(
    ctx: &Arc<Ctx>,
    pre: Preamble,
    buf: &AlignedVec,
    reader: &mut Reader,
    stall: Duration,
) -> Result<Reply, Fatal> {
    let fatal = |e: WireError| Fatal::Wire(pre.request_id, e);
    if pre.opcode.is_response() || pre.opcode == Opcode::Hello {
        return Err(fatal(WireError::InvalidHeader(format!(
            "{:?} is not a request here",
            pre.opcode
        ))));
    }
    wire::validate_header(pre.opcode, buf).map_err(fatal)?;
    crate::metrics::record_bytes(
        true,
        wire::PREAMBLE_LEN as u64 + pre.header_len as u64 + pre.payload_len,
    );
    Ok(match pre.opcode {
        Opcode::Put => handlers::put(ctx, pre, buf, reader, stall).await?,
        Opcode::Lookup => handlers::lookup(ctx, pre, buf, reader, stall).await?,
        Opcode::Retrieve => super::retrieve::retrieve(ctx, pre, buf, reader, stall).await?,
        Opcode::ShmRegister => handlers::shm_register(ctx, buf, reader).await?,
        Opcode::Get => handlers::get(ctx, buf),
        Opcode::Lease => handlers::lease(ctx, buf),
        Opcode::Release => handlers::release(ctx, buf),
        Opcode::Delete => handlers::delete(ctx, buf),
        Opcode::Stats => handlers::stats(ctx),
        Opcode::ShmPut => handlers::shm_put(ctx, buf),
        Opcode::ShmGet => handlers::shm_get(ctx, buf),
        Opcode::MapArenas => handlers::map_arenas(ctx, reader.is_unix()),
        Opcode::GetLocated => handlers::get_located(ctx, buf),
        Opcode::TransferLayers => super::transfer::layers(ctx, pre, buf, reader, stall).await?,
        Opcode::TransferBegin => super::transfer::begin(ctx, buf),
        Opcode::WaitLayers => super::transfer::wait(ctx, buf),
        Opcode::TransferPush => super::transfer::push_to_peer(ctx, buf),
        Opcode::TransferPull => super::transfer::pull_from_peer(ctx, buf),
        other => return Err(fatal(WireError::UnknownOpcode(other as u8))),
    })
}
