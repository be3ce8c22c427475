//! Chunk keys: a 128-bit chained hash over token ids under a namespace.
//!
//! `key_i = H(key_{i-1}, H(tokens_i), namespace)`, with `key_{-1}` the namespace seed. Equal
//! prefixes under the same namespace give equal keys; a different tenant, salt, layout or chunk
//! size gives a different seed and so a disjoint key space. xxh3-128 hashes the 4-byte token ids
//! at memory speed, far under the 2 ns per token the design asks for.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128, xxh3_128_with_seed};

use crate::layout::HASH_VERSION;

/// Default tokens per chunk.
pub const DEFAULT_CHUNK_TOKENS: u32 = 256;
/// Largest chunk the store accepts, in tokens.
pub const MAX_CHUNK_TOKENS: u32 = 1 << 16;

/// A 128-bit chunk identifier. Displayed and parsed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkKey(pub u128);

impl ChunkKey {
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    pub fn from_le_bytes(b: [u8; 16]) -> Self {
        ChunkKey(u128::from_le_bytes(b))
    }
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkKey({self})")
    }
}

/// Error parsing a [`ChunkKey`] from text.
#[derive(Debug, thiserror::Error)]
#[error("invalid chunk key {0:?}: expected 32 hex digits")]
pub struct ParseKeyError(String);

impl std::str::FromStr for ChunkKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseKeyError(s.chars().take(40).collect()));
        }
        u128::from_str_radix(s, 16)
            .map(ChunkKey)
            .map_err(|_| ParseKeyError(s.to_string()))
    }
}

/// Stable 64-bit id of a tenant name; stored with every chunk so that listing, reads and deletes
/// can be scoped to the caller's tenant.
pub fn tenant_id(tenant: &str) -> u64 {
    let mut buf = Vec::with_capacity(tenant.len() + 16);
    buf.extend_from_slice(b"kvtier-tenant");
    buf.extend_from_slice(tenant.as_bytes());
    xxh3_64(&buf)
}

/// The key space a prompt is hashed in: layout fingerprint, tenant, optional salt (LoRA id,
/// cache salt) and chunk size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Namespace {
    pub layout_fingerprint: u64,
    pub tenant: String,
    pub salt: Option<String>,
    pub chunk_tokens: u32,
}

impl Namespace {
    pub fn new(layout_fingerprint: u64, tenant: &str) -> Self {
        Namespace {
            layout_fingerprint,
            tenant: tenant.to_string(),
            salt: None,
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
        }
    }

    pub fn with_salt(mut self, salt: &str) -> Self {
        self.salt = Some(salt.to_string());
        self
    }

    pub fn with_chunk_tokens(mut self, chunk_tokens: u32) -> Self {
        self.chunk_tokens = chunk_tokens;
        self
    }

    /// The tenant id stored with chunks of this namespace.
    pub fn tenant_id(&self) -> u64 {
        tenant_id(&self.tenant)
    }

    /// The 128-bit seed that starts every key chain in this namespace.
    pub fn seed(&self) -> u128 {
        let mut buf = Vec::with_capacity(64 + self.tenant.len());
        buf.extend_from_slice(b"kvtier-ns");
        buf.extend_from_slice(&HASH_VERSION.to_le_bytes());
        buf.extend_from_slice(&self.layout_fingerprint.to_le_bytes());
        buf.extend_from_slice(&self.chunk_tokens.to_le_bytes());
        buf.extend_from_slice(&(self.tenant.len() as u32).to_le_bytes());
        buf.extend_from_slice(self.tenant.as_bytes());
        match &self.salt {
            Some(s) => {
                buf.push(1);
                buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
                buf.extend_from_slice(s.as_bytes());
            }
            None => buf.push(0),
        }
        xxh3_128(&buf)
    }

    /// A hasher that walks a prompt chunk by chunk.
    pub fn hasher(&self) -> KeyChain {
        let seed = self.seed();
        KeyChain {
            seed,
            prev: seed,
            chunk_tokens: self.chunk_tokens as usize,
        }
    }

    /// Keys of every full chunk of `tokens`. A trailing partial chunk has no key.
    pub fn chunk_keys(&self, tokens: &[u32]) -> Vec<ChunkKey> {
        let mut chain = self.hasher();
        tokens
            .chunks_exact(self.chunk_tokens.max(1) as usize)
            .map(|c| chain.next_key(c))
            .collect()
    }
}

/// Incremental key chain: feed one chunk of token ids at a time.
#[derive(Debug, Clone)]
pub struct KeyChain {
    seed: u128,
    prev: u128,
    chunk_tokens: usize,
}

impl KeyChain {
    /// Tokens per chunk this chain expects.
    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens
    }

    /// The key of the next chunk, chained on the previous one.
    pub fn next_key(&mut self, chunk: &[u32]) -> ChunkKey {
        let tokens: &[u8] = bytemuck_u32(chunk);
        // The token hash uses the low half of the seed so different namespaces diverge even in
        // the inner hash; the chain step then folds in the previous key and the full seed.
        let inner = xxh3_128_with_seed(tokens, self.seed as u64);
        let mut step = [0u8; 48];
        step[..16].copy_from_slice(&self.prev.to_le_bytes());
        step[16..32].copy_from_slice(&inner.to_le_bytes());
        step[32..].copy_from_slice(&self.seed.to_le_bytes());
        self.prev = xxh3_128(&step);
        ChunkKey(self.prev)
    }
}

/// Views token ids as bytes without copying. Keys are defined over little-endian token ids.
fn bytemuck_u32(v: &[u32]) -> &[u8] {
    #[cfg(not(target_endian = "little"))]
    compile_error!("kvtier keys are defined over little-endian token ids");
    bytemuck::cast_slice(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(tenant: &str) -> Namespace {
        Namespace::new(42, tenant).with_chunk_tokens(4)
    }

    #[test]
    fn equal_prefixes_equal_keys() {
        let a: Vec<u32> = (0..12).collect();
        let mut b = a.clone();
        b[9] = 99;
        let ka = ns("t").chunk_keys(&a);
        let kb = ns("t").chunk_keys(&b);
        assert_eq!(ka.len(), 3);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
    }

    #[test]
    fn chain_depends_on_prefix() {
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let b: Vec<u32> = vec![9, 2, 3, 4, 5, 6, 7, 8];
        assert_ne!(ns("t").chunk_keys(&a)[1], ns("t").chunk_keys(&b)[1]);
    }

    #[test]
    fn tenants_salts_and_sizes_never_collide() {
        let t: Vec<u32> = (0..8).collect();
        let base = ns("a").chunk_keys(&t);
        assert_ne!(base, ns("b").chunk_keys(&t));
        assert_ne!(base, ns("a").with_salt("lora-1").chunk_keys(&t));
        assert_ne!(base[0], ns("a").with_chunk_tokens(8).chunk_keys(&t)[0]);
        let mut other_layout = ns("a");
        other_layout.layout_fingerprint = 43;
        assert_ne!(base, other_layout.chunk_keys(&t));
    }

    #[test]
    fn partial_tail_has_no_key() {
        assert_eq!(ns("t").chunk_keys(&[1, 2, 3, 4, 5, 6]).len(), 1);
    }

    #[test]
    fn key_text_round_trip() {
        let k = ChunkKey(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let s = k.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<ChunkKey>().unwrap(), k);
        assert!("xyz".parse::<ChunkKey>().is_err());
        assert!(
            "0123456789abcdef0123456789abcdeg"
                .parse::<ChunkKey>()
                .is_err()
        );
    }
}
