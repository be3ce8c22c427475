//! The chunk's vocabulary: where layer L's K and V rows for token t and head h sit in a raw
//! chunk payload, and their values as f32.
//!
//! A raw payload is layer-major (DESIGN.md "Chunk"):
//! - MHA/GQA: `[layer][K|V][token][kv_head][head_dim]`: two planes per layer;
//! - MLA: `[layer][token][latent_dim + rope_dim]`: one plane per layer, one "head" per token.
//!
//! [`PayloadLayout`] is that geometry for a chunk of a given number of tokens, in elements and
//! bytes; [`ChunkView`] pairs it with a payload. For MLA the latent row is both the K and the V
//! row (K and V are up-projected from it), so [`PayloadLayout::k_row`] and
//! [`PayloadLayout::v_row`] answer the same range there. [`to_f32`] widens rows of every
//! [`Dtype`].

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::{CacheError, Result};
use crate::layout::{AttentionKind, Dtype, ModelLayout};

/// Plane index of the keys (the latent plane for MLA).
pub const K: usize = 0;
/// Plane index of the values (MHA only; MLA has one plane).
pub const V: usize = 1;

/// The geometry of one raw chunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLayout {
    layers: usize,
    /// Planes per layer: 2 (K, V) for MHA, 1 (latent) for MLA.
    planes: usize,
    /// Heads per token row: KV heads for MHA, 1 for MLA.
    heads: usize,
    /// Elements per head: `head_dim`, or `latent_dim + rope_dim` for MLA.
    head_dim: usize,
    tokens: usize,
    dtype: Dtype,
}

impl PayloadLayout {
    /// The payload of a chunk of `tokens` tokens of `layout`.
    pub fn new(layout: &ModelLayout, tokens: usize) -> Self {
        let (planes, heads, head_dim) = match layout.attention {
            AttentionKind::Mha => (2, layout.kv_heads as usize, layout.head_dim as usize),
            AttentionKind::Mla {
                latent_dim,
                rope_dim,
            } => (1, 1, (latent_dim + rope_dim) as usize),
        };
        PayloadLayout {
            layers: layout.num_layers as usize,
            planes,
            heads,
            head_dim,
            tokens,
            dtype: layout.dtype,
        }
    }

    /// An MHA payload given by its dimensions (as a codec's container records them).
    pub fn mha(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        tokens: usize,
        dtype: Dtype,
    ) -> Self {
        PayloadLayout {
            layers,
            planes: 2,
            heads: kv_heads,
            head_dim,
            tokens,
            dtype,
        }
    }

    /// The payload of `len` bytes under `layout`: the token count is derived from the length.
    /// Refuses invalid layouts and lengths that are not a whole, non-zero number of tokens.
    pub fn for_len(layout: &ModelLayout, len: usize) -> Result<Self> {
        layout.validate()?;
        let per_token = layout.bytes_per_token();
        if len == 0 || !len.is_multiple_of(per_token) {
            return Err(CacheError::NotWholeTokens { len, per_token });
        }
        Ok(Self::new(layout, len / per_token))
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Planes per layer: 2 (K then V) for MHA, 1 for MLA.
    pub fn planes(&self) -> usize {
        self.planes
    }

    /// Heads per token row (KV heads; 1 for MLA).
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Elements of one head's row (`head_dim`; `latent_dim + rope_dim` for MLA).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Elements of one token's row in one plane, every head together.
    pub fn row_elems(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Elements of one plane of one layer: `tokens × row_elems`.
    pub fn plane_elems(&self) -> usize {
        self.tokens * self.row_elems()
    }

    /// Elements of one layer, every plane together.
    pub fn layer_elems(&self) -> usize {
        self.planes * self.plane_elems()
    }

    /// Elements of the whole payload.
    pub fn elems(&self) -> usize {
        self.layers * self.layer_elems()
    }

    /// Bytes of the whole payload.
    pub fn len(&self) -> usize {
        self.elems() * self.dtype.size()
    }

    /// Whether the payload has no bytes (a chunk of zero tokens).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element offset of `plane` of `layer`.
    pub fn plane_start(&self, layer: usize, plane: usize) -> usize {
        (layer * self.planes + plane) * self.plane_elems()
    }

    /// Element offset of the row of (`layer`, `plane`, `token`, `head`).
    pub fn row_start(&self, layer: usize, plane: usize, token: usize, head: usize) -> usize {
        self.plane_start(layer, plane) + token * self.row_elems() + head * self.head_dim
    }

    fn bytes(&self, elems: Range<usize>) -> Range<usize> {
        let s = self.dtype.size();
        elems.start * s..elems.end * s
    }

    /// Byte range of `layer`.
    pub fn layer_range(&self, layer: usize) -> Range<usize> {
        let start = layer * self.layer_elems();
        self.bytes(start..start + self.layer_elems())
    }

    /// Byte range of `plane` ([`K`] or [`V`]) of `layer`.
    pub fn plane_range(&self, layer: usize, plane: usize) -> Range<usize> {
        let start = self.plane_start(layer, plane);
        self.bytes(start..start + self.plane_elems())
    }

    /// Byte range of `token`'s row in `plane` of `layer`, every head together.
    pub fn token_row(&self, layer: usize, plane: usize, token: usize) -> Range<usize> {
        let start = self.row_start(layer, plane, token, 0);
        self.bytes(start..start + self.row_elems())
    }

    /// Byte range of the K row of (`layer`, `token`, `head`); for MLA the latent row (head 0).
    pub fn k_row(&self, layer: usize, token: usize, head: usize) -> Range<usize> {
        self.head_row(layer, K, token, head)
    }

    /// Byte range of the V row of (`layer`, `token`, `head`); for MLA the latent row (head 0).
    pub fn v_row(&self, layer: usize, token: usize, head: usize) -> Range<usize> {
        self.head_row(layer, V.min(self.planes - 1), token, head)
    }

    fn head_row(&self, layer: usize, plane: usize, token: usize, head: usize) -> Range<usize> {
        let start = self.row_start(layer, plane, token, head);
        self.bytes(start..start + self.head_dim)
    }

    /// This geometry over `payload`, which must be exactly [`PayloadLayout::len`] bytes.
    pub fn view<'a>(&self, payload: &'a [u8]) -> Result<ChunkView<'a>> {
        if payload.len() != self.len() {
            return Err(CacheError::LengthMismatch {
                expected: self.len() as u64,
                got: payload.len() as u64,
            });
        }
        Ok(ChunkView {
            layout: *self,
            payload,
        })
    }
}

