//! Layer-wise KV budgets (SqueezeAttention).
//!
//! A layer's importance is read from `layer_cos`, the cosine similarity of the residual stream
//! before and after its attention block: a high cosine means attention changed the stream
//! little, so the layer can give up cache. Layers are clustered into three groups by a
//! deterministic 1-D k-means; the group with the highest cosine gets a fraction `p` of the
//! uniform per-layer share, and what it gives up is spread equally over the other layers.
//!
//! All integer rounding uses largest-remainder apportionment on exact rational quotas, so the
//! total is conserved exactly and `p = 1` reproduces the uniform allocation bit for bit.

use crate::error::{IndexError, Result, invalid};

/// Groups SqueezeAttention clusters layers into.
pub const GROUPS: usize = 3;

/// `p` is carried as an exact fraction with this denominator, so rounding never depends on
/// how floating point happened to represent an intermediate quota.
const P_DENOM: u128 = 1_000_000;

/// Result of the 1-D k-means over layer cosines.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGroups {
    /// Group of each layer: 0 has the lowest mean cosine (most important), `GROUPS - 1` the
    /// highest (least important).
    pub labels: Vec<usize>,
    /// Mean cosine of each group, ascending. A group can be empty when fewer distinct values
    /// exist than groups; its centroid is then the one it was initialised at.
    pub centroids: Vec<f64>,
}

impl LayerGroups {
    /// Layers of the least important (highest-cosine) non-empty group.
    pub fn least_important(&self) -> Vec<usize> {
        let top = self.labels.iter().copied().max().unwrap_or(0);
        (0..self.labels.len())
            .filter(|&l| self.labels[l] == top)
            .collect()
    }
}

/// Deterministic 1-D k-means with `GROUPS` clusters.
///
/// Centroids start at the 1/6, 3/6 and 5/6 quantiles of the sorted values; Lloyd iterations
/// assign each value to the nearest centroid (ties go to the lower centroid) until no label
/// changes. Labels depend only on the values, never on their order, so equal values always
/// share a group.
pub fn kmeans_layers(layer_cos: &[f32]) -> Result<LayerGroups> {
    if layer_cos.is_empty() {
        return Err(invalid("layer_cos", "no layers"));
    }
    if !layer_cos.iter().all(|c| c.is_finite()) {
        return Err(IndexError::NonFinite("layer_cos"));
    }
    let values: Vec<f64> = layer_cos.iter().map(|&c| c as f64).collect();
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let mut centroids: Vec<f64> = (0..GROUPS)
        .map(|g| sorted[((2 * g + 1) * n / (2 * GROUPS)).min(n - 1)])
        .collect();
    let mut labels = vec![usize::MAX; n];
    // Lloyd's algorithm in 1-D converges in few steps; the cap only guards against cycling.
    for _ in 0..100 {
        let next: Vec<usize> = values.iter().map(|&v| nearest(&centroids, v)).collect();
        if next == labels {
            break;
        }
        labels = next;
        for (g, c) in centroids.iter_mut().enumerate() {
            let members: Vec<f64> = values
                .iter()
                .zip(&labels)
                .filter(|(_, l)| **l == g)
                .map(|(v, _)| *v)
                .collect();
            if !members.is_empty() {
                *c = members.iter().sum::<f64>() / members.len() as f64;
            }
        }
    }
    Ok(LayerGroups { labels, centroids })
}

fn nearest(centroids: &[f64], v: f64) -> usize {
    let mut best = 0;
    for (g, c) in centroids.iter().enumerate() {
        if (v - c).abs() < (v - centroids[best]).abs() {
            best = g;
        }
    }
    best
}

/// Splits `total` into integers proportional to rational quotas `numerators[i] / denom`
/// (which must sum to `total`): floors first, then one more unit to the largest remainders,
/// ties to the lower layer.
fn apportion(total: usize, numerators: &[u128], denom: u128) -> Vec<usize> {
    let mut out: Vec<usize> = numerators.iter().map(|n| (n / denom) as usize).collect();
    let given: usize = out.iter().sum();
    let mut order: Vec<usize> = (0..numerators.len()).collect();
    order.sort_by(|&a, &b| {
        (numerators[b] % denom)
            .cmp(&(numerators[a] % denom))
            .then(a.cmp(&b))
    });
    for &i in order.iter().take(total - given) {
        out[i] += 1;
    }
    out
}

