//! Unit tests of the retrieval service state: memory budget, parent chains, settled builds.

use super::*;
use crate::read::chain;
use kvtier_cache::{ChunkMeta, Dtype, HostConfig, HostTier, StoreConfig, TieredStore};

const TOKENS: u32 = 64;

fn layout() -> ModelLayout {
    ModelLayout::mha("retrieval-unit", 2, 1, 8, Dtype::F32)
}

/// A store holding `prompts` prompts of two chunks each; returns their key lists.
fn store(prompts: u128) -> (TieredStore, Vec<Vec<ChunkKey>>) {
    let host = Arc::new(HostTier::new(HostConfig::with_budget(64 << 20)));
    let s = TieredStore::new(StoreConfig::default(), host, Vec::new());
    let l = layout();
    let mut all = Vec::new();
    for p in 0..prompts {
        let keys = vec![ChunkKey(p * 10), ChunkKey(p * 10 + 1)];
        for (i, k) in keys.iter().enumerate() {
            let data: Vec<u8> = (0..l.chunk_bytes(TOKENS as usize) / 4)
                .flat_map(|j| (((j * 7 + i * 13 + p as usize) % 97) as f32 / 97.0).to_le_bytes())
                .collect();
            let mut m = ChunkMeta::raw(1, l.fingerprint(), TOKENS, i as u32, data.len() as u64);
            m.parent = i.checked_sub(1).map(|j| keys[j]);
            s.put(*k, m, &data).unwrap();
        }
        all.push(keys);
    }
    (s, all)
}

fn retrieval(max_bytes: u64) -> Retrieval {
    Retrieval::new(
        Arc::new(Layouts::new([layout()])),
        RetrievalConfig {
            min_tokens: 1,
            max_bytes,
            ..RetrievalConfig::default()
        },
    )
}

#[test]
fn indexes_stay_inside_their_memory_budget() {
    let (s, prompts) = store(2);
    // One prompt: 128 tokens × 2 layers × 1 KV head.
    let one = 128 * 2 * INDEX_BYTES_PER_KEY;
    let r = retrieval(one - 1);
    assert!(
        !r.build(&s, 1, &prompts[0]).unwrap(),
        "too large for the budget"
    );
    assert!(r.indexed().is_empty());
    let r = retrieval(one);
    assert!(r.build(&s, 1, &prompts[0]).unwrap());
    assert!(!r.build(&s, 1, &prompts[0]).unwrap(), "already indexed");
    assert!(r.build(&s, 1, &prompts[1]).unwrap());
    let indexed = r.indexed();
    assert_eq!(indexed.len(), 1, "the older index made room");
    assert_eq!(r.usage(), (1, one));
    assert_eq!(indexed[0].1, prompts[1]);
}

#[test]
fn chains_follow_parents_and_settled_tips_are_built() {
    let (s, prompts) = store(1);
    assert_eq!(chain(&s, 1, prompts[0][1]).unwrap(), prompts[0]);
    assert!(
        chain(&s, 2, prompts[0][1]).is_none(),
        "another tenant's chunks"
    );
    let r = Retrieval::new(
        Arc::new(Layouts::new([layout()])),
        RetrievalConfig {
            min_tokens: 1,
            settle: Duration::ZERO,
            ..RetrievalConfig::default()
        },
    );
    let meta = s.info(1, prompts[0][1]).unwrap().meta;
    r.observe(&StoreEvent::Stored {
        key: prompts[0][1],
        meta,
        tier: kvtier_cache::TierKind::Host,
    });
    assert_eq!(r.build_settled(&s), 1);
    assert_eq!(r.indexed()[0].1, prompts[0]);
    // Removing a chunk drops the index over it.
    r.observe(&StoreEvent::Removed {
        key: prompts[0][0],
        tenant: 1,
    });
    assert!(r.indexed().is_empty());
}

#[test]
fn uploaded_queries_stay_inside_the_budget_and_switch_the_build_to_aware() {
    let (s, prompts) = store(2);
    // [2 layers][1 head][n = 16][8]: 1 KiB of f32 per prompt.
    let q = |seed: usize| -> Vec<f32> {
        (0..2 * 16 * 8)
            .map(|i| ((i * 31 + seed) % 17) as f32 / 17.0 - 0.5)
            .collect()
    };
    let r = retrieval(1536);
    let too_big: Vec<f32> = (0..512).map(|i| i as f32).collect();
    assert!(matches!(
        r.set_queries(&s, 1, prompts[0][1], 1, too_big),
        Err(PromptError::QueriesOverBudget { .. })
    ));
    assert_eq!(r.set_queries(&s, 1, prompts[0][1], 1, q(1)).unwrap(), 16);
    // A refused upload leaves the prompt's earlier queries in place.
    let too_big: Vec<f32> = (0..512).map(|i| i as f32).collect();
    assert!(matches!(
        r.set_queries(&s, 1, prompts[0][1], 1, too_big),
        Err(PromptError::QueriesOverBudget { .. })
    ));
    assert_eq!(r.queries.lock()[0].0, (1, prompts[0][1]));
    // A second prompt's queries push the first out: only 1.5 KiB may be held.
    assert_eq!(r.set_queries(&s, 1, prompts[1][1], 1, q(2)).unwrap(), 16);
    assert_eq!(r.queries.lock().len(), 1);
    assert!(matches!(
        r.set_queries(&s, 2, prompts[1][1], 1, q(3)),
        Err(PromptError::NotStored(_))
    ));
    assert!(matches!(
        r.set_queries(&s, 1, prompts[1][1], 1, q(4)[..100].to_vec()),
        Err(PromptError::Invalid(_))
    ));

    // With the queries, the prompt is built as the attention-aware index.
    let r = retrieval(64 << 20);
    r.set_queries(&s, 1, prompts[1][1], 1, q(5)).unwrap();
    assert!(r.build(&s, 1, &prompts[1]).unwrap());
    assert_eq!(r.index_kind(1, &prompts[1]), Some(IndexUsed::Aware));
    assert!(r.build(&s, 1, &prompts[0]).unwrap());
    assert_eq!(r.index_kind(1, &prompts[0]), Some(IndexUsed::Hnsw));
}
