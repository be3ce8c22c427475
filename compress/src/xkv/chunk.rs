//! Encoding and decoding one chunk against a fitted [`XkvBasis`].
//!
//! Body, per basis part in basis order: `rank` f32 column scales, then the token-side rows
//! `C / scale` as f16 (`[tokens x rank]`, row-major); then, for a keys-only basis, every layer's
//! raw value block in the payload dtype. Column scaling keeps `C` inside f16's range whatever
//! the magnitude of the keys. Params carry the basis id, the chunk's first position, its shape
//! and the measured relative error that becomes its [`Fidelity`] bound.

use faer::{Mat, MatRef};
use half::f16;
use kvtier_cache::{Dtype, Fidelity};

use super::fit::unrope_keys;
use super::{KvKind, RopeTable, XkvBasis};
use crate::codec::CODEC_XKV;
use crate::container::{self, Container, ParamWriter, Reader};
use crate::error::{CompressError, Result};
use crate::shape::{ChunkShape, from_f32, to_f32};

/// Allowance added to the measured error for the f16 storage of rows and basis (2^-10).
const STORAGE_SLACK: f64 = 1.0 / 1024.0;

fn shape_for(basis: &XkvBasis, raw_len: usize) -> Result<ChunkShape> {
    let layout = kvtier_cache::ModelLayout::mha(
        "xkv",
        basis.layers as u32,
        basis.kv_heads as u32,
        basis.head_dim as u32,
        basis.dtype,
    );
    ChunkShape::of(&layout, raw_len)
}

/// Encodes one chunk whose first token is at `start_pos`, against `basis`.
pub fn xkv_encode(basis: &XkvBasis, start_pos: u64, chunk: &[u8]) -> Result<Vec<u8>> {
    let shape = shape_for(basis, chunk.len())?;
    let x = to_f32(shape.dtype, chunk);
    if x.iter().any(|v| !v.is_finite()) {
        return Err(CompressError::InvalidParams(
            "lossy codecs need finite input".into(),
        ));
    }
    let x = unrope_keys(&shape, basis.rope_base, start_pos, x);
    let (row, t) = (shape.row(), shape.tokens);
    let mut body = Vec::new();
    let (mut energy, mut residual) = (0f64, 0f64);
    for part in &basis.parts {
        let (cols, k) = (part.columns(), part.rank);
        let kv = matches!(part.kind, KvKind::Value) as usize;
        let a = Mat::<f32>::from_fn(t, cols, |tok, c| {
            let (l, ch) = (c / row, c % row);
            x[shape.block_offset(part.first_layer + l, kv) + tok * row + ch] - part.mean[c]
        });
        let w = MatRef::from_row_major_slice(&part.right, cols, k);
        let coeffs = &a * w;
        // W is orthonormal (up to f16 rounding), so the residual energy of the projection is
        // ||A - mean||^2 - ||C||^2: the error is measured without reconstructing.
        let (mut centered, mut kept) = (0f64, 0f64);
        for c in 0..cols {
            for v in a.col(c).iter() {
                centered += (*v as f64).powi(2);
                energy += ((*v + part.mean[c]) as f64).powi(2);
            }
        }
        for j in 0..k {
            kept += coeffs
                .col(j)
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>();
        }
        residual += (centered - kept).max(0.0);
        let scales: Vec<f32> = (0..k)
            .map(|j| coeffs.col(j).iter().fold(0f32, |m, v| m.max(v.abs())))
            .map(|m| if m > 0.0 { m } else { 1.0 })
            .collect();
        scales
            .iter()
            .for_each(|s| body.extend_from_slice(&s.to_le_bytes()));
        for tok in 0..t {
            for (j, s) in scales.iter().enumerate() {
                body.extend_from_slice(&f16::from_f32(coeffs[(tok, j)] / s).to_le_bytes());
            }
        }
    }
    if !basis.params.compress_values {
        let size = shape.dtype.size();
        for l in 0..shape.layers {
            let o = shape.block_offset(l, 1) * size;
            body.extend_from_slice(&chunk[o..o + shape.block() * size]);
        }
    }
    let rel = if energy > 0.0 {
        (residual / energy).sqrt()
    } else {
        0.0
    } + STORAGE_SLACK;
    let params = shape
        .write(ParamWriter::default().u64(basis.id).u64(start_pos))
        .f64(rel)
        .0;
    let mut out = container::begin(CODEC_XKV, &params, body.len());
    out.extend_from_slice(&body);
    Ok(container::finish(out, chunk.len() as u64))
}

