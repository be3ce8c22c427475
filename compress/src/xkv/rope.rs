//! Rotary position embedding, rotate-half convention (GPT-NeoX / Hugging Face).
//!
//! Dimension `i < head_dim/2` pairs with `i + head_dim/2` and turns by
//! `pos * base^(-2i/head_dim)`. Chunk payloads hold post-RoPE keys, whose low-rank structure is
//! smeared by the position-dependent rotation, so xKV removes RoPE before the SVD and puts it
//! back at the chunk's own positions on decode. Angles are computed in f64: at position 8k the
//! angle is ~8000 rad and f32 would lose ~1e-3 rad of it.

/// cos/sin for every (token, pair) of a run of positions, computed once per chunk and shared by
/// all layers and heads.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(base: f64, head_dim: usize, start_pos: u64, tokens: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| base.powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for t in 0..tokens {
            let pos = (start_pos + t as u64) as f64;
            for f in &inv_freq {
                let (s, c) = (pos * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates one head vector of token `t` by +angle (`apply`) or -angle (undo).
    pub fn rotate(&self, t: usize, head: &mut [f32], apply: bool) {
        let h = self.half;
        let (c, s) = (&self.cos[t * h..(t + 1) * h], &self.sin[t * h..(t + 1) * h]);
        let (lo, hi) = head.split_at_mut(h);
        for i in 0..h {
            let (x, y) = (lo[i], hi[i]);
            let sn = if apply { s[i] } else { -s[i] };
            lo[i] = x * c[i] - y * sn;
            hi[i] = y * c[i] + x * sn;
        }
    }

    /// Rotates every head of a `[tokens][heads][head_dim]` block (row length `heads * head_dim`).
    pub fn rotate_block(&self, block: &mut [f32], head_dim: usize, apply: bool) {
        let tokens = self.cos.len() / self.half.max(1);
        let row = block.len() / tokens.max(1);
        for (t, token_row) in block.chunks_exact_mut(row).enumerate() {
            for head in token_row.chunks_exact_mut(head_dim) {
                self.rotate(t, head, apply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_inverts_apply_and_matches_the_formula() {
        let (d, tokens) = (8, 3);
        let table = RopeTable::new(10000.0, d, 5, tokens);
        let orig: Vec<f32> = (0..tokens * 2 * d)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut x = orig.clone();
        table.rotate_block(&mut x, d, true);
        // Token 1 (position 6), head 1, pair 1: angle 6 * 10000^(-2/8).
        let (t, h, i) = (1, 1, 1);
        let a = 6.0f64 * 10000f64.powf(-2.0 / 8.0);
        let o = (t * 2 + h) * d;
        let want = orig[o + i] as f64 * a.cos() - orig[o + i + d / 2] as f64 * a.sin();
        assert!((x[o + i] as f64 - want).abs() < 1e-5);
        table.rotate_block(&mut x, d, false);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
