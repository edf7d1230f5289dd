//! `cargo xtask bench <area>`: runs an area's benchmark programs and merges what they report into
//! target/bench/results.json (a flat JSON object; keys of other areas are kept).
//!
//! Convention for benchmark programs: print one line per number, `bench-result: <key> <value>`,
//! keys prefixed with the area (e.g. `kme.enc_keys_ratio`). Speed targets are checked as ratios
//! against a baseline measured in the same run, never in timed tests.
//!
//! Or one line `bench-json: {...}` holding a flat JSON object. To add an area's benchmarks, extend
//! [`area_jobs`].

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::util;

pub const AREAS: [&str; 4] = ["kme", "macsec", "ebpf", "agent"];

/// Where a benchmark runs and how its numbers come back.
pub enum Where {
    /// On the host: a command line run from the repository root; prints `bench-result:` lines.
    Host(Vec<String>),
    /// On the host: a command that merges its numbers into target/bench/results.json itself.
    HostMerges(Vec<String>),
    /// Inside the MACsec VM: a shell script body run from the repository root. It prints
    /// `bench-result: <key> <value>` lines or `bench-json: {...}` (one flat object on one line);
    /// they come back as marks, since files written in the VM are thrown away.
    Vm(String),
}

/// The agent binary the benchmarks run (release build).
fn agent() -> String {
    util::repo_root()
        .join("target/release/qkd-macsec-agent")
        .to_string_lossy()
        .into_owned()
}

/// The benchmark jobs of one area.
fn area_jobs(area: &str) -> Vec<Where> {
    let agent = agent();
    match area {
        "kme" => vec![Where::Host(vec![agent, "bench-kme".into()])],
        "ebpf" => vec![Where::HostMerges(vec![
            agent,
            "bench-ebpf".into(),
            "--out".into(),
            results_path().to_string_lossy().into_owned(),
        ])],
        // Rollovers through the agent's netlink layer vs `ip macsec` under a frame stream; needs
        // kernel MACsec, so it runs in the VM. It prints `bench-result:` lines itself.
        "macsec" => vec![Where::Vm(format!(
            "{} bench-macsec",
            util::sh_quote(&agent)
        ))],
        "agent" => vec![
            // Per-message cost of the key exchange against AES-CMAC (host).
            Where::Host(vec![agent, "bench-agent".into()]),
            // The agent's zeroing allocator against the system allocator (host).
            Where::Host(vec![util::repo_root()
                .join("target/release/qkd-macsec-bench-alloc")
                .to_string_lossy()
                .into_owned()]),
            // Two real agents with 16 links each in the MACsec VM: start-to-secure, rekey
            // latency, rollovers, lost frames, RSS and CPU.
            Where::Vm(util::sh_quote(
                &util::repo_root()
                    .join("target/release/qkd-macsec-bench-agent")
                    .to_string_lossy(),
            )),
        ],
        _ => Vec::new(),
    }
}

