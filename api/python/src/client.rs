//! `kvtier.Client`: one connection to kvtier's data plane through kvtier-client's
//! [`BlockingClient`]. Every request runs with the GIL released (`Python::detach`), so other
//! Python threads (an engine's forward pass) keep running while it waits on the socket.
//!
//! Reads: `get_into` packs the chunks into the caller's buffer. On a Unix socket to a same-host
//! server the chunks held in host memory are copied out of the server's mapped arenas (the
//! shared-memory path: a lease and an offset cross the socket, not the bytes); the others, and
//! every chunk over TCP, come through the socket into a receive buffer the client reuses. Either
//! way one `memcpy` lands them in the caller's memory; no Python object is created per chunk.

use std::ops::Range;

use kvtier_cache::{ChunkKey, ChunkMeta};
use kvtier_client::{BlockingClient, ClientError, ClientOptions, fidelity_name};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Mutex;

use crate::buffers::BytesView;
use crate::errors::{ProtocolError, to_py};
use crate::keys::{DEFAULT_TENANT, ModelArg, key_str, namespace, parse_key};

/// A lookup answer: the keys of every full chunk of the prompt and how many leading ones kvtier
/// holds.
#[pyclass(module = "kvtier", frozen, get_all)]
pub struct Lookup {
    /// Tokens covered by the held leading chunks.
    hit_tokens: u64,
    /// Leading chunks held.
    hit_chunks: usize,
    /// Key of every full chunk of the prompt (32 hex digits), first chunk first.
    keys: Vec<String>,
    /// Tiers holding each held chunk (`"host"`, `"host+disk"`, ...).
    tiers: Vec<String>,
    /// Best fidelity held for each held chunk (`"exact"`, `"lossless"`, `"lossy"`).
    fidelities: Vec<String>,
}

#[pymethods]
impl Lookup {
    fn __repr__(&self) -> String {
        format!(
            "Lookup(hit_tokens={}, hit_chunks={}, chunks={})",
            self.hit_tokens,
            self.hit_chunks,
            self.keys.len()
        )
    }
}

/// A connection to a kvtier server.
#[pyclass(module = "kvtier", frozen, subclass)]
pub struct Client {
    inner: BlockingClient,
    address: String,
    tenant: String,
    shared_memory: bool,
    /// Receive buffers reused across reads (socket replies, shared-memory copies).
    scratch: Mutex<(Vec<u8>, Vec<u8>)>,
}

type Entries = Vec<Option<(ChunkMeta, Range<usize>)>>;

impl Client {
    fn keys(&self, keys: &[String]) -> PyResult<Vec<ChunkKey>> {
        keys.iter().map(|k| parse_key(k)).collect()
    }

    /// Reads `keys` (batched by the server's key limit) and calls `sink` with each key's index,
    /// metadata and bytes, in key order. Runs without the GIL.
    fn read(
        &self,
        keys: &[ChunkKey],
        accept_lossy: bool,
        mut sink: impl FnMut(usize, Option<(&ChunkMeta, &[u8])>) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let (located, socket) = &mut *scratch;
        let mut base = 0;
        for batch in keys.chunks(self.inner.max_keys()) {
            let mut from_shm: Entries = vec![None; batch.len()];
            if self.shared_memory {
                from_shm = self.inner.block_on(self.inner.client().read_located(
                    batch,
                    accept_lossy,
                    located,
                ))?;
            }
            let missing: Vec<usize> = (0..batch.len())
                .filter(|i| from_shm[*i].is_none())
                .collect();
            let mut from_socket: Entries = vec![None; batch.len()];
            if !missing.is_empty() {
                let ask: Vec<ChunkKey> = missing.iter().map(|i| batch[*i]).collect();
                let (got, buf) = self
                    .inner
                    .get_into(&ask, accept_lossy, std::mem::take(socket))?;
                *socket = buf;
                for (i, e) in missing.into_iter().zip(got) {
                    from_socket[i] = e;
                }
            }
            for i in 0..batch.len() {
                let found = match (&from_shm[i], &from_socket[i]) {
                    (Some((m, r)), _) => Some((m, &located[r.clone()])),
                    (None, Some((m, r))) => Some((m, &socket[r.clone()])),
                    (None, None) => None,
                };
                sink(base + i, found)?;
            }
            base += batch.len();
        }
        Ok(())
    }
}

