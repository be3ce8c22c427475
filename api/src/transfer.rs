//! The receiving side of prefill→decode transfers: the registry of transfers in progress, keyed
//! by (tenant, transfer id), over one [`TransferRegion`].
//!
//! `begin` reserves the whole request as one segment (or reports the progress of a transfer
//! with the same id and manifest, which makes retries idempotent); `claim` takes a run of
//! layers for one frame and hands out the windows its pieces are read into; a finished claim
//! marks its layers arrived, and the last one freezes the segment and stores every chunk as an
//! ordinary host-tier chunk (`TieredStore::put_view`), so nothing is visible before it is
//! whole. A dropped claim (the sender went away mid-frame) returns its layers to missing. The
//! reaper drops transfers past their deadline, which frees their segments.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use kvtier_cache::{ChunkKey, ChunkMeta, TieredStore};
use kvtier_offload::transfer::{PieceMut, SegmentError, SegmentWriter, TransferRegion};

use crate::error::ApiError;

/// How often the reaper looks for overdue transfers.
pub const REAP_EVERY: Duration = Duration::from_millis(100);

/// One chunk of a manifest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ManifestChunk {
    pub key: ChunkKey,
    pub meta: ChunkMeta,
    pub len: u64,
}

/// The published progress of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub layers_done: u32,
    pub complete: bool,
    /// The transfer was dropped (deadline passed, or storing it failed).
    pub failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Missing,
    InFlight,
    Done,
}

struct State {
    /// `None` once frozen (complete) or dropped.
    writer: Option<SegmentWriter>,
    layers: Vec<Layer>,
}

/// One transfer being received (or recently completed).
pub struct Transfer {
    chunks: Vec<ManifestChunk>,
    /// Start of each chunk in the segment.
    offsets: Vec<usize>,
    layers: u32,
    started: Instant,
    deadline: Instant,
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
}

impl Transfer {
    /// Bytes a frame of `layers` `[start, end)` carries.
    pub fn run_len(&self, range: &Range<u32>) -> u64 {
        let n = u64::from(range.end - range.start);
        self.chunks
            .iter()
            .map(|c| c.len / u64::from(self.layers) * n)
            .sum()
    }

    pub fn layers(&self) -> u32 {
        self.layers
    }

    fn publish(&self, st: &State, complete: bool, failed: bool) {
        let layers_done = st.layers.iter().take_while(|l| **l == Layer::Done).count() as u32;
        self.progress.send_replace(Progress {
            layers_done,
            complete,
            failed,
        });
    }
}

/// One stretch of a frame's payload: read into the segment, or drained (layers another frame
/// already delivered or is delivering).
pub enum Piece {
    Read(PieceMut),
    Skip(u64),
}

/// The missing layers of a run, claimed by one frame: go through the pieces in order, then
/// [`Claim::finish`].
pub struct Claim {
    transfer: Arc<Transfer>,
    /// The layers this frame took from missing to in flight.
    claimed: Vec<u32>,
    pub pieces: Vec<Piece>,
    finished: bool,
}

impl Claim {
    /// Marks the run arrived; the transfer's last run stores its chunks (which may evict, so
    /// call it where blocking is allowed). Returns whether the transfer is now complete.
    pub fn finish(mut self, store: &TieredStore) -> Result<bool, ApiError> {
        self.finished = true;
        self.pieces.clear();
        let t = self.transfer.clone();
        let mut st = t.state.lock();
        for l in &self.claimed {
            st.layers[*l as usize] = Layer::Done;
        }
        if st.layers.iter().any(|l| *l != Layer::Done) {
            t.publish(&st, false, false);
            return Ok(false);
        }
        let Some(writer) = st.writer.take() else {
            // Completed by a duplicate run, or dropped by the reaper while this frame was read.
            return match *t.progress.borrow() {
                p if p.complete => Ok(true),
                _ => Err(ApiError::NotFound(
                    "transfer expired before it completed".into(),
                )),
            };
        };
        let frozen = writer
            .freeze()
            .map_err(|(_, e)| ApiError::Internal(format!("freezing a transfer: {e}")))?;
        for (c, off) in t.chunks.iter().zip(&t.offsets) {
            let view = frozen
                .view(*off..*off + c.len as usize)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Err(e) = store.put_view(c.key, c.meta, view) {
                t.publish(&st, false, true);
                crate::metrics::record_transfer_failure("store");
                return Err(e.into());
            }
        }
        t.publish(&st, true, false);
        let bytes = t.chunks.iter().map(|c| c.len).sum();
        crate::metrics::record_transfer("received", bytes, t.started.elapsed());
        Ok(true)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.pieces.clear();
        let mut st = self.transfer.state.lock();
        for l in &self.claimed {
            st.layers[*l as usize] = Layer::Missing;
        }
    }
}

