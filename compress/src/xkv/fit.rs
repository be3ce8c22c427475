//! Fitting an xKV basis: gather a span of chunks into one matrix per (layer group, K|V), center
//! it, and eigen-decompose its f64 Gram matrix once; any rank rule is then a truncation.
//!
//! Separating the decomposition ([`XkvFit`]) from the rank choice ([`XkvFit::basis`]) lets a
//! caller (the bench) try 2x, 4x and 8x from one fit instead of three.

use faer::{Mat, Side};
use half::f16;
use kvtier_cache::{Dtype, ModelLayout};
use rayon::prelude::*;

use super::{BasisPart, KvKind, RankRule, RopeTable, XkvBasis, XkvParams};
use crate::error::{CompressError, Result};
use crate::shape::{ChunkShape, check_float_dtype, to_f32};

/// The full decomposition of one (layer group, K|V) matrix.
struct FitPart {
    first_layer: usize,
    layers: usize,
    kind: KvKind,
    mean: Vec<f64>,
    /// Eigenvalues of the centered Gram matrix (squared singular values), largest first.
    eigvals: Vec<f64>,
    /// Matching eigenvectors as columns, `[columns x columns]`.
    eigvecs: Mat<f64>,
}

/// A fitted, not yet truncated xKV decomposition of one span of chunks.
pub struct XkvFit {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: Dtype,
    rope_base: f64,
    group_layers: usize,
    compress_values: bool,
    /// Tokens of the first chunk: the chunk size rank-from-ratio plans for.
    chunk_tokens: usize,
    span: usize,
    parts: Vec<FitPart>,
}

impl XkvFit {
    /// Decomposes `chunks` (`(first token position, raw payload)`) of `layout` in groups of
    /// `group_layers` adjacent layers. Keys are un-RoPE'd with `rope_base` first.
    pub fn new(
        layout: &ModelLayout,
        rope_base: f64,
        chunks: &[(u64, &[u8])],
        group_layers: usize,
        compress_values: bool,
    ) -> Result<XkvFit> {
        check_float_dtype(layout.dtype)?;
        if chunks.is_empty() {
            return Err(CompressError::InvalidParams(
                "an xkv fit needs at least one chunk".into(),
            ));
        }
        if group_layers == 0 || group_layers > layout.num_layers as usize {
            return Err(CompressError::InvalidParams(format!(
                "group of {group_layers} layers"
            )));
        }
        if !layout.head_dim.is_multiple_of(2) || rope_base.is_nan() || rope_base <= 1.0 {
            return Err(CompressError::InvalidParams(
                "rope needs an even head_dim and a base > 1".into(),
            ));
        }
        let shapes = chunks
            .iter()
            .map(|(_, c)| ChunkShape::of(layout, c.len()))
            .collect::<Result<Vec<_>>>()?;
        // Decode every chunk to f32 once, with keys turned back to their pre-RoPE form.
        let decoded: Vec<Vec<f32>> = chunks
            .par_iter()
            .zip(&shapes)
            .map(|((pos, raw), shape)| {
                unrope_keys(shape, rope_base, *pos, to_f32(shape.dtype, raw))
            })
            .collect();
        let layers = layout.num_layers as usize;
        let mut jobs = Vec::new();
        for first in (0..layers).step_by(group_layers) {
            let n = group_layers.min(layers - first);
            jobs.push((first, n, KvKind::Key));
            if compress_values {
                jobs.push((first, n, KvKind::Value));
            }
        }
        let parts = jobs
            .into_par_iter()
            .map(|(first, n, kind)| fit_part(&shapes, &decoded, first, n, kind))
            .collect::<Result<Vec<_>>>()?;
        Ok(XkvFit {
            layers,
            kv_heads: layout.kv_heads as usize,
            head_dim: layout.head_dim as usize,
            dtype: layout.dtype,
            rope_base,
            group_layers,
            compress_values,
            chunk_tokens: shapes[0].tokens,
            span: chunks.len(),
            parts,
        })
    }

    /// Fraction of each part's centered energy kept at the ranks `rule` picks (for reports).
    pub fn energy_kept(&self, rule: RankRule) -> Vec<f64> {
        self.parts
            .iter()
            .map(|p| {
                let k = self.rank_for(p, rule);
                let total: f64 = p.eigvals.iter().sum();
                if total > 0.0 {
                    p.eigvals[..k].iter().sum::<f64>() / total
                } else {
                    1.0
                }
            })
            .collect()
    }

