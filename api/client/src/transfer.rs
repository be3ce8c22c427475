//! The sending side of a prefill→decode transfer, and the client calls of the transfer opcodes.
//!
//! [`push`] moves one request's chunks to a receiving server: a `TransferBegin` with the
//! manifest (the receiver reserves the whole request up front; on a retry it answers what it
//! already has), then one `TransferLayers` frame per run of layers, spread round-robin over the
//! given connections and written with vectored writes straight from the chunks' [`Bytes`] (slot
//! memory when the sender is a server): no intermediate copy, `ceil(layers / layers_per_run)`
//! calls per request instead of one per block per layer. The first run is sent alone, the rest
//! concurrently. [`Client::wait_layers`] lets the
//! receiving engine start on the first layers while later ones are in flight.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use kvtier_cache::{ChunkKey, ChunkMeta};
use kvtier_wire::{
    ChunkMetaWire, MAX_TRANSFER_LAYERS, Opcode, TransferBeginHeader, TransferBeginOkHeader,
    TransferChunk, TransferLayersHeader, TransferOkHeader, TransferPullHeader, TransferPushHeader,
    WaitLayersHeader, WaitLayersOkHeader,
};

use crate::client::{Client, ClientError, expect};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// One chunk to send: its key, metadata and raw bytes (layer-major).
#[derive(Debug, Clone)]
pub struct OutgoingChunk {
    pub key: ChunkKey,
    pub meta: ChunkMeta,
    pub bytes: Bytes,
}

/// How to cut a transfer.
#[derive(Debug, Clone, Copy)]
pub struct PushOptions {
    /// Layers every payload splits into (the model's layer count).
    pub layers: u32,
    /// Layers per frame; `layers` sends each chunk whole in one frame.
    pub layers_per_run: u32,
    /// How long the receiver keeps the reservation waiting for us.
    pub timeout: Duration,
}

/// What one transfer moved (also the answer of a server-side push or pull).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferReport {
    pub bytes: u64,
    pub chunks: u32,
    pub layers: u32,
    /// `TransferLayers` frames sent (0 when the receiver already held everything).
    pub calls: u32,
    pub elapsed: Duration,
}

/// Progress of a transfer on the receiving server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerProgress {
    /// Layers `0..layers_done` arrived for every chunk.
    pub layers_done: u32,
    pub layers: u32,
    pub complete: bool,
    pub timed_out: bool,
}

/// The receiver's answer to a begin: what it already holds of the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    pub layers_done: u32,
    pub complete: bool,
}

fn check_layers(layers: u32) -> Result<()> {
    if layers == 0 || layers > MAX_TRANSFER_LAYERS {
        return Err(ClientError::Protocol(format!(
            "layers {layers} out of 1..={MAX_TRANSFER_LAYERS}"
        )));
    }
    Ok(())
}

/// Announces transfer `transfer_id` of `chunks` (the receiver reserves it whole).
pub async fn begin(
    conn: &Client,
    transfer_id: u128,
    chunks: &[OutgoingChunk],
    layers: u32,
    timeout: Duration,
) -> Result<Begun> {
    check_layers(layers)?;
    let begin = TransferBeginHeader {
        transfer_id,
        layers,
        timeout_ms: (timeout.as_millis() as u64).max(1),
        chunks: chunks
            .iter()
            .map(|c| TransferChunk {
                key: c.key.0,
                meta: ChunkMetaWire::from_meta(&c.meta),
                len: c.bytes.len() as u64,
            })
            .collect(),
    };
    let f = expect(conn.call(&begin, &[], None).await?, Opcode::TransferBeginOk)?;
    let state: TransferBeginOkHeader =
        kvtier_wire::decode_header(Opcode::TransferBeginOk, &f.header)?;
    Ok(Begun {
        layers_done: state.layers_done,
        complete: state.complete,
    })
}

/// Sends layers `range` of every chunk as one frame, written from the chunks' memory.
pub async fn send_layers(
    conn: &Client,
    transfer_id: u128,
    chunks: &[OutgoingChunk],
    layers: u32,
    range: std::ops::Range<u32>,
) -> Result<()> {
    check_layers(layers)?;
    let h = TransferLayersHeader {
        transfer_id,
        layer_start: range.start,
        layer_end: range.end,
    };
    let slices: Vec<&[u8]> = chunks
        .iter()
        .map(|c| {
            let lb = c.bytes.len() / layers as usize;
            &c.bytes[range.start as usize * lb..range.end as usize * lb]
        })
        .collect();
    expect(conn.call(&h, &slices, None).await?, Opcode::Ok).map(|_| ())
}