#[pymethods]
impl Client {
    /// `Client(address, token=None, tenant=None)`: connects to `host:port` (TCP) or
    /// `unix:/path` (Unix socket; enables the shared-memory read path unless
    /// `shared_memory=False`). Raises `ConnectError` when nothing listens there and
    /// `UnauthorizedError` for a wrong token.
    #[new]
    #[pyo3(signature = (address, token = None, tenant = None, client_name = "kvtier-python", shared_memory = true))]
    fn new(
        py: Python<'_>,
        address: &str,
        token: Option<String>,
        tenant: Option<String>,
        client_name: &str,
        shared_memory: bool,
    ) -> PyResult<Client> {
        let opts = ClientOptions {
            token,
            tenant: tenant.clone(),
            client_name: client_name.to_string(),
        };
        let inner = py
            .detach(|| BlockingClient::connect(address, opts))
            .map_err(to_py)?;
        let shared_memory = shared_memory && inner.client().is_unix();
        Ok(Client {
            inner,
            address: address.to_string(),
            tenant: tenant.unwrap_or_else(|| DEFAULT_TENANT.to_string()),
            shared_memory,
            scratch: Mutex::new((Vec::new(), Vec::new())),
        })
    }

    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    /// The tenant this client keys prompts in (the server's `"default"` when none was named).
    #[getter]
    fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Most keys one request may carry (larger calls are split by this).
    #[getter]
    fn max_keys(&self) -> usize {
        self.inner.max_keys()
    }

    /// Whether reads use the shared-memory path (Unix socket to a same-host server).
    #[getter]
    fn shared_memory(&self) -> bool {
        self.shared_memory
    }

    /// Keys of every full chunk of `token_ids` in this client's tenant (see `kvtier.chunk_keys`).
    #[pyo3(signature = (token_ids, model, salt = None, chunk_tokens = kvtier_cache::key::DEFAULT_CHUNK_TOKENS))]
    fn chunk_keys(
        &self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        model: ModelArg,
        salt: Option<&str>,
        chunk_tokens: u32,
    ) -> PyResult<Vec<String>> {
        crate::keys::chunk_keys(py, token_ids, model, &self.tenant, salt, chunk_tokens)
    }

    /// How many leading full chunks of `token_ids` kvtier holds for this tenant. The server
    /// hashes the tokens with the same code as `chunk_keys`; a reply whose keys differ from the
    /// local ones (the server resolved another tenant, say from a tenant token) raises
    /// `ProtocolError` rather than being trusted.
    #[pyo3(signature = (token_ids, model, salt = None, chunk_tokens = kvtier_cache::key::DEFAULT_CHUNK_TOKENS))]
    fn lookup(
        &self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        model: ModelArg,
        salt: Option<&str>,
        chunk_tokens: u32,
    ) -> PyResult<Lookup> {
        let ns = namespace(&model, &self.tenant, salt, chunk_tokens)?;
        let (keys, reply) = py.detach(|| {
            let keys = ns.chunk_keys(&token_ids);
            let reply = self.inner.lookup(
                ns.layout_fingerprint,
                ns.salt.as_deref(),
                chunk_tokens,
                &token_ids,
            );
            (keys, reply)
        });
        let reply = reply.map_err(to_py)?;
        for (i, (h, k)) in reply.hits.iter().zip(&keys).enumerate() {
            if h.key != *k {
                return Err(ProtocolError::new_err(format!(
                    "kvtier answered key {} for chunk {i} where tenant {:?} gives {}: is the connection's tenant another?",
                    h.key, self.tenant, k
                )));
            }
        }
        let hit_chunks = reply.hits.len().min(keys.len());
        Ok(Lookup {
            hit_tokens: reply.hit_tokens,
            hit_chunks,
            keys: keys.into_iter().map(key_str).collect(),
            tiers: reply.hits.iter().map(|h| h.tiers.to_string()).collect(),
            fidelities: reply
                .hits
                .iter()
                .map(|h| fidelity_name(h.fidelity_tag).to_string())
                .collect(),
        })
    }

