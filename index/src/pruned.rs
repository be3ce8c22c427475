//! The stored form of a pruned chunk: for every layer, the chunk-local positions it keeps and
//! their cache rows (a [`PrunedLayer`] each).
//!
//! Layout (little-endian): magic `KVPR`, version u16, layers u16, chunk tokens u32, then per
//! layer: kept count u32, the kept positions (u32 each), data length u64, the data; last, a
//! CRC32C of everything before it. A pruned chunk cannot be decoded back to the full chunk; a
//! reader that accepts lossy data parses it with [`decode_pruned`] and attends to the kept rows
//! at their positions.

use kvtier_cache::ModelLayout;

use crate::error::{IndexError, Result};
use crate::select::PrunedLayer;

/// Codec id of a pruned chunk in [`kvtier_cache::ChunkMeta::codec`] (from the cache's table).
pub const CODEC_PRUNED: u16 = kvtier_cache::codec_id::PRUNED;

const MAGIC: &[u8; 4] = b"KVPR";
const VERSION: u16 = 1;

/// Serialises the layers of one pruned chunk of `tokens` tokens.
pub fn encode_pruned(tokens: u32, layers: &[PrunedLayer]) -> Vec<u8> {
    let body: usize = layers
        .iter()
        .map(|l| 12 + 4 * l.positions.len() + l.data.len())
        .sum();
    let mut out = Vec::with_capacity(16 + body);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(layers.len() as u16).to_le_bytes());
    out.extend_from_slice(&tokens.to_le_bytes());
    for l in layers {
        out.extend_from_slice(&(l.positions.len() as u32).to_le_bytes());
        for p in &l.positions {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&(l.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&l.data);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn corrupt(msg: impl Into<String>) -> IndexError {
    IndexError::InvalidPositions(format!("pruned chunk: {}", msg.into()))
}

/// A bounds-checked little-endian reader.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| corrupt("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

/// Parses and checks a pruned chunk of `layout`: checksum, version, layer count, positions
/// strictly increasing below the chunk's tokens, and each layer's data exactly its kept rows.
/// Returns the chunk's token count and its layers.
pub fn decode_pruned(layout: &ModelLayout, bytes: &[u8]) -> Result<(u32, Vec<PrunedLayer>)> {
    if bytes.len() < 16 {
        return Err(corrupt("too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut c = Cursor { buf: body, at: 0 };
    if c.take(4)? != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = u16::from_le_bytes(c.take(2)?.try_into().expect("2 bytes"));
    if version != VERSION {
        return Err(corrupt(format!("unsupported version {version}")));
    }
    let layers = u16::from_le_bytes(c.take(2)?.try_into().expect("2 bytes")) as usize;
    if layers != layout.num_layers as usize {
        return Err(corrupt(format!(
            "{layers} layers, the layout has {}",
            layout.num_layers
        )));
    }
    let tokens = c.u32()?;
    // One kept token's rows of one layer, every plane together.
    let row = layout.layer_bytes(1);
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let n = c.u32()? as usize;
        if n > tokens as usize {
            return Err(corrupt(format!("layer {l} keeps {n} of {tokens} tokens")));
        }
        let positions: Vec<u32> = c
            .take(4 * n)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if positions.windows(2).any(|w| w[0] >= w[1])
            || positions.last().is_some_and(|&p| p >= tokens)
        {
            return Err(corrupt(format!(
                "layer {l}: positions out of order or range"
            )));
        }
        let len = u64::from_le_bytes(c.take(8)?.try_into().expect("8 bytes"));
        if len != (n * row) as u64 {
            return Err(corrupt(format!("layer {l}: {len} data bytes for {n} rows")));
        }
        let data = c.take(len as usize)?.to_vec();
        out.push(PrunedLayer { positions, data });
    }
    if c.at != body.len() {
        return Err(corrupt("trailing bytes"));
    }
    Ok((tokens, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::prune_kv;
    use kvtier_cache::Dtype;

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let layout = ModelLayout::mha("t", 3, 2, 4, Dtype::F16);
        let tokens = 8;
        let payload: Vec<u8> = (0..layout.chunk_bytes(tokens))
            .map(|i| (i * 7) as u8)
            .collect();
        let keep = vec![vec![0, 3, 7], vec![], (0..8).collect()];
        let layers = prune_kv(&layout, tokens, &payload, &keep).unwrap();
        let enc = encode_pruned(tokens as u32, &layers);
        let (t, back) = decode_pruned(&layout, &enc).unwrap();
        assert_eq!((t, &back), (tokens as u32, &layers));
        // Every single flipped bit is caught.
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(decode_pruned(&layout, &bad).is_err(), "byte {i}");
        }
        assert!(decode_pruned(&layout, &enc[..enc.len() - 1]).is_err());
        let other = ModelLayout::mha("t", 2, 2, 4, Dtype::F16);
        assert!(decode_pruned(&other, &enc).is_err());
    }
}
