//! Turning a KV dump into chunk payloads and back, and the error metrics.
//!
//! Payloads follow the chunk layout `[layer][K|V][token][kv_head][head_dim]` in f16; the dump
//! holds `[layer][kv_head][token][head_dim]` f32 (values that were f16 on disk, so the f16
//! payloads are bit-exact copies of the capture).

use half::f16;
use rayon::prelude::*;

use crate::dump::KvDump;

/// Which part of the dump the suite evaluates.
pub struct Scope {
    /// Layers `0..layers` of the dump.
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub chunk_tokens: usize,
    pub chunks: usize,
}

impl Scope {
    pub fn tokens(&self) -> usize {
        self.chunks * self.chunk_tokens
    }
}

/// The f16 chunk payload `c` of `scope` from the post-RoPE keys and the values of `dump`.
pub fn chunk_payload(dump: &KvDump, scope: &Scope, c: usize) -> Vec<u8> {
    let (t0, t1) = (c * scope.chunk_tokens, (c + 1) * scope.chunk_tokens);
    let mut out = Vec::with_capacity(
        scope.layers * 2 * scope.chunk_tokens * scope.kv_heads * scope.head_dim * 2,
    );
    for l in 0..scope.layers {
        for src in [&dump.k, &dump.v] {
            for t in t0..t1 {
                for h in 0..scope.kv_heads {
                    let o = dump.kv_index(l, h, t);
                    for x in &src[o..o + scope.head_dim] {
                        out.extend_from_slice(&f16::from_f32(*x).to_le_bytes());
                    }
                }
            }
        }
    }
    out
}

/// Reconstructed K and V in the dump's `[layer][kv_head][token][head_dim]` order (scope's
/// layers and tokens only).
pub struct KvArrays {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvArrays {
    pub fn index(scope: &Scope, l: usize, h: usize, t: usize) -> usize {
        ((l * scope.kv_heads + h) * scope.tokens() + t) * scope.head_dim
    }

    /// Scatters decoded f16 chunk payloads into dump order.
    pub fn from_chunks(scope: &Scope, chunks: &[Vec<u8>]) -> KvArrays {
        let n = scope.layers * scope.kv_heads * scope.tokens() * scope.head_dim;
        let (mut k, mut v) = (vec![0f32; n], vec![0f32; n]);
        let hd = scope.head_dim;
        for (c, payload) in chunks.iter().enumerate() {
            let mut vals = payload
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32());
            for l in 0..scope.layers {
                for dst in [&mut k, &mut v] {
                    for t in c * scope.chunk_tokens..(c + 1) * scope.chunk_tokens {
                        for h in 0..scope.kv_heads {
                            let o = Self::index(scope, l, h, t);
                            for x in &mut dst[o..o + hd] {
                                *x = vals.next().expect("payload matches scope");
                            }
                        }
                    }
                }
            }
        }
        KvArrays { k, v }
    }
}

/// Relative Frobenius error `||b - a|| / ||a||`.
pub fn rel_frobenius(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Attention outputs `softmax(q·Kᵀ/√d)·V` over the causal context, for every evaluated layer,
/// every query head and every sampled position, concatenated.
pub fn attention_outputs(
    dump: &KvDump,
    scope: &Scope,
    kv: &KvArrays,
    layers: &[usize],
    positions: &[usize],
) -> Vec<f32> {
    let hd = scope.head_dim;
    let jobs: Vec<(usize, usize)> = layers
        .iter()
        .flat_map(|l| (0..dump.heads).map(move |h| (*l, h)))
        .collect();
    let per_job: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|&(l, h)| {
            let kvh = dump.kv_head_of(h);
            let keys = &kv.k[KvArrays::index(scope, l, kvh, 0)..][..scope.tokens() * hd];
            let vals = &kv.v[KvArrays::index(scope, l, kvh, 0)..][..scope.tokens() * hd];
            let mut out = Vec::with_capacity(positions.len() * hd);
            let mut scores = Vec::new();
            for &p in positions {
                let q = &dump.q_rows(l, h)[p * hd..(p + 1) * hd];
                let scale = 1.0 / (hd as f32).sqrt();
                scores.clear();
                scores.extend(
                    keys[..(p + 1) * hd]
                        .chunks_exact(hd)
                        .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale),
                );
                let m = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
                let mut denom = 0f32;
                scores.iter_mut().for_each(|s| {
                    *s = (*s - m).exp();
                    denom += *s;
                });
                let mut o = vec![0f32; hd];
                for (w, v) in scores.iter().zip(vals.chunks_exact(hd)) {
                    o.iter_mut().zip(v).for_each(|(acc, x)| *acc += w * x);
                }
                out.extend(o.iter().map(|x| x / denom));
            }
            out
        })
        .collect();
    per_job.concat()
}
