//! Multi-key operations of the remote tier: a prompt's chunks in one concurrent round.
//!
//! Keys spread over all slots (no hash tags, see ARCHITECTURE.md), and the async cluster client
//! refuses pipelines across slots, so keys are grouped by slot into one pipeline each and every
//! pipeline is sent at once on the shared multiplexed connection: the round costs the latency
//! of the slowest master involved, not one round trip per chunk.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use kvtier_cache::key::ChunkKey;
use kvtier_cache::tier::ChunkMeta;
use kvtier_cache::{CacheError, Result};
use redis::cluster_routing::Slot;

use super::record::{RecordArg, decode_header, decode_value};
use super::{Chunk, Known, RemoteTier, backend, now_ms};
use crate::disk::record::HEADER_LEN;

impl RemoteTier {
    /// Stores several chunks: one pipelined `SET` group per slot, all groups at once. Every
    /// chunk is charged first; the result of each put is returned in order.
    pub fn put_many(&self, items: &[(ChunkKey, ChunkMeta, &[u8])]) -> Vec<Result<()>> {
        let mut out: Vec<Result<()>> = Vec::with_capacity(items.len());
        let mut groups: HashMap<Slot, (redis::Pipeline, Vec<usize>)> = HashMap::new();
        let ms = now_ms();
        for (i, (key, meta, payload)) in items.iter().enumerate() {
            let rec = match RecordArg::new(*key, meta, payload, ms) {
                Ok(r) => r,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            if let Err(e) = self.reserve(rec.len()) {
                out.push(Err(e));
                continue;
            }
            out.push(Ok(()));
            let name = self.key_name(*key);
            let (pipe, idx) = groups
                .entry(Slot::for_key(&name))
                .or_insert_with(|| (redis::pipe(), Vec::new()));
            // Building the command copies the payload once into its argument buffer (the
            // crate owns its commands' bytes); sending packs it into the RESP buffer once more.
            let cmd = pipe.cmd("SET").arg(&name).arg(&rec);
            if let Some(ttl) = self.ttl {
                cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            cmd.ignore();
            idx.push(i);
        }
        let groups: Vec<(redis::Pipeline, Vec<usize>)> = groups.into_values().collect();
        let idx: Vec<Vec<usize>> = groups.iter().map(|(_, i)| i.clone()).collect();
        let pipes: Vec<redis::Pipeline> = groups.into_iter().map(|(p, _)| p).collect();
        let results = self.call("put", |inner| async move {
            let c = inner.conn().await?;
            let mut set = tokio::task::JoinSet::new();
            for (g, p) in pipes.into_iter().enumerate() {
                let mut c = c.clone();
                set.spawn(async move { (g, p.query_async::<()>(&mut c).await) });
            }
            let mut res = Vec::new();
            while let Some(j) = set.join_next().await {
                let (g, r) = j.map_err(|e| backend(format!("remote put task: {e}")))?;
                res.push((
                    g,
                    match r {
                        Ok(()) => Ok(()),
                        Err(e) => Err(inner.fail("put", e).await),
                    },
                ));
            }
            Ok(res)
        });
        let expires = self.expiry();
        let mut group_ok: Vec<Option<Result<()>>> = (0..idx.len()).map(|_| None).collect();
        match results {
            Ok(res) => {
                for (g, r) in res {
                    group_ok[g] = Some(r);
                }
            }
            Err(e) => group_ok
                .iter_mut()
                .for_each(|g| *g = Some(Err(clone_err(&e)))),
        }
        for (g, members) in idx.iter().enumerate() {
            let r = group_ok[g]
                .take()
                .unwrap_or_else(|| Err(backend("remote put: no reply")));
            for &i in members {
                let (key, meta, payload) = items[i];
                let len = (HEADER_LEN + payload.len()) as u64;
                match &r {
                    Ok(()) => {
                        let c = &self.inner.counters;
                        c.puts.fetch_add(1, Ordering::Relaxed);
                        c.bytes_written.fetch_add(len, Ordering::Relaxed);
                        let k = Known {
                            meta,
                            payload_len: payload.len() as u64,
                            charged: len,
                            expires,
                        };
                        if let Some(old) = self.known.insert(key, k) {
                            self.release(old.charged);
                        }
                    }
                    Err(e) => {
                        self.release(len);
                        out[i] = Err(clone_err(e));
                    }
                }
            }
        }
        out
    }

    /// Reads several chunks: one pipelined `GET` group per slot, all groups at once. A missing
    /// chunk is `Ok(None)`; a corrupt one `Err(Corrupt)` (never its bytes).
    pub fn get_many(&self, keys: &[ChunkKey]) -> Result<Vec<Result<Option<Chunk>>>> {
        let values = self.fetch_many("get", keys, false)?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, v) in keys.iter().zip(values) {
            out.push(self.accept_value(*key, v));
        }
        Ok(out)
    }

    /// Reads only the headers of several chunks (`GETRANGE 0 127`), in one concurrent round:
    /// how a node learns of chunks other nodes wrote without moving their payloads.
    pub fn probe_many(&self, keys: &[ChunkKey]) -> Result<Vec<Option<(ChunkMeta, u64)>>> {
        let values = self.fetch_many("probe", keys, true)?;
        let c = &self.inner.counters;
        let expires = self.expiry();
        let mut out = Vec::with_capacity(keys.len());
        for (key, v) in keys.iter().zip(values) {
            match decode_header(*key, v.as_deref().unwrap_or(&[])) {
                Ok(Some(h)) => {
                    self.known.entry(*key).or_insert(Known {
                        meta: h.meta,
                        payload_len: h.payload_len,
                        charged: 0,
                        expires,
                    });
                    out.push(Some((h.meta, h.payload_len)));
                }
                Ok(None) => out.push(None),
                // A bad header is found again (and dropped) by the read that follows, if any.
                Err(_) => {
                    c.corrupt.fetch_add(1, Ordering::Relaxed);
                    out.push(None)
                }
            }
        }
        Ok(out)
    }

    fn fetch_many(
        &self,
        what: &'static str,
        keys: &[ChunkKey],
        header_only: bool,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let mut groups: HashMap<Slot, (redis::Pipeline, Vec<usize>)> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let name = self.key_name(*key);
            let (pipe, idx) = groups
                .entry(Slot::for_key(&name))
                .or_insert_with(|| (redis::pipe(), Vec::new()));
            match header_only {
                true => pipe.cmd("GETRANGE").arg(&name).arg(0).arg(HEADER_LEN - 1),
                false => pipe.cmd("GET").arg(&name),
            };
            idx.push(i);
        }
        let n = keys.len();
        let groups: Vec<(redis::Pipeline, Vec<usize>)> = groups.into_values().collect();
        self.call(what, move |inner| async move {
            let c = inner.conn().await?;
            let mut set = tokio::task::JoinSet::new();
            for (p, idx) in groups {
                let mut c = c.clone();
                set.spawn(
                    async move { (idx, p.query_async::<Vec<Option<Vec<u8>>>>(&mut c).await) },
                );
            }
            let mut out = vec![None; n];
            while let Some(j) = set.join_next().await {
                let (idx, r) = j.map_err(|e| backend(format!("remote {what} task: {e}")))?;
                let vals = match r {
                    Ok(v) => v,
                    Err(e) => return Err(inner.fail(what, e).await),
                };
                if vals.len() != idx.len() {
                    return Err(backend(format!("remote {what}: reply count mismatch")));
                }
                for (i, v) in idx.into_iter().zip(vals) {
                    out[i] = v;
                }
            }
            Ok(out)
        })
    }

