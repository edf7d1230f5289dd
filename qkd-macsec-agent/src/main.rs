//! `qkd-macsec-agent`: the command-line entry point. Each subcommand's logic lives in its module;
//! this file only parses arguments, sets up logging and dispatches.

use clap::{CommandFactory, Parser, Subcommand};
use qkd_macsec_agent::{certs, etsi014, kmesim};

/// Every heap block is wiped when freed: key plaintext passes through buffers of hyper, rustls
/// and serde_json that our zeroizing types cannot reach (qkd_macsec_agent::zalloc).
#[global_allocator]
static GLOBAL: qkd_macsec_agent::zalloc::ZeroingAlloc =
    qkd_macsec_agent::zalloc::Zeroing(std::alloc::System);

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
    /// Run the agent: key every configured link's MACsec from QKD and watch its key lifetime.
    ///
    /// Key material is kept out of core dumps and swap. At start the agent sets
    /// PR_SET_DUMPABLE to 0: no core dump is written, and ptrace or /proc/PID/mem need
    /// CAP_SYS_PTRACE. It locks its memory (mlockall, pages locked as they are touched) when
    /// RLIMIT_MEMLOCK is unlimited or may be raised to unlimited; otherwise it logs one warning
    /// that swap may hold key material (the packaged unit sets LimitMEMLOCK=infinity and
    /// LimitCORE=0). Every heap block is wiped when it is freed, including the buffers of the
    /// TLS and HTTP layers that carried keys from the KME; docs/operator-guide.md, section 6, says
    /// what stays in memory until it is reused.
    Run(qkd_macsec_agent::agent::run::RunArgs),
    /// Show each link of the running agent: state, key IDs, AKL left, key supply, counters.
    Status(qkd_macsec_agent::ops::client::StatusArgs),
    /// Load and validate a config file as `run` would, without touching the system.
    CheckConfig {
        #[arg(long, env = "QKD_MACSEC_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Write the man pages (section 8) into DIR (used by `cargo xtask package`).
    #[command(hide = true)]
    GenMan {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Benchmark the key exchange's per-message cost against AES-CMAC (`cargo xtask bench agent`).
    #[command(hide = true)]
    BenchAgent {
        /// Messages per measurement.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
    },
    /// Print the size of the embedded eBPF object (a quick build sanity check).
    EbpfInfo,
    /// Benchmark MACsec rollovers through netlink against `ip macsec` (root, kernel with MACsec;
    /// run in the test VM). Prints `bench-result: <key> <value>` lines.
    #[command(hide = true)]
    BenchMacsec {
        /// Rollovers through this layer (each rolls both directions).
        #[arg(long, default_value_t = 200)]
        rollovers: usize,
        /// Rollovers through `ip macsec` for the baseline.
        #[arg(long, default_value_t = 20)]
        cli_rollovers: usize,
        /// Grace period in ms between switching TX and retiring the old SA.
        #[arg(long, default_value_t = 100)]
        grace_ms: u64,
        /// Cipher suite (gcm-aes-128, gcm-aes-256, gcm-aes-xpn-128, gcm-aes-xpn-256).
        #[arg(long, default_value = "gcm-aes-256")]
        cipher: String,
    },
    /// Test helper: attach the data plane to IFACE, optionally stall, print `ready`, sleep.
    #[command(hide = true)]
    DataplaneHold {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/qkd-macsec")]
        bpffs_root: std::path::PathBuf,
        #[arg(long)]
        stall: bool,
    },
    /// Benchmark `ebpf`: per-packet cost of the XDP/TC programs (BPF_PROG_TEST_RUN).
    #[command(hide = true)]
    BenchEbpf {
        /// Also merge the results into this flat JSON object (xtask collects the printed
        /// `bench-result:` lines otherwise).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Program runs per measurement.
        #[arg(long, default_value_t = 5_000_000)]
        repeat: u32,
        /// Interleaved rounds (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Run a pair of simulated ETSI GS QKD 014 KMEs sharing one simulated QKD link.
    KmeSim(kmesim::cli::SimArgs),
    /// Show or change a running KME simulator's knobs and faults.
    KmeSimCtl(kmesim::cli::CtlArgs),
    /// Talk to a KME over ETSI GS QKD 014 (JSON output).
    Kme {
        #[command(subcommand)]
        cmd: etsi014::cli::KmeCmd,
    },
    /// Create certificates for the ETSI 014 interface.
    Certs {
        #[command(subcommand)]
        cmd: certs::CertsCmd,
    },
    /// Diagnose a setup and explain what is wrong.
    Doctor {
        #[command(subcommand)]
        cmd: DoctorCmd,
    },
    /// Benchmark the ETSI 014 client against the KME simulator (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchKme(kmesim::bench::BenchArgs),
}

#[derive(Subcommand)]
enum DoctorCmd {
    /// Connect to a KME as an SAE would and explain any failure.
    Kme(certs::doctor::DoctorKmeArgs),
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
        Command::Run(a) => qkd_macsec_agent::agent::run::run(a),
        Command::Status(a) => Ok(qkd_macsec_agent::ops::client::run(a)?),
        Command::CheckConfig { config } => {
            println!("{}", qkd_macsec_agent::ops::check_config(&config)?);
            Ok(())
        }
        Command::GenMan { out } => {
            for f in qkd_macsec_agent::ops::write_man_pages(Cli::command(), &out)? {
                println!("{}", out.join(f).display());
            }
            Ok(())
        }
        Command::BenchAgent { messages } => qkd_macsec_agent::agent::bench::run(messages),
        Command::EbpfInfo => {
            println!(
                "embedded eBPF object: {} bytes",
                qkd_macsec_agent::EBPF_OBJECT.len()
            );
            Ok(())
        }
        Command::KmeSim(a) => kmesim::cli::run_sim(a),
        Command::KmeSimCtl(a) => kmesim::cli::run_ctl(a),
        Command::Kme { cmd } => etsi014::cli::run(cmd),
        Command::Certs { cmd } => certs::run(cmd),
        Command::Doctor {
            cmd: DoctorCmd::Kme(a),
        } => {
            if certs::doctor::run(a)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::BenchKme(a) => kmesim::bench::run(a),
        Command::DataplaneHold {
            iface,
            bpffs_root,
            stall,
        } => Ok(qkd_macsec_agent::dataplane::tool::hold(
            &iface,
            &bpffs_root,
            stall,
        )?),
        Command::BenchEbpf {
            out,
            repeat,
            rounds,
        } => Ok(qkd_macsec_agent::dataplane::tool::bench(
            out.as_deref(),
            repeat,
            rounds,
        )?),
        Command::BenchMacsec {
            rollovers,
            cli_rollovers,
            grace_ms,
            cipher,
        } => {
            let opts = qkd_macsec_agent::macsec::BenchOptions {
                rollovers,
                cli_rollovers,
                grace: std::time::Duration::from_millis(grace_ms),
                cipher: cipher.parse()?,
                ..Default::default()
            };
            for (key, value) in qkd_macsec_agent::macsec::run_bench(&opts)? {
                println!("bench-result: {key} {value}");
            }
            Ok(())
        }
    }
}
