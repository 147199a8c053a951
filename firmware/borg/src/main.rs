//! `borg`: the BorgIOS multi-call binary. It parses arguments, sets up logging and calls into
//! the libraries; everything that matters lives in the crates under firmware/.

mod appliance;
mod bench;
mod bench_flood;
mod bench_netns;
mod bench_relay;
mod bench_store;
mod bench_store_netns;
mod bench_time;
mod bench_tree;
mod cli;
mod files_cli;
mod files_get;
mod files_net;
mod files_progress;
mod files_stream;
mod release;
mod release_net;
mod update_fetch;
mod update_install;
mod userkey;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// BorgIOS: turn this machine into a node of a self-organizing peer-to-peer network.
#[derive(Parser, Debug)]
#[command(name = "borg", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// PID 1 of the appliance (also what runs when the binary is started as /init).
    Init(appliance::InitArgs),
    /// Run the cell supervisor on this machine, without the PID-1 duties (development).
    Up(appliance::UpArgs),
    /// Run a whole node in the foreground: every registered cell (peerTreeNet, cronoTree),
    /// each on its DNA ports on the --listen IP, sharing one key and one network clock.
    Node(cli::NodeArgs),
    /// Run the base cell alone (`borg cell peerTreeNet --data DIR`), for debugging; other
    /// cells find their peers through it and run only inside `borg node`.
    Cell(cli::CellArgs),
    /// User identities: BIP39 phrases and the P-256 key derived from them.
    #[command(subcommand)]
    Id(cli::IdCommand),
    /// Show a node's status (from its monitor port).
    Status(cli::StatusArgs),
    /// Draw the whole tree, starting from any node.
    Tree(cli::TreeArgs),
    /// Send a signed broadcast from a node to the whole tree.
    Broadcast(cli::BroadcastArgs),
    /// Store a file on the network: encrypted here, one 256 KiB chunk at a time, its shards
    /// sent to a node's shardTree and a manifest signed by your key to its ftreeFileMgr.
    /// Prints the file id.
    Put(files_cli::PutArgs),
    /// Fetch a file by id, check and decrypt every chunk, and write it to -o OUT; an
    /// interrupted download resumes when the same command is run again.
    Get(files_get::GetArgs),
    /// List the files stored under your key: id, size, created time, shards, name.
    Ls(files_cli::LsArgs),
    /// Delete one of your files by id (a delete signed by your key); fails if the node knows
    /// no such file of yours.
    Rm(files_cli::RmArgs),
    /// Maintainers: keys, trust roots, release manifests and approvals (docs/OTA.md).
    #[command(subcommand)]
    Release(release::ReleaseCommand),
    /// Installing releases: `update fetch` writes an approved release's image into a slot
    /// and verifies it (what the appliance's PID 1 does; docs/OTA.md).
    #[command(subcommand)]
    Update(UpdateCommand),
    /// Benchmarks that print figures (see docs/BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand, Debug)]
enum UpdateCommand {
    /// Fetch an approved release's image through a node into a slot (a partition or a file),
    /// resumably, and verify it by reading it back. Refuses before writing anything when the
    /// release is not approved for this node (k approvals, version, board, expiry).
    Fetch(update_fetch::FetchArgs),
}

fn main() -> std::process::ExitCode {
    // Started as /init or as PID 1: be the appliance's init, whatever the arguments.
    if let Some(args) = appliance::argv0_dispatch() {
        return exit_code(appliance::run_init(args));
    }
    let cli = Cli::parse();
    // init and up install their own logging (it also feeds the console's `log` command).
    match cli.command {
        Command::Init(args) => return exit_code(appliance::run_init(args)),
        Command::Up(args) => return exit_code(appliance::run_up(args)),
        _ => {}
    }
    let verbose_default = matches!(cli.command, Command::Node(_) | Command::Cell(_));
    init_tracing(verbose_default);
    exit_code(run(cli))
}

fn exit_code(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("borg: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BORG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Node(args) => cli::node(args),
        Command::Cell(args) => cli::cell(args),
        Command::Id(cmd) => cli::id(cmd),
        Command::Status(args) => cli::status(args),
        Command::Tree(args) => cli::tree(args),
        Command::Broadcast(args) => cli::broadcast(args),
        Command::Put(args) => files_cli::put(args),
        Command::Get(args) => files_get::get(args),
        Command::Ls(args) => files_cli::ls(args),
        Command::Rm(args) => files_cli::rm(args),
        Command::Release(cmd) => release::run(cmd),
        Command::Update(UpdateCommand::Fetch(args)) => update_fetch::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Init(args) => appliance::run_init(args),
        Command::Up(args) => appliance::run_up(args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pid1_and_the_node_page_agree_on_the_appliance_file_variable() {
        assert_eq!(
            borg_system::init::APPLIANCE_FILE_ENV,
            borg_net::page::APPLIANCE_FILE_ENV
        );
    }

    /// clap's own consistency checks over every subcommand (e.g. two `--version` flags).
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
