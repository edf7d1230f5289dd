//! `cargo xtask test`: every check in order (fmt, clippy, unit, integration, fuzz, host, bench, vm), each announced and timed;
//! and `cargo xtask build-ebpf`.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::util::{self, cmd, secs};
use crate::{setup, vm};

/// Time limit of the whole VM stage (one boot), seconds.
const VM_STAGE_TIMEOUT_SECS: u64 = 3000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// cargo fmt --all --check
    Fmt,
    /// cargo clippy --workspace --all-targets -- -D warnings
    Clippy,
    /// unit tests and doc tests (no privileges)
    Unit,
    /// tests/tests/*.rs that are neither host_ nor vm_: real sockets, no privileges (e.g. etsi_*)
    Integration,
    /// a short run of every fuzz target in fuzz/ (cargo xtask fuzz --seconds 12)
    Fuzz,
    /// tests/tests/host_*.rs as root on the host
    Host,
    /// every benchmark area with tiny counts (host jobs, then the VM jobs in one boot)
    Bench,
    /// tests/tests/vm_*.rs inside the VM, all in one boot
    Vm,
}

const ALL: [Stage; 8] = [
    Stage::Fmt,
    Stage::Clippy,
    Stage::Unit,
    Stage::Integration,
    Stage::Fuzz,
    Stage::Host,
    Stage::Bench,
    Stage::Vm,
];

/// Seconds per fuzz target in the smoke stage: six targets stay near a minute and a half.
const FUZZ_SMOKE_SECONDS: u64 = 12;

fn cargo(args: &[&str]) -> Command {
    let mut c = cmd("cargo", args);
    c.current_dir(util::repo_root());
    c
}

/// Test binaries (file stems) in tests/tests whose name starts with `prefix`, optionally filtered.
fn test_targets(prefix: &str, filter: Option<&str>) -> Result<Vec<String>> {
    let dir = util::repo_root().join("tests").join("tests");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".rs")?.to_owned();
            stem.starts_with(prefix).then_some(stem)
        })
        .filter(|s| filter.is_none_or(|f| s.contains(f)))
        .collect();
    names.sort();
    Ok(names)
}

pub fn run(only: &[Stage], filter: Option<&str>) -> Result<()> {
    let total = Instant::now();
    let stages: Vec<Stage> = ALL
        .into_iter()
        .filter(|s| only.is_empty() || only.contains(s))
        .collect();
    // Set-up is idempotent and takes seconds when everything is there.
    setup::run(setup::Options::default())?;
    let mut timings = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let t = Instant::now();
        eprintln!("\n==> [{}/{}] {}", i + 1, stages.len(), describe(*stage));
        let r = match stage {
            Stage::Fmt => util::run(&mut cargo(&["fmt", "--all", "--check"]))
                .context("formatting differs; run `cargo fmt --all`"),
            Stage::Clippy => clippy(),
            Stage::Unit => unit(),
            Stage::Integration => integration(filter),
            Stage::Fuzz => {
                crate::fuzz::run(&[], crate::fuzz::Budget::Seconds(FUZZ_SMOKE_SECONDS), true)
            }
            Stage::Host => host(filter),
            Stage::Bench => crate::bench::smoke(),
            Stage::Vm => vm_stage(filter),
        };
        timings.push((*stage, t.elapsed()));
        if let Err(e) = r {
            eprintln!("\n==> stage {stage:?} FAILED after {}", secs(t));
            return Err(e.context(format!("`cargo xtask test` stage {stage:?} failed")));
        }
        eprintln!("==> stage {stage:?} passed ({})", secs(t));
    }
    eprintln!(
        "\n==> all {} stages passed in {}:",
        stages.len(),
        secs(total)
    );
    for (s, d) in timings {
        eprintln!("    {:<7} {:>7.1} s", format!("{s:?}"), d.as_secs_f64());
    }
    Ok(())
}

