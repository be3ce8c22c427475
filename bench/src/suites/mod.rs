//! One module per benchmark suite.

pub mod store;
