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
    /// Benchmark MACsec rollovers through netlink against `ip macsec` (root, kernel with MACsec;
    /// run in the test VM). Prints one flat JSON object on stdout.
    #[command(hide = true)]
    BenchMacsec {
        /// Rollovers through this layer (each rolls both directions).
        #[arg(long, default_value_t = 200)]
        rollovers: usize,
        /// Rollovers through `ip macsec` for the baseline.
        #[arg(long, default_value_t = 20)]
        cli_rollovers: usize,
        /// Grace period in ms between switching TX and retiring the old SA.
        #[arg(long, default_value_t = 30)]
        grace_ms: u64,
        /// Cipher suite (gcm-aes-128, gcm-aes-256, gcm-aes-xpn-128, gcm-aes-xpn-256).
        #[arg(long, default_value = "gcm-aes-256")]
        cipher: String,
        /// Also merge the numbers into this JSON file (e.g. target/bench/results.json).
        #[arg(long)]
        merge_into: Option<std::path::PathBuf>,
    },
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
        Command::BenchMacsec {
            rollovers,
            cli_rollovers,
            grace_ms,
            cipher,
            merge_into,
        } => {
            let opts = qkd_macsec_agent::macsec::BenchOptions {
                rollovers,
                cli_rollovers,
                grace: std::time::Duration::from_millis(grace_ms),
                cipher: cipher.parse()?,
                merge_into,
                ..Default::default()
            };
            let out = qkd_macsec_agent::macsec::run_bench(&opts)?;
            println!("{}", serde_json::Value::Object(out));
            Ok(())
        }
    }
}
