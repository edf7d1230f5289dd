//! `cargo xtask bench <area>`: runs an area's benchmark programs and merges what they report into
//! target/bench/results.json (a flat JSON object; keys of other areas are kept).
//!
//! Convention for benchmark programs: print one line per number, `bench-result: <key> <value>`,
//! keys prefixed with the area (e.g. `kme.enc_keys_ratio`). Speed targets are checked as ratios
//! against a baseline measured in the same run, never in timed tests.
//!
//! To add an area's benchmarks, extend [`area_jobs`].

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::util;

pub const AREAS: [&str; 4] = ["kme", "macsec", "ebpf", "agent"];

/// Where a benchmark runs.
#[expect(dead_code, reason = "variants are used as areas add their benchmarks")]
pub enum Where {
    /// On the host: a command line run from the repository root.
    Host(Vec<String>),
    /// Inside the MACsec VM: a shell script body run from the repository root.
    Vm(String),
}

/// The benchmark jobs of one area. Empty until the area's owner adds them.
fn area_jobs(area: &str) -> Vec<Where> {
    match area {
        // Rollovers through the agent's netlink layer vs `ip macsec`, under a frame stream;
        // needs kernel MACsec, so it runs in the VM on the binary built by `prebuild`.
        "macsec" => vec![Where::Vm(
            "target/release/qkd-macsec-agent bench-macsec".to_owned(),
        )],
        "kme" | "ebpf" | "agent" => Vec::new(),
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
    for a in areas {
        prebuild(a)?;
        let jobs = area_jobs(a);
        if jobs.is_empty() {
            bail!("no benchmarks registered for area {a} yet (add them in xtask/src/bench.rs)");
        }
        for job in jobs {
            let output = match job {
                Where::Host(argv) => {
                    let (prog, args) = argv.split_first().context("empty bench command")?;
                    let mut c = Command::new(prog);
                    c.args(args)
                        .current_dir(util::repo_root())
                        .stderr(Stdio::inherit());
                    util::stdout(&mut c)?
                }
                Where::Vm(body) => {
                    let job = crate::vm::Job {
                        cwd: util::repo_root(),
                        env: crate::vm::passthrough_env(),
                        // Results come back as marks, since the console is the only channel.
                        body: format!(
                            "( {body} ) | while IFS= read -r l; do case \"$l\" in \
                             'bench-result: '*) mark \"$l\";; *) echo \"$l\";; esac; done\n"
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
            let results = parse_results(&output)?;
            if results.is_empty() {
                bail!("a benchmark of area {a} reported no `bench-result:` lines");
            }
            merge(&results)?;
        }
    }
    Ok(())
}

/// Builds what an area's VM jobs run: the VM (TCG) runs host-built binaries, it does not build.
fn prebuild(area: &str) -> Result<()> {
    if area == "macsec" {
        util::run(
            util::cmd(
                "cargo",
                &["build", "--release", "-p", "qkd-macsec-agent", "--bins"],
            )
            .current_dir(util::repo_root()),
        )?;
    }
    Ok(())
}

fn parse_results(output: &str) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("bench-result:") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let (Some(k), Some(v), None) = (w.next(), w.next(), w.next()) else {
            bail!("malformed bench line {line:?}; expected `bench-result: <key> <number>`");
        };
        let v: f64 = v
            .parse()
            .with_context(|| format!("bench line {line:?}: {v:?} is not a number"))?;
        m.insert(k.to_owned(), v);
    }
    Ok(m)
}

fn results_path() -> PathBuf {
    util::repo_root().join("target/bench/results.json")
}

/// Merges `new` into target/bench/results.json, keeping other keys.
pub fn merge(new: &BTreeMap<String, f64>) -> Result<()> {
    let path = results_path();
    let mut all: serde_json::Map<String, serde_json::Value> = match fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s)
            .with_context(|| format!("{} is not a JSON object; delete it", path.display()))?,
        Err(_) => serde_json::Map::new(),
    };
    for (k, v) in new {
        all.insert(k.clone(), serde_json::json!(v));
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
        assert!(parse_results("bench-result: kme.x fast").is_err());
        assert!(parse_results("bench-result: kme.x").is_err());
    }
}
