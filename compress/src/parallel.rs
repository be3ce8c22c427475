//! Encoding and decoding many chunks in parallel on rayon's pool.
//!
//! Codecs are CPU-bound (xKV chunks take tens of milliseconds), so callers on an async runtime
//! hand a batch to a blocking thread that calls these; rayon spreads the chunks over cores.
//! Results keep the input order, one `Result` per chunk, so one corrupt chunk does not hide the
//! others.

use rayon::prelude::*;

use crate::codec::{Codec, decode_any};
use crate::error::Result;
use crate::xkv::{XkvBasis, xkv_decode, xkv_encode};

/// Encodes every chunk with `codec`, in parallel.
pub fn encode_many(codec: &dyn Codec, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>>> {
    chunks.par_iter().map(|c| codec.encode(c)).collect()
}

/// Decodes every container by its own codec id, in parallel (not xKV: see [`xkv_decode_many`]).
pub fn decode_many(encoded: &[&[u8]]) -> Vec<Result<Vec<u8>>> {
    encoded
        .par_iter()
        .map(|e| decode_any(e).map(|(_, raw)| raw))
        .collect()
}

/// Encodes `(start_pos, chunk)` pairs against one basis, in parallel.
pub fn xkv_encode_many(basis: &XkvBasis, chunks: &[(u64, &[u8])]) -> Vec<Result<Vec<u8>>> {
    chunks
        .par_iter()
        .map(|(pos, c)| xkv_encode(basis, *pos, c))
        .collect()
}

/// Decodes xKV chunks against one basis, in parallel.
pub fn xkv_decode_many(basis: &XkvBasis, encoded: &[&[u8]]) -> Vec<Result<Vec<u8>>> {
    encoded
        .par_iter()
        .map(|e| {
            let mut out = Vec::new();
            xkv_decode(basis, e, &mut out).map(|_| out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lossless::PlanesLz4;

    #[test]
    fn many_round_trip_in_order() {
        let chunks: Vec<Vec<u8>> = (0..9u8)
            .map(|i| (0..1000u32).map(|j| (j as u8).wrapping_mul(i)).collect())
            .collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let enc: Vec<Vec<u8>> = encode_many(
            &PlanesLz4 {
                elem_size: 2,
                xor_stride: 10,
                bitshuffle: true,
            },
            &refs,
        )
        .into_iter()
        .collect::<Result<_>>()
        .unwrap();
        let mut enc_refs: Vec<&[u8]> = enc.iter().map(|c| c.as_slice()).collect();
        let bad = [0u8; 40];
        enc_refs.push(&bad);
        let dec = decode_many(&enc_refs);
        assert!(dec.last().unwrap().is_err());
        for (d, c) in dec.iter().zip(&chunks) {
            assert_eq!(d.as_ref().unwrap(), c);
        }
    }
}
