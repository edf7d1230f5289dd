//! `qkd-macsec-bench-ebpf`: the `ebpf` benchmark (`cargo xtask bench ebpf`), per-packet cost of
//! the XDP and TC programs under BPF_PROG_TEST_RUN against the test object's trivial programs
//! (qkd_macsec_agent::dataplane::run_benchmark; docs/dataplane.md, "Benchmark ebpf"). Needs root
//! (BPF). A program of its own rather than an agent subcommand, so the agent binary does not
//! embed the test object.
//!
//! Prints one `bench-result: <key> <value>` line per number; with `--out` also merges them into
//! that flat JSON object itself (for runs outside xtask).

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "qkd-macsec-bench-ebpf")]
struct Args {
    /// Also merge the results into this flat JSON object.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Program runs per measurement.
    #[arg(long, default_value_t = 5_000_000)]
    repeat: u32,
    /// Interleaved rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    qkd_macsec_agent::dataplane::tool::bench(a.out.as_deref(), a.repeat, a.rounds)?;
    Ok(())
}
