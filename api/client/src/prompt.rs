//! [`PromptCache`]: what a serving engine's KV connector does with kvtier, in one place.
//!
//! For a prompt the engine hashes its full chunks into keys (the [`Namespace`] fixes layout,
//! tenant, salt and chunk size), asks how many leading chunks kvtier holds ([`PromptCache::lookup`]),
//! reads those under a lease into one buffer it reuses ([`PromptCache::fetch`]), imports them,
//! computes the rest, and stores the chunks it computed itself ([`PromptCache::put_chunk`],
//! parent = the previous chunk). The reference engine of `kvtier-bench` and the integration
//! tests go through this type rather than re-deriving the sequence.

use std::ops::Range;
use std::time::Duration;

use kvtier_cache::{ChunkKey, ChunkMeta, Namespace};

use crate::client::{Client, ClientError};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How long a fetch's leases may outlive a client that died mid-fetch.
const FETCH_LEASE_TTL: Duration = Duration::from_secs(30);

/// A prompt's keys and how many of its leading chunks kvtier holds.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixHit {
    /// The key of every full chunk of the prompt, first chunk first.
    pub keys: Vec<ChunkKey>,
    /// Leading chunks the server reported as held (at most `keys.len()`).
    pub hit_chunks: usize,
}

impl PrefixHit {
    /// Tokens covered by the held chunks.
    pub fn hit_tokens(&self, chunk_tokens: u32) -> usize {
        self.hit_chunks * chunk_tokens as usize
    }
}

/// Chunks read by [`PromptCache::fetch`]: a leading run of the requested keys, packed in `buf`.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The payload buffer (the caller's, reused and grown as needed).
    pub buf: Vec<u8>,
    /// Metadata and byte range in `buf` of each chunk read, in key order. Shorter than the keys
    /// asked for when a chunk went away between lookup and fetch: a prefix stops at its first
    /// gap.
    pub chunks: Vec<(ChunkMeta, Range<usize>)>,
}

impl Fetched {
    /// Payload of the `i`-th chunk read.
    pub fn payload(&self, i: usize) -> &[u8] {
        &self.buf[self.chunks[i].1.clone()]
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// A prompt-prefix cache over one connection and one key space.
#[derive(Debug, Clone)]
pub struct PromptCache {
    client: Client,
    ns: Namespace,
}

impl PromptCache {
    /// Chunks of prompts are keyed in `ns`, whose tenant must be the connection's (the server
    /// hashes lookups with the connection's tenant; [`PromptCache::lookup`] checks they agree).
    pub fn new(client: Client, ns: Namespace) -> PromptCache {
        PromptCache { client, ns }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The keys of `tokens`' full chunks and how many leading ones the server holds.
    pub async fn lookup(&self, tokens: &[u32]) -> Result<PrefixHit> {
        let keys = self.ns.chunk_keys(tokens);
        let reply = self
            .client
            .lookup(
                self.ns.layout_fingerprint,
                self.ns.salt.as_deref(),
                self.ns.chunk_tokens,
                tokens,
            )
            .await?;
        // A different key means the server resolved another tenant (a tenant token) than the
        // namespace names: those chunks are not this key space's.
        for (h, k) in reply.hits.iter().zip(&keys) {
            if h.key != *k {
                return Err(ClientError::Protocol(format!(
                    "kvtier answered key {:?} where the namespace gives {:?}: is the connection's tenant {:?}?",
                    h.key, k, self.ns.tenant
                )));
            }
        }
        let hit_chunks = reply.hits.len().min(keys.len());
        Ok(PrefixHit { keys, hit_chunks })
    }

    /// Reads the chunks `keys` (a prompt's leading keys) into `buf`, holding a lease on them
    /// for the read and releasing it after. Stops at the first chunk that is gone; a chunk of
    /// another layout or chunk size is an error.
    pub async fn fetch(&self, keys: &[ChunkKey], buf: Vec<u8>) -> Result<Fetched> {
        if keys.is_empty() {
            return Ok(Fetched {
                buf,
                chunks: Vec::new(),
            });
        }
        let leases = self.client.lease(keys, FETCH_LEASE_TTL).await?;
        // Missing when leased: nothing after it can extend the prefix.
        let held = leases.iter().take_while(|id| **id != 0).count();
        let got = if held > 0 {
            self.client.get_into(&keys[..held], false, buf).await
        } else {
            Ok((Vec::new(), buf))
        };
        let ids: Vec<u64> = leases.into_iter().filter(|id| *id != 0).collect();
        if !ids.is_empty() {
            self.client.release(&ids).await?;
        }
        let (entries, buf) = got?;
        let mut chunks = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let Some((meta, range)) = e else { break };
            if meta.layout != self.ns.layout_fingerprint || meta.tokens != self.ns.chunk_tokens {
                return Err(ClientError::Protocol(format!(
                    "chunk {i} has layout {:#x} and {} tokens, expected {:#x} and {}",
                    meta.layout, meta.tokens, self.ns.layout_fingerprint, self.ns.chunk_tokens
                )));
            }
            chunks.push((meta, range));
        }
        Ok(Fetched { buf, chunks })
    }

    /// Stores chunk `i` of the prompt whose keys are `keys`, raw, with depth `i` and parent
    /// `keys[i - 1]` (the server stamps the connection's tenant).
    pub async fn put_chunk(&self, keys: &[ChunkKey], i: usize, payload: &[u8]) -> Result<()> {
        let key = *keys
            .get(i)
            .ok_or_else(|| ClientError::Protocol(format!("chunk {i} of {} keys", keys.len())))?;
        let mut meta = ChunkMeta::raw(
            0,
            self.ns.layout_fingerprint,
            self.ns.chunk_tokens,
            i as u32,
            payload.len() as u64,
        );
        meta.parent = i.checked_sub(1).map(|p| keys[p]);
        self.client.put(key, &meta, payload).await
    }
}
