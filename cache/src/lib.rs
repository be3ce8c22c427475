//! `kvtier-cache`: the core domain of kvtier.
//!
//! - [`layout`]: what one token's cache looks like ([`ModelLayout`]) and its fingerprint;
//! - [`chunk`]: where each layer's K and V rows sit in a chunk payload ([`PayloadLayout`],
//!   [`ChunkView`]) and their values as f32; [`codec_id`]: the one table of codec ids and names;
//! - [`key`]: chained 128-bit [`ChunkKey`]s over token ids under a [`Namespace`];
//! - [`tier`]: the [`Tier`] trait every storage level implements, chunk metadata, fidelity;
//! - [`host`]: the host-memory tier (arenas carved into slots, zero-copy views);
//! - [`store`]: the [`TieredStore`]: prefix lookup, promotion, demotion, eviction, admission,
//!   leases, stats and events;
//! - [`transcode`]: the codec hook ([`Transcoder`]) and [`encoding`]: [`EncodingTier`], the
//!   decorator tier that applies it to a slower tier;
//! - [`conformance`]: the test suite every tier backend must pass.
//!
//! This crate does no async I/O and knows nothing of the network, CUDA or codecs
//! (codecs plug in through [`Transcoder`]).

pub mod chunk;
pub mod codec_id;
pub mod conformance;
pub mod encoding;
pub mod error;
pub mod host;
pub mod key;
pub mod layout;
pub mod memory;
pub mod tier;
pub mod transcode;

pub use chunk::{ChunkView, PayloadLayout};
pub use encoding::EncodingTier;
pub use error::{CacheError, Result};
pub use host::{HostConfig, HostTier, SlotMut};
pub use key::{ChunkKey, KeyChain, Namespace};
pub use layout::{AttentionKind, Dtype, ModelLayout};
pub use memory::MemoryTier;
pub use tier::{ChunkMeta, Fidelity, Tier, TierKind, TierSet, TierUsage};
pub use transcode::{Encoded, Transcoder};
pub(crate) mod policy;
pub mod store;
pub use store::{
    ChunkHit, ChunkInfo, ChunkRead, GetOutcome, Lease, LookupResult, StoreConfig, StoreEvent,
    StoreStats, StoredCopy, TierStats, TieredStore, WriteMode,
};
