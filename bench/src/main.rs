//! `kvtier-bench`: benchmark suites, load generators and real-KV tools.
//!
//! Every suite prints a human-readable table and ends with one JSON line
//! `{"suite": "<name>", ...figures}` (see DESIGN.md). `--quick` keeps a suite under a minute.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod dump;
mod report;
mod suites;

#[derive(Parser)]
#[command(name = "kvtier-bench", about = "kvtier benchmark suites and real-KV tools")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Core store: host and disk tier throughput vs memcpy/raw file I/O, prefix lookup, hashing.
    Store(suites::store::Args),
}

fn main() -> Result<()> {
    match Cli::parse().suite {
        Suite::Store(a) => suites::store::run(a),
    }
}
