//! One module per benchmark suite.

pub mod budget;
pub mod capture;
pub mod compress;
pub mod engine;
pub mod gpu;
pub mod load;
pub mod remote;
pub mod retrieval;
pub mod retrieve;
pub mod store;
pub mod transfer;
pub mod vllm;
pub mod wire;
