//! Model tests that need the real weights: exact reuse of cache chunks (export a prefix as a
//! kvtier payload, import it into a fresh cache, prefill the rest) and chunked prefill.

use kvtier_cache::Dtype;

use super::forward::Logits;
use super::testutil::model;

/// The first `n` tokens of the machine's license texts (real prose the model has not been
/// tuned on in this project).
fn prose_tokens(n: usize) -> Vec<u32> {
    let texts = crate::suites::capture::default_texts();
    assert!(
        !texts.is_empty(),
        "this test needs the texts under /usr/share/common-licenses"
    );
    crate::suites::capture::tokenize_files(model(), &texts, n).unwrap()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
        )
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy continuation of `steps` tokens from a cache whose next input is `first`.
fn greedy(cache: &mut super::KvCache, first: u32, steps: usize) -> Vec<u32> {
    let m = model();
    let mut out = vec![first];
    for _ in 0..steps {
        let logits = m
            .forward(&[*out.last().unwrap()], cache, Logits::Last)
            .unwrap();
        out.push(argmax(&logits) as u32);
    }
    out
}

#[test]
fn model_reuses_exported_prefix_chunk_exactly() {
    let m = model();
    let vocab = m.config.vocab;
    let (prefix, total) = (256, 300);
    let ids = prose_tokens(total);

    let mut full_cache = m.new_cache();
    let full = m.forward(&ids, &mut full_cache, Logits::All).unwrap();
    let full_rest = &full[prefix * vocab..];

    let mut prefilled = m.new_cache();
    m.forward(&ids[..prefix], &mut prefilled, Logits::Last)
        .unwrap();
    for dtype in [Dtype::F32, Dtype::F16] {
        let payload = prefilled.export_chunk(0..prefix, dtype).unwrap();
        assert_eq!(
            payload.len(),
            m.config.layout(dtype).chunk_bytes(prefix),
            "payload size must match the kvtier layout"
        );

        let mut loaded = m.new_cache();
        loaded.import_chunk(&payload, 0, prefix, dtype).unwrap();
        let reused = m.forward(&ids[prefix..], &mut loaded, Logits::All).unwrap();

        // Bit-exact against the same computation with the cache rounded through the dtype.
        let mut rounded = prefilled.clone();
        rounded.round_through(dtype).unwrap();
        let reference = m
            .forward(&ids[prefix..], &mut rounded, Logits::All)
            .unwrap();
        assert_eq!(
            reused, reference,
            "{dtype:?}: imported chunk must behave exactly like the rounded cache"
        );

        // Close to a full prefill, with identical top-1 predictions.
        let diff = max_abs_diff(&reused, full_rest);
        eprintln!("{dtype:?}: max |logit difference| against a full prefill: {diff}");
        let tol = if dtype == Dtype::F32 { 2e-3 } else { 0.1 };
        assert!(
            diff < tol,
            "{dtype:?}: logits differ from a full prefill by {diff}"
        );
        let same_top = reused
            .chunks(vocab)
            .zip(full_rest.chunks(vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        assert_eq!(
            same_top,
            total - prefix,
            "{dtype:?}: top-1 tokens differ from a full prefill"
        );

        // Greedy generation from both caches agrees token for token.
        let next = argmax(&full[(total - 1) * vocab..]) as u32;
        let mut from_full = full_cache.clone();
        assert_eq!(
            greedy(&mut loaded, next, 12),
            greedy(&mut from_full, next, 12),
            "{dtype:?}: greedy continuations differ"
        );
    }
}

#[test]
fn model_chunked_prefill_matches_one_shot() {
    let m = model();
    let ids = prose_tokens(96);
    let mut one = m.new_cache();
    let a = m.forward(&ids, &mut one, Logits::All).unwrap();
    let mut pieces = m.new_cache();
    let mut b = Vec::new();
    for part in ids.chunks(40) {
        b.extend(m.forward(part, &mut pieces, Logits::All).unwrap());
    }
    assert!(
        max_abs_diff(&a, &b) < 2e-3,
        "chunked prefill drifts by {}",
        max_abs_diff(&a, &b)
    );
    assert!(max_abs_diff(&one.layer(29).k, &pieces.layer(29).k) < 1e-3);
    let last = m
        .forward(&ids[..10], &mut m.new_cache(), Logits::Last)
        .unwrap();
    assert_eq!(last.len(), m.config.vocab);
    assert!(max_abs_diff(&last, &a[9 * m.config.vocab..10 * m.config.vocab]) < 2e-3);
}

#[test]
fn keeping_every_position_changes_nothing_and_dropping_them_does() {
    let m = model();
    let ids = prose_tokens(96);
    let (prompt, rest) = ids.split_at(80);
    let mut base = m.new_cache();
    m.forward(prompt, &mut base, Logits::Last).unwrap();
    let full = m.forward(rest, &mut base.clone(), Logits::All).unwrap();
    let layers = base.num_layers();
    let all: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut kept_all = base.clone();
    for l in 0..layers {
        kept_all.keep_only(l, &all);
    }
    let same = m.forward(rest, &mut kept_all, Logits::All).unwrap();
    assert_eq!(same, full, "a mask keeping every position is no mask");
    // Sinks plus the last 8 prompt tokens: the output moves, but stays a distribution over the
    // same vocabulary and the new tokens still see each other.
    let few: Vec<u32> = (0..4).chain(72..80).collect();
    let mut pruned = base.clone();
    for l in 0..layers {
        pruned.keep_only(l, &few);
    }
    let other = m.forward(rest, &mut pruned, Logits::All).unwrap();
    assert_eq!(other.len(), full.len());
    assert!(
        max_abs_diff(&other, &full) > 1e-3,
        "pruning must change the logits"
    );
    assert!(other.iter().all(|x| x.is_finite()));
}
