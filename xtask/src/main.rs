//! Project automation: `cargo xtask <command>`.
//!
//! - `setup`: installs everything the project needs (apt packages, Rust toolchains, bpf-linker, the
//!   VM kernel and initramfs). Idempotent; a second run takes seconds.
//! - `vm-run`, `vm-runner`: run a command (or a cargo test binary) as root inside a qemu VM whose
//!   kernel has MACsec.
//! - `test`: every check, in order: fmt, clippy, unit tests, loopback integration tests, fuzz smoke run, privileged host tests, benchmark smoke run, VM tests.
//! - `build-ebpf`: builds the eBPF object alone.
//! - `demo`: two QKD-keyed MACsec gateways with traffic and a live view (in the VM if needed).
//! - `soak --minutes N`: the seeded chaos soak (faults against a live link), results under
//!   `soak.*` in target/bench/results.json.
//! - `bench [area]`: benchmarks, merged into target/bench/results.json, and the report.
//! - `package`: the Debian package (target/package/*.deb).
//! - `fuzz`: the cargo-fuzz targets in fuzz/, each for a time or a number of runs.

mod bench;
mod demo;
mod fuzz;
mod package;
mod report;
mod setup;
mod soak;
mod test;
mod util;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "qkd-macsec project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install or check everything the project needs (apt packages, toolchains, bpf-linker, VM).
    Setup {
        /// Rebuild the VM initramfs even if it is up to date.
        #[arg(long)]
        force_initramfs: bool,
    },
    /// Boot the MACsec test VM and run CMD as root inside it; exits with CMD's status.
    VmRun {
        /// Directory to run CMD in (default: the current directory). The host's root filesystem is
        /// visible read-only inside the VM, with a throw-away writable layer on top.
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Extra environment variable for CMD (KEY=VALUE); may repeat.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        envs: Vec<String>,
        /// Give up after this many seconds (default 900, or QKD_MACSEC_VM_TIMEOUT).
        #[arg(long)]
        timeout: Option<u64>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Cargo runner: run a test binary inside the VM (set
    /// CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER to "<path>/xtask vm-runner").
    VmRunner {
        /// The binary cargo built, then its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Run every check: fmt, clippy, unit tests, integration tests, fuzz smoke, host tests (root), benchmark smoke, VM tests.
    Test {
        /// Run only these stages (fmt, clippy, unit, integration, fuzz, host, bench, vm); may repeat. Default: all.
        #[arg(long = "only", value_name = "STAGE")]
        only: Vec<test::Stage>,
        /// Only test binaries whose name contains this text (host and VM stages).
        #[arg(long)]
        filter: Option<String>,
    },
    /// Build the eBPF object alone (release, bpfel-unknown-none, pinned nightly).
    BuildEbpf,
    /// Two gateways, QKD-keyed MACsec between them, traffic and a live view; JSON summary last.
    Demo {
        /// Seconds of traffic once the link is secured.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Key profile: cak or sak.
        #[arg(long, default_value = "cak")]
        profile: String,
        /// Datagrams per second in each direction.
        #[arg(long, default_value_t = 200)]
        pps: u32,
        /// Where to run: auto (the VM when the host kernel lacks MACsec), host or vm.
        #[arg(long, default_value = "auto")]
        place: String,
    },
    /// Chaos soak: the demo topology on a bridged wire under seeded random faults (KME outages,
    /// latency, 503s, eavesdropper, LLDP loss/duplication/reordering, replayed TLVs, agent
    /// kill -9). Ends by itself; summary JSON last and under soak.* in results.json; fails when
    /// a frame was lost while keys were valid, plaintext hit the wire, or a frame was accepted
    /// under an expired key.
    Soak {
        /// Length of the soak, minutes (30 s warm-up and 60 s cool-down included).
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Seed of the fault schedule (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        /// Key profile: cak or sak.
        #[arg(long, default_value = "sak")]
        profile: String,
        /// Datagrams per second in each direction.
        #[arg(long, default_value_t = 100)]
        pps: u32,
    },
    /// Run the fuzz targets in fuzz/ one after the other (one job each); figures go to
    /// target/fuzz/summary.json. Fails if any target finds a crash.
    Fuzz {
        /// Only this target (lldp, keyx_wire, sectag, etsi014, config, sectag_xdp); may repeat.
        #[arg(long = "target", value_name = "T")]
        targets: Vec<String>,
        /// Seconds per target (default 20 when --runs is not given).
        #[arg(long, conflicts_with = "runs")]
        seconds: Option<u64>,
        /// Executions per target.
        #[arg(long)]
        runs: Option<u64>,
        /// Run the binaries of the last build (while another build is under way, say).
        #[arg(long)]
        no_build: bool,
    },
    /// Run the benchmarks of one area (kme, macsec, ebpf, agent) or all of them (no area), then
    /// write target/bench/report.md with SVG plots.
    Bench {
        /// kme, macsec, ebpf, agent or all (the default).
        #[arg(default_value = "all")]
        area: String,
    },
    /// Render target/bench/report.md and its plots from results.json and samples/ alone.
    BenchReport,
    /// Build the Debian package into target/package/ (binary, systemd unit, sample config, man
    /// pages, docs).
    Package {
        /// Package the debug build (faster; for tests) instead of the release build.
        #[arg(long)]
        debug: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup { force_initramfs } => setup::run(setup::Options { force_initramfs }).map(|_| 0),
        Cmd::VmRun {
            cwd,
            envs,
            timeout,
            cmd,
        } => vm::vm_run(cwd, envs, timeout, cmd),
        Cmd::VmRunner { cmd } => vm::vm_runner(cmd),
        Cmd::Test { only, filter } => test::run(&only, filter.as_deref()).map(|_| 0),
        Cmd::BuildEbpf => test::build_ebpf().map(|_| 0),
        Cmd::Demo {
            seconds,
            profile,
            pps,
            place,
        } => demo::run(&demo::Options {
            seconds,
            profile,
            pps,
            place,
        }),
        Cmd::Soak {
            minutes,
            seed,
            profile,
            pps,
        } => soak::run(&soak::Options {
            minutes,
            seed,
            profile,
            pps,
        }),
        Cmd::Bench { area } => bench::run(&area).map(|_| 0),
        Cmd::Fuzz {
            targets,
            seconds,
            runs,
            no_build,
        } => {
            let budget = match (seconds, runs) {
                (_, Some(n)) => fuzz::Budget::Runs(n),
                (s, None) => fuzz::Budget::Seconds(s.unwrap_or(20)),
            };
            fuzz::run(&targets, budget, !no_build).map(|_| 0)
        }
        Cmd::BenchReport => {
            report::write_report(&util::repo_root().join("target/bench"), &[]).map(|p| {
                eprintln!("[bench] report in {}", p.display());
                0
            })
        }
        Cmd::Package { debug } => package::run(!debug).map(|_| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
