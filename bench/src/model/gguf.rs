//! A small reader for GGUF v2/v3 files (llama.cpp's model format): header, metadata key/values of
//! every value type (arrays included), tensor infos, the aligned data section, and dequantisation
//! to f32 of the tensor types the project's model uses (F32, F16, Q4_0, Q4_1, Q8_0).
//!
//! Only what a CPU forward pass needs: the whole file is read into memory once and every tensor
//! is dequantised at load, so the forward pass runs on plain row-major f32.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use half::f16;

const MAGIC: &[u8; 4] = b"GGUF";
/// Default alignment of the data section when `general.alignment` is absent (GGUF spec).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Sanity bounds so a corrupt header fails with a message instead of a huge allocation.
const MAX_COUNT: u64 = 1 << 24;
const MAX_STRING: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

/// One metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer value that fits a `u64` (GGUF writers differ in the integer width they pick).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Tensor element types (ggml_type ids) this reader can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl TensorType {
    fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => TensorType::F32,
            1 => TensorType::F16,
            2 => TensorType::Q4_0,
            3 => TensorType::Q4_1,
            8 => TensorType::Q8_0,
            other => bail!("unsupported ggml tensor type {other}"),
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 => (1, 2),
            // f16 scale + 16 bytes of nibbles.
            TensorType::Q4_0 => (32, 18),
            // f16 scale + f16 min + 16 bytes of nibbles.
            TensorType::Q4_1 => (32, 20),
            // f16 scale + 32 signed bytes.
            TensorType::Q8_0 => (32, 34),
        }
    }
}

/// Where one tensor lies in the file. `dims[0]` is the fastest-varying dimension (ggml order), so
/// a 2-D weight with `dims = [in, out]` is row-major `[out][in]`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Absolute byte offset in the file.
    pub offset: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    fn byte_len(&self) -> Result<usize> {
        let (per_block, bytes) = self.ty.block();
        let n = self.elements();
        ensure!(
            n.is_multiple_of(per_block),
            "tensor {} has {n} elements, not a multiple of its block of {per_block}",
            self.name
        );
        Ok(n / per_block * bytes)
    }
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    /// Format version (2 or 3, checked on parse); only the tests read it back.
    #[allow(dead_code)]
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    bytes: Vec<u8>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading GGUF file {}", path.display()))?;
        Self::parse(bytes).with_context(|| format!("parsing GGUF file {}", path.display()))
    }

    pub fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        ensure!(r.take(4)? == MAGIC, "bad magic: not a GGUF file");
        let version = r.u32()?;
        ensure!(
            version == 2 || version == 3,
            "unsupported GGUF version {version} (expected 2 or 3)"
        );
        let n_tensors = r.count()?;
        let n_kv = r.count()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r
                .value(ty)
                .with_context(|| format!("metadata value of {key:?}"))?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            ensure!(
                (1..=MAX_DIMS).contains(&n_dims),
                "tensor {name:?} has {n_dims} dimensions"
            );
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ty = TensorType::from_id(r.u32()?).with_context(|| format!("tensor {name:?}"))?;
            let rel = r.u64()?;
            infos.push((name, dims, ty, rel));
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().context("general.alignment is not an integer")?,
            None => DEFAULT_ALIGNMENT,
        };
        ensure!(
            alignment > 0 && alignment.is_power_of_two(),
            "alignment {alignment} is not a power of two"
        );
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        for (name, dims, ty, rel) in infos {
            ensure!(
                rel % alignment == 0,
                "tensor {name:?} offset {rel} is not aligned to {alignment}"
            );
            let info = TensorInfo {
                name: name.clone(),
                dims,
                ty,
                offset: (data_start + rel) as usize,
            };
            let end = info
                .offset
                .checked_add(info.byte_len()?)
                .context("tensor offset overflows")?;
            ensure!(
                end <= bytes.len(),
                "tensor {name:?} ends at byte {end}, past the end of the file ({})",
                bytes.len()
            );
            tensors.insert(name, info);
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    pub fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .with_context(|| format!("GGUF metadata lacks {key:?}"))
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)?
            .as_u64()
            .with_context(|| format!("GGUF metadata {key:?} is not an integer"))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)?
            .as_f64()
            .with_context(|| format!("GGUF metadata {key:?} is not a number"))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?
            .as_str()
            .with_context(|| format!("GGUF metadata {key:?} is not a string"))
    }

    /// A string array (tokens, merges).
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .meta(key)?
            .as_array()
            .with_context(|| format!("GGUF metadata {key:?} is not an array"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .with_context(|| format!("GGUF metadata {key:?} holds a non-string"))
            })
            .collect()
    }

    /// An integer array (token types).
    pub fn meta_ints(&self, key: &str) -> Result<Vec<i64>> {
        let arr = self
            .meta(key)?
            .as_array()
            .with_context(|| format!("GGUF metadata {key:?} is not an array"))?;
        arr.iter()
            .map(|v| match *v {
                Value::I32(x) => Ok(x.into()),
                Value::I64(x) => Ok(x),
                _ => v
                    .as_u64()
                    .map(|x| x as i64)
                    .with_context(|| format!("GGUF metadata {key:?} holds a non-integer")),
            })
            .collect()
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .with_context(|| format!("GGUF file lacks tensor {name:?}"))
    }

    /// Dequantises a tensor to row-major f32, checking its dims (ggml order: fastest first).
    pub fn tensor_f32(&self, name: &str, dims: &[u64]) -> Result<Vec<f32>> {
        let info = self.tensor_info(name)?;
        ensure!(
            info.dims == dims,
            "tensor {name:?} has dims {:?}, expected {dims:?}",
            info.dims
        );
        let raw = &self.bytes[info.offset..info.offset + info.byte_len()?];
        Ok(dequantize(info.ty, raw, info.elements()))
    }
}

