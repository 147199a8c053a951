//! TEMPORARY main for the appliance work (issue 3). The real multi-call CLI lands from the
//! node work; merge by keeping `mod appliance;`, the `Init`/`Up` variants and their arms.
mod appliance;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "borg", version, about = "BorgIOS node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PID 1 of the appliance (also when started as /init).
    Init(appliance::InitArgs),
    /// Run the cells under the supervisor on this machine.
    Up(appliance::UpArgs),
}

fn main() -> anyhow::Result<()> {
    if let Some(args) = appliance::argv0_dispatch() {
        return appliance::run_init(args);
    }
    match Cli::parse().cmd {
        Cmd::Init(a) => appliance::run_init(a),
        Cmd::Up(a) => appliance::run_up(a),
    }
}