/// The uniform allocation: `total` tokens split as evenly as possible over `layers`.
pub fn uniform_budgets(total: usize, layers: usize) -> Result<Vec<usize>> {
    if layers == 0 {
        return Err(invalid("layers", "no layers"));
    }
    Ok(apportion(
        total,
        &vec![total as u128; layers],
        layers as u128,
    ))
}

/// SqueezeAttention's allocation of `total` tokens: layers in `squeezed` get `p` times the
/// uniform share `total / layers`; the rest is split equally over the other layers. Conserves
/// `total` exactly; `p = 1` (or no squeezed layer, or every layer squeezed) gives the uniform
/// allocation. `p` must be in `[0, 1]`.
pub fn squeezed_budgets(
    total: usize,
    layers: usize,
    squeezed: &[usize],
    p: f64,
) -> Result<Vec<usize>> {
    if layers == 0 {
        return Err(invalid("layers", "no layers"));
    }
    if !(0.0..=1.0).contains(&p) {
        return Err(invalid("p", format!("{p} is not in [0, 1]")));
    }
    let mut is_squeezed = vec![false; layers];
    for &l in squeezed {
        *is_squeezed
            .get_mut(l)
            .ok_or_else(|| invalid("squeezed", format!("layer {l} is not below {layers}")))? = true;
    }
    let g = is_squeezed.iter().filter(|s| **s).count() as u128;
    let (l, t) = (layers as u128, total as u128);
    if g == 0 || g == l {
        return uniform_budgets(total, layers);
    }
    let pn = (p * P_DENOM as f64).round() as u128;
    // Over the common denominator D = P_DENOM·L·(L−g):
    //   squeezed quota  p·T/L            = pn·T·(L−g) / D
    //   other quota     (T − g·p·T/L)/(L−g) = (P_DENOM·T·L − g·pn·T) / D
    // With pn = P_DENOM both numerators equal P_DENOM·T·(L−g), so p = 1 is exactly uniform.
    let denom = P_DENOM * l * (l - g);
    let low = pn * t * (l - g);
    let high = P_DENOM * t * l - g * pn * t;
    let numerators: Vec<u128> = is_squeezed
        .iter()
        .map(|&s| if s { low } else { high })
        .collect();
    Ok(apportion(total, &numerators, denom))
}

