//! The Llama forward pass in f32: RMSNorm, GQA attention with rotate-half RoPE against the KV
//! cache, SwiGLU FFN, tied (or separate) output head.
//!
//! Prefill is batched: up to [`PREFILL_CHUNK`] new tokens go through each layer at once, so every
//! projection is one matrix product (faer, multi-threaded) and attention is two products per
//! head against the whole cache. Longer inputs are processed chunk after chunk against the
//! growing cache, which keeps the score matrix of one head at `chunk × cache` floats.

use anyhow::{Result, ensure};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{Block, KvCache, Model};

/// New tokens per batched step. 512 keeps one head's scores at 512 × 8192 × 4 B = 16 MiB.
pub const PREFILL_CHUNK: usize = 512;

/// What one layer computed for the tokens of one step, handed to a [`LayerObserver`].
pub struct LayerTrace<'a> {
    pub layer: usize,
    /// Position of the first token of this step.
    pub first_pos: usize,
    pub tokens: usize,
    /// `[tokens][heads][head_dim]`, post-RoPE.
    pub q: &'a [f32],
    /// `[tokens][kv_heads][head_dim]`, before RoPE.
    pub k_prerope: &'a [f32],
    /// `[tokens][kv_heads][head_dim]`, post-RoPE.
    pub k: &'a [f32],
    /// `[tokens][kv_heads][head_dim]`.
    pub v: &'a [f32],
    /// `[tokens]`: cosine similarity of the residual stream before the attention block and after
    /// its output is added (SqueezeAttention's layer importance signal).
    pub residual_cos: &'a [f32],
}