/// What `claim` found.
pub enum Claimed {
    /// Read the frame's pieces into these windows.
    Fresh(Claim),
    /// These layers are arrived or being received on another connection (a retry): drain the
    /// payload and acknowledge.
    Duplicate,
}

/// Every transfer of this server.
pub struct Transfers {
    region: Option<TransferRegion>,
    capacity: u64,
    timeout: Duration,
    map: Mutex<HashMap<(u64, u128), Arc<Transfer>>>,
}

impl Transfers {
    /// A registry over `capacity` bytes of host memory (0: transfers are refused).
    pub fn new(capacity: u64, timeout: Duration) -> Self {
        Transfers {
            region: (capacity > 0).then(|| TransferRegion::new(capacity as usize)),
            capacity,
            timeout,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Starts receiving transfer `id` of `tenant`, or reports the progress of the one already
    /// begun with the same manifest.
    pub fn begin(
        &self,
        tenant: u64,
        id: u128,
        layers: u32,
        timeout: Duration,
        chunks: Vec<ManifestChunk>,
    ) -> Result<Progress, ApiError> {
        let mut map = self.map.lock();
        if let Some(t) = map.get(&(tenant, id)) {
            if t.chunks != chunks || t.layers != layers {
                return Err(ApiError::BadRequest(format!(
                    "transfer {id:#x} was begun with a different manifest"
                )));
            }
            return Ok(*t.progress.borrow());
        }
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut total: u64 = 0;
        for c in &chunks {
            if c.len > kvtier_cache::host::MAX_SLOT_BYTES as u64 {
                return Err(ApiError::TooLarge(format!(
                    "chunk of {} bytes exceeds the host bound",
                    c.len
                )));
            }
            offsets.push(total as usize);
            total = total.saturating_add(c.len);
        }
        let Some(region) = &self.region else {
            return Err(ApiError::Unavailable(
                "transfers are disabled on this server (transfer_bytes = 0)".into(),
            ));
        };
        if total > self.capacity {
            return Err(ApiError::TooLarge(format!(
                "transfer of {total} bytes exceeds transfer_bytes ({})",
                self.capacity
            )));
        }
        let deadline = Instant::now() + timeout.min(self.timeout);
        let writer = region
            .reserve(total as usize, deadline)
            .map_err(|e| match e {
                SegmentError::NoSpace { free, .. } => ApiError::Full(format!(
                    "transfer of {total} bytes does not fit the free transfer memory ({free} bytes free)"
                )),
                e => ApiError::BadRequest(e.to_string()),
            })?;
        let (progress, _) = watch::channel(Progress::default());
        map.insert(
            (tenant, id),
            Arc::new(Transfer {
                chunks,
                offsets,
                layers,
                started: Instant::now(),
                deadline,
                state: Mutex::new(State {
                    writer: Some(writer),
                    layers: vec![Layer::Missing; layers as usize],
                }),
                progress,
            }),
        );
        Ok(Progress::default())
    }

    /// The transfer `id` of `tenant`, if it is known.
    pub fn get(&self, tenant: u64, id: u128) -> Option<Arc<Transfer>> {
        self.map.lock().get(&(tenant, id)).cloned()
    }

    /// Claims layers `range` of a transfer for one frame.
    pub fn claim(&self, t: &Arc<Transfer>, range: Range<u32>) -> Result<Claimed, ApiError> {
        if range.end > t.layers {
            return Err(ApiError::BadRequest(format!(
                "layer range {}..{} past the transfer's {} layers",
                range.start, range.end, t.layers
            )));
        }
        let mut st = t.state.lock();
        let Some(writer) = &st.writer else {
            return Ok(Claimed::Duplicate);
        };
        let missing: Vec<u32> = range
            .clone()
            .filter(|l| st.layers[*l as usize] == Layer::Missing)
            .collect();
        if missing.is_empty() {
            return Ok(Claimed::Duplicate);
        }
        // Per chunk, maximal stretches of layers that are all missing (read) or not (skip).
        let mut pieces = Vec::new();
        for (c, off) in t.chunks.iter().zip(&t.offsets) {
            let lb = (c.len / u64::from(t.layers)) as usize;
            let mut l = range.start;
            while l < range.end {
                let read = st.layers[l as usize] == Layer::Missing;
                let mut e = l + 1;
                while e < range.end && (st.layers[e as usize] == Layer::Missing) == read {
                    e += 1;
                }
                let r = off + l as usize * lb..off + e as usize * lb;
                pieces.push(if read {
                    Piece::Read(
                        writer
                            .piece_mut(r)
                            .map_err(|e| ApiError::Internal(e.to_string()))?,
                    )
                } else {
                    Piece::Skip(r.len() as u64)
                });
                l = e;
            }
        }
        for l in &missing {
            st.layers[*l as usize] = Layer::InFlight;
        }
        Ok(Claimed::Fresh(Claim {
            transfer: t.clone(),
            claimed: missing,
            pieces,
            finished: false,
        }))
    }

    /// Waits until `upto` layers of a transfer arrived, it completed, or `timeout` passed.
    pub async fn wait(
        &self,
        tenant: u64,
        id: u128,
        upto: u32,
        timeout: Duration,
    ) -> Result<(Progress, u32, bool), ApiError> {
        let t = self.get(tenant, id).ok_or_else(|| {
            ApiError::NotFound(format!("transfer {id:#x} (never begun or expired)"))
        })?;
        let upto = upto.min(t.layers);
        let mut rx = t.progress.subscribe();
        let ready = |p: &Progress| p.complete || p.failed || p.layers_done >= upto;
        let waited = tokio::time::timeout(timeout, rx.wait_for(ready)).await;
        let p = *t.progress.borrow();
        if p.failed {
            return Err(ApiError::NotFound(format!(
                "transfer {id:#x} expired or failed before it completed"
            )));
        }
        Ok((p, t.layers, waited.is_err()))
    }

    /// Drops transfers past their deadline that did not complete (freeing their segments), and
    /// completed ones older than the deadline (their chunks live on in the store). Returns the
    /// number of incomplete transfers dropped.
    pub fn reap(&self, now: Instant) -> usize {
        let mut dropped = 0;
        self.map.lock().retain(|_, t| {
            if t.deadline > now {
                return true;
            }
            let mut st = t.state.lock();
            if st.writer.take().is_some() {
                dropped += 1;
                t.publish(&st, false, true);
                crate::metrics::record_transfer_failure("expired");
            }
            false
        });
        dropped
    }

    /// Free and total bytes of the transfer region, and transfers known.
    pub fn stats(&self) -> (u64, u64, usize) {
        let free = self.region.as_ref().map_or(0, |r| r.stats().free_bytes);
        (free, self.capacity, self.map.lock().len())
    }
}

/// Starts the reaper thread; it ends when the registry is dropped.
pub fn spawn_reaper(transfers: Weak<Transfers>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("kvtier-transfer-reaper".into())
        .spawn(move || {
            while let Some(t) = transfers.upgrade() {
                let n = t.reap(Instant::now());
                if n > 0 {
                    tracing::warn!("freed {n} transfer reservations past their deadline");
                }
                drop(t);
                std::thread::sleep(REAP_EVERY);
            }
        })
        .map(|_| ())
}
