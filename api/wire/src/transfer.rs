//! Headers of the prefill→decode transfer opcodes (ARCHITECTURE.md "Prefill→decode transfer").
//!
//! A transfer is named by a client-chosen `transfer_id` (unique per tenant), so a retry with the
//! same id is recognised. `TransferBegin` carries the manifest: every chunk's key, metadata and
//! length, and the number of layers every payload is split into (raw payloads are layer-major,
//! so layer run `[a, b)` of a chunk of `len` bytes is bytes `[a·len/layers, b·len/layers)`).
//! Each `TransferLayers` frame's payload is that range of every chunk, in manifest order.

use rkyv::{Archive, Deserialize, Serialize};

use crate::headers::{ChunkMetaWire, WireHeader, check_len, wire_header};
use crate::{MAX_KEYS, Opcode};

/// Most layers a transfer may split its payloads into.
pub const MAX_TRANSFER_LAYERS: u32 = 1024;
/// Most parallel connections one transfer may use.
pub const MAX_TRANSFER_CONNECTIONS: u32 = 16;
/// Longest peer address (`host:port`).
pub const MAX_PEER_LEN: usize = 256;
/// Longest wait or reservation a request may ask for (10 minutes).
pub const MAX_TRANSFER_TIMEOUT_MS: u64 = 600_000;

/// One chunk of a transfer manifest.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct TransferChunk {
    pub key: u128,
    pub meta: ChunkMetaWire,
    /// Payload bytes; a multiple of the transfer's `layers`.
    pub len: u64,
}

/// Announces a transfer; the receiver reserves the whole request's bytes up front.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TransferBeginHeader {
    pub transfer_id: u128,
    pub layers: u32,
    /// How long the receiver keeps the reservation before giving up on the sender (capped by
    /// its `transfer_timeout_ms`).
    pub timeout_ms: u64,
    pub chunks: Vec<TransferChunk>,
}
wire_header!(TransferBeginHeader, TransferBegin, |a| {
    check_len("chunks", a.chunks.len())?;
    if a.chunks.is_empty() {
        return Err("chunks: a transfer has at least one chunk".into());
    }
    let layers = a.layers.to_native();
    check_layers(layers)?;
    check_timeout(a.timeout_ms.to_native())?;
    for c in a.chunks.iter() {
        c.meta.check()?;
        let len = c.len.to_native();
        if len == 0 || !len.is_multiple_of(u64::from(layers)) {
            return Err(format!(
                "chunk of {len} bytes does not split into {layers} layers"
            ));
        }
    }
    Ok(())
});

fn check_layers(layers: u32) -> Result<(), String> {
    if layers == 0 || layers > MAX_TRANSFER_LAYERS {
        return Err(format!("layers {layers} out of 1..={MAX_TRANSFER_LAYERS}"));
    }
    Ok(())
}

fn check_timeout(ms: u64) -> Result<(), String> {
    if ms == 0 || ms > MAX_TRANSFER_TIMEOUT_MS {
        return Err(format!(
            "timeout {ms} ms out of 1..={MAX_TRANSFER_TIMEOUT_MS}"
        ));
    }
    Ok(())
}

/// The receiver's state of a transfer: a fresh one has nothing; a retried one says what arrived.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct TransferBeginOkHeader {
    /// Layers `0..layers_done` have arrived for every chunk.
    pub layers_done: u32,
    /// Every chunk is stored: the sender has nothing left to send.
    pub complete: bool,
}
wire_header!(TransferBeginOkHeader, TransferBeginOk);

/// Layers `layer_start..layer_end` of every chunk of a begun transfer (the payload).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TransferLayersHeader {
    pub transfer_id: u128,
    pub layer_start: u32,
    pub layer_end: u32,
}
wire_header!(TransferLayersHeader, TransferLayers, |a| {
    let (s, e) = (a.layer_start.to_native(), a.layer_end.to_native());
    if s >= e || e > MAX_TRANSFER_LAYERS {
        return Err(format!(
            "layer range {s}..{e} is empty or past {MAX_TRANSFER_LAYERS}"
        ));
    }
    Ok(())
});

/// Waits until layers `0..upto` of a transfer have arrived (or it completes, or `timeout_ms`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct WaitLayersHeader {
    pub transfer_id: u128,
    pub upto: u32,
    pub timeout_ms: u64,
}
wire_header!(WaitLayersHeader, WaitLayers, |a| {
    if a.upto.to_native() > MAX_TRANSFER_LAYERS {
        return Err(format!("upto past {MAX_TRANSFER_LAYERS}"));
    }
    check_timeout(a.timeout_ms.to_native())
});

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct WaitLayersOkHeader {
    pub layers_done: u32,
    pub layers: u32,
    pub complete: bool,
    /// The wait ended at its timeout before `upto` layers arrived.
    pub timed_out: bool,
}
wire_header!(WaitLayersOkHeader, WaitLayersOk);