    /// Stores one raw chunk under `key` from any C-contiguous buffer (bytes, numpy array, ...),
    /// read in place. `model` gives the layout fingerprint, `tokens` the chunk's token count,
    /// `depth` its index in the prompt and `parent` the previous chunk's key.
    #[pyo3(signature = (key, data, model, tokens = kvtier_cache::key::DEFAULT_CHUNK_TOKENS, depth = 0, parent = None))]
    fn put(
        &self,
        py: Python<'_>,
        key: &str,
        data: &Bound<'_, PyAny>,
        model: ModelArg,
        tokens: u32,
        depth: u32,
        parent: Option<&str>,
    ) -> PyResult<()> {
        let key = parse_key(key)?;
        let parent = parent.map(parse_key).transpose()?;
        let view = BytesView::new(data, false)?;
        let mut meta = ChunkMeta::raw(0, model.fingerprint()?, tokens, depth, view.len() as u64);
        meta.parent = parent;
        py.detach(|| self.inner.put(key, &meta, view.bytes()))
            .map_err(to_py)
    }

    /// Stores chunk `i` of the prompt whose chunk keys are `keys`: depth `i`, parent
    /// `keys[i - 1]`, `chunk_tokens` tokens.
    #[pyo3(signature = (keys, i, data, model, chunk_tokens = kvtier_cache::key::DEFAULT_CHUNK_TOKENS))]
    fn put_chunk(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        i: usize,
        data: &Bound<'_, PyAny>,
        model: ModelArg,
        chunk_tokens: u32,
    ) -> PyResult<()> {
        let key = keys.get(i).ok_or_else(|| {
            PyValueError::new_err(format!("chunk {i} of a prompt of {} chunks", keys.len()))
        })?;
        let parent = i.checked_sub(1).map(|p| keys[p].as_str());
        self.put(py, key, data, model, chunk_tokens, i as u32, parent)
    }

    /// Reads chunks as `bytes` (`None` for a miss, or a lossy chunk unless `accept_lossy`).
    /// Use `get_into` to read into preallocated memory without creating objects.
    #[pyo3(signature = (keys, accept_lossy = false))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
        accept_lossy: bool,
    ) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
        let keys = self.keys(&keys)?;
        let mut owned: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        py.detach(|| {
            self.read(&keys, accept_lossy, |i, got| {
                owned[i] = got.map(|(_, b)| b.to_vec());
                Ok(())
            })
        })
        .map_err(to_py)?;
        Ok(owned
            .into_iter()
            .map(|o| o.map(|b| PyBytes::new(py, &b)))
            .collect())
    }

    /// Reads chunks into `out` (any writable C-contiguous buffer: bytearray, numpy array, a
    /// CPU tensor's `.numpy()`), packed in key order. Returns `(offset, length)` in bytes for each
    /// key, `None` for a miss. Raises `ValueError` when `out` is too small; `out` may then hold
    /// part of the data.
    #[pyo3(signature = (keys, out, accept_lossy = false))]
    fn get_into(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        out: &Bound<'_, PyAny>,
        accept_lossy: bool,
    ) -> PyResult<Vec<Option<(usize, usize)>>> {
        let keys = self.keys(&keys)?;
        let mut view = BytesView::new(out, true)?;
        let mut placed = vec![None; keys.len()];
        let mut too_small = None;
        py.detach(|| {
            let dst = view.bytes_mut();
            let mut at = 0usize;
            self.read(&keys, accept_lossy, |i, got| {
                let Some((_, bytes)) = got else { return Ok(()) };
                let end = at + bytes.len();
                match dst.get_mut(at..end) {
                    Some(d) if too_small.is_none() => d.copy_from_slice(bytes),
                    _ => {
                        too_small = Some(end);
                        return Ok(());
                    }
                }
                placed[i] = Some((at, bytes.len()));
                at = end;
                Ok(())
            })
        })
        .map_err(to_py)?;
        if let Some(need) = too_small {
            return Err(PyValueError::new_err(format!(
                "output buffer of {} bytes is too small: the chunks need at least {need}",
                view.len()
            )));
        }
        Ok(placed)
    }

    /// Deletes chunks of this tenant; returns how many existed.
    fn delete(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<u32> {
        let keys = self.keys(&keys)?;
        py.detach(|| {
            let mut n = 0;
            for batch in keys.chunks(self.inner.max_keys()) {
                n += self.inner.delete(batch)?;
            }
            Ok(n)
        })
        .map_err(to_py)
    }

    /// The server's statistics as a JSON string (`kvtier.Client.stats()` parses it).
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.inner.stats())
            .map(|v| v.to_string())
            .map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Client({:?}, tenant={:?}, shared_memory={})",
            self.address, self.tenant, self.shared_memory
        )
    }
}
