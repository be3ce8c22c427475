//! The attention-aware key index of RetrievalAttention.
//!
//! Decode queries and keys come from different distributions (a query's nearest keys are not
//! near it in key space), so a graph built from key-to-key proximity, like HNSW, walks through
//! the wrong neighbourhoods. This index is built from the prompt's own query vectors instead:
//!
//! 1. each build query's exact top-`k_build` keys are found by brute force;
//! 2. the query→key bipartite graph is projected onto keys: keys co-retrieved by the same query
//!    are linked (the query's best key to all others, and each key to a few others of the
//!    list), weighted by how many queries linked them;
//! 3. each key keeps its most frequently co-retrieved neighbours up to `max_degree`, minus
//!    links to its adjacent tokens and a few random long-range links that keep the graph
//!    connected;
//! 4. a decode query is answered by best-first search on inner product from a few entry
//!    points: the keys most often retrieved during the build and a fixed random sample.
//!
//! Every inner product computed during a search is counted.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{IndexError, Result, invalid};
use crate::exact::{BruteForce, exact_top_k, exact_top_k_batch, top_k_pairs};
use crate::matrix::{MatrixView, dot};
use crate::retriever::{BuildInput, Retriever, SearchResult, check_query};

/// Build and search parameters of [`AwareIndex`].
#[derive(Debug, Clone)]
pub struct AwareConfig {
    /// Keys retrieved per build query (the bipartite graph's query degree).
    pub k_build: usize,
    /// Out-degree bound of the key graph, random links included.
    pub max_degree: usize,
    /// Random long-range links per key, for connectivity.
    pub random_links: usize,
    /// Links to the tokens within this distance on each side: adjacent tokens' keys are
    /// similar (same phrase, nearby RoPE angle), and these links reach keys that no build
    /// query retrieved but a decode query might. Counted within `max_degree`.
    pub token_neighbours: usize,
    /// Build queries used at most (evenly spaced rows); 0 uses all. Build cost is linear in it.
    pub max_build_queries: usize,
    /// Entry points taken from the keys most often retrieved by build queries.
    pub hub_entries: usize,
    /// Entry points taken from a fixed random sample of keys.
    pub sample_entries: usize,
    /// Candidate list width used by [`Retriever::search`] (raised to `k`).
    pub ef_search: usize,
    /// Seed of the random links and the entry sample: builds are deterministic.
    pub seed: u64,
}

impl Default for AwareConfig {
    fn default() -> Self {
        AwareConfig {
            k_build: 32,
            max_degree: 32,
            random_links: 2,
            token_neighbours: 1,
            max_build_queries: 0,
            hub_entries: 8,
            sample_entries: 24,
            ef_search: 256,
            seed: 0x5eed,
        }
    }
}

/// Attention-aware key graph of one (layer, KV head).
pub struct AwareIndex {
    exact: BruteForce,
    dim: usize,
    /// CSR adjacency: neighbours of key `i` are `neighbours[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<u32>,
    neighbours: Vec<u32>,
    entries: Vec<u32>,
    ef_search: usize,
}

/// A key and its inner product with the query, ordered by score (then position, so heaps are
/// deterministic).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scored(f32, u32);

impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

impl AwareIndex {
    /// Mean out-degree of the key graph (a build diagnostic).
    pub fn mean_degree(&self) -> f64 {
        self.neighbours.len() as f64 / self.len() as f64
    }

    /// Neighbours of key `i`.
    fn links(&self, i: u32) -> &[u32] {
        &self.neighbours[self.offsets[i as usize] as usize..self.offsets[i as usize + 1] as usize]
    }