/// Sends `chunks` as transfer `transfer_id` to the server behind `conns` (all connections to the
/// same receiver, same tenant). Retrying with the same id after a failure sends only from the
/// first missing layer; a completed transfer is not sent again.
pub async fn push(
    conns: &[Client],
    transfer_id: u128,
    chunks: &[OutgoingChunk],
    opts: PushOptions,
) -> Result<TransferReport> {
    let started = Instant::now();
    let first = conns
        .first()
        .ok_or_else(|| ClientError::Protocol("a transfer needs at least one connection".into()))?;
    let layers = opts.layers;
    let state = begin(first, transfer_id, chunks, layers, opts.timeout).await?;
    let per_run = opts.layers_per_run.clamp(1, layers);
    let mut report = TransferReport {
        bytes: chunks.iter().map(|c| c.bytes.len() as u64).sum(),
        chunks: chunks.len() as u32,
        layers,
        calls: 0,
        elapsed: Duration::ZERO,
    };
    if !state.complete {
        // The chunks' views are cheap to clone (reference counts), which lets each run be a
        // task of its own while they keep the memory alive.
        let chunks: std::sync::Arc<[OutgoingChunk]> = chunks.into();
        let mut set = JoinSet::new();
        let mut start = state.layers_done;
        // The first run goes alone: it then has the whole link, so the receiver can start on
        // layer 0 after about `per_run / layers` of the transfer instead of `connections` times
        // that. The rest share the connections.
        if start < layers {
            let end = (start + per_run).min(layers);
            send_layers(first, transfer_id, &chunks, layers, start..end).await?;
            report.calls += 1;
            start = end;
        }
        while start < layers {
            let end = (start + per_run).min(layers);
            let conn = conns[report.calls as usize % conns.len()].clone();
            let chunks = chunks.clone();
            set.spawn(
                async move { send_layers(&conn, transfer_id, &chunks, layers, start..end).await },
            );
            report.calls += 1;
            start = end;
        }
        let mut failed = None;
        while let Some(r) = set.join_next().await {
            let r = r
                .map_err(|e| ClientError::Protocol(format!("transfer task failed: {e}")))
                .and_then(|r| r);
            if let Err(e) = r {
                // Stop the other runs and wait until each is gone: a task dropped with the set
                // would be freed later by the runtime, and with it its view of the chunks, so
                // the caller could not reuse (or free) them as soon as we return.
                set.abort_all();
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn report_of(h: &TransferOkHeader) -> TransferReport {
    TransferReport {
        bytes: h.bytes,
        chunks: h.chunks,
        layers: h.layers,
        calls: h.calls,
        elapsed: Duration::from_micros(h.micros),
    }
}

impl Client {
    /// Waits until layers `0..upto` of transfer `transfer_id` have arrived on this server (or it
    /// completed, or `timeout` passed: then `timed_out` is set).
    pub async fn wait_layers(
        &self,
        transfer_id: u128,
        upto: u32,
        timeout: Duration,
    ) -> Result<LayerProgress> {
        let h = WaitLayersHeader {
            transfer_id,
            upto,
            timeout_ms: (timeout.as_millis() as u64).max(1),
        };
        let f = expect(self.call(&h, &[], None).await?, Opcode::WaitLayersOk)?;
        let a: WaitLayersOkHeader = kvtier_wire::decode_header(Opcode::WaitLayersOk, &f.header)?;
        Ok(LayerProgress {
            layers_done: a.layers_done,
            layers: a.layers,
            complete: a.complete,
            timed_out: a.timed_out,
        })
    }

    /// Asks this server (which holds `keys` for our tenant) to send them to `peer` as transfer
    /// `transfer_id` over `connections` connections (0: its default).
    pub async fn push_transfer(
        &self,
        transfer_id: u128,
        keys: &[ChunkKey],
        peer: &str,
        connections: u32,
        layers_per_run: u32,
    ) -> Result<TransferReport> {
        let h = TransferPushHeader {
            transfer_id,
            keys: keys.iter().map(|k| k.0).collect(),
            peer: peer.to_string(),
            connections,
            layers_per_run,
        };
        self.server_transfer(&h).await
    }

    /// Asks this server to fetch `keys` from `peer` (which holds them for our tenant) as
    /// transfer `transfer_id`; answers when they are stored here.
    pub async fn pull_transfer(
        &self,
        transfer_id: u128,
        keys: &[ChunkKey],
        peer: &str,
        connections: u32,
        layers_per_run: u32,
    ) -> Result<TransferReport> {
        let h = TransferPullHeader {
            transfer_id,
            keys: keys.iter().map(|k| k.0).collect(),
            peer: peer.to_string(),
            connections,
            layers_per_run,
        };
        self.server_transfer(&h).await
    }

    /// Sends a push or pull request the server carries out itself and reads its report.
    async fn server_transfer<H: kvtier_wire::WireHeader>(&self, h: &H) -> Result<TransferReport> {
        let f = expect(self.call(h, &[], None).await?, Opcode::TransferOk)?;
        Ok(report_of(&kvtier_wire::decode_header(
            Opcode::TransferOk,
            &f.header,
        )?))
    }
}