/// Receives every layer's activations during a forward pass (the KV capture uses it).
pub trait LayerObserver {
    fn observe(&mut self, trace: &LayerTrace<'_>);
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[tokens][vocab]`: one row per new token (perplexity, checks).
    All,
    /// `[vocab]`: the last token only (generation); skips most of the output head.
    Last,
}

/// `out[m×n] = a[m×k] · w[n×k]ᵀ`, all row-major: a batch of rows through a `[out][in]` weight.
fn matmul_wt(out: &mut [f32], a: &[f32], w: &[f32], m: usize, k: usize, n: usize, par: Par) {
    debug_assert_eq!((a.len(), w.len(), out.len()), (m * k, n * k, m * n));
    matmul(
        MatMut::from_row_major_slice_mut(out, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        MatRef::from_row_major_slice(w, n, k).transpose(),
        1.0f32,
        par,
    );
}

fn linear(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    matmul_wt(&mut out, a, w, m, k, n, Par::rayon(0));
    out
}

/// Row-wise RMSNorm: `x / sqrt(mean(x²) + eps) * weight`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = vec![0.0; x.len()];
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
    out
}

/// Rotate-half RoPE in place on `[tokens][n_heads][head_dim]`: dimension `i` pairs with
/// `i + head_dim/2`, angle `pos · base^(-2i/head_dim)`. Angles in f64 so long positions keep
/// full f32 accuracy in cos/sin.
pub fn apply_rope(x: &mut [f32], first_pos: usize, n_heads: usize, head_dim: usize, base: f32) {
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| (base as f64).powf(-2.0 * i as f64 / head_dim as f64))
        .collect();
    for (t, tok) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
        let pos = (first_pos + t) as f64;
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| ((pos * f).cos() as f32, (pos * f).sin() as f32))
            .unzip();
        for head in tok.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// Reborrows an optional observer for one call. `as_deref_mut` cannot: `&mut` is invariant, so
/// the trait object's lifetime must be shortened explicitly with a coercion.
fn reborrow<'a>(o: &'a mut Option<&mut dyn LayerObserver>) -> Option<&'a mut dyn LayerObserver> {
    match o {
        Some(o) => Some(&mut **o),
        None => None,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64) * (*x as f64);
        bb += (*y as f64) * (*y as f64);
    }
    (ab / (aa.sqrt() * bb.sqrt()).max(1e-30)) as f32
}

impl Model {
    /// Runs `tokens` after the cache's contents, appends their K/V to it, and returns logits.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        self.forward_observed(tokens, cache, which, None)
    }

    /// [`Model::forward`] with an observer that sees every layer's Q/K/V of every step.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        mut observer: Option<&mut dyn LayerObserver>,
    ) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "forward needs at least one token");
        let c = &self.config;
        ensure!(
            cache.num_layers() == c.layers
                && cache.kv_heads == c.kv_heads
                && cache.head_dim == c.head_dim,
            "KV cache shape does not match the model"
        );
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= c.vocab) {
            anyhow::bail!("token id {bad} is outside the vocabulary ({})", c.vocab);
        }
        let mut logits = Vec::new();
        let steps = tokens.len().div_ceil(PREFILL_CHUNK);
        for (s, step) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let hidden = self.step(step, cache, reborrow(&mut observer));
            match which {
                Logits::All => logits.extend(self.head(&hidden, step.len())),
                Logits::Last if s + 1 == steps => {
                    logits = self.head(&hidden[(step.len() - 1) * c.hidden..], 1)
                }
                Logits::Last => {}
            }
        }
        Ok(logits)
    }

    /// Final norm and output projection of `n` hidden rows.
    fn head(&self, hidden: &[f32], n: usize) -> Vec<f32> {
        let c = &self.config;
        let normed = rms_norm(hidden, &self.output_norm, c.rms_eps);
        let w = self.output.as_deref().unwrap_or(&self.token_embd);
        linear(&normed, w, n, c.hidden, c.vocab)
    }

    /// One batched step through every layer; returns the last layer's residual stream.
    fn step(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mut observer: Option<&mut dyn LayerObserver>,
    ) -> Vec<f32> {
        let c = &self.config;
        let n = tokens.len();
        let mut x: Vec<f32> = Vec::with_capacity(n * c.hidden);
        for &t in tokens {
            x.extend_from_slice(&self.token_embd[t as usize * c.hidden..][..c.hidden]);
        }
        let first_pos = cache.len();
        for (l, block) in self.blocks.iter().enumerate() {
            self.layer(
                l,
                block,
                &mut x,
                n,
                first_pos,
                cache,
                reborrow(&mut observer),
            );
        }
        cache.commit(n);
        x
    }

    fn layer(
        &self,
        l: usize,
        b: &Block,
        x: &mut [f32],
        n: usize,
        first_pos: usize,
        cache: &mut KvCache,
        observer: Option<&mut dyn LayerObserver>,
    ) {
        let c = &self.config;
        let (h, hd, kvd) = (c.hidden, c.head_dim, c.kv_heads * c.head_dim);
        let normed = rms_norm(x, &b.attn_norm, c.rms_eps);
        let mut q = linear(&normed, &b.wq, n, h, c.heads * hd);
        let k_prerope = linear(&normed, &b.wk, n, h, kvd);
        let v = linear(&normed, &b.wv, n, h, kvd);
        let mut k = k_prerope.clone();
        apply_rope(&mut q, first_pos, c.heads, hd, c.rope_base);
        apply_rope(&mut k, first_pos, c.kv_heads, hd, c.rope_base);
        cache.push_layer(l, &k, &v);

        let attn = self.attention(&q, cache.layer(l), n, first_pos);
        let o = linear(&attn, &b.wo, n, c.heads * hd, h);
        if let Some(obs) = observer {
            let residual_cos: Vec<f32> = x
                .chunks_exact(h)
                .zip(o.chunks_exact(h))
                .map(|(xr, or)| {
                    let after: Vec<f32> = xr.iter().zip(or).map(|(a, b)| a + b).collect();
                    cosine(xr, &after)
                })
                .collect();
            obs.observe(&LayerTrace {
                layer: l,
                first_pos,
                tokens: n,
                q: &q,
                k_prerope: &k_prerope,
                k: &k,
                v: &v,
                residual_cos: &residual_cos,
            });
        }
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }

        let normed = rms_norm(x, &b.ffn_norm, c.rms_eps);
        let mut gate = linear(&normed, &b.w_gate, n, h, c.ffn);
        let up = linear(&normed, &b.w_up, n, h, c.ffn);
        // SwiGLU: silu(gate) * up.
        for (g, u) in gate.iter_mut().zip(&up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        let down = linear(&gate, &b.w_down, n, c.ffn, h);
        for (xv, dv) in x.iter_mut().zip(&down) {
            *xv += dv;
        }
    }

    /// Causal GQA attention of `n` new queries (`[n][heads][head_dim]`, positions
    /// `first_pos..first_pos + n`) over the layer's cache, which already holds them.
    /// Returns `[n][heads][head_dim]`.
    fn attention(
        &self,
        q: &[f32],
        kv: &super::kv::LayerKv,
        n: usize,
        first_pos: usize,
    ) -> Vec<f32> {
        let c = &self.config;
        let (hd, heads, kvd) = (c.head_dim, c.heads, c.kv_heads * c.head_dim);
        let total = first_pos + n;
        let group = heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Heads in parallel; each head's two products run single-threaded inside.
        let per_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|head| {
                let g = head / group;
                let qh =
                    MatRef::from_row_major_slice_with_stride(&q[head * hd..], n, hd, heads * hd);
                let kg = MatRef::from_row_major_slice_with_stride(&kv.k[g * hd..], total, hd, kvd);
                let vg = MatRef::from_row_major_slice_with_stride(&kv.v[g * hd..], total, hd, kvd);
                let mut scores = vec![0.0f32; n * total];
                matmul(
                    MatMut::from_row_major_slice_mut(&mut scores, n, total),
                    Accum::Replace,
                    qh,
                    kg.transpose(),
                    scale,
                    Par::Seq,
                );
                for (i, row) in scores.chunks_exact_mut(total).enumerate() {
                    // Query i sits at position first_pos + i and sees keys 0..=first_pos + i.
                    let visible = first_pos + i + 1;
                    let (seen, masked) = row.split_at_mut(visible);
                    if let Some(keep) = &kv.keep {
                        for (s, k) in seen.iter_mut().zip(keep) {
                            if !k {
                                *s = f32::NEG_INFINITY;
                            }
                        }
                    }
                    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for s in seen.iter_mut() {
                        // Scores far below the row's max contribute nothing, and their exp
                        // would be a subnormal float: subnormals take microcode assists on
                        // x86, in the exp and in the P·V product, and slowed long captures
                        // several-fold. e^-60 is far below f32 resolution next to the max's 1.
                        let d = *s - max;
                        *s = if d < -60.0 { 0.0 } else { d.exp() };
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    seen.iter_mut().for_each(|s| *s *= inv);
                    masked.fill(0.0);
                }
                let mut out = vec![0.0f32; n * hd];
                matmul(
                    MatMut::from_row_major_slice_mut(&mut out, n, hd),
                    Accum::Replace,
                    MatRef::from_row_major_slice(&scores, n, total),
                    vg,
                    1.0f32,
                    Par::Seq,
                );
                out
            })
            .collect();
        let mut attn = vec![0.0f32; n * heads * hd];
        for (head, out) in per_head.iter().enumerate() {
            for (i, row) in out.chunks_exact(hd).enumerate() {
                attn[i * heads * hd + head * hd..][..hd].copy_from_slice(row);
            }
        }
        attn
    }
}