/// Dequantises `n` elements of type `ty` from `raw` (ggml block layouts).
pub fn dequantize(ty: TensorType, raw: &[u8], n: usize) -> Vec<f32> {
    let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut out = Vec::with_capacity(n);
    match ty {
        TensorType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        TensorType::F16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        // Q4 blocks store element j in the low nibble of byte j and element j + 16 in its high nibble.
        TensorType::Q4_0 => {
            for b in raw.chunks_exact(18) {
                let d = half_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        TensorType::Q4_1 => {
            for b in raw.chunks_exact(20) {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
        }
        TensorType::Q8_0 => {
            for b in raw.chunks_exact(34) {
                let d = half_at(b, 0);
                out.extend(b[2..34].iter().map(|q| (*q as i8) as f32 * d));
            }
        }
    }
    debug_assert_eq!(out.len(), n);
    out
}

/// Little-endian cursor over the file with bounds checks on every read.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).context("length overflow")?;
        ensure!(
            end <= self.buf.len(),
            "unexpected end of file at byte {} (wanted {n} more)",
            self.pos
        );
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self) -> Result<u64> {
        let n = self.u64()?;
        ensure!(n <= MAX_COUNT, "count {n} is implausibly large");
        Ok(n)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        ensure!(n <= MAX_STRING, "string length {n} is implausibly large");
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).context("string is not UTF-8")
    }

    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool byte {b} is neither 0 nor 1"),
            },
            8 => Value::Str(self.string()?),
            9 => {
                let elem_ty = self.u32()?;
                ensure!(elem_ty != 9, "nested arrays are not supported");
                let n = self.count()?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny GGUF v3 file in memory: two metadata keys (one an array) and one Q8_0 and one
    /// Q4_1 tensor, so the parser and both dequantisers are checked against hand-computed values.
    fn tiny_file() -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kvs
        s(&mut b, "a.count");
        b.extend(4u32.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        s(&mut b, "a.list");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "x");
        s(&mut b, "yz");
        s(&mut b, "q8");
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        s(&mut b, "q41");
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        // Q8_0: scale 0.5, q = -16..16.
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        b.resize(b.len() + 30, 0); // pad to the next 32-byte tensor offset (64)
        // Q4_1: scale 2, min -1, byte j = low nibble j%16, high nibble 15 - j%16.
        b.extend(f16::from_f32(2.0).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        b
    }

    #[test]
    fn parses_metadata_and_dequantises() {
        let g = GgufFile::parse(tiny_file()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.meta_u64("a.count").unwrap(), 7);
        assert_eq!(g.meta_strings("a.list").unwrap(), vec!["x", "yz"]);
        let q8 = g.tensor_f32("q8", &[32]).unwrap();
        assert_eq!(
            q8,
            (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect::<Vec<_>>()
        );
        let q41 = g.tensor_f32("q41", &[32]).unwrap();
        assert_eq!(q41[3], 3.0 * 2.0 - 1.0);
        assert_eq!(q41[16 + 3], 12.0 * 2.0 - 1.0);
        assert!(
            g.tensor_f32("q8", &[16, 2]).is_err(),
            "wrong dims must be refused"
        );
    }

    #[test]
    fn corrupt_files_are_refused() {
        let mut bad = tiny_file();
        bad[0] = b'X';
        assert!(GgufFile::parse(bad).is_err());
        let mut v9 = tiny_file();
        v9[4] = 9;
        assert!(GgufFile::parse(v9).is_err());
        let truncated = tiny_file()[..100].to_vec();
        assert!(GgufFile::parse(truncated).is_err());
    }
}
