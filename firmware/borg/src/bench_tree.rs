//! `borg bench tree`: figures for docs/BENCHMARKS.md (filled in below).
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct TreeBenchArgs {
    /// Simulated nodes (0 to skip).
    #[arg(long, default_value_t = 10_000)]
    sim: usize,
    /// Real `borg node` processes on loopback (0 to skip).
    #[arg(long, default_value_t = 100)]
    procs: usize,
}

pub fn run(_args: TreeBenchArgs) -> Result<()> {
    Ok(())
}
