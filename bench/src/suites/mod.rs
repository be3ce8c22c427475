//! One module per benchmark suite.

pub mod budget;
pub mod capture;
pub mod compress;
pub mod engine;
pub mod load;
pub mod retrieval;
pub mod retrieve;
pub mod store;
pub mod vllm;
pub mod wire;
