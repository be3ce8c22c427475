//! Synthetic chunks shaped like real KV, for tests: a low-rank structure shared across layers,
//! per-channel offsets on keys (the outlier channels KIVI targets), noise, and RoPE applied to
//! keys at the chunk's positions, so codecs see post-RoPE keys as in real payloads.

use kvtier_cache::{Dtype, ModelLayout};

use crate::shape::{ChunkShape, from_f32};
use crate::xkv::RopeTable;

/// Deterministic xorshift generator (tests need reproducible data, not a rand dependency).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

pub fn small_layout(dtype: Dtype) -> ModelLayout {
    ModelLayout::mha("test", 6, 2, 16, dtype)
}

/// Consecutive chunks of one synthetic prompt: `(start_pos, payload)` with rank-`rank` structure
/// (plus 1% noise) shared by all layers.
pub fn synthetic_prompt(
    layout: &ModelLayout,
    chunks: usize,
    tokens: usize,
    rank: usize,
    seed: u64,
) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    let row = (layout.kv_heads * layout.head_dim) as usize;
    let layers = layout.num_layers as usize;
    // Mixing matrices: one shared direction set, perturbed per layer so layers are similar but
    // not identical.
    let shared: Vec<f32> = (0..rank * row).map(|_| rng.uniform()).collect();
    let mix: Vec<Vec<f32>> = (0..layers * 2)
        .map(|_| shared.iter().map(|s| s + 0.2 * rng.uniform()).collect())
        .collect();
    let offsets: Vec<f32> = (0..row)
        .map(|c| if c % 7 == 0 { 6.0 } else { 0.3 * rng.uniform() })
        .collect();
    (0..chunks)
        .map(|ci| {
            let start = (ci * tokens) as u64;
            let shape = ChunkShape::of(layout, layout.chunk_bytes(tokens)).expect("valid layout");
            let mut x = vec![0f32; shape.elems()];
            let latent: Vec<f32> = (0..tokens * rank).map(|_| rng.uniform()).collect();
            for l in 0..layers {
                for kv in 0..2 {
                    let m = &mix[l * 2 + kv];
                    let block = &mut x[shape.block_offset(l, kv)..][..shape.block()];
                    for t in 0..tokens {
                        for c in 0..row {
                            let v: f32 = (0..rank)
                                .map(|j| latent[t * rank + j] * m[j * row + c])
                                .sum();
                            let off = if kv == 0 { offsets[c] } else { 0.0 };
                            block[t * row + c] = v + off + 0.01 * rng.uniform();
                        }
                    }
                    if kv == 0 {
                        RopeTable::new(10000.0, shape.head_dim, start, tokens).rotate_block(
                            block,
                            shape.head_dim,
                            true,
                        );
                    }
                }
            }
            let mut raw = Vec::new();
            from_f32(layout.dtype, &x, &mut raw);
            (start, raw)
        })
        .collect()
}
