//! The attention-aware key index of RetrievalAttention.
//!
//! Decode queries and keys come from different distributions (a query's nearest keys are not
//! near it in key space), so a graph built from key-to-key proximity, like HNSW, walks through
//! the wrong neighbourhoods. This index is built from the prompt's own query vectors instead:
//!
//! 1. each build query's exact top-`k_build` keys are found by brute force (the query→key
//!    bipartite graph);
//! 2. the bipartite graph is projected onto keys: two keys are linked as often as build queries
//!    retrieved them together. Each key keeps the `max_degree` partners with the highest
//!    co-retrieval count divided by `popularity^lift_exponent` (popularity: how many build
//!    queries retrieved the partner), which keeps hubs such as attention sinks from filling
//!    every list while still preferring partners that co-occur often; a partner that is closer
//!    (in key space) to an already kept partner than to the key is passed over while better
//!    placed ones remain, so the links spread over several directions;
//! 3. a decode query is answered by a search under a budget of inner products that scores
//!    candidates in order of the evidence for them: it scores the most popular keys (plus a
//!    small fixed random sample), then every scored key votes for its unscored partners,
//!    `exp(score / temperature)` weighted by the link's rank, and the search always scores next
//!    the candidate with the highest mean vote (votes ÷ link weights plus a prior). A key linked
//!    from several good keys, or from one very good key through a strong link, comes before the
//!    weak partners of the best key. (An earlier version expanded the best key's links in rank
//!    order, a best-first walk; most of the top-k keys it missed were partners of keys it had
//!    scored that it never got to, and ordering them by votes found more of them: 0.752 → 0.800
//!    recall at 5% of the keys on layer 18 of the 8k capture, in numpy.) The answer is the
//!    best `k` of every key scored.
//!
//! Every inner product computed during a search is counted.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{IndexError, Result, invalid};
use crate::exact::{BruteForce, exact_top_k, exact_top_k_batch, top_k_pairs};
use crate::matrix::{MatrixView, dot, l2_squared};
use crate::retriever::{BuildInput, Retriever, SearchResult, check_query};

/// Build and search parameters of [`AwareIndex`].
#[derive(Debug, Clone)]
pub struct AwareConfig {
    /// Keys retrieved per build query (the bipartite graph's query degree).
    pub k_build: usize,
    /// Out-degree bound of the key graph, token-neighbour links included. With the vote
    /// search, 12 matched 16 and 30 in prototypes at a third of the links (the votes of links
    /// past the first dozen weigh under `exp(-0.2 · 12)` ≈ 0.09); 8 and 10 lost recall.
    pub max_degree: usize,
    /// Exponent of the partner's popularity that divides a co-retrieval count when ranking a
    /// key's partners: 0 ranks by raw count (hubs everywhere), 1 by lift (rare partners win,
    /// and the graph falls apart into small cliques). In prototypes on SmolLM2 keys 0.5–0.7
    /// worked best; 0 and 1 were far worse.
    pub lift_exponent: f32,
    /// Links to the tokens within this distance on each side, for keys that few build queries
    /// retrieved. Counted within `max_degree`.
    pub token_neighbours: usize,
    /// Build queries used at most (evenly spaced rows); 0 uses all. Build cost is linear in it.
    pub max_build_queries: usize,
    /// Entry points taken from the keys most often retrieved by build queries.
    pub hub_entries: usize,
    /// Entry points taken from a fixed random sample of keys, so that a search also starts
    /// outside the hubs' region (on unstructured data the hubs alone reach little). On layer 18
    /// of the 8k capture (numpy) 8 of them cost 0.6 points of recall at 5% scanned.
    pub sample_entries: usize,
    /// Inner products a [`Retriever::search`] may compute, as a fraction of the keys; the
    /// budget is raised to `min_scan` and to `2·k`.
    pub scan_fraction: f64,
    /// Lower bound of the default search budget.
    pub min_scan: usize,
    /// Seed of the entry sample: builds are deterministic.
    pub seed: u64,
}

impl Default for AwareConfig {
    fn default() -> Self {
        AwareConfig {
            k_build: 32,
            max_degree: 12,
            lift_exponent: 0.6,
            token_neighbours: 0,
            max_build_queries: 0,
            hub_entries: 16,
            sample_entries: 8,
            scan_fraction: 0.1,
            min_scan: 256,
            seed: 0x5eed,
        }
    }
}

