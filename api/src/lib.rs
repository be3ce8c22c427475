//! `kvtier`: the service around the tiered store.
//!
//! - [`config`]: defaults < TOML < environment < flags, validated into [`config::ServeConfig`];
//! - [`service`]: the store built from configuration, shared by both planes;
//! - [`auth`]: bearer tokens (constant-time) and tenant resolution;
//! - [`wire`]: the binary data-plane frame format;
//! - [`error`]: the service error type and its HTTP mapping.

pub mod auth;
pub mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod prompt;
pub mod retrieval;
pub mod server;
pub mod service;
mod transport;
pub mod wire;
