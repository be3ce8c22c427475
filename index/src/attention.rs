//! Attention over part of the context, and the exact merge of partial results.
//!
//! Sparse decoding attends to two disjoint sets: the static tokens (attention sinks and the
//! recent window), always kept, and the tokens a retriever returned. Each part is reduced to
//! `(max score, Σ exp(score − max), Σ exp(score − max)·v)`; two parts merge by rescaling to the
//! larger max (log-sum-exp), which is exactly softmax attention over their union, with no
//! overflow however large the scores are.

use crate::matrix::{MatrixView, dot};

/// Softmax attention restricted to a set of positions, not yet normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnPartial {
    /// Largest scaled score in the part (`-inf` when empty).
    pub max: f32,
    /// `Σ exp(score − max)` over the part.
    pub sum_exp: f32,
    /// `Σ exp(score − max) · v` over the part.
    pub weighted_v: Vec<f32>,
}

impl AttnPartial {
    /// The neutral element of [`merge`](Self::merge): attention over no tokens.
    pub fn empty(dim: usize) -> Self {
        AttnPartial {
            max: f32::NEG_INFINITY,
            sum_exp: 0.0,
            weighted_v: vec![0.0; dim],
        }
    }

    /// Attention of `query` over the rows `positions` of `keys`/`values`, scores scaled by
    /// `scale` (usually `1/sqrt(head_dim)`).
    pub fn over(
        query: &[f32],
        keys: MatrixView<'_>,
        values: MatrixView<'_>,
        positions: impl IntoIterator<Item = usize>,
        scale: f32,
    ) -> Self {
        let positions: Vec<usize> = positions.into_iter().collect();
        let scores: Vec<f32> = positions
            .iter()
            .map(|&p| dot(keys.row(p), query) * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut out = AttnPartial::empty(values.dim());
        if positions.is_empty() {
            return out;
        }
        out.max = max;
        for (&p, &s) in positions.iter().zip(&scores) {
            let w = (s - max).exp();
            out.sum_exp += w;
            for (o, v) in out.weighted_v.iter_mut().zip(values.row(p)) {
                *o += w * v;
            }
        }
        out
    }

    /// Attention over the union of two disjoint parts.
    pub fn merge(&self, other: &AttnPartial) -> AttnPartial {
        // An empty part has max -inf; rescaling by exp(-inf - -inf) would give NaN.
        if other.sum_exp == 0.0 {
            return self.clone();
        }
        if self.sum_exp == 0.0 {
            return other.clone();
        }
        let max = self.max.max(other.max);
        let (a, b) = ((self.max - max).exp(), (other.max - max).exp());
        AttnPartial {
            max,
            sum_exp: self.sum_exp * a + other.sum_exp * b,
            weighted_v: self
                .weighted_v
                .iter()
                .zip(&other.weighted_v)
                .map(|(x, y)| x * a + y * b)
                .collect(),
        }
    }

    /// The normalised attention output (zeros for an empty part).
    pub fn output(&self) -> Vec<f32> {
        if self.sum_exp == 0.0 {
            return self.weighted_v.clone();
        }
        self.weighted_v.iter().map(|x| x / self.sum_exp).collect()
    }
}

/// Full causal attention of a query at context length `context` (positions `0..context`).
pub fn full_attention(
    query: &[f32],
    keys: MatrixView<'_>,
    values: MatrixView<'_>,
    context: usize,
    scale: f32,
) -> Vec<f32> {
    AttnPartial::over(query, keys, values, 0..context, scale).output()
}

/// The tokens a sparse decoder always attends to: the first `sinks` tokens (attention sinks)
/// and the last `window` tokens before and including the query position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticTokens {
    pub sinks: usize,
    pub window: usize,
}

impl StaticTokens {
    /// Whether `pos` is static for a context of `context` tokens.
    pub fn contains(&self, pos: usize, context: usize) -> bool {
        pos < self.sinks.min(context) || pos + self.window >= context && pos < context
    }

    /// The static positions of a context of `context` tokens, ascending, without repeats.
    pub fn positions(&self, context: usize) -> Vec<usize> {
        (0..context)
            .filter(|&p| self.contains(p, context))
            .collect::<Vec<_>>()
    }

