//! The Rust async client of the data plane, used by the CLI, tests and benches.
//!
//! One connection carries many requests at once: callers write frames under a short lock and
//! wait on their own reply, while a reader task matches replies to requests by id. A `get` can
//! hand in a buffer to be reused for the reply's payload, so repeated reads do not allocate.
//! On a Unix socket to a same-host server, [`Client::map_arenas`] maps the server's host arenas
//! read-only and [`Client::read_located`] copies a chunk straight out of them (a lease and an
//! offset travel over the socket, not the bytes).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use kvtier_cache::{ChunkKey, ChunkMeta, TierSet};

use crate::transport::{Reader, Writer};
use kvtier_wire::{
    self as wire, AlignedVec, ChunkMetaWire, DeleteHeader, DeleteOkHeader, ErrorCode, ErrorHeader,
    GetHeader, GetLocatedHeader, GetLocatedOkHeader, GetOkHeader, HelloHeader, HelloOkHeader,
    LeaseHeader, LeaseOkHeader, Limits, LookupHeader, LookupOkHeader, MapArenasHeader,
    MapArenasOkHeader, Opcode, PutHeader, ReleaseHeader, RetrieveHeader, RetrieveOkHeader,
    ShmGetHeader, ShmPutHeader, ShmRegisterHeader, ShmRegisterOkHeader, StatsHeader, StatsOkHeader,
    WireError, WireHeader,
};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("server refused the request ({code:?}): {message}")]
    Server {
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => *code,
            _ => None,
        }
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How to authenticate.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub token: Option<String>,
    pub tenant: Option<String>,
    pub client_name: String,
}

/// A reply frame: its opcode, its header (aligned, validated as the opcode's type) and payload.
pub(crate) struct Frame {
    pub(crate) opcode: Opcode,
    pub(crate) header: AlignedVec,
    pub(crate) payload: Vec<u8>,
}

struct Pending {
    tx: oneshot::Sender<Result<Frame>>,
    /// A buffer to read the payload into, reused from the caller.
    dest: Option<Vec<u8>>,
}

struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set (under the `pending` lock) when the reader loop has ended: no reply can come any more,
    /// so a request registered after that would wait forever.
    closed: AtomicBool,
    next_id: AtomicU64,
    hello: HelloOkHeader,
    unix: bool,
    /// Server arenas mapped read-only, by arena id.
    arenas: Mutex<HashMap<u32, Arc<memmap2::Mmap>>>,
    /// Descriptors received with the last `MapArenasOk`, picked up by `map_arenas`.
    arena_fds: Mutex<Vec<std::os::fd::OwnedFd>>,
}

/// A connection to a kvtier server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// One chunk of a lookup answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LookupHitInfo {
    pub key: ChunkKey,
    pub tiers: TierSet,
    pub fidelity_tag: u8,
}

/// A lookup answer.
#[derive(Debug, Clone, PartialEq)]
pub struct LookupReply {
    pub hit_tokens: u64,
    pub hits: Vec<LookupHitInfo>,
}

/// The answer to [`Client::retrieve`].
#[derive(Debug, Clone, PartialEq)]
pub struct RetrieveReply {
    /// True when answered by an exact scan (no index built yet), false for a graph.
    pub exact: bool,
    /// True when answered by the attention-aware graphs (built from uploaded queries), false
    /// for HNSW or an exact scan.
    pub aware: bool,
    /// True when some chunk was read from a lossy copy (the request accepted lossy data).
    pub lossy: bool,
    /// Tokens in the prompt.
    pub tokens: u64,
    /// Positions per (query, head).
    pub k: u32,
    /// `[n][heads][k]` token positions, best first.
    pub positions: Vec<u32>,
    /// Bytes of one K or V row (head_dim × dtype size).
    pub row_bytes: usize,
    /// `[n][heads][k]` K rows in the layout's dtype.
    pub k_rows: Vec<u8>,
    /// Same, V rows.
    pub v_rows: Vec<u8>,
}

/// A chunk returned by `get`.
#[derive(Debug, Clone)]
pub struct GotChunk {
    pub meta: ChunkMeta,
    pub bytes: Bytes,
}

