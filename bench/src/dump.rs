//! The real-KV dump format of DESIGN.md: a safetensors file with `k`, `k_prerope`, `v`
//! (`[layers, kv_heads, tokens, head_dim]`), `q` (`[layers, heads, tokens, head_dim]`), all f16,
//! `layer_cos` (`[layers]`, f32), `token_ids` (`[tokens]`, i32) and string metadata `model`,
//! `arch`, `rope_base`, `layers`, `heads`, `kv_heads`, `head_dim`.
//!
//! In memory every tensor is held as f32 for evaluation code; writing converts back to f16.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use half::f16;
use kvtier_cache::Dtype;
use kvtier_cache::chunk::to_f32;
use kvtier_index::MatrixView;
use safetensors::tensor::{Dtype as StDtype, TensorView};

/// A loaded (or to-be-written) KV dump. Tensors are row-major f32.
#[derive(Debug, Clone)]
pub struct KvDump {
    pub model: String,
    pub arch: String,
    pub rope_base: f32,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
    /// `[layers, kv_heads, tokens, head_dim]`, post-RoPE (rotate-half convention).
    pub k: Vec<f32>,
    /// Same shape as `k`, before RoPE.
    pub k_prerope: Vec<f32>,
    /// Same shape as `k`.
    pub v: Vec<f32>,
    /// `[layers, heads, tokens, head_dim]`, post-RoPE.
    pub q: Vec<f32>,
    /// `[layers]`: cosine similarity of the residual stream before and after attention.
    pub layer_cos: Vec<f32>,
    /// `[tokens]`.
    pub token_ids: Vec<i32>,
}

impl KvDump {
    /// Offset of row `(layer, kv_head, token)` in `k`, `k_prerope` or `v`.
    pub fn kv_index(&self, layer: usize, kv_head: usize, token: usize) -> usize {
        ((layer * self.kv_heads + kv_head) * self.tokens + token) * self.head_dim
    }

    /// Offset of row `(layer, head, token)` in `q`.
    pub fn q_index(&self, layer: usize, head: usize, token: usize) -> usize {
        ((layer * self.heads + head) * self.tokens + token) * self.head_dim
    }

    /// The `[tokens, head_dim]` key matrix of one (layer, kv_head).
    pub fn k_rows(&self, layer: usize, kv_head: usize) -> &[f32] {
        let s = self.kv_index(layer, kv_head, 0);
        &self.k[s..s + self.tokens * self.head_dim]
    }

    /// The `[tokens, head_dim]` value matrix of one (layer, kv_head).
    pub fn v_rows(&self, layer: usize, kv_head: usize) -> &[f32] {
        let s = self.kv_index(layer, kv_head, 0);
        &self.v[s..s + self.tokens * self.head_dim]
    }

    /// The `[tokens, head_dim]` query matrix of one (layer, head).
    pub fn q_rows(&self, layer: usize, head: usize) -> &[f32] {
        let s = self.q_index(layer, head, 0);
        &self.q[s..s + self.tokens * self.head_dim]
    }

    /// The key and value matrices of one (layer, kv_head) as views for the index crate.
    pub fn kv_views(
        &self,
        layer: usize,
        kv_head: usize,
    ) -> Result<(MatrixView<'_>, MatrixView<'_>)> {
        Ok((
            MatrixView::new(self.k_rows(layer, kv_head), self.head_dim)?,
            MatrixView::new(self.v_rows(layer, kv_head), self.head_dim)?,
        ))
    }

    /// The query row of (layer, head) at `token`.
    pub fn q_row(&self, layer: usize, head: usize, token: usize) -> &[f32] {
        &self.q_rows(layer, head)[token * self.head_dim..(token + 1) * self.head_dim]
    }