    /// Static tokens plus `retrieved` positions (static ones, repeats and positions outside the
    /// context dropped), merged by log-sum-exp: the sparse decoder's attention output.
    pub fn attend(
        &self,
        query: &[f32],
        keys: MatrixView<'_>,
        values: MatrixView<'_>,
        context: usize,
        retrieved: &[u32],
        scale: f32,
    ) -> Vec<f32> {
        let fixed = AttnPartial::over(query, keys, values, self.positions(context), scale);
        let mut dynamic: Vec<usize> = retrieved
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| p < context && !self.contains(p, context))
            .collect();
        dynamic.sort_unstable();
        dynamic.dedup();
        fixed
            .merge(&AttnPartial::over(query, keys, values, dynamic, scale))
            .output()
    }
}

/// `|approx − exact| / |exact|` in L2 (absolute error when `exact` is zero).
pub fn relative_error(approx: &[f32], exact: &[f32]) -> f64 {
    let diff: f64 = approx
        .iter()
        .zip(exact)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let base: f64 = exact
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    if base == 0.0 { diff } else { diff / base }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, d: usize, seed: u32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let f = |i: usize, s: f32| ((i as f32 + seed as f32) * s).sin() * 3.0;
        (
            (0..n * d).map(|i| f(i, 0.37)).collect(),
            (0..n * d).map(|i| f(i, 0.91)).collect(),
            (0..d).map(|i| f(i, 1.7)).collect(),
        )
    }

    #[test]
    fn retrieving_every_key_reproduces_full_attention() {
        let (n, d) = (300, 16);
        let (k, v, q) = data(n, d, 1);
        let (km, vm) = (
            MatrixView::new(&k, d).unwrap(),
            MatrixView::new(&v, d).unwrap(),
        );
        let scale = 1.0 / (d as f32).sqrt();
        for context in [1, 5, 64, n] {
            let full = full_attention(&q, km, vm, context, scale);
            let every: Vec<u32> = (0..n as u32).rev().collect();
            let stat = StaticTokens {
                sinks: 4,
                window: 16,
            };
            let merged = stat.attend(&q, km, vm, context, &every, scale);
            assert!(relative_error(&merged, &full) < 1e-5, "context {context}");
            // Only static tokens: strictly an approximation once the context exceeds them.
            let sparse = stat.attend(&q, km, vm, context, &[], scale);
            if context > 20 {
                assert!(relative_error(&sparse, &full) > 1e-3);
            }
        }
    }

    #[test]
    fn huge_scores_do_not_overflow() {
        let d = 4;
        let k = vec![100.0f32; 2 * d];
        let v = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let (km, vm) = (
            MatrixView::new(&k, d).unwrap(),
            MatrixView::new(&v, d).unwrap(),
        );
        let q = [100.0f32; 4];
        let a = AttnPartial::over(&q, km, vm, [0], 1.0);
        let b = AttnPartial::over(&q, km, vm, [1], 1.0);
        assert_eq!(a.merge(&b).output(), vec![3.0, 4.0, 5.0, 6.0]);
        assert_eq!(AttnPartial::empty(d).merge(&a), a);
        assert_eq!(a.merge(&AttnPartial::empty(d)), a);
    }

    #[test]
    fn static_set_covers_sinks_and_window_once() {
        let s = StaticTokens {
            sinks: 4,
            window: 3,
        };
        assert_eq!(s.positions(10), vec![0, 1, 2, 3, 7, 8, 9]);
        assert_eq!(s.positions(5), vec![0, 1, 2, 3, 4]);
        assert!(!s.contains(10, 10));
    }

    proptest! {
        #[test]
        fn any_split_merges_to_full_attention(mask in proptest::collection::vec(0u8..3, 1..80), seed in 0u32..1000) {
            let n = mask.len();
            let d = 8;
            let (k, v, q) = data(n, d, seed);
            let (km, vm) = (MatrixView::new(&k, d).unwrap(), MatrixView::new(&v, d).unwrap());
            let parts: Vec<AttnPartial> = (0..3u8)
                .map(|c| AttnPartial::over(&q, km, vm, (0..n).filter(|&i| mask[i] == c), 0.5))
                .collect();
            let merged = parts[2].merge(&parts[0].merge(&parts[1]));
            let full = full_attention(&q, km, vm, n, 0.5);
            // The output is a convex combination of value rows, so measure the error against
            // their scale: relative to the output itself it blows up when the rows cancel
            // (seed 383 gave 1.5e-4 of a near-zero output). 1e-4 of the largest row is f32
            // noise over ~80 terms; a wrong rescale is off by O(1) of it.
            let out = merged.output();
            let diff = out.iter().zip(&full).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
            let scale = (0..n).map(|i| crate::matrix::norm(vm.row(i))).fold(0.0, f32::max);
            prop_assert!(diff <= 1e-4 * scale, "error {diff} against value rows of norm {scale}");
        }
    }
}
