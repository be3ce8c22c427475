//! `kvtier-offload`: tier backends that touch devices.
//!
//! - [`disk`]: [`DiskTier`], chunks in checksummed append-only segment files;
//! - [`shm`]: [`MemfdArenas`], host-tier arenas in memfd shared memory that same-host clients
//!   can map read-only;
//! - [`gpu`]: [`gpu::GpuTier`] in device memory (CUDA loaded at run time), pinned host arenas,
//!   the page gather kernel and NVML telemetry;
//! - [`remote`]: [`RemoteTier`], chunks in a Redis Cluster shared by many nodes, and
//!   [`remote::cluster::LocalCluster`], a real loopback cluster for tests and benchmarks;
//! - [`transfer`]: the prefill→decode transfer engine's receiver-side allocator.
//!
//! All `unsafe` code of the project lives in this crate, each block small and justified.

pub mod disk;
pub mod gpu;
pub mod remote;
pub mod shm;
pub mod transfer;

pub use disk::{DiskConfig, DiskStats, DiskTier, Durability, RecordLocation};
pub use remote::{RemoteConfig, RemoteStats, RemoteTier};
pub use shm::{MemfdArenas, map_readonly};