/// A raw chunk payload read through its [`PayloadLayout`].
#[derive(Debug, Clone, Copy)]
pub struct ChunkView<'a> {
    layout: PayloadLayout,
    payload: &'a [u8],
}

impl<'a> ChunkView<'a> {
    /// A view of `payload`, a raw chunk of `tokens` tokens of `layout`.
    pub fn new(layout: &ModelLayout, tokens: usize, payload: &'a [u8]) -> Result<Self> {
        PayloadLayout::new(layout, tokens).view(payload)
    }

    pub fn layout(&self) -> &PayloadLayout {
        &self.layout
    }

    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The K row of (`layer`, `token`, `head`) in the payload's dtype.
    pub fn k(&self, layer: usize, token: usize, head: usize) -> &'a [u8] {
        &self.payload[self.layout.k_row(layer, token, head)]
    }

    /// The V row of (`layer`, `token`, `head`) in the payload's dtype.
    pub fn v(&self, layer: usize, token: usize, head: usize) -> &'a [u8] {
        &self.payload[self.layout.v_row(layer, token, head)]
    }

    /// `[tokens × head_dim]` f32 keys of one (`layer`, `head`).
    pub fn keys_f32(&self, layer: usize, head: usize) -> Vec<f32> {
        self.gather_f32(|t| self.k(layer, t, head))
    }

    /// `[tokens × head_dim]` f32 values of one (`layer`, `head`).
    pub fn values_f32(&self, layer: usize, head: usize) -> Vec<f32> {
        self.gather_f32(|t| self.v(layer, t, head))
    }

    fn gather_f32(&self, row: impl Fn(usize) -> &'a [u8]) -> Vec<f32> {
        let l = &self.layout;
        let mut raw = Vec::with_capacity(l.tokens * l.head_dim * l.dtype.size());
        for t in 0..l.tokens {
            raw.extend_from_slice(row(t));
        }
        to_f32(l.dtype, &raw)
    }
}

/// Elements converted per batch by the 16-bit paths: `half`'s slice conversions use the CPU's
/// conversion instructions (F16C) on whole blocks, where converting element by element pays a
/// feature check and a call per value (they were the largest cost of quantised and xKV codecs).
const BATCH: usize = 4096;

/// Widens little-endian `dtype` elements to f32 (exactly: every dtype's values are f32 values).
pub fn to_f32(dtype: Dtype, raw: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => widen16::<f16>(raw),
        Dtype::Bf16 => widen16::<bf16>(raw),
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::Fp8E4m3 => raw.iter().map(|b| e4m3_to_f32(*b)).collect(),
    }
}

/// A 16-bit float type `half` converts in bulk.
trait Half16: Copy + Default + bytemuck::Pod
where
    [Self]: HalfFloatSliceExt,
{
}
impl Half16 for f16 {}
impl Half16 for bf16 {}

fn widen16<H: Half16>(raw: &[u8]) -> Vec<f32>
where
    [H]: HalfFloatSliceExt,
{
    let n = raw.len() / 2;
    let mut out = vec![0f32; n];
    let mut halves = vec![H::default(); BATCH.min(n)];
    for (src, dst) in raw.chunks(2 * BATCH).zip(out.chunks_mut(BATCH)) {
        let h = &mut halves[..dst.len()];
        for (x, b) in h.iter_mut().zip(src.chunks_exact(2)) {
            *x = bytemuck::cast(u16::from_le_bytes([b[0], b[1]]));
        }
        h.convert_to_f32_slice(dst);
    }
    out
}

