//! `store` suite: host and disk tier throughput, prefix lookup latency, key hashing.

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("the store suite is being written (issue 2)")
}