    /// KV head used by query head `h` (grouped-query attention).
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// Reads a dump, checking every shape against the metadata.
    pub fn load(path: &Path) -> Result<KvDump> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading KV dump {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .with_context(|| format!("dump metadata lacks {k:?}"))
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse::<usize>()
                .with_context(|| format!("metadata {k:?} is not a number"))
        };
        let layers = num("layers")?;
        let heads = num("heads")?;
        let kv_heads = num("kv_heads")?;
        let head_dim = num("head_dim")?;
        ensure!(
            kv_heads > 0 && heads % kv_heads == 0,
            "heads {heads} is not a multiple of kv_heads {kv_heads}"
        );
        let token_ids = read_i32(&st, "token_ids")?;
        let tokens = token_ids.len();
        let kv_shape = [layers, kv_heads, tokens, head_dim];
        let q_shape = [layers, heads, tokens, head_dim];
        Ok(KvDump {
            model: get("model")?,
            arch: get("arch")?,
            rope_base: get("rope_base")?
                .parse()
                .context("metadata rope_base is not a number")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            tokens,
            k: read_f32(&st, "k", &kv_shape)?,
            k_prerope: read_f32(&st, "k_prerope", &kv_shape)?,
            v: read_f32(&st, "v", &kv_shape)?,
            q: read_f32(&st, "q", &q_shape)?,
            layer_cos: read_f32(&st, "layer_cos", &[layers])?,
            token_ids,
        })
    }

    /// Writes the dump (f16 tensors, f32 `layer_cos`, i32 `token_ids`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let kv_shape = vec![self.layers, self.kv_heads, self.tokens, self.head_dim];
        let q_shape = vec![self.layers, self.heads, self.tokens, self.head_dim];
        let to_f16 = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let buffers: Vec<(&str, StDtype, Vec<usize>, Vec<u8>)> = vec![
            ("k", StDtype::F16, kv_shape.clone(), to_f16(&self.k)),
            (
                "k_prerope",
                StDtype::F16,
                kv_shape.clone(),
                to_f16(&self.k_prerope),
            ),
            ("v", StDtype::F16, kv_shape, to_f16(&self.v)),
            ("q", StDtype::F16, q_shape, to_f16(&self.q)),
            (
                "layer_cos",
                StDtype::F32,
                vec![self.layers],
                self.layer_cos
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            (
                "token_ids",
                StDtype::I32,
                vec![self.tokens],
                self.token_ids
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        ];
        let views: Vec<(&str, TensorView<'_>)> = buffers
            .iter()
            .map(|(n, d, s, b)| Ok((*n, TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [
            ("model", self.model.clone()),
            ("arch", self.arch.clone()),
            ("rope_base", self.rope_base.to_string()),
            ("layers", self.layers.to_string()),
            ("heads", self.heads.to_string()),
            ("kv_heads", self.kv_heads.to_string()),
            ("head_dim", self.head_dim.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize_to_file(views, Some(meta), path)
            .with_context(|| format!("writing KV dump {}", path.display()))?;
        Ok(())
    }
}

fn read_f32(st: &safetensors::SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("dump lacks tensor {name:?}"))?;
    ensure!(
        t.shape() == shape,
        "tensor {name:?} has shape {:?}, expected {shape:?}",
        t.shape()
    );
    let data = t.data();
    let dtype = match t.dtype() {
        StDtype::F16 => Dtype::F16,
        StDtype::BF16 => Dtype::Bf16,
        StDtype::F32 => Dtype::F32,
        other => bail!("tensor {name:?} has dtype {other:?}; expected f16, bf16 or f32"),
    };
    Ok(to_f32(dtype, data))
}

fn read_i32(st: &safetensors::SafeTensors<'_>, name: &str) -> Result<Vec<i32>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("dump lacks tensor {name:?}"))?;
    ensure!(
        t.dtype() == StDtype::I32 && t.shape().len() == 1,
        "tensor {name:?} must be a 1-D i32 tensor"
    );
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let (l, h, kvh, t, d) = (2, 4, 2, 5, 8);
        let n = l * kvh * t * d;
        let dump = KvDump {
            model: "m".into(),
            arch: "llama".into(),
            rope_base: 100000.0,
            layers: l,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            tokens: t,
            k: (0..n).map(|i| i as f32 * 0.5).collect(),
            k_prerope: (0..n).map(|i| -(i as f32)).collect(),
            v: (0..n).map(|i| (i % 7) as f32).collect(),
            q: (0..l * h * t * d).map(|i| (i % 11) as f32 * 0.25).collect(),
            layer_cos: vec![0.5, 0.9],
            token_ids: vec![1, 2, 3, 4, 5],
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        dump.save(&p).unwrap();
        let back = KvDump::load(&p).unwrap();
        assert_eq!(back.k, dump.k);
        assert_eq!(back.q, dump.q);
        assert_eq!(back.layer_cos, dump.layer_cos);
        assert_eq!(back.token_ids, dump.token_ids);
        assert_eq!(back.rope_base, 100000.0);
        assert_eq!(back.kv_head_of(3), 1);
        assert_eq!(
            &back.k_rows(1, 1)[..2],
            &dump.k[dump.kv_index(1, 1, 0)..][..2]
        );
    }

    #[test]
    fn wrong_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"not a safetensors file").unwrap();
        assert!(KvDump::load(&p).is_err());
    }
}
