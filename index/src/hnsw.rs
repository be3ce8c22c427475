//! HNSW over keys (hnsw_rs), turned into a maximum-inner-product index.
//!
//! HNSW searches by a metric, and inner product is not one. The standard reduction: with `M`
//! the largest key norm, append `sqrt(M² − |k|²)` to every key (all keys now have norm `M`)
//! and `0` to the query. Then `|q' − k'|² = |q|² + M² − 2 q·k`, so the nearest key in L2 is the
//! key with the largest inner product. We use squared L2 (monotone in L2, no square root).
//!
//! Every distance evaluation is counted in a thread-local counter: hnsw_rs evaluates
//! distances on the calling thread during `search`, so the difference of the counter around
//! one search is exactly the number of inner products that search computed.

use std::cell::Cell;

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use crate::error::{Result, invalid};
use crate::exact::{BruteForce, exact_top_k};
use crate::matrix::{MatrixView, l2_squared, norm};
use crate::retriever::{BuildInput, Retriever, SearchResult, check_query};

thread_local! {
    static DISTANCE_EVALS: Cell<u64> = const { Cell::new(0) };
}

/// Squared L2 that counts its evaluations on the current thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingL2;

impl Distance<f32> for CountingL2 {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        DISTANCE_EVALS.with(|c| c.set(c.get() + 1));
        l2_squared(va, vb)
    }
}

fn evals_now() -> u64 {
    DISTANCE_EVALS.with(|c| c.get())
}

/// Build and search parameters of [`HnswRetriever`].
#[derive(Debug, Clone)]
pub struct HnswConfig {
    /// Links per node and layer (hnsw_rs exits the process above 256, so it is checked here).
    pub max_connections: usize,
    /// Candidate list width while inserting.
    pub ef_construction: usize,
    /// Candidate list width while searching, used by [`Retriever::search`] (at least `k`).
    pub ef_search: usize,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig {
            max_connections: 24,
            ef_construction: 200,
            ef_search: 256,
        }
    }
}

/// HNSW index over MIPS-augmented keys of one (layer, KV head).
pub struct HnswRetriever {
    graph: Hnsw<'static, f32, CountingL2>,
    /// Kept for the exact fallback when `k` is a large part of the key set.
    exact: BruteForce,
    dim: usize,
    ef_search: usize,
}

impl HnswRetriever {
    /// Searches with an explicit candidate width `ef`, for sweeps. An `ef` below `k` is a
    /// budgeted walk: it returns only the best `ef` keys it found (the low-scan end of a sweep).
    pub fn search_ef(&self, query: &[f32], k: usize, ef: usize) -> Result<SearchResult> {
        check_query(query, self.dim)?;
        let n = self.len();
        let k = k.min(n);
        // A graph walk that must return half the keys scans about all of them anyway.
        if 2 * k >= n {
            return Ok(SearchResult {
                positions: exact_top_k(self.exact.keys(), query, k),
                scanned: n,
            });
        }
        let mut augmented = Vec::with_capacity(self.dim + 1);
        augmented.extend_from_slice(query);
        augmented.push(0.0);
        let before = evals_now();
        let want = k.min(ef.max(1));
        let found = self.graph.search(&augmented, want, ef.max(want));
        let scanned = (evals_now() - before) as usize;
        Ok(SearchResult {
            positions: found.iter().map(|n| n.d_id as u32).collect(),
            scanned,
        })
    }
}

impl Retriever for HnswRetriever {
    type Config = HnswConfig;

    fn build(input: BuildInput<'_>, config: &HnswConfig) -> Result<Self> {
        input.validate()?;
        if config.max_connections == 0 || config.max_connections > 256 {
            return Err(invalid("max_connections", "must be in 1..=256"));
        }
        if config.ef_construction == 0 || config.ef_search == 0 {
            return Err(invalid(
                "ef",
                "ef_construction and ef_search must be positive",
            ));
        }
        let keys: MatrixView<'_> = input.keys;
        let n = keys.rows();
        let norms: Vec<f32> = (0..n).map(|i| norm(keys.row(i))).collect();
        let max_norm = norms.iter().copied().fold(0.0f32, f32::max);
        let graph = Hnsw::new(
            config.max_connections,
            n,
            16,
            config.ef_construction,
            CountingL2,
        );
        let mut augmented = vec![0.0f32; keys.dim() + 1];
        // Sequential inserts keep the graph independent of thread scheduling; callers build
        // many (layer, head) graphs in parallel instead.
        for (i, row_norm) in norms.iter().enumerate() {
            augmented[..keys.dim()].copy_from_slice(keys.row(i));
            augmented[keys.dim()] = (max_norm * max_norm - row_norm * row_norm).max(0.0).sqrt();
            graph.insert_slice((&augmented, i));
        }
        let mut graph = graph;
        graph.set_searching_mode(true);
        Ok(HnswRetriever {
            graph,
            exact: BruteForce::build(input, &())?,
            dim: keys.dim(),
            ef_search: config.ef_search,
        })
    }

    fn search(&self, query: &[f32], k: usize) -> Result<SearchResult> {
        self.search_ef(query, k, self.ef_search.max(k))
    }

    fn len(&self) -> usize {
        self.exact.len()
    }

    fn dim(&self) -> usize {
        self.dim
    }
}