/// Weight of a key's `j`-th strongest link in the votes it casts: `exp(-LINK_DECAY · j)`, so a
/// key's first few partners carry most of its evidence (in prototypes on the SmolLM2 8k capture,
/// 0.2 beat 0.1, 0.35 and 1, and ranks beat the raw co-retrieval weights).
const LINK_DECAY: f64 = 0.2;
/// Temperature of a vote, in standard deviations of the entry scores: a scored key votes
/// `exp(score / (VOTE_TEMPERATURE · spread))` for each partner, so one clearly better key
/// outvotes several middling ones (0.7–1 worked best in prototypes; 0.35 and 1.5 were worse).
const VOTE_TEMPERATURE: f64 = 0.75;
/// Prior weight in a candidate's priority `Σ vote / (Σ link weight + VOTE_PRIOR)`: a candidate
/// linked only from poor keys ranks low however many of them link it, while a single strong
/// link is not outranked by the sum of many weak ones.
const VOTE_PRIOR: f64 = 1.0;

/// Attention-aware key graph of one (layer, KV head).
pub struct AwareIndex {
    exact: BruteForce,
    dim: usize,
    /// CSR adjacency: neighbours of key `i`, strongest first, are
    /// `neighbours[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<u32>,
    neighbours: Vec<u32>,
    entries: Vec<u32>,
    /// How many of `entries` are hubs (they come first).
    hubs: usize,
    /// Vote weight of a key's `j`-th link, `exp(-LINK_DECAY · j)`, for `j` below the largest
    /// out-degree.
    link_weights: Vec<f32>,
    scan_fraction: f64,
    min_scan: usize,
}

/// Evidence for one unscored candidate.
#[derive(Debug, Clone, Copy, Default)]
struct Votes {
    votes: f64,
    weights: f32,
    /// 1 + the bucket of its live queue entry (0: none). Entries in other buckets are stale.
    slot: u32,
}

/// Buffers of the vote search, kept per thread between searches, so that a search costs in
/// proportion to the keys it touches rather than to the index (the per-key state would be 2 MiB
/// to allocate and zero at 128k keys). At 8k keys it made no measurable difference.
#[derive(Default)]
struct Scratch {
    /// Evidence per key (all default between searches).
    state: Vec<Votes>,
    queue: BucketQueue,
}

impl Scratch {
    fn prepare(&mut self, n: usize) {
        if self.state.len() < n {
            self.state.resize(n, Votes::default());
        }
        self.queue.reset();
    }

