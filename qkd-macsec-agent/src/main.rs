//! `qkd-macsec-agent`: the command-line entry point. Each subcommand's logic lives in its module;
//! this file only parses arguments, sets up logging and dispatches.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qkd-macsec-agent",
    version,
    about = "QKD-keyed Linux kernel MACsec agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the size of the embedded eBPF object (a quick build sanity check).
    EbpfInfo,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QKD_MACSEC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::EbpfInfo => {
            println!(
                "embedded eBPF object: {} bytes",
                qkd_macsec_agent::EBPF_OBJECT.len()
            );
            Ok(())
        }
    }
}
