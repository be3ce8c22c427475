//! Per-layer token selection under a budget, and pruning a stored prompt's KV to it.
//!
//! Two policies: StreamingLLM (attention sinks plus the most recent tokens) and H2O (sinks, a
//! recent window, and the heavy hitters: the tokens that received the most accumulated
//! attention, scores supplied by the caller). Both always keep the sinks, and H2O always keeps
//! its window, whatever the scores say: dropping the sinks collapses attention.

use kvtier_cache::{ModelLayout, PayloadLayout};

use crate::error::{IndexError, Result, invalid};
use crate::exact::top_k_of_scores;

/// How a layer chooses which tokens to keep within its budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SelectionPolicy {
    /// StreamingLLM: the first `sinks` tokens and the most recent ones filling the budget.
    Streaming { sinks: usize },
    /// H2O: the first `sinks` tokens, a recent window of `recent_ratio` of the remaining budget,
    /// and the highest-scoring tokens for the rest.
    HeavyHitters { sinks: usize, recent_ratio: f32 },
}

/// Positions (ascending) a layer keeps out of `tokens` under `budget`. `scores` (one per token,
/// higher = more important) is required by [`SelectionPolicy::HeavyHitters`] and ignored by
/// streaming. A budget at or above `tokens` keeps everything.
pub fn select_tokens(
    policy: SelectionPolicy,
    tokens: usize,
    budget: usize,
    scores: Option<&[f32]>,
) -> Result<Vec<u32>> {
    if budget >= tokens {
        return Ok((0..tokens as u32).collect());
    }
    match policy {
        SelectionPolicy::Streaming { sinks } => {
            if budget < sinks {
                return Err(IndexError::BudgetTooSmall {
                    budget,
                    required: sinks,
                });
            }
            let recent = budget - sinks;
            Ok((0..sinks as u32)
                .chain((tokens - recent) as u32..tokens as u32)
                .collect())
        }
        SelectionPolicy::HeavyHitters {
            sinks,
            recent_ratio,
        } => {
            if !(0.0..=1.0).contains(&recent_ratio) {
                return Err(invalid(
                    "recent_ratio",
                    format!("{recent_ratio} is not in [0, 1]"),
                ));
            }
            if budget < sinks {
                return Err(IndexError::BudgetTooSmall {
                    budget,
                    required: sinks,
                });
            }
            let scores = scores.ok_or_else(|| {
                invalid("scores", "heavy-hitter selection needs attention scores")
            })?;
            if scores.len() != tokens {
                return Err(invalid(
                    "scores",
                    format!("{} scores for {tokens} tokens", scores.len()),
                ));
            }
            if !scores.iter().all(|s| s.is_finite()) {
                return Err(IndexError::NonFinite("scores"));
            }
            let window = ((budget - sinks) as f64 * recent_ratio as f64).floor() as usize;
            let middle = sinks..tokens - window;
            let heavy = top_k_of_scores(&scores[middle.clone()], budget - sinks - window);
            let mut keep: Vec<u32> = (0..sinks as u32)
                .chain(heavy.into_iter().map(|p| p + sinks as u32))
                .chain(middle.end as u32..tokens as u32)
                .collect();
            keep.sort_unstable();
            Ok(keep)
        }
    }
}

/// One layer of a pruned prompt: the kept positions and their cache rows, laid out like a
/// chunk's layer with only those tokens (`[K|V][kept][kv_head][head_dim]`, or
/// `[kept][latent+rope]` for MLA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunedLayer {
    pub positions: Vec<u32>,
    pub data: Vec<u8>,
}

