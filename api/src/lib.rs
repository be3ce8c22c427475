//! `kvtier`: the service around the tiered store.
//!
//! - [`config`]: defaults < TOML < environment < flags, validated into [`config::ServeConfig`];
//! - [`service`]: the store built from configuration, shared by both planes;
//! - [`auth`]: bearer tokens (constant-time) and tenant resolution;
//! - [`wire`]: the binary data-plane frame format (the `kvtier-wire` package, re-exported);
//! - [`client`]: the Rust client (the `kvtier-client` package, re-exported);
//! - [`error`]: the service error type and its HTTP mapping;
//! - [`testing`]: the in-process server every integration test and benchmark suite starts;
//! - [`transfer`]: the receiving side of prefill→decode transfers (registry, claims, reaper).
//!
//! What the service does with stored prompts (layouts, retrieval, budgets, the squeezer) lives
//! below it, in `kvtier-prompt`; this crate holds the adapters: wire, HTTP, CLI, config, metrics.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod server;
pub mod service;
pub mod testing;
pub mod transfer;

pub use kvtier_client as client;
pub use kvtier_wire as wire;
// The server reads and writes through the client's transport halves.
use kvtier_client::transport;

// The wire format bounds `Retrieve`'s k by the same figure the service enforces.
const _: () = assert!(kvtier_prompt::retrieval::MAX_K == wire::MAX_RETRIEVE_K);