    fn rank_for(&self, part: &FitPart, rule: RankRule) -> usize {
        let cols = part.eigvals.len();
        let k = match rule {
            RankRule::Fixed(k) => k,
            RankRule::Energy(e) => {
                let total: f64 = part.eigvals.iter().sum();
                let mut acc = 0.0;
                part.eigvals
                    .iter()
                    .take_while(|v| {
                        let below = acc < e as f64 * total;
                        acc += **v;
                        below
                    })
                    .count()
            }
            RankRule::Ratio(r) => {
                // Per chunk: T*k f16 rows + k f32 scales, plus 1/span of the basis
                // (cols*k f16 right factor + cols f32 means) against T*cols raw elements.
                let (t, c, s) = (self.chunk_tokens as f64, cols as f64, self.span as f64);
                let raw = t * c * self.dtype.size() as f64;
                let budget = raw / r.max(1.0) as f64 - 4.0 * c / s;
                (budget / (2.0 * t + 4.0 + 2.0 * c / s)).floor().max(1.0) as usize
            }
        };
        k.clamp(1, cols)
    }

    /// Truncates the decomposition to the ranks `rule` picks and packages the basis.
    pub fn basis(&self, rule: RankRule) -> Result<XkvBasis> {
        let parts = self
            .parts
            .iter()
            .map(|p| {
                let k = self.rank_for(p, rule);
                let cols = p.mean.len();
                let mut right = Vec::with_capacity(cols * k);
                for c in 0..cols {
                    // Round to f16 here, as stored, so fit-time and load-time bases are identical.
                    right.extend((0..k).map(|j| f16::from_f64(p.eigvecs[(c, j)]).to_f32()));
                }
                BasisPart {
                    first_layer: p.first_layer,
                    layers: p.layers,
                    kind: p.kind,
                    mean: p.mean.iter().map(|m| *m as f32).collect(),
                    right,
                    rank: k,
                }
            })
            .collect();
        let params = XkvParams {
            group_layers: self.group_layers,
            rank: rule,
            compress_values: self.compress_values,
        };
        Ok(XkvBasis {
            id: 0,
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            rope_base: self.rope_base,
            params,
            parts,
        }
        .seal_id())
    }
}

/// Turns every key block of a decoded chunk back to pre-RoPE (in place) and returns it.
pub(super) fn unrope_keys(
    shape: &ChunkShape,
    base: f64,
    start_pos: u64,
    mut x: Vec<f32>,
) -> Vec<f32> {
    let table = RopeTable::new(base, shape.head_dim, start_pos, shape.tokens);
    for l in 0..shape.layers {
        let o = shape.block_offset(l, 0);
        table.rotate_block(&mut x[o..o + shape.block()], shape.head_dim, false);
    }
    x
}

fn fit_part(
    shapes: &[ChunkShape],
    decoded: &[Vec<f32>],
    first: usize,
    n: usize,
    kind: KvKind,
) -> Result<FitPart> {
    let row = shapes[0].row();
    let cols = n * row;
    let rows: usize = shapes.iter().map(|s| s.tokens).sum();
    let kv = matches!(kind, KvKind::Value) as usize;
    let mut a = Mat::<f64>::zeros(rows, cols);
    let mut r0 = 0;
    for (shape, x) in shapes.iter().zip(decoded) {
        for l in 0..n {
            let block = &x[shape.block_offset(first + l, kv)..][..shape.block()];
            for (t, token_row) in block.chunks_exact(row).enumerate() {
                for (c, v) in token_row.iter().enumerate() {
                    a[(r0 + t, l * row + c)] = *v as f64;
                }
            }
        }
        r0 += shape.tokens;
    }
    let mean: Vec<f64> = (0..cols)
        .map(|c| a.col(c).iter().sum::<f64>() / rows as f64)
        .collect();
    for (c, m) in mean.iter().enumerate() {
        a.col_mut(c).iter_mut().for_each(|v| *v -= m);
    }
    let (eigvals, eigvecs) = right_singular(&a)?;
    Ok(FitPart {
        first_layer: first,
        layers: n,
        kind,
        mean,
        eigvals,
        eigvecs,
    })
}

/// Squared singular values (largest first) and right singular vectors (as columns) of `a`, from
/// the eigen-decomposition of its f64 Gram matrix.
pub(super) fn right_singular(a: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>)> {
    let cols = a.ncols();
    let gram = a.transpose() * a;
    let evd = gram
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| CompressError::Linalg(format!("{e:?}")))?;
    // faer returns eigenvalues in nondecreasing order; the basis wants the largest first.
    let s = evd.S().column_vector();
    let u = evd.U();
    let eigvals = (0..cols).rev().map(|i| s[i].max(0.0)).collect();
    let eigvecs = Mat::from_fn(cols, cols, |r, j| u[(r, cols - 1 - j)]);
    Ok((eigvals, eigvecs))
}
