//! Exact top-k by inner product: the ground truth every approximate index is measured
//! against, and the fallback when an approximate search would scan most keys anyway.

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::error::Result;
use crate::matrix::{MatrixView, dot, scores_into, scores4_into};
use crate::retriever::{BuildInput, Retriever, SearchResult, check_query};

/// Key count above which one query's scan is split into parallel key blocks; below it the
/// rayon hand-off costs more than the scan.
const PARALLEL_KEYS: usize = 32 * 1024;
/// Keys per parallel block.
const KEY_BLOCK: usize = 8 * 1024;

/// Orders (score, position) best first: higher score, then lower position, so results are
/// deterministic when scores tie.
#[inline]
pub(crate) fn best_first(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Positions of the `k` largest scores, best first (ties: lower position first).
pub fn top_k_of_scores(scores: &[f32], k: usize) -> Vec<u32> {
    top_k_pairs(scores.iter().copied().zip(0u32..).collect(), k)
        .into_iter()
        .map(|p| p.1)
        .collect()
}

/// The `k` best (score, position) pairs, best first; consumes the candidate list.
pub(crate) fn top_k_pairs(mut pairs: Vec<(f32, u32)>, k: usize) -> Vec<(f32, u32)> {
    let k = k.min(pairs.len());
    if k == 0 {
        return Vec::new();
    }
    if k < pairs.len() {
        pairs.select_nth_unstable_by(k - 1, |a, b| best_first(*a, *b));
        pairs.truncate(k);
    }
    pairs.sort_unstable_by(|a, b| best_first(*a, *b));
    pairs
}

/// Exact top-k keys for one query, with key blocks scanned in parallel for long contexts.
pub fn exact_top_k(keys: MatrixView<'_>, query: &[f32], k: usize) -> Vec<u32> {
    let n = keys.rows();
    if n < PARALLEL_KEYS {
        let mut scores = Vec::with_capacity(n);
        scores_into(keys, query, &mut scores);
        return top_k_of_scores(&scores, k);
    }
    // Each block keeps its own top-k; the global top-k is among their union.
    let partial: Vec<(f32, u32)> = (0..n.div_ceil(KEY_BLOCK))
        .into_par_iter()
        .flat_map_iter(|b| {
            let lo = b * KEY_BLOCK;
            let hi = (lo + KEY_BLOCK).min(n);
            let pairs = (lo..hi)
                .map(|i| (dot(keys.row(i), query), i as u32))
                .collect();
            top_k_pairs(pairs, k)
        })
        .collect();
    top_k_pairs(partial, k).into_iter().map(|p| p.1).collect()
}

/// Exact top-k keys for every query row, parallel over groups of four queries (each key row is
/// loaded once per group).
pub fn exact_top_k_batch(keys: MatrixView<'_>, queries: MatrixView<'_>, k: usize) -> Vec<Vec<u32>> {
    let m = queries.rows();
    let groups: Vec<usize> = (0..m).step_by(4).collect();
    groups
        .into_par_iter()
        .map_init(<[Vec<f32>; 4]>::default, |buf, start| {
            let rows: Vec<usize> = (start..(start + 4).min(m)).collect();
            // Pad a short last group by repeating its first query; the extra lists are dropped.
            let q = [0, 1, 2, 3].map(|j| queries.row(rows[j.min(rows.len() - 1)]));
            scores4_into(keys, q, buf);
            rows.iter()
                .enumerate()
                .map(|(j, _)| top_k_of_scores(&buf[j], k))
                .collect::<Vec<_>>()
        })
        .flatten()
        .collect()
}

/// Brute force as a [`Retriever`]: scans every key, recall 1 by construction.
pub struct BruteForce {
    keys: Vec<f32>,
    dim: usize,
}

impl BruteForce {
    /// The indexed keys.
    pub fn keys(&self) -> MatrixView<'_> {
        MatrixView::new(&self.keys, self.dim).expect("validated at build")
    }
}

impl Retriever for BruteForce {
    type Config = ();

    fn build(input: BuildInput<'_>, _config: &()) -> Result<Self> {
        input.validate()?;
        Ok(BruteForce {
            keys: input.keys.as_slice().to_vec(),
            dim: input.keys.dim(),
        })
    }

    fn search(&self, query: &[f32], k: usize) -> Result<SearchResult> {
        check_query(query, self.dim)?;
        Ok(SearchResult {
            positions: exact_top_k(self.keys(), query, k),
            scanned: self.len(),
        })
    }

    fn len(&self) -> usize {
        self.keys.len() / self.dim
    }

    fn dim(&self) -> usize {
        self.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_break_towards_lower_positions() {
        assert_eq!(
            top_k_of_scores(&[1.0, 3.0, 3.0, 2.0, 3.0], 3),
            vec![1, 2, 4]
        );
        assert_eq!(top_k_of_scores(&[1.0, 2.0], 5), vec![1, 0]);
        assert!(top_k_of_scores(&[1.0], 0).is_empty());
    }

    #[test]
    fn blocked_and_batched_paths_agree_with_the_simple_scan() {
        let d = 8;
        let n = PARALLEL_KEYS + 1234;
        let keys: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let km = MatrixView::new(&keys, d).unwrap();
        let queries: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let qm = MatrixView::new(&queries, d).unwrap();
        let batch = exact_top_k_batch(km, qm, 10);
        assert_eq!(batch.len(), 5);
        for (i, got) in batch.iter().enumerate() {
            let mut s = Vec::new();
            scores_into(km, qm.row(i), &mut s);
            let want = top_k_of_scores(&s, 10);
            assert_eq!(got, &want);
            assert_eq!(exact_top_k(km, qm.row(i), 10), want);
        }
    }
}
