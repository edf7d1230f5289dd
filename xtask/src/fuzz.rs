//! `cargo xtask fuzz`: builds the fuzz targets in `fuzz/` (cargo fuzz, libFuzzer, pinned nightly)
//! and runs each one for a time or a number of executions, one after the other with one job (the
//! machine's two cores are shared). Records executions, speed, corpus size and findings per target
//! in `target/fuzz/summary.json` and prints a table. See docs/fuzzing.md.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::setup::NIGHTLY;
use crate::util::{self, cmd};

/// Every target, in run order. `sectag_xdp` needs root (BPF_PROG_TEST_RUN).
pub const TARGETS: [&str; 6] = [
    "lldp",
    "keyx_wire",
    "sectag",
    "etsi014",
    "config",
    "sectag_xdp",
];

/// How long each target runs.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Seconds(u64),
    Runs(u64),
}

/// One target's figures.
#[derive(Debug)]
struct Outcome {
    target: String,
    execs: u64,
    seconds: f64,
    corpus: usize,
    crashes: Vec<PathBuf>,
    exit_ok: bool,
}

fn fuzz_dir() -> PathBuf {
    util::repo_root().join("fuzz")
}

fn fuzz_target_dir() -> PathBuf {
    fuzz_dir().join("target")
}

/// Builds every target: release, no sanitizer. The code under test is safe Rust, so
/// AddressSanitizer would find nothing the borrow checker has not excluded, and it halves the
/// executions per second. Debug assertions stay off for the same reason (they cost a third of
/// the speed); the targets assert their properties with `assert!`, which is always on.
pub fn build() -> Result<()> {
    let mut c = cmd(
        "cargo",
        &[
            &format!("+{NIGHTLY}"),
            "fuzz",
            "build",
            "--sanitizer",
            "none",
            "--release",
            "--target-dir",
        ],
    );
    c.arg(fuzz_target_dir()).current_dir(util::repo_root());
    util::run(&mut c).context(
        "building the fuzz targets failed; `cargo xtask setup` installs cargo-fuzz and the pinned nightly",
    )
}

fn binary(target: &str) -> PathBuf {
    fuzz_target_dir()
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join(target)
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A `stat::name: value` line of libFuzzer's -print_final_stats output.
fn stat(stderr: &str, name: &str) -> Option<u64> {
    stderr.lines().rev().find_map(|l| {
        l.strip_prefix(&format!("stat::{name}:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn run_one(target: &str, budget: Budget) -> Result<Outcome> {
    if target == "sectag_xdp" && !util::is_root() {
        bail!("fuzz target sectag_xdp loads the XDP program and runs it with BPF_PROG_TEST_RUN: run `cargo xtask fuzz` as root (or leave it out with --target)");
    }
    let corpus = fuzz_dir().join("corpus").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    let artifacts = fuzz_dir().join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let before = files_in(&artifacts);
    let mut c = Command::new(binary(target));
    c.arg(&corpus);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    c.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
        .arg(match budget {
            Budget::Seconds(s) => format!("-max_total_time={s}"),
            Budget::Runs(n) => format!("-runs={n}"),
        })
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    eprintln!("[fuzz] {}", util::show(&c));
    let t = Instant::now();
    let out = c
        .output()
        .with_context(|| format!("cannot start {}; build first", binary(target).display()))?;
    let seconds = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // libFuzzer's progress goes to stderr; keep only the summary and any report.
    for l in stderr.lines().filter(|l| {
        l.starts_with("stat::")
            || l.contains("ERROR")
            || l.contains("panicked")
            || l.contains("Test unit written")
            || l.starts_with("Done ")
    }) {
        eprintln!("[fuzz {target}] {l}");
    }
    let crashes: Vec<PathBuf> = files_in(&artifacts).difference(&before).cloned().collect();
    if !out.status.success() && crashes.is_empty() {
        // Not a finding of the target: show everything so the cause is visible.
        eprintln!("{stderr}");
    }
    Ok(Outcome {
        target: target.to_owned(),
        execs: stat(&stderr, "number_of_executed_units").unwrap_or(0),
        seconds,
        corpus: files_in(&corpus).len(),
        crashes,
        exit_ok: out.status.success(),
    })
}

fn summary_path() -> PathBuf {
    util::repo_root()
        .join("target")
        .join("fuzz")
        .join("summary.json")
}

/// Merges the outcomes into target/fuzz/summary.json (other targets' entries stay).
fn record(outcomes: &[Outcome]) -> Result<()> {
    let path = summary_path();
    let mut all: Map<String, Value> = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for o in outcomes {
        all.insert(
            o.target.clone(),
            json!({
                "execs": o.execs,
                "seconds": (o.seconds * 10.0).round() / 10.0,
                "execs_per_sec": (o.execs as f64 / o.seconds.max(1e-9)).round(),
                "corpus_files": o.corpus,
                "crashes": o.crashes.len(),
                "artifacts": o.crashes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "clean_exit": o.exit_ok,
            }),
        );
    }
    fs::create_dir_all(path.parent().expect("has a parent"))?;
    fs::write(&path, serde_json::to_vec_pretty(&Value::Object(all))?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `cargo xtask fuzz`: build, run each target with `budget`, record, print; fails on any finding.
pub fn run(targets: &[String], budget: Budget, build_first: bool) -> Result<()> {
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", "));
            }
        }
        TARGETS
            .iter()
            .copied()
            .filter(|t| targets.iter().any(|x| x == t))
            .collect()
    };
    if build_first {
        build()?;
    }
    let mut outcomes = Vec::new();
    for t in &chosen {
        outcomes.push(run_one(t, budget)?);
    }
    record(&outcomes)?;
    eprintln!(
        "\n{:<11} {:>12} {:>8} {:>10} {:>7} {:>7}",
        "target", "execs", "time s", "execs/s", "corpus", "crashes"
    );
    for o in &outcomes {
        eprintln!(
            "{:<11} {:>12} {:>8.1} {:>10.0} {:>7} {:>7}",
            o.target,
            o.execs,
            o.seconds,
            o.execs as f64 / o.seconds.max(1e-9),
            o.corpus,
            o.crashes.len()
        );
    }
    eprintln!("(recorded in {})", summary_path().display());
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.crashes.is_empty() || !o.exit_ok || o.execs == 0)
        .map(|o| {
            if o.crashes.is_empty() {
                format!(
                    "{}: libFuzzer exited with an error and {} executions",
                    o.target, o.execs
                )
            } else {
                format!(
                    "{}: {} (reproduce: {} {})",
                    o.target,
                    o.crashes.len(),
                    binary(&o.target).display(),
                    o.crashes[0].display()
                )
            }
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "fuzzing found problems; turn each into a regression test next to the parser:\n  {}",
            bad.join("\n  ")
        );
    }
    Ok(())
}