/// The value of an OCP FP8 E4M3 byte (no infinities; `S.1111.111` is NaN).
pub fn e4m3_to_f32(b: u8) -> f32 {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let (e, m) = ((i >> 3) & 0xf, (i & 7) as f32);
            let mag = match (e, i & 7) {
                (15, 7) => f32::NAN,
                (0, _) => m * 2f32.powi(-9),
                _ => (1.0 + m / 8.0) * 2f32.powi(e as i32 - 7),
            };
            *v = if i & 0x80 != 0 { -mag } else { mag };
        }
        t
    })[b as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload whose every element is its own element index (exact in f32).
    fn indexed_f32(len_elems: usize) -> Vec<u8> {
        (0..len_elems)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect()
    }

    fn elem(row: &[u8]) -> Vec<f32> {
        to_f32(Dtype::F32, row)
    }

    #[test]
    fn mha_rows_sit_at_layer_plane_token_head() {
        // 2 layers, 3 KV heads, head_dim 4, 5 tokens.
        let layout = ModelLayout::mha("m", 2, 3, 4, Dtype::F32);
        let p = PayloadLayout::new(&layout, 5);
        assert_eq!((p.planes(), p.row_elems(), p.plane_elems()), (2, 12, 60));
        assert_eq!(p.len(), layout.chunk_bytes(5));
        let payload = indexed_f32(p.elems());
        let v = p.view(&payload).unwrap();
        // Layer 1, token 2, head 1: K at ((1·2 + 0)·5 + 2)·12 + 1·4, V one plane later.
        assert_eq!(elem(v.k(1, 2, 1)), vec![148.0, 149.0, 150.0, 151.0]);
        assert_eq!(elem(v.v(1, 2, 1)), vec![208.0, 209.0, 210.0, 211.0]);
        assert_eq!(p.plane_range(1, V), 4 * 180..4 * 240);
        assert_eq!(p.token_row(0, K, 1), 4 * 12..4 * 24);
        assert_eq!(p.layer_range(1), layout.layer_range(1, 1, 5).unwrap());
        let keys = v.keys_f32(0, 2);
        assert_eq!(keys.len(), 5 * 4);
        assert_eq!(&keys[4..8], &[20.0, 21.0, 22.0, 23.0]);
        assert_eq!(&v.values_f32(0, 0)[..2], &[60.0, 61.0]);
    }

    #[test]
    fn mla_has_one_latent_row_per_token_serving_as_k_and_v() {
        let layout = ModelLayout::mla("m", 3, 6, 2, Dtype::F32);
        let p = PayloadLayout::new(&layout, 4);
        assert_eq!((p.planes(), p.heads(), p.head_dim()), (1, 1, 8));
        assert_eq!(p.len(), layout.chunk_bytes(4));
        let payload = indexed_f32(p.elems());
        let v = p.view(&payload).unwrap();
        // Layer 2, token 3: element (2·4 + 3)·8.
        assert_eq!(elem(v.k(2, 3, 0))[0], 88.0);
        assert_eq!(v.k(2, 3, 0), v.v(2, 3, 0));
        assert_eq!(p.plane_range(1, K), p.layer_range(1));
    }

    #[test]
    fn lengths_are_checked() {
        let layout = ModelLayout::mha("m", 2, 1, 2, Dtype::F16);
        let per_token = layout.bytes_per_token();
        assert_eq!(
            PayloadLayout::for_len(&layout, 3 * per_token)
                .unwrap()
                .tokens(),
            3
        );
        for bad in [0, per_token + 2] {
            assert!(matches!(
                PayloadLayout::for_len(&layout, bad),
                Err(CacheError::NotWholeTokens { .. })
            ));
        }
        assert!(matches!(
            ChunkView::new(&layout, 3, &[0u8; 7]),
            Err(CacheError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn conversions_to_f32_are_exact_for_every_dtype() {
        let f16s: Vec<u8> = [1.5f32, -0.25, 65504.0]
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::F16, &f16s), vec![1.5, -0.25, 65504.0]);
        let bf16s: Vec<u8> = [3.0f32, -1e30]
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect();
        assert_eq!(
            to_f32(Dtype::Bf16, &bf16s),
            vec![3.0, bf16::from_f32(-1e30).to_f32()]
        );
        assert_eq!(to_f32(Dtype::F32, &0.1f32.to_le_bytes()), vec![0.1]);
        // E4M3: 1.0 = 0.0111.000, 448 = 0.1111.110, the smallest subnormal 2^-9, -2.
        assert_eq!(
            to_f32(Dtype::Fp8E4m3, &[0x38, 0x7e, 0x01, 0xc0]),
            vec![1.0, 448.0, 2f32.powi(-9), -2.0]
        );
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        // The batched 16-bit path agrees with element-wise conversion past one batch.
        let many: Vec<u8> = (0..2 * BATCH as u16 + 3)
            .flat_map(|i| (i ^ 0x3c00).to_le_bytes())
            .collect();
        let want: Vec<f32> = many
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let got = to_f32(Dtype::F16, &many);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
