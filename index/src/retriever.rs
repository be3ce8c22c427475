//! The [`Retriever`] trait every key index implements, its result type, and [`HeadIndexes`],
//! which holds one index per (layer, KV head) and routes query heads of a GQA group to their
//! KV head.

use rayon::prelude::*;

use crate::error::{IndexError, Result, invalid};
use crate::matrix::MatrixView;

/// What a search returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchResult {
    /// Row indices of the keys found (token positions within the indexed key set), best first.
    pub positions: Vec<u32>,
    /// Inner products (or equivalent distance evaluations) computed to answer the query; divide
    /// by the number of keys for the "fraction of keys scanned".
    pub scanned: usize,
}

/// The data an index is built from.
#[derive(Debug, Clone, Copy)]
pub struct BuildInput<'a> {
    /// `[tokens × head_dim]` keys of one (layer, KV head).
    pub keys: MatrixView<'a>,
    /// The prompt's own query vectors for the query heads that use this KV head, if available;
    /// only the attention-aware index needs them.
    pub queries: Option<MatrixView<'a>>,
}

impl<'a> BuildInput<'a> {
    /// Keys only.
    pub fn keys(keys: MatrixView<'a>) -> Self {
        BuildInput {
            keys,
            queries: None,
        }
    }

    /// Checks the shared preconditions: non-empty, finite, queries of the keys' width.
    pub fn validate(&self) -> Result<()> {
        if self.keys.rows() == 0 {
            return Err(IndexError::EmptyKeys);
        }
        self.keys.check_finite("keys")?;
        if let Some(q) = self.queries {
            if q.dim() != self.keys.dim() {
                return Err(IndexError::DimensionMismatch {
                    expected: self.keys.dim(),
                    got: q.dim(),
                });
            }
            q.check_finite("build queries")?;
        }
        Ok(())
    }
}

/// A top-k maximum-inner-product index over the keys of one (layer, KV head).
///
/// Builds are CPU heavy and synchronous: async callers run them on blocking threads.
pub trait Retriever: Send + Sync {
    /// Build parameters.
    type Config: Clone + Send + Sync;

    /// Builds the index; keys (and queries, if any) are copied, the input is not kept.
    fn build(input: BuildInput<'_>, config: &Self::Config) -> Result<Self>
    where
        Self: Sized;

    /// The (approximately) `k` keys with the largest inner product with `query`, best first.
    /// Returns `min(k, len())` distinct positions.
    fn search(&self, query: &[f32], k: usize) -> Result<SearchResult>;

    /// Number of keys indexed.
    fn len(&self) -> usize;

    /// True when nothing is indexed (never, for a successfully built index).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Width of a key.
    fn dim(&self) -> usize;
}

/// Checks a search query against an index's dimension.
pub(crate) fn check_query(query: &[f32], dim: usize) -> Result<()> {
    if query.len() != dim {
        return Err(IndexError::DimensionMismatch {
            expected: dim,
            got: query.len(),
        });
    }
    if !query.iter().all(|x| x.is_finite()) {
        return Err(IndexError::NonFinite("query"));
    }
    Ok(())
}

/// One index per (layer, KV head) of a model, searched by (layer, query head).
pub struct HeadIndexes<R> {
    layers: usize,
    heads: usize,
    kv_heads: usize,
    /// Row-major `[layer][kv_head]`.
    indexes: Vec<R>,
}

impl<R: Retriever> HeadIndexes<R> {
    /// Builds every (layer, KV head) index with `build`, in parallel across heads (the graphs
    /// are independent, so this keeps all cores busy even when one build is sequential).
    pub fn build(
        layers: usize,
        heads: usize,
        kv_heads: usize,
        build: impl Fn(usize, usize) -> Result<R> + Sync,
    ) -> Result<Self> {
        if layers == 0 || kv_heads == 0 || heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(
                "heads",
                format!("{heads} query heads cannot be grouped over {kv_heads} kv heads"),
            ));
        }
        let indexes = (0..layers * kv_heads)
            .into_par_iter()
            .map(|i| build(i / kv_heads, i % kv_heads))
            .collect::<Result<Vec<R>>>()?;
        Ok(HeadIndexes {
            layers,
            heads,
            kv_heads,
            indexes,
        })
    }

    /// KV head used by query head `head` (query heads are grouped contiguously).
    pub fn kv_head_of(&self, head: usize) -> usize {
        head / (self.heads / self.kv_heads)
    }

    /// The index of one (layer, KV head).
    pub fn get(&self, layer: usize, kv_head: usize) -> Option<&R> {
        if layer >= self.layers || kv_head >= self.kv_heads {
            return None;
        }
        self.indexes.get(layer * self.kv_heads + kv_head)
    }

    /// Searches the index that query head `head` of `layer` attends through.
    pub fn search(
        &self,
        layer: usize,
        head: usize,
        query: &[f32],
        k: usize,
    ) -> Result<SearchResult> {
        if head >= self.heads {
            return Err(invalid(
                "head",
                format!("{head} is not below {}", self.heads),
            ));
        }
        let index = self
            .get(layer, self.kv_head_of(head))
            .ok_or_else(|| invalid("layer", format!("{layer} is not below {}", self.layers)))?;
        index.search(query, k)
    }
}
