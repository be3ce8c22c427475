//! Prometheus metrics for both planes, through the `metrics` facade.
//!
//! [`init`] installs one process-wide Prometheus recorder (no HTTP listener of its own: the
//! control plane's `GET /metrics` renders it). Request handlers of either plane call
//! [`record_op`] and [`record_bytes`]; store figures are not pushed on every change but copied
//! from [`kvtier_cache::StoreStats`] at scrape time by [`render`], so the hot path pays nothing
//! for them.
//!
//! Metric names (all prefixed `kvtier_`):
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `kvtier_requests_total` | counter | `op`, `plane` (`http` or `wire`), `result` (`ok`/`error`) | requests handled |
//! | `kvtier_request_duration_seconds` | histogram | `op`, `plane` | time to handle one request |
//! | `kvtier_bytes_total` | counter | `direction` (`in`/`out`) | chunk payload bytes received / sent |
//! | `kvtier_chunks` | gauge | | chunks in the index (all tiers, all tenants) |
//! | `kvtier_leases` | gauge | | live leases |
//! | `kvtier_tier_chunks` | gauge | `tier` | chunks held by a tier |
//! | `kvtier_tier_bytes` | gauge | `tier` | bytes charged against a tier's budget |
//! | `kvtier_tier_budget_bytes` | gauge | `tier` | a tier's byte budget |
//! | `kvtier_tier_hits_total` | counter | `tier` | reads served by a tier |
//! | `kvtier_tier_misses_total` | counter | `tier` | reads a tier could not serve |
//! | `kvtier_tier_evictions_total` | counter | `tier` | chunks evicted from a tier |
//! | `kvtier_tier_promotions_total` | counter | `tier` | chunks copied into a tier from a slower one |
//! | `kvtier_tier_demotions_total` | counter | `tier` | chunks written into a tier from a faster one |
//! | `kvtier_tier_corrupt_total` | counter | `tier` | records found corrupt and dropped |
//! | `kvtier_tier_errors_total` | counter | `tier` | failed writes into a tier |
//! | `kvtier_retrieval_indexed_prompts` | gauge | | prompts with built retrieval indexes |
//! | `kvtier_retrieval_index_bytes` | gauge | | their estimated memory |
//! | `kvtier_gpu_memory_used_bytes` | gauge | `gpu`, `name` | device memory in use (NVML) |
//! | `kvtier_gpu_memory_free_bytes` | gauge | `gpu`, `name` | device memory free |
//! | `kvtier_gpu_memory_total_bytes` | gauge | `gpu`, `name` | device memory installed |
//! | `kvtier_gpu_utilization_ratio` | gauge | `gpu`, `name` | share of time a kernel ran (0–1) |
//! | `kvtier_gpu_pcie_rx_bytes_per_second` | gauge | `gpu`, `name` | PCIe host→device throughput |
//! | `kvtier_gpu_pcie_tx_bytes_per_second` | gauge | `gpu`, `name` | PCIe device→host throughput |
//! | `kvtier_transfers_total` | counter | `result` (`received`/`pushed`/`pulled`) | prefill→decode transfers completed |
//! | `kvtier_transfer_bytes_total` | counter | `result` | their chunk bytes |
//! | `kvtier_transfer_duration_seconds` | histogram | `result` | begin to last chunk stored (received) or the whole push / pull |
//! | `kvtier_transfer_failures_total` | counter | `cause` (`expired`/`store`/`peer`) | transfers that did not complete |
//!
//! The per-tier counters mirror the store's own cumulative counters (`absolute`), so they
//! restart from zero with the process, as Prometheus counters may.

use std::sync::OnceLock;
use std::time::Duration;

use kvtier_cache::StoreStats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests handled, by op, plane and result.
pub const REQUESTS_TOTAL: &str = "kvtier_requests_total";
/// Request latency histogram, by op and plane.
pub const REQUEST_DURATION: &str = "kvtier_request_duration_seconds";
/// Payload bytes, by direction.
pub const BYTES_TOTAL: &str = "kvtier_bytes_total";

/// Transfer duration histogram, by result.
pub const TRANSFER_DURATION: &str = "kvtier_transfer_duration_seconds";
/// Transfer buckets in seconds: 1 ms (a small request on loopback) to 60 s (gigabytes over a
/// slow link).
const TRANSFER_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0];