    /// Returns every key that received a vote to its default state.
    fn finish(&mut self) {
        for &(_, key) in &self.queue.entries {
            self.state[key as usize] = Votes::default();
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

/// Max-priority queue of candidates in buckets of the priority's f32 bit pattern (8 exponent
/// and `23 − BUCKET_SHIFT` mantissa bits; entries within a bucket come out last in, first out).
/// A priority changes with every vote; the search pushes a new entry only when the candidate
/// moves to another bucket and skips stale entries when popping. With `BinaryHeap` and a push
/// per vote the search was 3.7× slower; here a push is an append and a pop rarely scans more
/// than a few empty buckets. Written here because no crate in the tree offers a bucket queue
/// keyed by float priorities.
#[derive(Default)]
struct BucketQueue {
    /// First entry of each bucket (`NONE` when empty).
    heads: Vec<u32>,
    /// Per entry: the next entry of its bucket, the candidate.
    entries: Vec<(u32, u32)>,
    /// No bucket above this one holds an entry.
    top: usize,
}

const NONE: u32 = u32::MAX;
/// Bits of a positive f32 dropped to form its bucket: 32 − 1 (sign) − 18 = 13 bits remain.
const BUCKET_SHIFT: u32 = 18;

/// Buckets of a [`BucketQueue`]: every positive f32 bit pattern shifted by `BUCKET_SHIFT`.
const BUCKETS: usize = 1 << (31 - BUCKET_SHIFT);

impl BucketQueue {
    /// Empties the queue, sizing its buckets on first use.
    fn reset(&mut self) {
        if self.heads.len() == BUCKETS {
            self.heads.fill(NONE);
        } else {
            self.heads = vec![NONE; BUCKETS];
        }
        self.entries.clear();
        self.top = 0;
    }

    /// The bucket of `priority`: positive f32s order like their bit patterns; overflow lands
    /// in the top bucket, NaN and underflow in the bottom one.
    fn bucket_of(priority: f64) -> u32 {
        let p = if priority.is_nan() {
            0.0
        } else {
            priority as f32
        }
        .clamp(f32::MIN_POSITIVE, f32::MAX);
        p.to_bits() >> BUCKET_SHIFT
    }

    fn push(&mut self, bucket: u32, key: u32) {
        let b = bucket as usize;
        self.entries.push((self.heads[b], key));
        self.heads[b] = (self.entries.len() - 1) as u32;
        self.top = self.top.max(b);
    }

    /// The most recent entry of the highest non-empty bucket: (candidate, bucket).
    fn pop(&mut self) -> Option<(u32, u32)> {
        while self.heads[self.top] == NONE {
            if self.top == 0 {
                return None;
            }
            self.top -= 1;
        }
        let (next, key) = self.entries[self.heads[self.top] as usize];
        self.heads[self.top] = next;
        Some((key, self.top as u32))
    }
}

impl AwareIndex {
    /// Mean out-degree of the key graph (a build diagnostic).
    pub fn mean_degree(&self) -> f64 {
        self.neighbours.len() as f64 / self.len() as f64
    }

    /// Neighbours of key `i`, strongest first.
    fn links(&self, i: u32) -> &[u32] {
        &self.neighbours[self.offsets[i as usize] as usize..self.offsets[i as usize + 1] as usize]
    }

    /// The default inner-product budget of a search for `k` keys.
    pub fn default_budget(&self, k: usize) -> usize {
        ((self.scan_fraction * self.len() as f64).ceil() as usize)
            .max(self.min_scan)
            .max(2 * k)
    }

    /// Searches computing at most `budget` inner products (raised to `k`), for sweeps. The
    /// answer is the best `k` keys of all those scored; a search that runs out of links before
    /// scoring `k` keys finishes with an exact scan of the rest (counted).
    pub fn search_budget(&self, query: &[f32], k: usize, budget: usize) -> Result<SearchResult> {
        check_query(query, self.dim)?;
        let n = self.len();
        let k = k.min(n);
        if k == 0 {
            return Ok(SearchResult {
                positions: Vec::new(),
                scanned: 0,
            });
        }
        let budget = budget.max(k).min(n);
        // A search that must score most keys costs more than scanning them all.
        if 2 * k >= n || 2 * budget >= n {
            return Ok(SearchResult {
                positions: exact_top_k(self.exact.keys(), query, k),
                scanned: n,
            });
        }
        let keys = self.exact.keys();
        let mut visited = vec![0u64; n.div_ceil(64)];
        let mut scored: Vec<(f32, u32)> = Vec::with_capacity(budget);
        // Scores key `i` unless already seen; every score computed lands in `scored`.
        let visit = |i: u32, visited: &mut [u64], scored: &mut Vec<(f32, u32)>| -> Option<f32> {
            if is_visited(visited, i) {
                return None;
            }
            visited[i as usize / 64] |= 1 << (i % 64);
            let s = dot(keys.row(i as usize), query);
            scored.push((s, i));
            Some(s)
        };
        let mut voters: Vec<(f32, u32)> = Vec::with_capacity(self.entries.len());
        for &e in &self.entries {
            if scored.len() >= budget {
                break;
            }
            if let Some(s) = visit(e, &mut visited, &mut scored) {
                voters.push((s, e));
            }
        }
        // Votes are relative to the hubs' score distribution, so the search does not depend on
        // the query's norm. The random entries are left out: their (mostly poor) scores widened
        // the spread, which flattened the votes and cost recall (numpy, layer 18 of the 8k
        // capture: 0.783 with them in, 0.792 without, 0.798 with no random entries at all).
        let (centre, spread) = {
            let hubs = if self.hubs == 0 {
                scored.len()
            } else {
                self.hubs.min(scored.len())
            };
            let basis = &scored[..hubs];
            let m = basis.len().max(1) as f64;
            let mean = basis.iter().map(|s| s.0 as f64).sum::<f64>() / m;
            let var = basis
                .iter()
                .map(|s| (s.0 as f64 - mean).powi(2))
                .sum::<f64>()
                / m;
            (mean, var.sqrt().max(f64::MIN_POSITIVE))
        };
        // Per candidate: summed votes, summed link weights and the bucket of its live queue
        // entry; dense, in buffers this thread keeps between searches.
        let mut scratch = SCRATCH.take().unwrap_or_default();
        scratch.prepare(n);
        let Scratch {
            state,
            queue: frontier,
        } = &mut scratch;
        loop {
            for (s, x) in voters.drain(..) {
                let strength = ((s as f64 - centre) / (VOTE_TEMPERATURE * spread))
                    .clamp(-700.0, 700.0)
                    .exp();
                for (&y, &w) in self.links(x).iter().zip(&self.link_weights) {
                    if is_visited(&visited, y) {
                        continue;
                    }
                    let c = &mut state[y as usize];
                    c.votes += strength * w as f64;
                    c.weights += w;
                    let b = BucketQueue::bucket_of(c.votes / (c.weights as f64 + VOTE_PRIOR));
                    if c.slot != b + 1 {
                        c.slot = b + 1;
                        frontier.push(b, y);
                    }
                }
            }
            if scored.len() >= budget {
                break;
            }
            // The best candidate whose entry is current and which is still unscored.
            let next = loop {
                match frontier.pop() {
                    None => break None,
                    Some((y, b)) if state[y as usize].slot == b + 1 => {
                        if let Some(s) = visit(y, &mut visited, &mut scored) {
                            break Some((s, y));
                        }
                    }
                    Some(_) => {}
                }
            };
            match next {
                Some(v) => voters.push(v),
                None => break,
            }
        }
        scratch.finish();
        SCRATCH.set(Some(scratch));
        // The search exhausted its component before scoring k keys: finish with an exact scan of
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

    /// A diagnostic bound, not a search: how many of the true top-`k` keys a search of this
    /// graph could reach within `budget` scored keys if it knew, before scoring, which linked
    /// candidate scores highest. It scores the same entry points as [`AwareIndex::search_budget`]
    /// and then always the unscored partner of a scored key with the highest true score in
    /// `scores` (one per key: the query's inner products with every key, computed by the
    /// caller). The gap between this and the vote search is what ordering loses; the gap
    /// between this and 1 is what the graph and its entry points lose. Returns the best `k`
    /// keys scored, best first, and how many were scored (at most `budget`, raised to `k`;
    /// fewer when the links run out).
    pub fn ordering_bound(&self, scores: &[f32], k: usize, budget: usize) -> Result<SearchResult> {
        let n = self.len();
        if scores.len() != n {
            return Err(invalid(
                "scores",
                format!("{} scores for {n} keys", scores.len()),
            ));
        }
        let budget = budget.max(k).min(n);
        let mut visited = vec![0u64; n.div_ceil(64)];
        let mut scored: Vec<(f32, u32)> = Vec::with_capacity(budget);
        // Written with the standard heap: a diagnostic, so speed does not matter here.
        type Heap = std::collections::BinaryHeap<(OrdF32, u32)>;
        let mut frontier = Heap::new();
        let visit =
            |i: u32, visited: &mut [u64], scored: &mut Vec<(f32, u32)>, frontier: &mut Heap| {
                if is_visited(visited, i) {
                    return;
                }
                visited[i as usize / 64] |= 1 << (i % 64);
                scored.push((scores[i as usize], i));
                for &y in self.links(i) {
                    if !is_visited(visited, y) {
                        frontier.push((OrdF32(scores[y as usize]), y));
                    }
                }
            };
        for &e in self.entries.iter().take(budget) {
            visit(e, &mut visited, &mut scored, &mut frontier);
        }
        while scored.len() < budget {
            match frontier.pop() {
                Some((_, y)) => visit(y, &mut visited, &mut scored, &mut frontier),
                None => break,
            }
        }
        let scanned = scored.len();
        let positions = top_k_pairs(scored, k.min(n))
            .into_iter()
            .map(|p| p.1)
            .collect();
        Ok(SearchResult { positions, scanned })
    }
}

/// An f32 ordered by `total_cmp`, for the diagnostic's heap.
#[derive(PartialEq)]
struct OrdF32(f32);

impl Eq for OrdF32 {}

impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Whether bit `i` of the search's visited set is set.
fn is_visited(visited: &[u64], i: u32) -> bool {
    visited[i as usize / 64] >> (i % 64) & 1 == 1
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

/// Candidates examined by the occlusion pruning (at least 3 per kept link). Fixed rather than
/// proportional to the degree, so a graph of degree d holds the first d links of the same
/// graph built with a higher degree.
const PRUNE_POOL: usize = 90;

/// Projects the query→key lists onto keys: for each key, its co-retrieved partners ranked by
/// `count / popularity^lift_exponent` (ties: lower position); of the best `max(PRUNE_POOL, 3 · keep)`,
/// links are kept in rank order unless occluded — unless an already kept partner lies closer
/// to the candidate (L2 in key space) than the key itself, so the candidate is reached through
/// it anyway (the relative-neighbourhood rule RoarGraph prunes with). Occluded candidates fill
/// the remaining slots in rank order. Without `keys` the list is only truncated.
///
/// Counted per key from an inverted list (which lists hold the key) into a dense counter, so
/// the cost is `queries · k_build²` increments with no pair list in memory.
fn project(
    n: usize,
    keys: Option<MatrixView<'_>>,
    lists: &[Vec<u32>],
    popularity: &[u32],
    lift_exponent: f32,
    keep: usize,
) -> Vec<Vec<u32>> {
    // Inverted lists as CSR: lists_of[x] = the build queries whose list holds key x.
    let mut offsets = vec![0usize; n + 1];
    for &key in lists.iter().flatten() {
        offsets[key as usize + 1] += 1;
    }
    for i in 0..n {
        offsets[i + 1] += offsets[i];
    }
    let mut fill = offsets.clone();
    let mut lists_of = vec![0u32; offsets[n]];
    for (q, list) in lists.iter().enumerate() {
        for &key in list {
            lists_of[fill[key as usize]] = q as u32;
            fill[key as usize] += 1;
        }
    }
    let discount: Vec<f32> = popularity
        .iter()
        .map(|&p| (p.max(1) as f32).powf(-lift_exponent))
        .collect();
    (0..n)
        .into_par_iter()
        .map_init(
            || (vec![0u32; n], Vec::<u32>::new()),
            |(counts, touched), x| {
                for &q in &lists_of[offsets[x]..offsets[x + 1]] {
                    for &y in &lists[q as usize] {
                        if y as usize != x {
                            if counts[y as usize] == 0 {
                                touched.push(y);
                            }
                            counts[y as usize] += 1;
                        }
                    }
                }
                let mut ranked: Vec<(f32, u32)> = touched
                    .iter()
                    .map(|&y| (counts[y as usize] as f32 * discount[y as usize], y))
                    .collect();
                for &y in touched.iter() {
                    counts[y as usize] = 0;
                }
                touched.clear();
                let by_weight =
                    |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                let pool = if keys.is_some() {
                    PRUNE_POOL.max(3 * keep)
                } else {
                    keep
                };
                if ranked.len() > pool && pool > 0 {
                    ranked.select_nth_unstable_by(pool - 1, by_weight);
                }
                ranked.truncate(pool);
                ranked.sort_unstable_by(by_weight);
                let ranked: Vec<u32> = ranked.into_iter().map(|r| r.1).collect();
                match keys {
                    Some(keys) => occlusion_prune(keys, x, &ranked, keep),
                    None => ranked.into_iter().take(keep).collect(),
                }
            },
        )
        .collect()
}

/// Keeps up to `keep` of `ranked` (best first) for key `x`: a candidate is skipped while some
/// kept partner is closer to it than `x` is; skipped candidates fill what is left, in order.
fn occlusion_prune(keys: MatrixView<'_>, x: usize, ranked: &[u32], keep: usize) -> Vec<u32> {
    let mut kept: Vec<u32> = Vec::with_capacity(keep);
    let mut occluded: Vec<u32> = Vec::new();
    for &y in ranked {
        if kept.len() == keep {
            break;
        }
        let row = keys.row(y as usize);
        let to_x = l2_squared(keys.row(x), row);
        if kept
            .iter()
            .any(|&z| l2_squared(keys.row(z as usize), row) < to_x)
        {
            occluded.push(y);
        } else {
            kept.push(y);
        }
    }
    let room = keep - kept.len();
    kept.extend(occluded.into_iter().take(room));
    kept
}

impl Retriever for AwareIndex {
    type Config = AwareConfig;

    fn build(input: BuildInput<'_>, config: &AwareConfig) -> Result<Self> {
        input.validate()?;
        let queries = input.queries.ok_or(IndexError::MissingQueries)?;
        if queries.rows() == 0 {
            return Err(IndexError::MissingQueries);
        }
        if config.k_build < 2
            || config.max_degree == 0
            || 2 * config.token_neighbours > config.max_degree
            || !(0.0..=4.0).contains(&config.lift_exponent)
        {
            return Err(invalid(
                "aware config",
                "need k_build >= 2, max_degree >= 1, 2 * token_neighbours <= max_degree and lift_exponent in 0..=4",
            ));
        }
        if config.hub_entries + config.sample_entries == 0
            || !(config.scan_fraction > 0.0 && config.scan_fraction <= 1.0)
        {
            return Err(invalid(
                "aware config",
                "need at least one entry point and scan_fraction in (0, 1]",
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
        let fixed_links = 2 * config.token_neighbours;
        let mut adjacency = project(
            n,
            Some(keys),
            &lists,
            &popularity,
            config.lift_exponent,
            config.max_degree - fixed_links,
        );
        drop(lists);
        for (i, links) in adjacency.iter_mut().enumerate() {
            let r = config.token_neighbours;
            for j in i.saturating_sub(r)..(i + r + 1).min(n) {
                if j != i && !links.contains(&(j as u32)) {
                    links.push(j as u32);
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
        // Hubs first, then the sample.
        let mut entries: Vec<u32> = by_popularity.into_iter().take(config.hub_entries).collect();
        let mut rng = StdRng::seed_from_u64(config.seed);
        for _ in 0..config.sample_entries.min(n) {
            let e = rng.random_range(0..n as u32);
            if !entries.contains(&e) {
                entries.push(e);
            }
        }

        Ok(AwareIndex {
            exact: BruteForce::build(BuildInput::keys(keys), &())?,
            dim,
            offsets,
            link_weights: (0..adjacency.iter().map(Vec::len).max().unwrap_or(0))
                .map(|j| (-LINK_DECAY * j as f64).exp() as f32)
                .collect(),
            neighbours,
            hubs: config.hub_entries.min(n),
            entries,
            scan_fraction: config.scan_fraction,
            min_scan: config.min_scan,
        })
    }

    fn search(&self, query: &[f32], k: usize) -> Result<SearchResult> {
        self.search_budget(query, k, self.default_budget(k))
    }

    fn len(&self) -> usize {
        self.exact.len()
    }

    fn dim(&self) -> usize {
        self.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::planted;

    #[test]
    fn projection_ranks_partners_by_co_retrieval() {
        let lists = vec![vec![0, 1, 2], vec![0, 1, 3], vec![4, 5], vec![1, 0]];
        let mut popularity = vec![0u32; 6];
        for &k in lists.iter().flatten() {
            popularity[k as usize] += 1;
        }
        let adj = project(6, None, &lists, &popularity, 0.0, 2);
        // Key 0 met key 1 three times, keys 2 and 3 once each (tie: lower position).
        assert_eq!(adj[0], vec![1, 2]);
        assert_eq!(adj[4], vec![5]);
        assert_eq!(adj[2], vec![0, 1]);
        // A strong popularity discount prefers the rarely retrieved partners of key 0.
        let lifted = project(6, None, &lists, &popularity, 2.0, 3);
        assert_eq!(lifted[0], vec![2, 3, 1]);
    }

    #[test]
    fn bucket_queue_pops_in_priority_order() {
        let mut q = BucketQueue::default();
        q.reset();
        assert_eq!(q.pop(), None);
        let push = |q: &mut BucketQueue, p: f64, key: u32| q.push(BucketQueue::bucket_of(p), key);
        for (p, key) in [
            (1.0, 1),
            (1e-30, 2),
            (50.0, 3),
            (f64::INFINITY, 4),
            (f64::NAN, 5),
            (2.0, 6),
        ] {
            push(&mut q, p, key);
        }
        let order: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|e| e.0).collect();
        assert_eq!(order, vec![4, 3, 6, 1, 2, 5]);
        // Nearby priorities share a bucket and come out last in, first out; pop names it.
        assert_eq!(
            BucketQueue::bucket_of(1.0),
            BucketQueue::bucket_of(1.0 + 1e-3)
        );
        push(&mut q, 1.0, 8);
        push(&mut q, 1.0 + 1e-3, 9);
        push(&mut q, 0.25, 10);
        let one = BucketQueue::bucket_of(1.0);
        assert_eq!(q.pop(), Some((9, one)));
        assert_eq!(q.pop(), Some((8, one)));
        assert_eq!(q.pop(), Some((10, BucketQueue::bucket_of(0.25))));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn occlusion_prefers_partners_in_other_directions() {
        // Keys on a line: x = 0 at position 0; candidates ranked 1, 2, 3 at 1.0, 2.0, -1.0.
        let data = [0.0f32, 1.0, 2.0, -1.0];
        let keys = MatrixView::new(&data, 1).unwrap();
        // Key 2 lies closer to kept key 1 than to x: passed over while key 3 remains.
        assert_eq!(occlusion_prune(keys, 0, &[1, 2, 3], 2), vec![1, 3]);
        // With room for all, the occluded one fills the last slot.
        assert_eq!(occlusion_prune(keys, 0, &[1, 2, 3], 3), vec![1, 3, 2]);
    }

    #[test]
    fn search_respects_its_budget_and_finds_planted_answers() {
        let data = planted(11);
        let keys = MatrixView::new(&data.keys, data.dim).unwrap();
        let build = MatrixView::new(&data.build_queries, data.dim).unwrap();
        let tests = MatrixView::new(&data.test_queries, data.dim).unwrap();
        let index = AwareIndex::build(
            BuildInput {
                keys,
                queries: Some(build),
            },
            &AwareConfig::default(),
        )
        .unwrap();
        let n = keys.rows();
        for budget in [data.k, 3 * data.k, n / 8, n / 3] {
            let mut hits = 0;
            for (g, answer) in data.answers.iter().enumerate() {
                let r = index.search_budget(tests.row(g), data.k, budget).unwrap();
                assert_eq!(r.positions.len(), data.k);
                assert!(
                    r.scanned <= budget,
                    "scanned {} > budget {budget}",
                    r.scanned
                );
                hits += r.positions.iter().filter(|p| answer.contains(p)).count();
            }
            let recall = hits as f64 / (data.k * data.answers.len()) as f64;
            let floor = match budget {
                b if b >= n / 3 => 0.95,
                b if b >= n / 8 => 0.85,
                _ => 0.0,
            };
            assert!(recall >= floor, "recall {recall} at budget {budget}");
        }
        // The ordering bound scores no more than its budget and, knowing the scores, recalls
        // at least as much as the vote search on this planted data.
        for budget in [3 * data.k, n / 8] {
            let (mut bound_hits, mut search_hits) = (0, 0);
            for (g, answer) in data.answers.iter().enumerate() {
                let q = tests.row(g);
                let mut scores = Vec::new();
                crate::matrix::scores_into(keys, q, &mut scores);
                let b = index.ordering_bound(&scores, data.k, budget).unwrap();
                assert!(b.scanned <= budget && b.positions.len() <= data.k);
                bound_hits += b.positions.iter().filter(|p| answer.contains(p)).count();
                let r = index.search_budget(q, data.k, budget).unwrap();
                search_hits += r.positions.iter().filter(|p| answer.contains(p)).count();
            }
            assert!(
                bound_hits >= search_hits,
                "bound {bound_hits} < search {search_hits} at budget {budget}"
            );
        }
        assert!(index.ordering_bound(&[0.0; 3], data.k, n).is_err());
        // A budget of half the keys or more is answered by the exact scan.
        let r = index.search_budget(tests.row(0), data.k, n).unwrap();
        assert_eq!(r.scanned, n);
    }
}
