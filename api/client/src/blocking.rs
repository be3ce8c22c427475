//! A blocking facade over the async [`Client`], for callers without an async runtime (a Python
//! binding, a synchronous engine loop).
//!
//! [`BlockingClient`] owns a current-thread runtime and blocks the calling thread on each
//! request; the connection's reader task runs inside those calls (every request waits for its
//! reply, so nothing needs reading in between). Several threads may call at once. It must not be used from inside an async
//! runtime: blocking there would stall that runtime's worker.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use kvtier_cache::{ChunkKey, ChunkMeta, Namespace};

use crate::client::{Client, ClientError, ClientOptions, GotChunk, LookupReply};
use crate::prompt::{Fetched, PrefixHit, PromptCache};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A connection to kvtier whose methods block. Cheap to clone; clones share the connection
/// and the runtime.
#[derive(Debug, Clone)]
pub struct BlockingClient {
    rt: Arc<tokio::runtime::Runtime>,
    client: Client,
}

impl BlockingClient {
    /// Connects like [`Client::connect`].
    pub fn connect(addr: &str, opts: ClientOptions) -> Result<BlockingClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt.block_on(Client::connect(addr, opts))?;
        Ok(BlockingClient {
            rt: Arc::new(rt),
            client,
        })
    }

    /// The async client underneath (for calls this facade does not mirror, through
    /// [`BlockingClient::block_on`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `f` on this client's runtime and waits for it.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn max_keys(&self) -> usize {
        self.client.max_keys()
    }

    /// See [`Client::put`].
    pub fn put(&self, key: ChunkKey, meta: &ChunkMeta, payload: &[u8]) -> Result<()> {
        self.block_on(self.client.put(key, meta, payload))
    }

    /// See [`Client::get`].
    pub fn get(&self, keys: &[ChunkKey], accept_lossy: bool) -> Result<Vec<Option<GotChunk>>> {
        self.block_on(self.client.get(keys, accept_lossy))
    }

    /// See [`Client::get_into`].
    #[allow(clippy::type_complexity)]
    pub fn get_into(
        &self,
        keys: &[ChunkKey],
        accept_lossy: bool,
        buf: Vec<u8>,
    ) -> Result<(Vec<Option<(ChunkMeta, Range<usize>)>>, Vec<u8>)> {
        self.block_on(self.client.get_into(keys, accept_lossy, buf))
    }

    /// See [`Client::lookup`].
    pub fn lookup(
        &self,
        layout_fingerprint: u64,
        salt: Option<&str>,
        chunk_tokens: u32,
        tokens: &[u32],
    ) -> Result<LookupReply> {
        self.block_on(
            self.client
                .lookup(layout_fingerprint, salt, chunk_tokens, tokens),
        )
    }

    /// See [`Client::lease`].
    pub fn lease(&self, keys: &[ChunkKey], ttl: Duration) -> Result<Vec<u64>> {
        self.block_on(self.client.lease(keys, ttl))
    }

    /// See [`Client::release`].
    pub fn release(&self, lease_ids: &[u64]) -> Result<()> {
        self.block_on(self.client.release(lease_ids))
    }

    /// See [`Client::delete`].
    pub fn delete(&self, keys: &[ChunkKey]) -> Result<u32> {
        self.block_on(self.client.delete(keys))
    }

    /// See [`Client::stats`].
    pub fn stats(&self) -> Result<serde_json::Value> {
        self.block_on(self.client.stats())
    }

    /// A [`PromptCache`] over this connection whose calls block.
    pub fn prompt_cache(&self, ns: Namespace) -> BlockingPromptCache {
        BlockingPromptCache {
            client: self.clone(),
            inner: PromptCache::new(self.client.clone(), ns),
        }
    }
}

/// [`PromptCache`] with blocking calls.
#[derive(Debug, Clone)]
pub struct BlockingPromptCache {
    client: BlockingClient,
    inner: PromptCache,
}

impl BlockingPromptCache {
    pub fn namespace(&self) -> &Namespace {
        self.inner.namespace()
    }

    /// See [`PromptCache::lookup`].
    pub fn lookup(&self, tokens: &[u32]) -> Result<PrefixHit> {
        self.client.block_on(self.inner.lookup(tokens))
    }

    /// See [`PromptCache::fetch`].
    pub fn fetch(&self, keys: &[ChunkKey], buf: Vec<u8>) -> Result<Fetched> {
        self.client.block_on(self.inner.fetch(keys, buf))
    }

    /// See [`PromptCache::put_chunk`].
    pub fn put_chunk(&self, keys: &[ChunkKey], i: usize, payload: &[u8]) -> Result<()> {
        self.client.block_on(self.inner.put_chunk(keys, i, payload))
    }
}