/// Latency buckets in seconds: 50 µs (a host hit over a Unix socket) up to 10 s (a large
/// verify or a stalled disk), roughly ×2.5 apart.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
    10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns a handle that renders it. Safe to call
/// from any thread, any number of times (many tests in one process share one recorder).
///
/// If some other recorder was installed globally first, the returned handle renders an empty,
/// private registry: facade calls go to that other recorder, and a warning is logged.
pub fn init() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &LATENCY_BUCKETS)
                .expect("latency bucket list is a non-empty constant")
                .set_buckets_for_metric(Matcher::Full(TRANSFER_DURATION.into()), &TRANSFER_BUCKETS)
                .expect("transfer bucket list is a non-empty constant");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics will be empty: {e}"
                );
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(REQUESTS_TOTAL, "requests handled, by op, plane and result");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "time to handle one request"
    );
    metrics::describe_counter!(BYTES_TOTAL, metrics::Unit::Bytes, "chunk payload bytes");
    metrics::describe_gauge!("kvtier_chunks", "chunks in the index");
    metrics::describe_gauge!("kvtier_leases", "live leases");
    metrics::describe_gauge!("kvtier_tier_chunks", "chunks held by a tier");
    metrics::describe_gauge!("kvtier_tier_bytes", "bytes charged against a tier's budget");
    metrics::describe_gauge!("kvtier_tier_budget_bytes", "a tier's byte budget");
}

/// Records one handled request: `op` names the operation (`lookup`, `get`, ...), `plane` is
/// `"http"` (control plane) or `"wire"` (data plane).
pub fn record_op(op: &'static str, plane: &'static str, elapsed: Duration, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(REQUESTS_TOTAL, "op" => op, "plane" => plane, "result" => result)
        .increment(1);
    metrics::histogram!(REQUEST_DURATION, "op" => op, "plane" => plane)
        .record(elapsed.as_secs_f64());
}

/// Records chunk payload bytes received (`direction_in`) or sent.
pub fn record_bytes(direction_in: bool, n: u64) {
    let direction = if direction_in { "in" } else { "out" };
    metrics::counter!(BYTES_TOTAL, "direction" => direction).increment(n);
}

/// Records a completed transfer: `result` is `received` (this server was the receiver),
/// `pushed` or `pulled` (a push or pull this server ran).
pub fn record_transfer(result: &'static str, bytes: u64, elapsed: Duration) {
    metrics::counter!("kvtier_transfers_total", "result" => result).increment(1);
    metrics::counter!("kvtier_transfer_bytes_total", "result" => result).increment(bytes);
    metrics::histogram!(TRANSFER_DURATION, "result" => result).record(elapsed.as_secs_f64());
}

/// Records a transfer that did not complete: `expired` (deadline passed on the receiver),
/// `store` (storing the received chunks failed), `peer` (a push or pull failed).
pub fn record_transfer_failure(cause: &'static str) {
    metrics::counter!("kvtier_transfer_failures_total", "cause" => cause).increment(1);
}

/// Copies the store's figures into the registry (gauges set, counters mirrored).
pub fn refresh_store(stats: &StoreStats) {
    metrics::gauge!("kvtier_chunks").set(stats.chunks as f64);
    metrics::gauge!("kvtier_leases").set(stats.leases as f64);
    for t in &stats.tiers {
        let tier = t.tier.name();
        metrics::gauge!("kvtier_tier_chunks", "tier" => tier).set(t.usage.chunks as f64);
        metrics::gauge!("kvtier_tier_bytes", "tier" => tier).set(t.usage.bytes as f64);
        metrics::gauge!("kvtier_tier_budget_bytes", "tier" => tier).set(t.usage.budget as f64);
        let counters = [
            ("kvtier_tier_hits_total", t.hits),
            ("kvtier_tier_misses_total", t.misses),
            ("kvtier_tier_evictions_total", t.evictions),
            ("kvtier_tier_promotions_total", t.promotions),
            ("kvtier_tier_demotions_total", t.demotions),
            ("kvtier_tier_corrupt_total", t.corrupt),
            ("kvtier_tier_errors_total", t.errors),
        ];
        for (name, value) in counters {
            metrics::counter!(name, "tier" => tier).absolute(value);
        }
    }
}