pub fn run(area: &str) -> Result<()> {
    let areas: Vec<&str> = match area {
        "all" => AREAS.to_vec(),
        a if AREAS.contains(&a) => vec![a],
        other => bail!(
            "unknown bench area {other:?}; expected one of {} or all",
            AREAS.join(", ")
        ),
    };
    // Benchmarks measure the optimised build.
    let mut build = Command::new("cargo");
    build
        .args(["build", "--release", "-p", "qkd-macsec-agent"])
        // --bin applies to every -p: name both binaries, or the agent's is not built.
        .args(["-p", "qkd-macsec-tests", "--bin", "qkd-macsec-agent"])
        .args([
            "--bin",
            "qkd-macsec-bench-agent",
            "--bin",
            "qkd-macsec-bench-alloc",
        ])
        .current_dir(util::repo_root());
    util::run(&mut build)?;
    // Every area runs even when an earlier one fails; a failure (or an area with nothing
    // registered) is an error entry in the report and in results.json, and the exit status.
    let mut errors: Vec<(String, String)> = Vec::new();
    for a in &areas {
        eprintln!("[bench] area {a}");
        let r = if area_jobs(a).is_empty() {
            Err(anyhow::anyhow!(
                "no benchmarks registered for area {a} (add them in xtask/src/bench.rs)"
            ))
        } else {
            run_area(a)
        };
        let mut m = BTreeMap::new();
        match r {
            Ok(()) => {
                m.insert(format!("bench.{a}.error"), serde_json::Value::Null);
            }
            Err(e) => {
                eprintln!("[bench] area {a} FAILED: {e:#}");
                m.insert(
                    format!("bench.{a}.error"),
                    serde_json::json!(format!("{e:#}")),
                );
                errors.push((a.to_string(), format!("{e:#}")));
            }
        }
        merge(&m)?;
    }
    // Error entries of areas that succeeded now are dropped (null), not kept from earlier runs.
    drop_nulls()?;
    let report = crate::report::write_report(&bench_dir(), &errors)?;
    eprintln!("[bench] results in {}", results_path().display());
    eprintln!("[bench] report in {}", report.display());
    if !errors.is_empty() {
        bail!(
            "{} benchmark area(s) failed: {}",
            errors.len(),
            errors
                .iter()
                .map(|(a, _)| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn bench_dir() -> PathBuf {
    util::repo_root().join("target/bench")
}

fn drop_nulls() -> Result<()> {
    let path = results_path();
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    let mut all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)?;
    all.retain(|_, v| !v.is_null());
    fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")?;
    Ok(())
}

/// Stores the `bench-samples: {json}` lines of `output` under target/bench/samples/.
fn store_sample_lines(output: &str) -> Result<()> {
    for line in output.lines() {
        if let Some(json) = line.trim().strip_prefix("bench-samples:") {
            let name = crate::report::store_samples(&bench_dir().join("samples"), json)?;
            eprintln!("[bench] samples {name}");
        }
    }
    Ok(())
}

fn run_area(a: &str) -> Result<()> {
    for job in area_jobs(a) {
        let output = match job {
            Where::Host(argv) => {
                let (prog, args) = argv.split_first().context("empty bench command")?;
                let mut c = Command::new(prog);
                c.args(args)
                    .current_dir(util::repo_root())
                    .stderr(Stdio::inherit());
                util::stdout(&mut c)?
            }
            Where::HostMerges(argv) => {
                let (prog, args) = argv.split_first().context("empty bench command")?;
                let mut c = Command::new(prog);
                c.args(args).current_dir(util::repo_root());
                util::run(&mut c)?;
                continue;
            }
            Where::Vm(body) => {
                // Files written in the VM are thrown away: sample files the job wrote come
                // back as `bench-samples:` marks (one JSON object per line).
                let job = crate::vm::Job {
                    cwd: util::repo_root(),
                    env: crate::vm::passthrough_env(),
                    body: format!(
                        "touch /tmp/bench-start\n\
                         ( {body}; echo $? > /tmp/bench-rc ) | while IFS= read -r l; do case \"$l\" in \
                         'bench-result: '*|'bench-json: '*|'bench-samples: '*) mark \"$l\";; \
                         *) echo \"$l\";; esac; done\n\
                         for f in $(find target/bench/samples -name '*.json' -newer /tmp/bench-start 2>/dev/null); do \
                         mark \"bench-samples: $(tr -d '\\n' < \"$f\")\"; done\n\
                         # The pipeline's status is the loop's: the benchmark's own comes from the file.\n\
                         rc=$(cat /tmp/bench-rc 2>/dev/null || echo 125); exit $rc\n"
                    ),
                    timeout: crate::vm::timeout(None)?,
                };
                let out = crate::vm::run_job(&job)?;
                if out.status != 0 {
                    bail!("VM benchmark for {a} exited with status {}", out.status);
                }
                out.marks.join("\n")
            }
        };
        store_sample_lines(&output)?;
        let results = parse_results(&output)?;
        if results.is_empty() {
            bail!("a benchmark of area {a} reported no results");
        }
        merge(&results)?;
    }
    Ok(())
}

fn parse_results(output: &str) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut m = BTreeMap::new();
    for line in output.lines() {
        let line = line.trim();
        if let Some(json) = line.strip_prefix("bench-json:") {
            let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json.trim())
                .with_context(|| format!("bench-json line is not a JSON object: {json}"))?;
            for (k, v) in obj {
                if v.is_object() || v.is_array() {
                    bail!("bench-json key {k} is not a flat value: {v}");
                }
                m.insert(k, v);
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("bench-result:") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let (Some(k), Some(v), None) = (w.next(), w.next(), w.next()) else {
            bail!("malformed bench line {line:?}; expected `bench-result: <key> <number>`");
        };
        let v: f64 = v
            .parse()
            .with_context(|| format!("bench line {line:?}: {v:?} is not a number"))?;
        m.insert(k.to_owned(), serde_json::json!(v));
    }
    Ok(m)
}

fn results_path() -> PathBuf {
    util::repo_root().join("target/bench/results.json")
}

/// Merges `new` into target/bench/results.json, keeping other keys.
pub fn merge(new: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    merge_replacing("", new)
}

/// Like [`merge`], but first drops every key starting with `prefix` (when not empty): a run
/// that no longer reports a figure must not leave the previous run's value behind.
pub fn merge_replacing(prefix: &str, new: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    let path = results_path();
    let mut all: serde_json::Map<String, serde_json::Value> = match fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s)
            .with_context(|| format!("{} is not a JSON object; delete it", path.display()))?,
        Err(_) => serde_json::Map::new(),
    };
    if !prefix.is_empty() {
        all.retain(|k, _| !k.starts_with(prefix));
    }
    for (k, v) in new {
        all.insert(k.clone(), v.clone());
        eprintln!("[bench] {k} = {v}");
    }
    fs::create_dir_all(path.parent().expect("has parent"))?;
    fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines_and_rejects_garbage() {
        let m = parse_results("noise\nbench-result: kme.x 1.5\n  bench-result: kme.y 2\n").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["kme.x"], 1.5);
        let m = parse_results("bench-json: {\"macsec.a\": 2, \"macsec.cipher\": \"gcm\"}").unwrap();
        assert_eq!(m["macsec.a"], 2);
        assert!(parse_results("bench-json: {\"k\": {\"nested\": 1}}").is_err());
        assert!(parse_results("bench-result: kme.x fast").is_err());
        assert!(parse_results("bench-result: kme.x").is_err());
    }
}
