//! `kvtier-client`: what an engine links to talk to kvtier's data plane.
//!
//! - [`Client`]: the async client (one connection, many requests in flight, buffer reuse,
//!   same-host shared memory on a Unix socket);
//! - [`BlockingClient`]: the same calls for callers without an async runtime;
//! - [`PromptCache`]: the engine's sequence (lookup the cached prefix, leased get into the
//!   caller's buffer, put the chunks it computed);
//! - [`transfer`]: the sending side of a prefill→decode transfer (one frame per run of
//!   layers, written from the chunks' memory, over N connections) and the calls that start,
//!   watch and move transfers on a server;
//! - [`transport`]: the TCP / Unix socket halves both ends of a connection use, with
//!   descriptor passing; the server reuses them.
//!
//! It depends on the wire format ([`kvtier_wire`]) and the chunk vocabulary
//! ([`kvtier_cache`]), never on the server, its HTTP stack, its CLI or its configuration.

mod blocking;
mod client;
mod prompt;
pub mod transfer;
pub mod transport;

pub use blocking::{BlockingClient, BlockingPromptCache};
pub use client::{
    Client, ClientError, ClientOptions, GotChunk, LookupHitInfo, LookupReply, RetrieveReply,
    ShmRegion, fidelity_name,
};
pub use prompt::{Fetched, PrefixHit, PromptCache};
