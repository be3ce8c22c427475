//! `kvtier-bench`: benchmark suites, load generators and real-KV tools.
//!
//! Every suite prints a human-readable table and ends with one JSON line
//! `{"suite": "<name>", ...figures}` (see DESIGN.md). `--quick` keeps a suite under a minute.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod dump;
mod inproc;
mod model;
mod report;
mod suites;

#[derive(Parser)]
#[command(
    name = "kvtier-bench",
    about = "kvtier benchmark suites and real-KV tools"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Core store: host and disk tier throughput vs memcpy/raw file I/O, prefix lookup, hashing.
    Store(suites::store::Args),
    /// Data plane: TCP, Unix socket and shared-memory gets vs a raw socket and Redis; lookup latency.
    Wire(suites::wire::Args),
    /// Load: hundreds of concurrent clients doing put/get for a fixed time; errors and memory.
    Load(suites::load::Args),
    /// Codecs on real KV: lossless planes, KIVI int8/int4, fp8, xKV vs per-layer SVD (--kv DUMP).
    Compress(suites::compress::Args),
    /// Real KV capture: runs SmolLM2-135M on prose and writes a KV dump (DESIGN.md).
    Capture(suites::capture::Args),
    /// Long-context key retrieval: exact, HNSW and attention-aware top-k on a KV dump.
    Retrieval(suites::retrieval::Args),
    /// RETRIEVE through a running service (exact scan vs background-built HNSW) on a KV dump.
    Retrieve(suites::retrieve::Args),
    /// Layer-wise KV budgets: uniform vs SqueezeAttention allocation, streaming and H2O selection.
    Budget(suites::budget::Args),
    /// Reference engine: SmolLM2 greedy generation reusing prefix KV through kvtier; cold vs warm TTFT.
    Engine(suites::engine::Args),
    /// GPU tier (H2D/D2H of 32 MiB chunks) vs pinned cuMemcpy; paged gather vs per-page copies.
    Gpu(suites::gpu::Args),
    /// Prefill→decode transfer of a Llama-3.1-8B-shaped request: naive per-block puts vs coalesced vs raw TCP.
    Transfer(suites::transfer::Args),
    /// Remote tier on a local Redis Cluster against a plain redis client; cross-node prefix.
    Remote(suites::remote::Args),
    /// vLLM (CPU) with kvtier's KV connector: cold vs warm TTFT, connector load/save throughput.
    Vllm(suites::vllm::Args),
}

fn main() -> Result<()> {
    match Cli::parse().suite {
        Suite::Store(a) => suites::store::run(a),
        Suite::Wire(a) => suites::wire::run(a),
        Suite::Load(a) => suites::load::run(a),
        Suite::Compress(a) => suites::compress::run(a),
        Suite::Capture(a) => suites::capture::run(a),
        Suite::Retrieval(a) => suites::retrieval::run(a),
        Suite::Retrieve(a) => suites::retrieve::run(a),
        Suite::Budget(a) => suites::budget::run(a),
        Suite::Engine(a) => suites::engine::run(a),
        Suite::Gpu(a) => suites::gpu::run(a),
        Suite::Transfer(a) => suites::transfer::run(a),
        Suite::Remote(a) => suites::remote::run(a),
        Suite::Vllm(a) => suites::vllm::run(a),
    }
}