    /// Searches with an explicit beam width `ef`, for sweeps. `ef` may be below `k`: the walk
    /// then keeps a narrower beam, and the answer is the best `k` of every key it scored.
    pub fn search_ef(&self, query: &[f32], k: usize, ef: usize) -> Result<SearchResult> {
        check_query(query, self.dim)?;
        let n = self.len();
        let k = k.min(n);
        if k == 0 {
            return Ok(SearchResult {
                positions: Vec::new(),
                scanned: 0,
            });
        }
        // A graph walk that must return half the keys scans about all of them anyway.
        if 2 * k >= n {
            return Ok(SearchResult {
                positions: exact_top_k(self.exact.keys(), query, k),
                scanned: n,
            });
        }
        let keys = self.exact.keys();
        let ef = ef.max(1);
        let mut visited = vec![0u64; n.div_ceil(64)];
        let mut candidates: BinaryHeap<Scored> = BinaryHeap::with_capacity(4 * ef);
        let mut results: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(ef + 1);
        // Every key scored, the beam's evictions included: the answer is the best k of these.
        let mut scored: Vec<(f32, u32)> = Vec::with_capacity(8 * ef.max(k));
        // Scores key `i` unless already seen; every score computed lands in `scored`.
        let visit = |i: u32, visited: &mut [u64], scored: &mut Vec<(f32, u32)>| -> Option<Scored> {
            let (w, b) = (i as usize / 64, i as usize % 64);
            if visited[w] >> b & 1 == 1 {
                return None;
            }
            visited[w] |= 1 << b;
            let s = Scored(dot(keys.row(i as usize), query), i);
            scored.push((s.0, s.1));
            Some(s)
        };
        for &e in &self.entries {
            if let Some(s) = visit(e, &mut visited, &mut scored) {
                candidates.push(s);
                results.push(Reverse(s));
                if results.len() > ef {
                    results.pop();
                }
            }
        }
        while let Some(best) = candidates.pop() {
            if results.len() >= ef && results.peek().is_some_and(|w| best < w.0) {
                break;
            }
            for &nb in self.links(best.1) {
                let Some(s) = visit(nb, &mut visited, &mut scored) else {
                    continue;
                };
                if results.len() < ef || results.peek().is_some_and(|w| s > w.0) {
                    candidates.push(s);
                    results.push(Reverse(s));
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
        // The walk exhausted its component before scoring k keys: finish with an exact scan of
        // the keys it never reached (counted), so the answer always has k positions.
        if scored.len() < k {
            for i in 0..n as u32 {
                visit(i, &mut visited, &mut scored);
            }
        }
        let scanned = scored.len();
        let positions = top_k_pairs(scored, k).into_iter().map(|p| p.1).collect();
        Ok(SearchResult { positions, scanned })
    }
}

/// Evenly spaced rows of `queries`, at most `max` of them (all when `max` is 0).
fn subsample(queries: MatrixView<'_>, max: usize) -> Vec<f32> {
    let m = queries.rows();
    if max == 0 || m <= max {
        return queries.as_slice().to_vec();
    }
    (0..max)
        .flat_map(|j| queries.row(j * m / max).iter().copied())
        .collect()
}

/// Rank offsets each list member links to within its list (besides the list's pivot). All
/// pairs would cost `k_build²` per query; a few fixed offsets make every list's keys a
/// well-connected subgraph at `O(k_build)` cost, and counting over many queries still
/// surfaces the pairs that are consistently co-retrieved.
const LIST_OFFSETS: [usize; 4] = [1, 2, 5, 11];

/// Calls `link(a, b)` for every projected edge of one query's list (both directions).
fn list_edges(list: &[u32], mut link: impl FnMut(u32, u32)) {
    let len = list.len();
    for (i, &a) in list.iter().enumerate() {
        // Star from the pivot (the query's best key), which is where searches tend to arrive.
        if i > 0 {
            link(list[0], a);
            link(a, list[0]);
        }
        for off in LIST_OFFSETS.iter().filter(|&&o| o < len) {
            let b = list[(i + off) % len];
            if b != a && !(i == 0 || (i + off) % len == 0) {
                link(a, b);
                link(b, a);
            }
        }
    }
}

/// Projects the query→key lists onto keys: for each key, its co-retrieved keys ranked by how
/// many queries linked them relative to the neighbour's popularity (ties: lower position),
/// truncated to `keep`.
fn project(n: usize, lists: &[Vec<u32>], popularity: &[u32], keep: usize) -> Vec<Vec<u32>> {
    // CSR of projected edges with repetition, filled in two passes (count, then place).
    let mut offsets = vec![0usize; n + 1];
    for list in lists {
        list_edges(list, |a, _| offsets[a as usize + 1] += 1);
    }
    for i in 0..n {
        offsets[i + 1] += offsets[i];
    }
    let mut fill = offsets.clone();
    let mut pairs = vec![0u32; offsets[n]];
    for list in lists {
        list_edges(list, |a, b| {
            pairs[fill[a as usize]] = b;
            fill[a as usize] += 1;
        });
    }
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut cands = pairs[offsets[i]..offsets[i + 1]].to_vec();
            cands.sort_unstable();
            let mut counted: Vec<(u32, u32)> = Vec::new();
            for c in cands {
                match counted.last_mut() {
                    Some((last, count)) if *last == c => *count += 1,
                    _ => counted.push((c, 1)),
                }
            }
            // Co-retrieval count discounted by the neighbour's popularity (a lift score):
            // hubs such as attention sinks co-occur with everything and would otherwise fill
            // every list, while the search reaches them from the entry points anyway.
            let lift =
                |c: &(u32, u32)| c.1 as f64 / (popularity[c.0 as usize].max(1) as f64).sqrt();
            counted.sort_unstable_by(|a, b| lift(b).total_cmp(&lift(a)).then(a.0.cmp(&b.0)));
            counted.into_iter().take(keep).map(|c| c.0).collect()
        })
        .collect()
}

impl Retriever for AwareIndex {
    type Config = AwareConfig;