/// Copies NVML readings into the GPU gauges (nothing without a GPU).
pub fn refresh_gpus(gpus: &[kvtier_offload::gpu::GpuStat]) {
    for g in gpus {
        let labels = [("gpu", g.index.to_string()), ("name", g.name.clone())];
        metrics::gauge!("kvtier_gpu_memory_used_bytes", &labels).set(g.memory_used_bytes as f64);
        metrics::gauge!("kvtier_gpu_memory_free_bytes", &labels).set(g.memory_free_bytes as f64);
        metrics::gauge!("kvtier_gpu_memory_total_bytes", &labels).set(g.memory_total_bytes as f64);
        if let Some(u) = g.utilization_gpu_pct {
            metrics::gauge!("kvtier_gpu_utilization_ratio", &labels).set(u as f64 / 100.0);
        }
        if let Some(rx) = g.pcie_rx_kbps {
            metrics::gauge!("kvtier_gpu_pcie_rx_bytes_per_second", &labels).set(rx as f64 * 1024.0);
        }
        if let Some(tx) = g.pcie_tx_kbps {
            metrics::gauge!("kvtier_gpu_pcie_tx_bytes_per_second", &labels).set(tx as f64 * 1024.0);
        }
    }
}

/// Refreshes the store figures and renders everything in the Prometheus text format.
pub fn render(stats: &StoreStats, retrieval: &kvtier_prompt::retrieval::Retrieval) -> String {
    let handle = init();
    refresh_store(stats);
    let (prompts, bytes) = retrieval.usage();
    metrics::gauge!("kvtier_retrieval_indexed_prompts").set(prompts as f64);
    metrics::gauge!("kvtier_retrieval_index_bytes").set(bytes as f64);
    handle.render()
}

/// The remote tier's own figures in the Prometheus text format: whether the cluster answered,
/// errors and the latency histogram of its requests (the store's per-tier counters cover hits,
/// misses, bytes and corrupt records).
pub fn remote_text(r: &kvtier_offload::RemoteStats) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# TYPE kvtier_remote_up gauge\nkvtier_remote_up {}",
        r.healthy as u8
    );
    let _ = writeln!(
        t,
        "# TYPE kvtier_remote_errors_total counter\nkvtier_remote_errors_total {}",
        r.errors
    );
    let _ = writeln!(t, "# TYPE kvtier_remote_request_seconds histogram");
    let mut cumulative = 0;
    for (bound, n) in r.latency_bounds_us.iter().zip(&r.latency_counts) {
        cumulative += n;
        let le = *bound as f64 / 1e6;
        let _ = writeln!(
            t,
            "kvtier_remote_request_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let total: u64 = r.latency_counts.iter().sum();
    let _ = writeln!(
        t,
        "kvtier_remote_request_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let _ = writeln!(
        t,
        "kvtier_remote_request_seconds_sum {}",
        r.latency_sum_us as f64 / 1e6
    );
    let _ = writeln!(t, "kvtier_remote_request_seconds_count {total}");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent_and_records_land_in_the_rendering() {
        let a = init();
        let b = init();
        record_op("unit_test_op", "wire", Duration::from_micros(300), true);
        record_op("unit_test_op", "wire", Duration::from_millis(3), false);
        record_bytes(true, 1234);
        let text = b.render();
        // Both handles render one registry. (Other tests record concurrently and the exporter's
        // family order is not fixed, so compare a series this test alone writes.)
        let line = r#"kvtier_requests_total{op="unit_test_op",plane="wire",result="ok"} 1"#;
        assert!(
            a.render().contains(line),
            "the first handle sees the same registry"
        );
        assert!(
            text.contains(r#"kvtier_requests_total{op="unit_test_op",plane="wire",result="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kvtier_requests_total{op="unit_test_op",plane="wire",result="error"} 1"#
            ),
            "{text}"
        );
        // A histogram (buckets), not a summary (quantiles): the 300 µs sample is under 0.5 ms.
        assert!(
            text.contains(
                r#"kvtier_request_duration_seconds_bucket{op="unit_test_op",plane="wire",le="0.0005"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"kvtier_bytes_total{direction="in"}"#),
            "{text}"
        );
    }
}
