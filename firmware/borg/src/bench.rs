//! `borg bench`: benchmarks that print figures.
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Tree figures: simulated nodes and real processes on loopback.
    Tree(crate::bench_tree::TreeBenchArgs),
    /// Relay cost: connection setup, echo round trip and throughput, direct vs relayed.
    Relay(crate::bench_relay::RelayBenchArgs),
    /// Flood cost: CPU, memory and descriptors of a node under envelope and connection floods.
    Flood(crate::bench_flood::FloodBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Tree(args) => crate::bench_tree::run(args),
        BenchCommand::Relay(args) => crate::bench_relay::run(args),
        BenchCommand::Flood(args) => crate::bench_flood::run(args),
    }
}
