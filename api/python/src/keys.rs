//! Model layouts and chunk keys for Python. Keys come from kvtier-cache's [`Namespace`] (the
//! code the server and the Rust client run), never from a Python reimplementation, so a prefix
//! stored from Python is found from Rust and the other way round.

use kvtier_cache::key::{DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS};
use kvtier_cache::{ChunkKey, Dtype, ModelLayout, Namespace};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Tenant used when a caller names none (the server's default too).
pub(crate) const DEFAULT_TENANT: &str = "default";

/// The layouts known by name. Same names as the CLI's `--model` (kvtier-prompt's
/// `builtin_layouts`); repeated here so the wheel does not link kvtier-prompt's index and codec
/// stack for two constructors. The Python tests check both tables agree through the CLI.
fn builtin(name: &str) -> Option<ModelLayout> {
    match name {
        "llama-3.1-8b" => Some(ModelLayout::llama31_8b()),
        "smollm2-135m" => Some(ModelLayout::smollm2_135m()),
        _ => None,
    }
}

/// A model's KV-cache layout (MHA/GQA): what one token's cache looks like, and its fingerprint.
#[pyclass(module = "kvtier", frozen, eq, hash, from_py_object)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    pub(crate) inner: ModelLayout,
}

#[pymethods]
impl Layout {
    /// `Layout(model_id, num_layers, kv_heads, head_dim, dtype="f16")`.
    #[new]
    #[pyo3(signature = (model_id, num_layers, kv_heads, head_dim, dtype = "f16"))]
    fn new(
        model_id: &str,
        num_layers: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: &str,
    ) -> PyResult<Layout> {
        let dtype = Dtype::parse(dtype).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown dtype {dtype:?} (f16, bf16, f32 or fp8-e4m3)"
            ))
        })?;
        let inner = ModelLayout::mha(model_id, num_layers, kv_heads, head_dim, dtype);
        inner
            .validate()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Layout { inner })
    }

    /// A layout known by name: `"smollm2-135m"` or `"llama-3.1-8b"`.
    #[staticmethod]
    fn builtin(name: &str) -> PyResult<Layout> {
        builtin(name).map(|inner| Layout { inner }).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown model {name:?} (smollm2-135m, llama-3.1-8b)"
            ))
        })
    }

    /// The layout's stable 64-bit fingerprint (folded into every key).
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.inner.fingerprint()
    }

    #[getter]
    fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    #[getter]
    fn num_layers(&self) -> u32 {
        self.inner.num_layers
    }

    #[getter]
    fn kv_heads(&self) -> u32 {
        self.inner.kv_heads
    }

    #[getter]
    fn head_dim(&self) -> u32 {
        self.inner.head_dim
    }

    #[getter]
    fn dtype(&self) -> String {
        self.inner.dtype.to_string()
    }

    /// Bytes of one element of the layout's dtype.
    #[getter]
    fn dtype_size(&self) -> usize {
        self.inner.dtype.size()
    }

    /// Bytes of a raw chunk of `tokens` tokens (`[layer][K|V][token][kv_head][head_dim]`).
    fn chunk_bytes(&self, tokens: usize) -> usize {
        self.inner.chunk_bytes(tokens)
    }

    /// Bytes of one layer of a raw chunk of `tokens` tokens.
    fn layer_bytes(&self, tokens: usize) -> usize {
        self.inner.layer_bytes(tokens)
    }

    fn __repr__(&self) -> String {
        let l = &self.inner;
        format!(
            "Layout({:?}, num_layers={}, kv_heads={}, head_dim={}, dtype={:?})",
            l.model_id,
            l.num_layers,
            l.kv_heads,
            l.head_dim,
            l.dtype.to_string()
        )
    }
}

/// What a `model=` argument may be: a `Layout`, a builtin layout's name, or a fingerprint.
#[derive(FromPyObject)]
pub(crate) enum ModelArg {
    Layout(Layout),
    Name(String),
    Fingerprint(u64),
}

impl ModelArg {
    pub(crate) fn fingerprint(&self) -> PyResult<u64> {
        Ok(match self {
            ModelArg::Layout(l) => l.inner.fingerprint(),
            ModelArg::Name(n) => Layout::builtin(n)?.inner.fingerprint(),
            ModelArg::Fingerprint(f) => *f,
        })
    }
}

/// The namespace a prompt is keyed in, with its arguments checked.
pub(crate) fn namespace(
    model: &ModelArg,
    tenant: &str,
    salt: Option<&str>,
    chunk_tokens: u32,
) -> PyResult<Namespace> {
    if chunk_tokens == 0 || chunk_tokens > MAX_CHUNK_TOKENS {
        return Err(PyValueError::new_err(format!(
            "chunk_tokens must be in 1..={MAX_CHUNK_TOKENS}, got {chunk_tokens}"
        )));
    }
    let mut ns = Namespace::new(model.fingerprint()?, tenant).with_chunk_tokens(chunk_tokens);
    if let Some(s) = salt {
        ns = ns.with_salt(s);
    }
    Ok(ns)
}

pub(crate) fn key_str(k: ChunkKey) -> String {
    k.to_string()
}

pub(crate) fn parse_key(s: &str) -> PyResult<ChunkKey> {
    s.parse::<ChunkKey>().map_err(|_| {
        PyValueError::new_err(format!("invalid chunk key {s:?} (32 hex digits expected)"))
    })
}

/// Keys (32 hex digits each) of every full chunk of `token_ids` in the namespace of `model`,
/// `tenant` and `salt`; a trailing partial chunk has no key.
#[pyfunction]
#[pyo3(signature = (token_ids, model, tenant = DEFAULT_TENANT, salt = None, chunk_tokens = DEFAULT_CHUNK_TOKENS))]
pub(crate) fn chunk_keys(
    py: Python<'_>,
    token_ids: Vec<u32>,
    model: ModelArg,
    tenant: &str,
    salt: Option<&str>,
    chunk_tokens: u32,
) -> PyResult<Vec<String>> {
    let ns = namespace(&model, tenant, salt, chunk_tokens)?;
    let keys = py.detach(|| ns.chunk_keys(&token_ids));
    Ok(keys.into_iter().map(key_str).collect())
}