struct ChunkParams {
    basis_id: u64,
    start_pos: u64,
    shape: ChunkShape,
    rel_err: f64,
}

fn read_params(c: &Container<'_>) -> Result<ChunkParams> {
    if c.codec != CODEC_XKV {
        return Err(CompressError::CodecMismatch {
            expected: CODEC_XKV,
            found: c.codec,
        });
    }
    let mut r = Reader::new(c.params);
    let (basis_id, start_pos) = (r.u64()?, r.u64()?);
    let shape = ChunkShape::read(&mut r)?;
    let rel_err = r.f64()?;
    r.done()?;
    if shape.raw_len() as u64 != c.raw_len {
        return Err(CompressError::BadLength(
            "raw length disagrees with the shape".into(),
        ));
    }
    Ok(ChunkParams {
        basis_id,
        start_pos,
        shape,
        rel_err,
    })
}

/// The fidelity an xKV chunk declares: lossy, bounded by its measured relative Frobenius error.
pub fn chunk_fidelity(c: &Container<'_>) -> Result<Fidelity> {
    let p = read_params(c)?;
    Ok(Fidelity::Lossy {
        codec: CODEC_XKV,
        error_bound: p.rel_err as f32,
    })
}

/// Decodes an xKV chunk with its basis into `out` (cleared first): post-RoPE keys and values in
/// the original dtype and layout.
pub fn xkv_decode(basis: &XkvBasis, encoded: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let c = container::parse(encoded)?;
    let p = read_params(&c)?;
    if p.basis_id != basis.id {
        return Err(CompressError::BasisMismatch {
            expected: p.basis_id,
            found: basis.id,
        });
    }
    let shape = p.shape;
    if shape != shape_for(basis, shape.raw_len())? {
        return Err(CompressError::LayoutMismatch(
            "chunk shape differs from the basis".into(),
        ));
    }
    let (row, t) = (shape.row(), shape.tokens);
    let mut x = vec![0f32; shape.elems()];
    let mut r = Reader::new(c.body);
    for part in &basis.parts {
        let (cols, k) = (part.columns(), part.rank);
        let kv = matches!(part.kind, KvKind::Value) as usize;
        let scales = to_f32(Dtype::F32, r.take(k * 4)?);
        let rows = r.take(t * k * 2)?;
        let coeffs = Mat::<f32>::from_fn(t, k, |tok, j| {
            let o = (tok * k + j) * 2;
            f16::from_le_bytes([rows[o], rows[o + 1]]).to_f32() * scales[j]
        });
        let w = MatRef::from_row_major_slice(&part.right, cols, k);
        let a = &coeffs * w.transpose();
        for l in 0..part.layers {
            let block = &mut x[shape.block_offset(part.first_layer + l, kv)..][..shape.block()];
            for (tok, token_row) in block.chunks_exact_mut(row).enumerate() {
                for (ch, v) in token_row.iter_mut().enumerate() {
                    *v = a[(tok, l * row + ch)] + part.mean[l * row + ch];
                }
            }
        }
    }
    if !basis.params.compress_values {
        let size = shape.dtype.size();
        for l in 0..shape.layers {
            let raw = r.take(shape.block() * size)?;
            let o = shape.block_offset(l, 1);
            x[o..o + shape.block()].copy_from_slice(&to_f32(shape.dtype, raw));
        }
    }
    r.done()?;
    let table = RopeTable::new(basis.rope_base, shape.head_dim, p.start_pos, t);
    for l in 0..shape.layers {
        let o = shape.block_offset(l, 0);
        table.rotate_block(&mut x[o..o + shape.block()], shape.head_dim, true);
    }
    out.clear();
    from_f32(shape.dtype, &x, out);
    Ok(())
}