    /// Validates one value read for `key`, counting and updating what this node knows.
    fn accept_value(
        &self,
        key: ChunkKey,
        v: Option<Vec<u8>>,
    ) -> Result<Option<(ChunkMeta, Bytes)>> {
        let c = &self.inner.counters;
        let Some(v) = v else {
            c.misses.fetch_add(1, Ordering::Relaxed);
            self.forget(key);
            return Ok(None);
        };
        let len = v.len() as u64;
        match decode_value(key, v) {
            Ok((meta, bytes)) => {
                c.hits.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
                let expires = self.expiry();
                self.known.entry(key).or_insert(Known {
                    meta,
                    payload_len: bytes.len() as u64,
                    charged: 0,
                    expires,
                });
                Ok(Some((meta, bytes)))
            }
            // Written by a newer build: not ours to judge or delete; a miss here.
            Err(CacheError::UnsupportedVersion { .. }) => {
                c.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => {
                c.corrupt.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// `CacheError` is not `Clone`; a pipeline's one error is reported for each of its chunks.
fn clone_err(e: &CacheError) -> CacheError {
    match e {
        CacheError::TierFull {
            tier,
            needed,
            budget,
        } => CacheError::TierFull {
            tier: *tier,
            needed: *needed,
            budget: *budget,
        },
        other => backend(other.to_string()),
    }
}
