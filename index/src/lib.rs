//! `kvtier-index`: retrieval over stored keys and layer-wise KV budgets.
//!
//! - [`matrix`]: row-major views and the vectorisable inner-product kernels;
//! - [`retriever`]: the [`Retriever`] trait, [`SearchResult`] and per-(layer, KV head)
//!   [`HeadIndexes`] with GQA routing;
//! - [`exact`]: exact top-k (ground truth and fallback), [`BruteForce`];
//! - [`hnsw`]: HNSW over MIPS-augmented keys, [`HnswRetriever`];
//! - [`aware`]: RetrievalAttention's attention-aware key graph, [`AwareIndex`];
//! - [`attention`]: partial attention and the exact log-sum-exp merge of static and retrieved
//!   tokens;
//! - [`budget`]: SqueezeAttention's layer clustering and budget reallocation;
//! - [`select`]: StreamingLLM / H2O token selection and pruning a prompt's KV to a selection;
//! - [`pruned`]: the stored form of a pruned chunk;
//! - [`conformance`]: the recall and contract suite every retriever passes.
//!
//! Index builds are CPU heavy and synchronous; async callers run them on blocking threads.

pub mod attention;
pub mod aware;
pub mod budget;
pub mod conformance;
pub mod error;
pub mod exact;
pub mod hnsw;
pub mod matrix;
pub mod pruned;
pub mod retriever;
pub mod select;

pub use attention::{AttnPartial, StaticTokens, full_attention, relative_error};
pub use aware::{AwareConfig, AwareIndex};
pub use budget::{LayerGroups, cap_budgets, kmeans_layers, squeezed_budgets, uniform_budgets};
pub use error::{IndexError, Result};
pub use exact::{BruteForce, exact_top_k, exact_top_k_batch, top_k_of_scores};
pub use hnsw::{HnswConfig, HnswRetriever};
pub use matrix::{MatrixView, dot};
pub use pruned::{CODEC_PRUNED, decode_pruned, encode_pruned};
pub use retriever::{BuildInput, HeadIndexes, Retriever, SearchResult};
pub use select::{PrunedLayer, SelectionPolicy, prune_kv, select_tokens};

#[cfg(test)]
mod conformance_tests {
    //! The one conformance suite, run against every implementation.
    use super::*;
    use crate::conformance::check_retriever;

    #[test]
    fn brute_force_conforms() {
        assert_eq!(check_retriever::<BruteForce>(&(), 1.0), 1.0);
    }

    #[test]
    fn hnsw_conforms() {
        check_retriever::<HnswRetriever>(
            &HnswConfig {
                max_connections: 16,
                ef_construction: 100,
                ef_search: 64,
            },
            0.95,
        );
    }

    #[test]
    fn aware_conforms() {
        check_retriever::<AwareIndex>(&AwareConfig::default(), 0.95);
    }

    #[test]
    fn aware_needs_queries_and_valid_config() {
        let keys = [1.0f32; 8];
        let km = MatrixView::new(&keys, 2).unwrap();
        assert_eq!(
            AwareIndex::build(BuildInput::keys(km), &AwareConfig::default()).err(),
            Some(IndexError::MissingQueries)
        );
        let bad = AwareConfig {
            token_neighbours: 40,
            ..AwareConfig::default()
        };
        assert!(
            AwareIndex::build(
                BuildInput {
                    keys: km,
                    queries: Some(km)
                },
                &bad
            )
            .is_err()
        );
        assert!(
            HnswRetriever::build(
                BuildInput::keys(km),
                &HnswConfig {
                    max_connections: 300,
                    ..HnswConfig::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn head_indexes_route_query_heads_to_their_kv_head() {
        // Two KV heads whose keys differ only in which one is large; 4 query heads, groups of 2.
        let k0 = [0.0f32, 1.0, 5.0, 0.0];
        let k1 = [5.0f32, 0.0, 0.0, 1.0];
        let idx = HeadIndexes::<BruteForce>::build(1, 4, 2, |_, kv| {
            let keys = if kv == 0 { &k0[..] } else { &k1[..] };
            BruteForce::build(BuildInput::keys(MatrixView::new(keys, 2)?), &())
        })
        .unwrap();
        assert_eq!(idx.kv_head_of(1), 0);
        assert_eq!(idx.kv_head_of(2), 1);
        assert_eq!(idx.search(0, 1, &[1.0, 0.0], 1).unwrap().positions, vec![1]);
        assert_eq!(idx.search(0, 3, &[1.0, 0.0], 1).unwrap().positions, vec![0]);
        assert!(idx.search(0, 4, &[1.0, 0.0], 1).is_err());
        assert!(idx.search(1, 0, &[1.0, 0.0], 1).is_err());
        assert!(HeadIndexes::<BruteForce>::build(1, 3, 2, |_, _| unreachable!()).is_err());
    }
}
