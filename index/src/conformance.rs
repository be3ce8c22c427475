//! The conformance suite every [`Retriever`] passes: recall on data with a planted answer,
//! plus the contract of `search` (distinct in-range positions, `min(k, len)` of them, errors
//! named). Implementations call [`check_retriever`] from their tests.
//!
//! The data: `groups` random unit directions; each direction owns `k` keys of norm about 4
//! along it, and a few hundred low-norm filler keys sit around the origin. A query near
//! direction `g` has its `k` largest inner products exactly at `g`'s keys (the margin is
//! checked by brute force), so the answer is known without trusting any index.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::IndexError;
use crate::exact::exact_top_k;
use crate::matrix::MatrixView;
use crate::retriever::{BuildInput, Retriever};

/// Planted-answer data set.
pub struct Planted {
    pub dim: usize,
    pub k: usize,
    /// `[n × dim]` keys, groups interleaved with fillers in a shuffled order.
    pub keys: Vec<f32>,
    /// Build queries (several per group) for indexes that learn from queries.
    pub build_queries: Vec<f32>,
    /// One test query per group.
    pub test_queries: Vec<f32>,
    /// The known answer of each test query (positions of its group's keys).
    pub answers: Vec<Vec<u32>>,
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box–Muller: rand 0.9 has no normal distribution without rand_distr.
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| gaussian(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// Builds the planted data set deterministically from `seed`.
pub fn planted(seed: u64) -> Planted {
    let (dim, groups, k, fillers, build_per_group) = (32, 48, 8, 700, 6);
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs: Vec<Vec<f32>> = (0..groups).map(|_| unit(&mut rng, dim)).collect();
    let near = |rng: &mut StdRng, dir: &[f32], scale: f32, noise: f32| -> Vec<f32> {
        dir.iter()
            .map(|x| scale * x + noise * gaussian(rng) / (dim as f32).sqrt())
            .collect()
    };
    // (owner group or None for a filler, vector)
    let mut rows: Vec<(Option<usize>, Vec<f32>)> = Vec::new();
    for (g, dir) in dirs.iter().enumerate() {
        for _ in 0..k {
            rows.push((Some(g), near(&mut rng, dir, 4.0, 0.3)));
        }
    }
    for _ in 0..fillers {
        let f = unit(&mut rng, dim).into_iter().map(|x| 0.5 * x).collect();
        rows.push((None, f));
    }
    // Fisher–Yates so group members are scattered over positions.
    for i in (1..rows.len()).rev() {
        let j = rng.random_range(0..=i);
        rows.swap(i, j);
    }
    let mut answers = vec![Vec::new(); groups];
    for (pos, (owner, _)) in rows.iter().enumerate() {
        if let Some(g) = owner {
            answers[*g].push(pos as u32);
        }
    }
    let keys = rows.into_iter().flat_map(|r| r.1).collect();
    let build_queries = dirs
        .iter()
        .flat_map(|d| {
            (0..build_per_group)
                .flat_map(|_| near(&mut rng, d, 1.0, 0.2))
                .collect::<Vec<_>>()
        })
        .collect();
    let test_queries = dirs
        .iter()
        .flat_map(|d| near(&mut rng, d, 1.0, 0.2))
        .collect();
    Planted {
        dim,
        k,
        keys,
        build_queries,
        test_queries,
        answers,
    }
}

/// Builds `R` on the planted data, checks the search contract and returns its mean recall@k
/// against the planted answer; panics (this is a test helper) if recall is below `min_recall`.
pub fn check_retriever<R: Retriever>(config: &R::Config, min_recall: f64) -> f64 {
    let data = planted(7);
    let keys = MatrixView::new(&data.keys, data.dim).unwrap();
    let queries = MatrixView::new(&data.test_queries, data.dim).unwrap();
    let build = MatrixView::new(&data.build_queries, data.dim).unwrap();
    let index = R::build(
        BuildInput {
            keys,
            queries: Some(build),
        },
        config,
    )
    .expect("build");
    let n = keys.rows();
    assert_eq!(index.len(), n);
    assert_eq!(index.dim(), data.dim);

    let mut hits = 0usize;
    for (g, answer) in data.answers.iter().enumerate() {
        let q = queries.row(g);
        // The planted answer really is the exact top-k: the data's margin holds.
        let mut exact = exact_top_k(keys, q, data.k);
        exact.sort_unstable();
        assert_eq!(
            &exact, answer,
            "planted answer of group {g} is not the exact top-k"
        );
        let got = index.search(q, data.k).expect("search");
        assert_eq!(got.positions.len(), data.k);
        assert!(
            got.scanned > 0,
            "a search that computed nothing cannot be right"
        );
        hits += got.positions.iter().filter(|p| answer.contains(p)).count();
    }
    let recall = hits as f64 / (data.k * data.answers.len()) as f64;

    // Contract: k = 0, k beyond the key count, a wrong-width query.
    assert!(
        index
            .search(queries.row(0), 0)
            .expect("k = 0")
            .positions
            .is_empty()
    );
    let mut all = index
        .search(queries.row(0), n + 5)
        .expect("k > n")
        .positions;
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        n,
        "k beyond the key count returns every key once"
    );
    assert_eq!(
        index.search(&[1.0; 3], 4).unwrap_err(),
        IndexError::DimensionMismatch {
            expected: data.dim,
            got: 3
        }
    );
    assert_eq!(
        index.search(&vec![f32::NAN; data.dim], 4).unwrap_err(),
        IndexError::NonFinite("query")
    );
    assert!(
        recall >= min_recall,
        "recall {recall:.3} is below {min_recall}"
    );
    recall
}