fn describe(s: Stage) -> &'static str {
    match s {
        Stage::Fmt => "fmt: cargo fmt --all --check",
        Stage::Clippy => {
            "clippy: cargo clippy --workspace --exclude qkd-macsec-ebpf --all-targets -- -D warnings; \
             then the eBPF crate with the pinned nightly for bpfel-unknown-none"
        }
        Stage::Unit => {
            "unit: cargo test --workspace --exclude qkd-macsec-ebpf --lib --bins; same with --doc"
        }
        Stage::Integration => {
            "integration: tests/tests/*.rs other than host_* and vm_* (loopback sockets, no privileges)"
        }
        Stage::Fuzz => "fuzz: every fuzz target for 12 s (cargo xtask fuzz --seconds 12; sectag_xdp needs root)",
        Stage::Host => "host: tests/tests/host_*.rs as root (--test-threads=1)",
        Stage::Bench => {
            "bench: every benchmark area (kme, macsec, ebpf, agent) with tiny counts on the debug \
             build, VM jobs in one boot; numbers in target/bench-smoke/ (cargo xtask bench for real ones)"
        }
        Stage::Vm => "vm: tests/tests/vm_*.rs inside the MACsec VM, one boot (--test-threads=1)",
    }
}

/// The eBPF crate only builds for bpfel-unknown-none (on the host its no_std bin fails with
/// "unwinding panics are not supported without std"), so host-target cargo commands exclude it
/// and it gets its own clippy run with the pinned nightly.
const EBPF_CRATE: &str = "qkd-macsec-ebpf";

fn clippy() -> Result<()> {
    util::run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut c = ebpf_cargo("clippy");
    c.args(["--", "-D", "warnings"]);
    util::run(&mut c).context("clippy on the eBPF crate (pinned nightly, bpfel-unknown-none)")
}

fn unit() -> Result<()> {
    util::run(&mut cargo(&[
        "test",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--lib",
        "--bins",
    ]))?;
    util::run(&mut cargo(&[
        "test",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--doc",
    ]))
}

/// Unprivileged integration tests: everything in tests/tests that is not a host_ or vm_ test.
fn integration(filter: Option<&str>) -> Result<()> {
    let targets: Vec<String> = test_targets("", filter)?
        .into_iter()
        .filter(|t| !t.starts_with("host_") && !t.starts_with("vm_"))
        .collect();
    if targets.is_empty() {
        bail!("no unprivileged tests/tests/*.rs matched; nothing would be tested");
    }
    build_agent()?;
    let mut c = cargo(&["test", "-p", "qkd-macsec-tests"]);
    for t in &targets {
        c.args(["--test", t]);
    }
    util::run(&mut c)
}

/// The agent binary that integration tests start (`qkd_macsec_tests::agent_bin`).
fn build_agent() -> Result<()> {
    util::run(&mut cargo(&["build", "-p", "qkd-macsec-agent", "--bins"]))
}