/// Clamps every layer's budget to `cap` (a layer cannot keep more tokens than it has) and
/// hands the excess, in equal shares with largest-remainder rounding, to the layers still
/// below the cap. The total is conserved while `total <= cap · layers`, else every layer ends
/// at `cap`.
pub fn cap_budgets(budgets: &[usize], cap: usize) -> Vec<usize> {
    let mut out = budgets.to_vec();
    loop {
        let excess: usize = out.iter().map(|&b| b.saturating_sub(cap)).sum();
        let open: Vec<usize> = (0..out.len()).filter(|&i| out[i] < cap).collect();
        for b in out.iter_mut() {
            *b = (*b).min(cap);
        }
        if excess == 0 || open.is_empty() {
            return out;
        }
        let share = apportion(
            excess,
            &vec![excess as u128; open.len()],
            open.len() as u128,
        );
        for (&i, s) in open.iter().zip(share) {
            out[i] += s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kmeans_separates_three_obvious_groups() {
        let cos = [0.5, 0.52, 0.95, 0.7, 0.96, 0.51, 0.72, 0.97];
        let g = kmeans_layers(&cos).unwrap();
        assert_eq!(g.labels, vec![0, 0, 2, 1, 2, 0, 1, 2]);
        assert_eq!(g.least_important(), vec![2, 4, 7]);
        assert!((g.centroids[2] - 0.96).abs() < 1e-6);
    }

    #[test]
    fn kmeans_handles_degenerate_inputs() {
        let g = kmeans_layers(&[0.8; 5]).unwrap();
        assert!(g.labels.iter().all(|&l| l == g.labels[0]));
        assert_eq!(g.least_important().len(), 5);
        assert_eq!(kmeans_layers(&[0.3]).unwrap().labels.len(), 1);
        assert!(kmeans_layers(&[]).is_err());
        assert_eq!(
            kmeans_layers(&[f32::NAN]),
            Err(IndexError::NonFinite("layer_cos"))
        );
    }

    #[test]
    fn squeezing_moves_budget_from_the_squeezed_group() {
        let b = squeezed_budgets(1000, 10, &[0, 1], 0.3).unwrap();
        assert_eq!(b[0], 30);
        assert_eq!(b[1], 30);
        // (1000 − 60) / 8 = 117.5: two layers get 118, ties going to the lower layers.
        assert_eq!(&b[2..], &[118, 118, 118, 118, 117, 117, 117, 117]);
        assert!(squeezed_budgets(10, 2, &[2], 0.5).is_err());
        assert!(squeezed_budgets(10, 2, &[0], 1.5).is_err());
    }

    #[test]
    fn caps_redistribute_excess() {
        // The excess 5 goes to layers 1 and 2 in equal shares, the odd unit to the lower layer.
        assert_eq!(cap_budgets(&[10, 0, 2], 5), vec![5, 3, 4]);
        assert_eq!(cap_budgets(&[10, 10], 5), vec![5, 5]);
    }

    proptest! {
        #[test]
        fn budgets_conserve_the_total(total in 0usize..100_000, layers in 1usize..64, p in 0.0f64..=1.0, mask in any::<u64>()) {
            let squeezed: Vec<usize> = (0..layers).filter(|l| mask >> l & 1 == 1).collect();
            let b = squeezed_budgets(total, layers, &squeezed, p).unwrap();
            prop_assert_eq!(b.iter().sum::<usize>(), total);
            let u = uniform_budgets(total, layers).unwrap();
            prop_assert_eq!(u.iter().sum::<usize>(), total);
            prop_assert!(u.iter().max().unwrap() - u.iter().min().unwrap() <= 1);
            // Squeezed layers never get more than the others.
            if !squeezed.is_empty() && squeezed.len() < layers {
                let lo = squeezed.iter().map(|&l| b[l]).max().unwrap();
                let hi = (0..layers).filter(|l| !squeezed.contains(l)).map(|l| b[l]).min().unwrap();
                prop_assert!(lo <= hi + 1);
            }
        }

        #[test]
        fn p_one_is_exactly_uniform(total in 0usize..100_000, layers in 1usize..64, mask in any::<u64>()) {
            let squeezed: Vec<usize> = (0..layers).filter(|l| mask >> l & 1 == 1).collect();
            prop_assert_eq!(squeezed_budgets(total, layers, &squeezed, 1.0).unwrap(), uniform_budgets(total, layers).unwrap());
        }

        #[test]
        fn kmeans_is_order_free_and_groups_are_intervals(cos in proptest::collection::vec(0.0f32..1.0, 1..40), rot in 0usize..40) {
            let g = kmeans_layers(&cos).unwrap();
            let mut rotated = cos.clone();
            let r = rot % cos.len();
            rotated.rotate_left(r);
            let mut labels = g.labels.clone();
            labels.rotate_left(r);
            prop_assert_eq!(kmeans_layers(&rotated).unwrap().labels, labels);
            // 1-D clusters are intervals: a larger cosine never has a lower label.
            for i in 0..cos.len() {
                for j in 0..cos.len() {
                    if cos[i] < cos[j] {
                        prop_assert!(g.labels[i] <= g.labels[j]);
                    }
                }
            }
        }

        #[test]
        fn caps_conserve_when_feasible(budgets in proptest::collection::vec(0usize..500, 1..30), cap in 1usize..400) {
            let total: usize = budgets.iter().sum();
            let out = cap_budgets(&budgets, cap);
            prop_assert!(out.iter().all(|&b| b <= cap));
            prop_assert_eq!(out.iter().sum::<usize>(), total.min(cap * budgets.len()));
        }
    }
}
