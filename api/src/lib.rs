//! `kvtier`: the service around the tiered store.
//!
//! - [`config`]: defaults < TOML < environment < flags, validated into [`config::ServeConfig`];
//! - [`service`]: the store built from configuration, shared by both planes;
//! - [`auth`]: bearer tokens (constant-time) and tenant resolution;
//! - [`wire`]: the binary data-plane frame format;
//! - [`error`]: the service error type and its HTTP mapping.
//!
//! What the service does with stored prompts (layouts, retrieval, budgets, the squeezer) lives
//! below it, in `kvtier-prompt`; this crate holds the adapters: wire, HTTP, CLI, config, metrics.

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod server;
pub mod service;
mod transport;
pub mod wire;

/// The RETRIEVE limit the wire headers check, until the wire format leaves this crate.
pub(crate) mod retrieval {
    pub(crate) use kvtier_prompt::retrieval::MAX_K;
}