/// Moves chunks between servers: `TransferPush` asks the server holding `keys` to send them to
/// `peer`; `TransferPull` asks the receiving server to have `peer` send them to it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TransferPushHeader {
    pub transfer_id: u128,
    pub keys: Vec<u128>,
    /// The other server's data-plane address, `host:port`.
    pub peer: String,
    /// Parallel connections (0: the server's `transfer_connections`).
    pub connections: u32,
    /// Layers per `TransferLayers` frame (0: the server's default).
    pub layers_per_run: u32,
}
wire_header!(TransferPushHeader, TransferPush, |a| check_move(
    a.keys.len(),
    a.peer.len(),
    a.connections.to_native(),
    a.layers_per_run.to_native()
));

/// Same fields as [`TransferPushHeader`], sent to the receiving server.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TransferPullHeader {
    pub transfer_id: u128,
    pub keys: Vec<u128>,
    pub peer: String,
    pub connections: u32,
    pub layers_per_run: u32,
}
wire_header!(TransferPullHeader, TransferPull, |a| check_move(
    a.keys.len(),
    a.peer.len(),
    a.connections.to_native(),
    a.layers_per_run.to_native()
));

fn check_move(keys: usize, peer: usize, connections: u32, per_run: u32) -> Result<(), String> {
    check_len("keys", keys)?;
    if keys == 0 || keys > MAX_KEYS {
        return Err("keys: a transfer has at least one chunk".into());
    }
    if peer == 0 || peer > MAX_PEER_LEN {
        return Err(format!(
            "peer address of {peer} bytes out of 1..={MAX_PEER_LEN}"
        ));
    }
    if connections > MAX_TRANSFER_CONNECTIONS {
        return Err(format!(
            "connections {connections} out of 0..={MAX_TRANSFER_CONNECTIONS}"
        ));
    }
    if per_run > MAX_TRANSFER_LAYERS {
        return Err(format!(
            "layers per run {per_run} past {MAX_TRANSFER_LAYERS}"
        ));
    }
    Ok(())
}

/// What a push or pull moved.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct TransferOkHeader {
    pub bytes: u64,
    pub chunks: u32,
    pub layers: u32,
    /// `TransferLayers` frames sent (0 when the receiver already had everything).
    pub calls: u32,
    pub micros: u64,
}
wire_header!(TransferOkHeader, TransferOk);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AlignedVec, access_header, encode_header};

    fn archived_ok<T: crate::WireHeader>(h: &T) -> Result<(), String> {
        let bytes = encode_header(h).map_err(|e| e.to_string())?;
        let mut buf = AlignedVec::new();
        buf.extend_from_slice(&bytes);
        access_header::<T>(T::OPCODE, &buf)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn begin(layers: u32, len: u64) -> TransferBeginHeader {
        TransferBeginHeader {
            transfer_id: 7,
            layers,
            timeout_ms: 1000,
            chunks: vec![TransferChunk {
                key: 1,
                meta: ChunkMetaWire {
                    raw_len: len,
                    ..ChunkMetaWire::default()
                },
                len,
            }],
        }
    }

    #[test]
    fn manifests_are_checked() {
        assert!(archived_ok(&begin(32, 32 * 4096)).is_ok());
        assert!(
            archived_ok(&begin(32, 32 * 4096 + 1))
                .unwrap_err()
                .contains("split")
        );
        assert!(archived_ok(&begin(0, 4096)).is_err());
        assert!(archived_ok(&begin(MAX_TRANSFER_LAYERS + 1, 4096)).is_err());
        let mut empty = begin(1, 1);
        empty.chunks.clear();
        assert!(archived_ok(&empty).is_err());
        let bad_range = TransferLayersHeader {
            transfer_id: 1,
            layer_start: 3,
            layer_end: 3,
        };
        assert!(archived_ok(&bad_range).is_err());
        let push = TransferPushHeader {
            transfer_id: 1,
            keys: vec![1],
            peer: "x".repeat(MAX_PEER_LEN + 1),
            connections: 1,
            layers_per_run: 1,
        };
        assert!(archived_ok(&push).unwrap_err().contains("peer"));
        let wait = WaitLayersHeader {
            transfer_id: 1,
            upto: 1,
            timeout_ms: MAX_TRANSFER_TIMEOUT_MS + 1,
        };
        assert!(archived_ok(&wait).is_err());
    }
}