    fn build(input: BuildInput<'_>, config: &AwareConfig) -> Result<Self> {
        input.validate()?;
        let queries = input.queries.ok_or(IndexError::MissingQueries)?;
        if queries.rows() == 0 {
            return Err(IndexError::MissingQueries);
        }
        let fixed_links = config.random_links + 2 * config.token_neighbours;
        if config.k_build < 2 || config.max_degree == 0 || fixed_links > config.max_degree {
            return Err(invalid(
                "aware config",
                "need k_build >= 2, max_degree >= 1 and random_links + 2 * token_neighbours <= max_degree",
            ));
        }
        if config.hub_entries + config.sample_entries == 0 || config.ef_search == 0 {
            return Err(invalid(
                "aware config",
                "need at least one entry point and ef_search >= 1",
            ));
        }
        let keys = input.keys;
        let n = keys.rows();
        let dim = keys.dim();
        let build_queries = subsample(queries, config.max_build_queries);
        let qm = MatrixView::new(&build_queries, dim)?;
        let lists = exact_top_k_batch(keys, qm, config.k_build.min(n));

        let mut popularity = vec![0u32; n];
        for &key in lists.iter().flatten() {
            popularity[key as usize] += 1;
        }
        let mut adjacency = project(n, &lists, &popularity, config.max_degree - fixed_links);
        for (i, links) in adjacency.iter_mut().enumerate() {
            let r = config.token_neighbours;
            for j in i.saturating_sub(r)..(i + r + 1).min(n) {
                if j != i && !links.contains(&(j as u32)) {
                    links.push(j as u32);
                }
            }
        }

        let mut rng = StdRng::seed_from_u64(config.seed);
        if n > 1 {
            for (i, links) in adjacency.iter_mut().enumerate() {
                let mut added = 0;
                let mut attempts = 0;
                while added < config.random_links && attempts < 8 * config.random_links {
                    attempts += 1;
                    let j = rng.random_range(0..n as u32);
                    if j as usize != i && !links.contains(&j) {
                        links.push(j);
                        added += 1;
                    }
                }
            }
        }
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        let mut neighbours = Vec::new();
        for links in &adjacency {
            neighbours.extend_from_slice(links);
            offsets.push(neighbours.len() as u32);
        }

        let mut by_popularity: Vec<u32> = (0..n as u32).collect();
        by_popularity.sort_unstable_by(|a, b| {
            popularity[*b as usize]
                .cmp(&popularity[*a as usize])
                .then(a.cmp(b))
        });
        let mut entries: Vec<u32> = by_popularity.into_iter().take(config.hub_entries).collect();
        for _ in 0..config.sample_entries.min(n) {
            entries.push(rng.random_range(0..n as u32));
        }
        entries.sort_unstable();
        entries.dedup();

        Ok(AwareIndex {
            exact: BruteForce::build(BuildInput::keys(keys), &())?,
            dim,
            offsets,
            neighbours,
            entries,
            ef_search: config.ef_search,
        })
    }

    fn search(&self, query: &[f32], k: usize) -> Result<SearchResult> {
        self.search_ef(query, k, self.ef_search)
    }

    fn len(&self) -> usize {
        self.exact.len()
    }

    fn dim(&self) -> usize {
        self.dim
    }
}