/// Applies per-layer selections to a prompt's KV payload of `tokens` tokens in the chunk layout
/// (`[layer][K|V][token][kv_head][head_dim]`, MLA `[layer][token][latent+rope]`), keeping only
/// the selected token rows of each layer. `keep[l]` must be strictly increasing and below
/// `tokens`.
pub fn prune_kv(
    layout: &ModelLayout,
    tokens: usize,
    payload: &[u8],
    keep: &[Vec<u32>],
) -> Result<Vec<PrunedLayer>> {
    let expected = layout.chunk_bytes(tokens);
    if payload.len() != expected {
        return Err(IndexError::PayloadLength {
            expected,
            got: payload.len(),
        });
    }
    let layers = layout.num_layers as usize;
    if keep.len() != layers {
        return Err(IndexError::InvalidPositions(format!(
            "{} selections for {layers} layers",
            keep.len()
        )));
    }
    // MHA layers hold a K plane then a V plane; MLA layers one plane of latent rows.
    let geometry = PayloadLayout::new(layout, tokens);
    let planes = geometry.planes();
    keep.iter()
        .enumerate()
        .map(|(l, positions)| {
            if positions.windows(2).any(|w| w[0] >= w[1])
                || positions.last().is_some_and(|&p| p as usize >= tokens)
            {
                return Err(IndexError::InvalidPositions(format!(
                    "layer {l}: not strictly increasing below {tokens}"
                )));
            }
            let row = geometry.token_row(l, 0, 0).len();
            let mut data = Vec::with_capacity(planes * positions.len() * row);
            for plane in 0..planes {
                for &p in positions {
                    data.extend_from_slice(&payload[geometry.token_row(l, plane, p as usize)]);
                }
            }
            Ok(PrunedLayer {
                positions: positions.clone(),
                data,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_cache::Dtype;

    #[test]
    fn streaming_keeps_sinks_and_the_recent_tokens() {
        let p = SelectionPolicy::Streaming { sinks: 2 };
        assert_eq!(select_tokens(p, 10, 5, None).unwrap(), vec![0, 1, 7, 8, 9]);
        assert_eq!(select_tokens(p, 4, 9, None).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(
            select_tokens(p, 10, 1, None),
            Err(IndexError::BudgetTooSmall {
                budget: 1,
                required: 2
            })
        );
    }

    #[test]
    fn heavy_hitters_keep_sinks_window_and_top_scores() {
        let p = SelectionPolicy::HeavyHitters {
            sinks: 1,
            recent_ratio: 0.5,
        };
        let scores = [9.0, 0.0, 5.0, 1.0, 7.0, 0.0, 0.0, 8.0, 0.0, 0.0];
        // Budget 7: 1 sink, window floor(0.5·6) = 3 (7, 8, 9), heavy hitters 3 of 1..7.
        assert_eq!(
            select_tokens(p, 10, 7, Some(&scores)).unwrap(),
            vec![0, 2, 3, 4, 7, 8, 9]
        );
        assert!(select_tokens(p, 10, 7, None).is_err());
        assert!(select_tokens(p, 10, 7, Some(&scores[..3])).is_err());
        let bad = SelectionPolicy::HeavyHitters {
            sinks: 1,
            recent_ratio: 2.0,
        };
        assert!(select_tokens(bad, 10, 7, Some(&scores)).is_err());
    }

    #[test]
    fn pruning_keeps_exactly_the_selected_rows() {
        let layout = ModelLayout::mha("m", 2, 1, 2, Dtype::F16);
        let tokens = 3;
        // Every element's byte pair encodes (layer, plane, token, elem) so rows are identifiable.
        let payload: Vec<u8> = (0..2u8)
            .flat_map(|l| {
                (0..2u8).flat_map(move |kv| {
                    (0..3u8).flat_map(move |t| {
                        (0..2u8).flat_map(move |e| [l * 64 + kv * 16 + t * 4 + e, 0])
                    })
                })
            })
            .collect();
        let out = prune_kv(&layout, tokens, &payload, &[vec![0, 2], vec![1]]).unwrap();
        assert_eq!(
            out[0].data,
            vec![0, 0, 1, 0, 8, 0, 9, 0, 16, 0, 17, 0, 24, 0, 25, 0]
        );
        assert_eq!(out[1].data, vec![68, 0, 69, 0, 84, 0, 85, 0]);
        assert!(matches!(
            prune_kv(&layout, tokens, &payload[1..], &[vec![], vec![]]),
            Err(IndexError::PayloadLength { .. })
        ));
        assert!(matches!(
            prune_kv(&layout, tokens, &payload, &[vec![2, 1], vec![]]),
            Err(IndexError::InvalidPositions(_))
        ));
        assert!(prune_kv(&layout, tokens, &payload, &[vec![3], vec![]]).is_err());
        let mla = ModelLayout::mla("m", 1, 2, 1, Dtype::F16);
        let p: Vec<u8> = (0..18).collect();
        assert_eq!(
            prune_kv(&mla, 3, &p, &[vec![1]]).unwrap()[0].data,
            vec![6, 7, 8, 9, 10, 11]
        );
    }
}
