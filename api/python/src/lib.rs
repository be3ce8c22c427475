//! `kvtier._kvtier`, the native half of the `kvtier` Python package.
//!
//! Everything protocol-shaped is kvtier-client's ([`kvtier_client::BlockingClient`]) and every
//! key is computed by kvtier-cache's [`kvtier_cache::Namespace`]: this crate only adapts them to
//! Python. The pure-Python half (`python/kvtier/`) re-exports these names, adds torch tensor
//! handling and the vLLM connector.
//!
//! - [`keys`]: `Layout` (a model's KV layout and its fingerprint) and `chunk_keys`;
//! - [`client`]: `Client` (connect, lookup, put, get, get_into, delete, stats), the GIL released
//!   around every request;
//! - [`buffers`]: byte views of Python buffer-protocol objects (the only `unsafe` here);
//! - [`errors`]: one Python exception class per kvtier error code.

mod buffers;
mod client;
mod errors;
mod keys;

use pyo3::prelude::*;

#[pymodule]
fn _kvtier(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "DEFAULT_CHUNK_TOKENS",
        kvtier_cache::key::DEFAULT_CHUNK_TOKENS,
    )?;
    m.add("DEFAULT_TENANT", keys::DEFAULT_TENANT)?;
    m.add_class::<keys::Layout>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<client::Lookup>()?;
    m.add_function(wrap_pyfunction!(keys::chunk_keys, m)?)?;
    errors::register(m)?;
    Ok(())
}