/// A shared-memory region registered with the server (Unix sockets only).
pub struct ShmRegion {
    pub id: u64,
    pub map: memmap2::MmapMut,
}

fn meta_of(m: &rkyv::Archived<ChunkMetaWire>) -> Result<ChunkMeta> {
    m.to_meta(0).map_err(ClientError::Protocol)
}

impl Client {
    /// Connects to `addr`: `unix:/path`, a path containing `/`, or `host:port` for TCP.
    pub async fn connect(addr: &str, opts: ClientOptions) -> Result<Client> {
        let conn_err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let (mut reader, writer) = if let Some(path) = addr
            .strip_prefix("unix:")
            .or_else(|| addr.contains('/').then_some(addr))
        {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(conn_err)?;
            let (r, w) = s.into_split();
            (Reader::Unix(r), Writer::Unix(w))
        } else {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(conn_err)?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            (Reader::Tcp(r), Writer::Tcp(w))
        };
        let unix = reader.is_unix();
        let mut writer = writer;
        let hello = HelloHeader {
            protocol_version: wire::VERSION,
            auth_token: opts.token.unwrap_or_default(),
            tenant: opts.tenant.unwrap_or_default(),
            client_name: if opts.client_name.is_empty() {
                "kvtier-client".into()
            } else {
                opts.client_name
            },
        };
        let head = wire::frame_head(Opcode::Hello, 0, 0, &hello, 0)?;
        wire::write_frame::<_, &[u8]>(&mut writer, &head, &[]).await?;
        let limits = Limits::default();
        let mut buf = AlignedVec::new();
        let pre = wire::read_frame_head(&mut reader, &limits, Duration::from_secs(30), &mut buf)
            .await?
            .ok_or(ClientError::Closed)?;
        let hello_ok: HelloOkHeader = match pre.opcode {
            Opcode::HelloOk => wire::decode_header(pre.opcode, &buf)?,
            Opcode::Error => return Err(server_error(&buf)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected HelloOk, got {other:?}"
                )));
            }
        };
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            hello: hello_ok,
            unix,
            arenas: Mutex::new(HashMap::new()),
            arena_fds: Mutex::new(Vec::new()),
        });
        tokio::spawn(read_loop(Arc::downgrade(&inner), reader));
        Ok(Client { inner })
    }

    /// Most keys one request may carry (batch larger requests by this).
    pub fn max_keys(&self) -> usize {
        self.inner.hello.max_keys.max(1) as usize
    }

    /// Whether this connection is a Unix socket (shared memory available).
    pub fn is_unix(&self) -> bool {
        self.inner.unix
    }

    /// Sends one request and waits for its reply, reading the reply payload into `dest` if given.
    pub(crate) async fn call<T: WireHeader>(
        &self,
        header: &T,
        payload: &[&[u8]],
        dest: Option<Vec<u8>>,
    ) -> Result<Frame> {
        self.call_with_fds(header, payload, dest, &[]).await
    }

    async fn call_with_fds<T: WireHeader>(
        &self,
        header: &T,
        payload: &[&[u8]],
        dest: Option<Vec<u8>>,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<Frame> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.inner.pending.lock();
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed);
            }
            pending.insert(id, Pending { tx, dest });
        }
        let len: u64 = payload.iter().map(|p| p.len() as u64).sum();
        let head = wire::frame_head(T::OPCODE, id, 0, header, len)?;
        let sent = async {
            let mut w = self.inner.writer.lock().await;
            wire::write_frame(&mut *w, &head, payload).await?;
            if !fds.is_empty() {
                w.send_fds(fds).await?;
            }
            Ok::<(), ClientError>(())
        }
        .await;
        if let Err(e) = sent {
            self.inner.pending.lock().remove(&id);
            return Err(e);
        }
        let frame = rx.await.map_err(|_| ClientError::Closed)??;
        if frame.opcode == Opcode::Error {
            return Err(server_error(&frame.header));
        }
        Ok(frame)
    }

    /// Stores one chunk (the tenant is the connection's).
    pub async fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        let h = PutHeader {
            key: key.0,
            meta: ChunkMetaWire::from_meta(meta),
        };
        expect(self.call(&h, &[payload], None).await?, Opcode::Ok).map(|_| ())
    }

    /// Reads chunks; `None` for keys that are missing (or lossy when `accept_lossy` is false).
    pub async fn get(
        &self,
        keys: &[ChunkKey],
        accept_lossy: bool,
    ) -> Result<Vec<Option<GotChunk>>> {
        let (entries, payload) = self.get_into(keys, accept_lossy, Vec::new()).await?;
        let payload = Bytes::from(payload);
        Ok(entries
            .into_iter()
            .map(|e| {
                e.map(|(meta, range)| GotChunk {
                    meta,
                    bytes: payload.slice(range),
                })
            })
            .collect())
    }

    /// Reads chunks into `buf` (reused, grown as needed); returns each key's metadata and byte
    /// range in the returned buffer.
    #[allow(clippy::type_complexity)]
    pub async fn get_into(
        &self,
        keys: &[ChunkKey],
        accept_lossy: bool,
        buf: Vec<u8>,
    ) -> Result<(Vec<Option<(ChunkMeta, std::ops::Range<usize>)>>, Vec<u8>)> {
        let h = GetHeader {
            keys: keys.iter().map(|k| k.0).collect(),
            accept_lossy,
        };
        let f = expect(self.call(&h, &[], Some(buf)).await?, Opcode::GetOk)?;
        let a = wire::access_header::<GetOkHeader>(Opcode::GetOk, &f.header)?;
        if a.entries.len() != keys.len() || a.payload_total() != Some(f.payload.len() as u64) {
            return Err(ClientError::Protocol(
                "get reply does not match the request".into(),
            ));
        }
        let mut out = Vec::with_capacity(keys.len());
        for e in a.entries.iter() {
            if !e.found {
                out.push(None);
                continue;
            }
            let (off, len) = (e.offset.to_native() as usize, e.len.to_native() as usize);
            if off.checked_add(len).is_none_or(|end| end > f.payload.len()) {
                return Err(ClientError::Protocol(
                    "get entry outside the payload".into(),
                ));
            }
            out.push(Some((meta_of(&e.meta)?, off..off + len)));
        }
        Ok((out, f.payload))
    }

    /// How many leading chunks of `tokens` the server holds for this tenant.
    pub async fn lookup(
        &self,
        layout_fingerprint: u64,
        salt: Option<&str>,
        chunk_tokens: u32,
        tokens: &[u32],
    ) -> Result<LookupReply> {
        let h = LookupHeader {
            layout_fingerprint,
            salt: salt.map(str::to_string),
            chunk_tokens,
        };
        let payload = wire::tokens_to_payload(tokens);
        let f = expect(self.call(&h, &[&payload], None).await?, Opcode::LookupOk)?;
        let a = wire::access_header::<LookupOkHeader>(Opcode::LookupOk, &f.header)?;
        Ok(LookupReply {
            hit_tokens: a.hit_tokens.to_native(),
            hits: a
                .hits
                .iter()
                .map(|h| LookupHitInfo {
                    key: ChunkKey(h.key.to_native()),
                    tiers: TierSet(h.tiers),
                    fidelity_tag: h.fidelity,
                })
                .collect(),
        })
    }

    /// The top-`k` token positions of a stored prompt (its chunk keys, first first) for one or
    /// more decode steps' queries of `layer` (`[n][heads][head_dim]` f32, post-RoPE), with the
    /// K and V rows of those positions.
    pub async fn retrieve(
        &self,
        keys: &[ChunkKey],
        layer: u32,
        heads: u32,
        queries: &[f32],
        k: u32,
        accept_lossy: bool,
    ) -> Result<RetrieveReply> {
        let h = RetrieveHeader {
            keys: keys.iter().map(|k| k.0).collect(),
            layer,
            heads,
            k,
            accept_lossy,
        };
        let payload: Vec<u8> = queries.iter().flat_map(|q| q.to_le_bytes()).collect();
        let f = expect(self.call(&h, &[&payload], None).await?, Opcode::RetrieveOk)?;
        let a = wire::access_header::<RetrieveOkHeader>(Opcode::RetrieveOk, &f.header)?;
        let head: RetrieveOkHeader = rkyv::deserialize::<_, rkyv::rancor::Error>(a)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let entries = head.queries as usize * head.heads as usize * head.k as usize;
        if head.payload_len() != Some(f.payload.len() as u64) {
            return Err(ClientError::Protocol(format!(
                "retrieve answer of {} bytes does not match its header",
                f.payload.len()
            )));
        }
        let rows = entries * head.row_bytes as usize;
        let (pos, rest) = f.payload.split_at(entries * 4);
        let (k_rows, v_rows) = rest.split_at(rows);
        Ok(RetrieveReply {
            exact: head.index == 0,
            aware: head.index == 2,
            lossy: head.lossy,
            tokens: head.tokens,
            k: head.k,
            positions: pos
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            row_bytes: head.row_bytes as usize,
            k_rows: k_rows.to_vec(),
            v_rows: v_rows.to_vec(),
        })
    }

    /// Leases chunks for `ttl`; 0 for keys that are missing.
    pub async fn lease(&self, keys: &[ChunkKey], ttl: Duration) -> Result<Vec<u64>> {
        let h = LeaseHeader {
            keys: keys.iter().map(|k| k.0).collect(),
            ttl_ms: ttl.as_millis() as u64,
        };
        let f = expect(self.call(&h, &[], None).await?, Opcode::LeaseOk)?;
        let a = wire::access_header::<LeaseOkHeader>(Opcode::LeaseOk, &f.header)?;
        Ok(a.lease_ids.iter().map(|i| i.to_native()).collect())
    }

    /// Ends leases.
    pub async fn release(&self, lease_ids: &[u64]) -> Result<()> {
        let h = ReleaseHeader {
            lease_ids: lease_ids.to_vec(),
        };
        expect(self.call(&h, &[], None).await?, Opcode::Ok).map(|_| ())
    }

    /// Deletes chunks; returns how many existed.
    pub async fn delete(&self, keys: &[ChunkKey]) -> Result<u32> {
        let h = DeleteHeader {
            keys: keys.iter().map(|k| k.0).collect(),
        };
        let f = expect(self.call(&h, &[], None).await?, Opcode::DeleteOk)?;
        Ok(
            wire::access_header::<DeleteOkHeader>(Opcode::DeleteOk, &f.header)?
                .removed
                .to_native(),
        )
    }

    /// Store statistics (JSON, as `kvtier_cache::StoreStats`).
    pub async fn stats(&self) -> Result<serde_json::Value> {
        let f = expect(
            self.call(&StatsHeader {}, &[], None).await?,
            Opcode::StatsOk,
        )?;
        let a = wire::access_header::<StatsOkHeader>(Opcode::StatsOk, &f.header)?;
        serde_json::from_str(a.json.as_str())
            .map_err(|e| ClientError::Protocol(format!("stats json: {e}")))
    }

    /// Maps the server's host arenas read-only (Unix socket to a same-host server).
    pub async fn map_arenas(&self) -> Result<usize> {
        let f = expect(
            self.call(&MapArenasHeader {}, &[], None).await?,
            Opcode::MapArenasOk,
        )?;
        let a = wire::access_header::<MapArenasOkHeader>(Opcode::MapArenasOk, &f.header)?;
        let fds = std::mem::take(&mut *self.inner.arena_fds.lock());
        if fds.len() != a.arenas.len() {
            return Err(ClientError::Protocol(format!(
                "{} arenas but {} descriptors",
                a.arenas.len(),
                fds.len()
            )));
        }
        let mut maps = self.inner.arenas.lock();
        for (info, fd) in a.arenas.iter().zip(fds) {
            let id = info.arena_id.to_native();
            if maps.contains_key(&id) {
                continue;
            }
            let map = kvtier_offload::shm::map_readonly(fd.as_fd(), info.len.to_native() as usize)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            maps.insert(id, Arc::new(map));
        }
        Ok(maps.len())
    }

    /// Copies chunks straight out of the mapped server arenas into `dst` (packed in key order):
    /// the server leases each chunk and says where it is; the bytes never cross the socket.
    /// Returns each key's metadata and range in `dst`, `None` for misses.
    #[allow(clippy::type_complexity)]
    pub async fn read_located(
        &self,
        keys: &[ChunkKey],
        accept_lossy: bool,
        dst: &mut Vec<u8>,
    ) -> Result<Vec<Option<(ChunkMeta, std::ops::Range<usize>)>>> {
        let h = GetLocatedHeader {
            keys: keys.iter().map(|k| k.0).collect(),
            lease_ttl_ms: 30_000,
            accept_lossy,
        };
        let f = expect(self.call(&h, &[], None).await?, Opcode::GetLocatedOk)?;
        let entries: Vec<_> = {
            let a = wire::access_header::<GetLocatedOkHeader>(Opcode::GetLocatedOk, &f.header)?;
            a.entries
                .iter()
                .map(|e| {
                    Ok((
                        e.found,
                        e.arena_id.to_native(),
                        e.offset.to_native(),
                        e.len.to_native(),
                        e.lease_id.to_native(),
                        if e.found {
                            Some(meta_of(&e.meta)?)
                        } else {
                            None
                        },
                    ))
                })
                .collect::<Result<_>>()?
        };
        if entries
            .iter()
            .any(|e| e.0 && !self.inner.arenas.lock().contains_key(&e.1))
        {
            self.map_arenas().await?;
        }
        let total: usize = entries.iter().filter(|e| e.0).map(|e| e.3 as usize).sum();
        dst.clear();
        dst.reserve(total);
        let mut out = Vec::with_capacity(entries.len());
        let mut leases = Vec::new();
        let copied = (|| {
            let maps = self.inner.arenas.lock();
            for (found, arena, offset, len, lease, meta) in &entries {
                if !found {
                    out.push(None);
                    continue;
                }
                leases.push(*lease);
                let map = maps
                    .get(arena)
                    .ok_or_else(|| ClientError::Protocol(format!("arena {arena} not mapped")))?;
                let (o, l) = (*offset as usize, *len as usize);
                let src = map
                    .get(o..o + l)
                    .ok_or_else(|| ClientError::Protocol("chunk outside its arena".into()))?;
                let start = dst.len();
                dst.extend_from_slice(src);
                out.push(Some((
                    (*meta).expect("found entries carry metadata"),
                    start..start + l,
                )));
            }
            Ok::<(), ClientError>(())
        })();
        if !leases.is_empty() {
            self.release(&leases).await?;
        }
        copied?;
        Ok(out)
    }

    /// Creates a shared region of `len` bytes and registers it with the server.
    pub async fn register_region(&self, len: usize) -> Result<ShmRegion> {
        let (fd, map) = kvtier_offload::shm::create_region(len)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let h = ShmRegisterHeader {
            name: "kvtier-client".into(),
            len: len as u64,
        };
        let f = expect(
            self.call_with_fds(&h, &[], None, &[fd.as_fd()]).await?,
            Opcode::ShmRegisterOk,
        )?;
        let id = wire::access_header::<ShmRegisterOkHeader>(Opcode::ShmRegisterOk, &f.header)?
            .region_id
            .to_native();
        Ok(ShmRegion { id, map })
    }

    /// Stores a chunk whose bytes lie in `region` at `offset..offset + len`.
    pub async fn shm_put(
        &self,
        region: &ShmRegion,
        offset: u64,
        len: u64,
        key: ChunkKey,
        meta: &ChunkMeta,
    ) -> Result<()> {
        let h = ShmPutHeader {
            region_id: region.id,
            offset,
            len,
            key: key.0,
            meta: ChunkMetaWire::from_meta(meta),
        };
        expect(self.call(&h, &[], None).await?, Opcode::Ok).map(|_| ())
    }

    /// Has the server copy chunks into `region` from `offset` (at most `capacity` bytes); returns
    /// each key's metadata and range in the region.
    #[allow(clippy::type_complexity)]
    pub async fn shm_get(
        &self,
        region: &ShmRegion,
        offset: u64,
        capacity: u64,
        keys: &[ChunkKey],
        accept_lossy: bool,
    ) -> Result<Vec<Option<(ChunkMeta, std::ops::Range<usize>)>>> {
        let h = ShmGetHeader {
            region_id: region.id,
            offset,
            capacity,
            keys: keys.iter().map(|k| k.0).collect(),
            accept_lossy,
        };
        let f = expect(self.call(&h, &[], None).await?, Opcode::GetOk)?;
        let a = wire::access_header::<GetOkHeader>(Opcode::GetOk, &f.header)?;
        a.entries
            .iter()
            .map(|e| {
                if !e.found {
                    return Ok(None);
                }
                let (o, l) = (e.offset.to_native() as usize, e.len.to_native() as usize);
                if o.checked_add(l).is_none_or(|end| end > region.map.len()) {
                    return Err(ClientError::Protocol("shm entry outside the region".into()));
                }
                Ok(Some((meta_of(&e.meta)?, o..o + l)))
            })
            .collect()
    }
}

