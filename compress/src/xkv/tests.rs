//! xKV tests: full-rank reconstruction, truncation error against the spectrum, the stated
//! bound, keys-only exactness, serialisation and refusal of foreign or corrupt data.

use faer::Mat;
use kvtier_cache::{Dtype, ModelLayout};

use super::fit::right_singular;
use super::*;
use crate::testdata::{Rng, small_layout, synthetic_prompt};
use kvtier_cache::chunk::to_f32;

fn rel_err(layout: &ModelLayout, a: &[u8], b: &[u8]) -> f64 {
    let (x, y) = (to_f32(layout.dtype, a), to_f32(layout.dtype, b));
    let num: f64 = x
        .iter()
        .zip(&y)
        .map(|(p, q)| ((p - q) as f64).powi(2))
        .sum();
    let den: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn refs(prompt: &[(u64, Vec<u8>)]) -> Vec<(u64, &[u8])> {
    prompt.iter().map(|(p, c)| (*p, c.as_slice())).collect()
}

fn round_trip(basis: &XkvBasis, pos: u64, chunk: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let enc = xkv_encode(basis, pos, chunk).unwrap();
    let mut out = Vec::new();
    xkv_decode(basis, &enc, &mut out).unwrap();
    (enc, out)
}

#[test]
fn full_rank_reconstructs_to_float_tolerance() {
    for dtype in [Dtype::F16, Dtype::F32] {
        let layout = small_layout(dtype);
        let prompt = synthetic_prompt(&layout, 3, 48, 5, 7);
        for g in [1, 4] {
            let params = XkvParams {
                group_layers: g,
                rank: RankRule::Fixed(usize::MAX),
                compress_values: true,
            };
            let basis = XkvBasis::fit(&layout, 10000.0, &refs(&prompt), params).unwrap();
            assert!(basis.parts.iter().all(|p| p.rank == p.columns()));
            for (pos, chunk) in &prompt {
                let (_, out) = round_trip(&basis, *pos, chunk);
                // f16 storage of rows and basis: ~2^-11 relative each.
                let e = rel_err(&layout, chunk, &out);
                assert!(e < 2e-3, "{dtype} g={g}: full-rank error {e}");
            }
        }
    }
}

#[test]
fn gram_eigen_matches_thin_svd_in_f64() {
    // Low rank plus noise, the shape FIELD-NOTES found f32 SVD to get wrong.
    let mut rng = Rng::new(11);
    let (m, n, r) = (300, 40, 6);
    let u = Mat::<f64>::from_fn(m, r, |_, _| rng.uniform() as f64);
    let v = Mat::<f64>::from_fn(r, n, |_, _| rng.uniform() as f64);
    let mut a = &u * &v;
    a.col_iter_mut()
        .for_each(|c| c.iter_mut().for_each(|x| *x += 1e-3 * rng.uniform() as f64));
    let (eig, vecs) = right_singular(&a).unwrap();
    let sv = a.singular_values().unwrap();
    for (e, s) in eig.iter().zip(&sv) {
        assert!(
            (e.sqrt() - s).abs() <= 1e-9 * sv[0] + 1e-6 * s,
            "{} vs {s}",
            e.sqrt()
        );
    }
    // Rank-k reconstruction error equals the discarded singular values (Eckart-Young).
    for k in [3, 6, 10] {
        let w = vecs.subcols(0, k);
        let approx = &a * w * w.transpose();
        let err: f64 = (0..m)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| (a[(i, j)] - approx[(i, j)]).powi(2))
            .sum();
        let tail: f64 = sv[k..].iter().map(|s| s * s).sum();
        assert!(
            (err - tail).abs() <= 1e-8 * sv[0] * sv[0],
            "k={k}: {err} vs {tail}"
        );
    }
}

#[test]
fn truncated_rank_error_is_small_and_within_the_stated_bound() {
    let layout = small_layout(Dtype::F16);
    let prompt = synthetic_prompt(&layout, 4, 64, 4, 3);
    // The synthetic data is rank 4 per group (shared latent) plus 1% noise.
    let params = XkvParams {
        group_layers: 4,
        rank: RankRule::Fixed(4),
        compress_values: true,
    };
    let basis = XkvBasis::fit(&layout, 10000.0, &refs(&prompt), params).unwrap();
    for (pos, chunk) in &prompt {
        let (enc, out) = round_trip(&basis, *pos, chunk);
        let e = rel_err(&layout, chunk, &out);
        assert!(e < 0.03, "rank-4 error {e}");
        let (codec, fidelity) = crate::codec::inspect(&enc).unwrap();
        assert_eq!(codec, crate::codec::CODEC_XKV);
        let kvtier_cache::Fidelity::Lossy { error_bound, .. } = fidelity else {
            panic!("xkv must be lossy")
        };
        assert!(
            e <= error_bound as f64 * 1.05,
            "error {e} above stated bound {error_bound}"
        );
        assert!(
            enc.len() * 2 < chunk.len(),
            "rank 4 of 64 columns must compress"
        );
    }
    // Rank 2 must be visibly worse than rank 4 on rank-4 data: the truncation really truncates.
    let low = XkvBasis::fit(
        &layout,
        10000.0,
        &refs(&prompt),
        XkvParams {
            rank: RankRule::Fixed(2),
            ..params
        },
    )
    .unwrap();
    let (_, out) = round_trip(&low, prompt[1].0, &prompt[1].1);
    assert!(rel_err(&layout, &prompt[1].1, &out) > 0.05);
}

