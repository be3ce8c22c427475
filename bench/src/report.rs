//! Shared helpers for suite output: medians, percentiles, the final JSON line.

use serde_json::{Map, Value};

/// Median of a sample (sorts a copy). Returns 0 for an empty sample.
pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

/// The `p`-th percentile (nearest rank) of a sample. Returns 0 for an empty sample.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Rounds to a few significant decimals so the JSON line stays readable.
pub fn round(x: f64, decimals: i32) -> f64 {
    let m = 10f64.powi(decimals);
    (x * m).round() / m
}

/// Collects figures and prints the suite's final JSON line.
pub struct Figures {
    map: Map<String, Value>,
}

impl Figures {
    pub fn new(suite: &str) -> Self {
        let mut map = Map::new();
        map.insert("suite".into(), Value::from(suite));
        Figures { map }
    }

    pub fn set(&mut self, name: &str, v: impl Into<Value>) {
        self.map.insert(name.to_string(), v.into());
    }

    /// A float figure rounded to 4 decimals.
    pub fn num(&mut self, name: &str, v: f64) {
        self.set(name, round(v, 4));
    }

    /// Prints the JSON line; call last.
    pub fn print(self) {
        println!("{}", Value::Object(self.map));
    }
}

/// Resident memory of this process, from /proc (kB → bytes), and its peak.
pub fn rss() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median(&xs), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
