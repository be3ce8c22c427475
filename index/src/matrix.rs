//! Row-major f32 matrix views and the inner-product kernels every index shares.
//!
//! The kernels are written as fixed-width chunked loops with independent accumulators so
//! that LLVM vectorises them without `unsafe` or target-specific intrinsics (a single running
//! sum would serialise on the add latency and stay scalar).

use crate::error::{IndexError, Result};

/// Lanes per accumulator block: 16 f32 fill two AVX or four SSE registers.
const LANES: usize = 16;

/// A borrowed `[rows × dim]` row-major matrix (keys or queries of one head).
#[derive(Debug, Clone, Copy)]
pub struct MatrixView<'a> {
    data: &'a [f32],
    dim: usize,
}

impl<'a> MatrixView<'a> {
    /// Wraps a flat buffer; fails when it is not a whole number of rows.
    pub fn new(data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(IndexError::RaggedMatrix {
                len: data.len(),
                dim,
            });
        }
        Ok(MatrixView { data, dim })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The underlying flat buffer.
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }

    /// The first `rows` rows (a prefix of the token axis).
    pub fn prefix(&self, rows: usize) -> MatrixView<'a> {
        MatrixView {
            data: &self.data[..rows.min(self.rows()) * self.dim],
            dim: self.dim,
        }
    }

    /// Fails on NaN or infinite entries, which would poison every ordering downstream.
    pub fn check_finite(&self, what: &'static str) -> Result<()> {
        if self.data.iter().all(|x| x.is_finite()) {
            Ok(())
        } else {
            Err(IndexError::NonFinite(what))
        }
    }
}

/// Inner product of two equal-length vectors.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() - a.len() % LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Squared Euclidean distance of two equal-length vectors.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() - a.len() % LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail += (x - y) * (x - y);
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[i] = query · keys[i]` for every key row.
pub fn scores_into(keys: MatrixView<'_>, query: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend((0..keys.rows()).map(|i| dot(keys.row(i), query)));
}

/// Scores of four queries against every key at once: each key row is loaded once for four
/// dot products, which roughly halves memory traffic when building from many queries.
pub fn scores4_into(keys: MatrixView<'_>, q: [&[f32]; 4], out: &mut [Vec<f32>; 4]) {
    for o in out.iter_mut() {
        o.clear();
    }
    let d = keys.dim();
    let full = d - d % LANES;
    for i in 0..keys.rows() {
        let k = keys.row(i);
        let mut acc = [[0.0f32; LANES]; 4];
        for c in (0..full).step_by(LANES) {
            let kc = &k[c..c + LANES];
            for (j, a) in acc.iter_mut().enumerate() {
                let qc = &q[j][c..c + LANES];
                for l in 0..LANES {
                    a[l] += qc[l] * kc[l];
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let tail: f32 = k[full..]
                .iter()
                .zip(&q[j][full..])
                .map(|(x, y)| x * y)
                .sum();
            out[j].push(a.iter().sum::<f32>() + tail);
        }
    }
}

/// Euclidean norm.
pub fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn kernels_match_naive_for_every_tail_length() {
        for d in [1usize, 7, 16, 17, 33, 64, 65] {
            let a: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
            assert!((dot(&a, &b) - naive(&a, &b)).abs() < 1e-4, "dot d={d}");
            let l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
            assert!((l2_squared(&a, &b) - l2).abs() < 1e-4, "l2 d={d}");
            let keys: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.05).sin()).collect();
            let m = MatrixView::new(&keys, d).unwrap();
            let mut out: [Vec<f32>; 4] = Default::default();
            scores4_into(m, [&a, &b, &a, &b], &mut out);
            let mut single = Vec::new();
            scores_into(m, &b, &mut single);
            for r in 0..5 {
                assert!((out[1][r] - single[r]).abs() < 1e-4);
                assert!((out[0][r] - naive(m.row(r), &a)).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn ragged_buffers_are_refused() {
        assert_eq!(
            MatrixView::new(&[1.0; 10], 3).unwrap_err(),
            IndexError::RaggedMatrix { len: 10, dim: 3 }
        );
        assert!(MatrixView::new(&[1.0; 10], 0).is_err());
        let bad = [1.0, f32::NAN];
        assert_eq!(
            MatrixView::new(&bad, 2).unwrap().check_finite("keys"),
            Err(IndexError::NonFinite("keys"))
        );
    }
}