#[test]
fn rank_rules_pick_sensible_ranks() {
    let layout = small_layout(Dtype::F16);
    let prompt = synthetic_prompt(&layout, 4, 64, 4, 5);
    let fit = XkvFit::new(&layout, 10000.0, &refs(&prompt), 4, true).unwrap();
    let b2 = fit.basis(RankRule::Ratio(2.0)).unwrap();
    let b8 = fit.basis(RankRule::Ratio(8.0)).unwrap();
    assert!(b2.parts.iter().zip(&b8.parts).all(|(a, b)| a.rank > b.rank));
    let (_, chunk) = &prompt[0];
    let ratio8 = chunk.len() as f64
        / (xkv_encode(&b8, 0, chunk).unwrap().len() as f64 + b8.encoded_len() as f64 / 4.0);
    assert!((6.0..=9.0).contains(&ratio8), "8x target gave {ratio8}");
    let e99 = fit.basis(RankRule::Energy(0.99)).unwrap();
    assert!(
        fit.energy_kept(RankRule::Energy(0.99))
            .iter()
            .all(|e| *e >= 0.99)
    );
    assert!(
        e99.parts.iter().all(|p| p.rank <= 8),
        "rank-4 data needs few vectors for 99%"
    );
}

#[test]
fn keys_only_leaves_values_bit_exact() {
    let layout = small_layout(Dtype::Bf16);
    let prompt = synthetic_prompt(&layout, 2, 32, 3, 9);
    let params = XkvParams {
        group_layers: 2,
        rank: RankRule::Fixed(3),
        compress_values: false,
    };
    let basis = XkvBasis::fit(&layout, 10000.0, &refs(&prompt), params).unwrap();
    assert!(basis.parts.iter().all(|p| p.kind == KvKind::Key));
    let (pos, chunk) = &prompt[1];
    let (_, out) = round_trip(&basis, *pos, chunk);
    let block = layout.layer_bytes(32) / 2;
    for l in 0..layout.num_layers as usize {
        let v = (2 * l + 1) * block..(2 * l + 2) * block;
        assert_eq!(out[v.clone()], chunk[v], "layer {l} values changed");
    }
}

#[test]
fn basis_serialises_and_foreign_or_corrupt_data_is_refused() {
    let layout = small_layout(Dtype::F16);
    let prompt = synthetic_prompt(&layout, 2, 32, 3, 1);
    let params = XkvParams {
        group_layers: 4,
        rank: RankRule::Fixed(5),
        compress_values: true,
    };
    let basis = XkvBasis::fit(&layout, 10000.0, &refs(&prompt), params).unwrap();
    let bytes = basis.to_bytes();
    let back = XkvBasis::from_bytes(&bytes).unwrap();
    assert_eq!(
        (back.id, &back.parts, back.rope_base),
        (basis.id, &basis.parts, basis.rope_base)
    );
    let enc = xkv_encode(&basis, 0, &prompt[0].1).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    xkv_decode(&basis, &enc, &mut a).unwrap();
    xkv_decode(&back, &enc, &mut b).unwrap();
    assert_eq!(a, b, "a reloaded basis must decode identically");

    let mut bad = bytes.clone();
    bad[40] ^= 1;
    assert!(XkvBasis::from_bytes(&bad).is_err());

    let other = XkvBasis::fit(
        &layout,
        10000.0,
        &refs(&prompt),
        XkvParams {
            rank: RankRule::Fixed(4),
            ..params
        },
    )
    .unwrap();
    assert_ne!(other.id, basis.id);
    assert!(matches!(
        xkv_decode(&other, &enc, &mut a),
        Err(CompressError::BasisMismatch { .. })
    ));
    assert!(matches!(
        crate::codec::decode_any(&enc),
        Err(CompressError::NeedsBasis(_))
    ));
    let mut corrupt = enc.clone();
    let n = corrupt.len();
    corrupt[n - 3] ^= 4;
    assert!(matches!(
        xkv_decode(&basis, &corrupt, &mut a),
        Err(CompressError::ChecksumMismatch { .. })
    ));
}