fn host(filter: Option<&str>) -> Result<()> {
    let targets = test_targets("host_", filter)?;
    if targets.is_empty() {
        bail!("no tests/tests/host_*.rs matched; nothing would be tested");
    }
    build_agent()?;
    if targets.iter().any(|t| t.contains("package")) {
        // host_package installs what `cargo xtask package` builds (debug build: same contents).
        crate::package::run(false)?;
    }
    let mut c = cargo(&["test", "-p", "qkd-macsec-tests"]);
    for t in &targets {
        c.args(["--test", t]);
    }
    c.args(["--", "--test-threads=1"]);
    if !util::is_root() {
        // The tests themselves fail loudly without root; sudo keeps the rest of the run usable.
        eprintln!("[test] not root: running the host test binaries through `sudo -E`");
        c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    util::run(&mut c)
}

/// Builds the VM test binaries, then runs all of them in ONE VM boot.
fn vm_stage(filter: Option<&str>) -> Result<()> {
    let targets = test_targets("vm_", filter)?;
    if targets.is_empty() {
        bail!("no tests/tests/vm_*.rs matched; nothing would be tested");
    }
    build_agent()?;
    let bins = build_test_binaries(&targets)?;
    let manifest_dir = util::repo_root().join("tests");
    let mut body = String::from("failed=0\n");
    for (name, bin) in &bins {
        body.push_str(&format!(
            "echo '---- VM test binary {name} ----'\n\
             {} --test-threads=1\n\
             rc=$?\n\
             mark test {name} $rc\n\
             [ $rc -eq 0 ] || failed=1\n",
            util::sh_quote(&bin.to_string_lossy())
        ));
    }
    body.push_str("exit $failed\n");
    let mut env = vm::passthrough_env();
    env.push((
        "CARGO_MANIFEST_DIR".into(),
        manifest_dir.to_string_lossy().into_owned(),
    ));
    env.push(("CARGO_PKG_NAME".into(), "qkd-macsec-tests".into()));
    env.push(("RUST_TEST_THREADS".into(), "1".into()));
    let job = vm::Job {
        cwd: manifest_dir,
        env,
        body,
        // Every VM test binary in one boot, the end-to-end agent tests included (about 20 min
        // under TCG): QKD_MACSEC_VM_TIMEOUT still overrides this.
        timeout: vm::timeout(Some(
            std::env::var("QKD_MACSEC_VM_TIMEOUT")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(VM_STAGE_TIMEOUT_SECS),
        ))?,
    };
    let out = vm::run_job(&job)?;
    eprintln!(
        "\n[vm] one boot ran {} test binaries: boot {:.1} s, total {:.1} s",
        bins.len(),
        out.boot.as_secs_f64(),
        out.elapsed.as_secs_f64()
    );
    let mut failed = Vec::new();
    for (name, _) in &bins {
        let rc = out
            .marks
            .iter()
            .filter_map(|m| m.strip_prefix("test "))
            .find_map(|m| {
                let (n, rc) = m.rsplit_once(' ')?;
                (n == name).then(|| rc.to_owned())
            });
        let verdict = match rc.as_deref() {
            Some("0") => "ok".to_owned(),
            Some(rc) => {
                failed.push(name.clone());
                format!("FAILED (exit status {rc})")
            }
            None => {
                failed.push(name.clone());
                "DID NOT REPORT (the VM stopped before it finished)".to_owned()
            }
        };
        eprintln!("    {name:<24} {verdict}");
    }
    if !failed.is_empty() || out.status != 0 {
        bail!(
            "VM tests failed: {} (rerun one alone with `cargo xtask test --only vm --filter NAME`)",
            if failed.is_empty() {
                format!("job exit status {}", out.status)
            } else {
                failed.join(", ")
            }
        );
    }
    Ok(())
}

/// `cargo test --no-run` for the given integration tests; returns (name, executable).
fn build_test_binaries(targets: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut c = cargo(&[
        "test",
        "-p",
        "qkd-macsec-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for t in targets {
        c.args(["--test", t]);
    }
    let shown = util::show(&c);
    let out = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if targets.iter().any(|t| t == name) {
            bins.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    // Cargo reports artifacts in completion order; run them in name order every time.
    bins.sort();
    bins.dedup();
    for t in targets {
        if !bins.iter().any(|(n, _)| n == t) {
            return Err(anyhow!(
                "`{shown}` reported no executable for test target {t}"
            ));
        }
    }
    Ok(bins)
}

/// `cargo xtask build-ebpf`: the same cargo command aya-build runs from the agent's build.rs.
pub fn build_ebpf() -> Result<()> {
    let t = Instant::now();
    let target_dir = ebpf_target_dir();
    let mut c = ebpf_cargo("build");
    util::run(&mut c)
        .context("eBPF build failed; `cargo xtask setup` installs the nightly and bpf-linker")?;
    // The production object and the test object (the eBPF crate's two bins), with their DWARF
    // (the agent's build.rs strips the copies it embeds).
    for name in ["qkd-macsec", "qkd-macsec-test"] {
        let obj = target_dir.join("bpfel-unknown-none/release").join(name);
        let size = fs::metadata(&obj)
            .with_context(|| format!("eBPF object {} missing after the build", obj.display()))?
            .len();
        eprintln!("[build-ebpf] {} ({size} bytes)", obj.display());
    }
    eprintln!("[build-ebpf] done in {}", secs(t));
    Ok(())
}

fn ebpf_target_dir() -> PathBuf {
    util::repo_root().join("target").join("ebpf")
}

/// `cargo <sub>` for the eBPF crate the way aya-build runs it from the agent's build.rs: pinned
/// nightly, bpfel-unknown-none, build-std=core, release, with BTF and the target-arch cfg.
fn ebpf_cargo(sub: &str) -> Command {
    let mut c = cmd(
        "rustup",
        &[
            "run",
            setup::NIGHTLY,
            "cargo",
            sub,
            "--package",
            EBPF_CRATE,
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ],
    );
    c.arg("--target-dir")
        .arg(ebpf_target_dir())
        .current_dir(util::repo_root())
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    c
}
