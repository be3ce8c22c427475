//! Counters and a latency histogram of the remote tier, lock-free.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is everything above).
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

#[derive(Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub corrupt: AtomicU64,
    pub puts: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl Counters {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self, healthy: bool) -> RemoteStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            healthy,
            hits: r(&self.hits),
            misses: r(&self.misses),
            errors: r(&self.errors),
            corrupt: r(&self.corrupt),
            puts: r(&self.puts),
            bytes_written: r(&self.bytes_written),
            bytes_read: r(&self.bytes_read),
            latency_bounds_us: LATENCY_BOUNDS_US.to_vec(),
            latency_counts: self.latency.iter().map(r).collect(),
            latency_sum_us: r(&self.latency_sum_us),
        }
    }
}

/// What the remote tier did since it was opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteStats {
    /// Whether the last operation reached the cluster.
    pub healthy: bool,
    pub hits: u64,
    pub misses: u64,
    /// Timeouts, connection and server errors.
    pub errors: u64,
    /// Values that failed their checks (never served).
    pub corrupt: u64,
    pub puts: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// Histogram of request latencies: `latency_counts[i]` requests took at most
    /// `latency_bounds_us[i]` µs (and more than the previous bound); the last count is the rest.
    pub latency_bounds_us: Vec<u64>,
    pub latency_counts: Vec<u64>,
    pub latency_sum_us: u64,
}