pub(crate) fn expect(f: Frame, op: Opcode) -> Result<Frame> {
    if f.opcode != op {
        return Err(ClientError::Protocol(format!(
            "expected {op:?}, got {:?}",
            f.opcode
        )));
    }
    Ok(f)
}

fn server_error(header: &AlignedVec) -> ClientError {
    match wire::access_header::<ErrorHeader>(Opcode::Error, header) {
        Ok(a) => ClientError::Server {
            code: ErrorCode::from_u16(a.code.to_native()),
            message: a.message.to_string(),
        },
        Err(e) => ClientError::Protocol(format!("unreadable error frame: {e}")),
    }
}

/// Matches reply frames to waiting requests until the connection ends; then fails them all.
async fn read_loop(inner: std::sync::Weak<Inner>, mut reader: Reader) {
    let limits = Limits::default();
    let stall = Duration::from_secs(60);
    let end = loop {
        let mut header = AlignedVec::new();
        let pre = match wire::read_frame_head(&mut reader, &limits, stall, &mut header).await {
            Ok(Some(p)) => p,
            Ok(None) => break ClientError::Closed,
            Err(e) => break ClientError::Wire(e),
        };
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = wire::validate_header(pre.opcode, &header) {
            break ClientError::Wire(e);
        }
        let pending = inner.pending.lock().remove(&pre.request_id);
        let (tx, mut payload) = match pending {
            Some(p) => (Some(p.tx), p.dest.unwrap_or_default()),
            None => (None, Vec::new()),
        };
        // Every byte is overwritten by the read: keep a reused buffer's old contents rather than
        // zeroing it, and zero only growth.
        let n = pre.payload_len as usize;
        if payload.len() >= n {
            payload.truncate(n);
        } else {
            payload.resize(n, 0);
        }
        if let Err(e) = wire::read_payload_into(&mut reader, &mut payload, stall).await {
            break ClientError::Wire(e);
        }
        if pre.opcode == Opcode::MapArenasOk {
            match reader.recv_fds().await {
                Ok(fds) => *inner.arena_fds.lock() = fds,
                Err(e) => break ClientError::Io(e),
            }
        }
        if pre.request_id == 0 && pre.opcode == Opcode::Error {
            // A connection-level error: the server closes next. Report it to everyone waiting.
            break server_error(&header);
        }
        if let Some(tx) = tx {
            let _ = tx.send(Ok(Frame {
                opcode: pre.opcode,
                header,
                payload,
            }));
        }
    };
    if let Some(inner) = inner.upgrade() {
        let msg = end.to_string();
        let mut pending = inner.pending.lock();
        inner.closed.store(true, Ordering::Release);
        for (_, p) in pending.drain() {
            let _ = p.tx.send(Err(ClientError::Protocol(msg.clone())));
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("unix", &self.inner.unix)
            .finish()
    }
}

/// The fidelity a lookup hit's tag names (lossy details are not carried by lookups).
pub fn fidelity_name(tag: u8) -> &'static str {
    match tag {
        0 => "exact",
        1 => "lossless",
        2 => "lossy",
        _ => "unknown",
    }
}
