//! `cargo xtask bench <area>`: runs an area's benchmark programs and merges what they report into
//! target/bench/results.json (a flat JSON object; keys of other areas are kept).
//!
//! Convention for benchmark programs: print one line per number, `bench-result: <key> <value>`,
//! keys prefixed with the area (e.g. `kme.enc_keys_ratio`). Speed targets are checked as ratios
//! against a baseline measured in the same run, never in timed tests.
//!
//! Or one line `bench-json: {...}` holding a flat JSON object. To add an area's benchmarks, extend
//! [`area_jobs`], with the tiny counts its smoke run uses ([`Mode::Smoke`], the `bench` stage of
//! `cargo xtask test`, which runs every job of every area so that no benchmark rots unnoticed).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::util;

pub const AREAS: [&str; 4] = ["kme", "macsec", "ebpf", "agent"];

/// How a benchmark run is built and sized, and where its numbers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `cargo xtask bench`: the release build, full counts, target/bench/.
    Full,
    /// The `bench` stage of `cargo xtask test`: every area with tiny counts on the debug build
    /// the earlier stages made, numbers in target/bench-smoke/ (never mixed with real ones). It
    /// proves that every benchmark still runs, not how fast anything is.
    Smoke,
}

impl Mode {
    fn profile_dir(self) -> &'static str {
        match self {
            Mode::Full => "release",
            Mode::Smoke => "debug",
        }
    }

    /// Where results.json, samples/ and report.md go.
    fn dir(self) -> PathBuf {
        util::repo_root().join(match self {
            Mode::Full => "target/bench",
            Mode::Smoke => "target/bench-smoke",
        })
    }

    fn results(self) -> PathBuf {
        self.dir().join("results.json")
    }

    /// A built binary of the workspace.
    fn bin(self, name: &str) -> String {
        util::repo_root()
            .join("target")
            .join(self.profile_dir())
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    /// `full` in a full run, `smoke` in a smoke run.
    fn pick<'a>(self, full: &'a [&'a str], smoke: &'a [&'a str]) -> Vec<String> {
        match self {
            Mode::Full => full,
            Mode::Smoke => smoke,
        }
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }
}

/// Where a benchmark runs and how its numbers come back.
pub enum Where {
    /// On the host: a command line run from the repository root; prints `bench-result:` lines.
    Host(Vec<String>),
    /// On the host: a command that merges its numbers into the mode's results.json itself.
    HostMerges(Vec<String>),
    /// Inside the MACsec VM: a shell script body run from the repository root. It prints
    /// `bench-result: <key> <value>` lines or `bench-json: {...}` (one flat object on one line);
    /// they come back as marks, since files written in the VM are thrown away.
    Vm(String),
}

/// `argv` run through `sudo -E` when we are not root (BPF needs it), as the host test stage does.
fn as_root(argv: Vec<String>) -> Vec<String> {
    if util::is_root() {
        return argv;
    }
    let mut v = vec!["sudo".to_owned(), "-E".to_owned()];
    v.extend(argv);
    v
}

/// The benchmark jobs of one area.
fn area_jobs(area: &str, mode: Mode) -> Vec<Where> {
    let agent = mode.bin("qkd-macsec-agent");
    let with = |mut argv: Vec<String>, args: Vec<String>| {
        argv.extend(args);
        argv
    };
    match area {
        "kme" => vec![Where::Host(with(
            vec![agent, "bench-kme".into()],
            mode.pick(&[], &["--seconds", "0.2", "--concurrency", "2"]),
        ))],
        // XDP/TC per-packet cost (BPF_PROG_TEST_RUN), a program of its own so that the agent
        // binary does not embed the test object with the baselines.
        "ebpf" => vec![Where::HostMerges(as_root(with(
            vec![
                mode.bin("qkd-macsec-bench-ebpf"),
                "--out".into(),
                mode.results().to_string_lossy().into_owned(),
            ],
            mode.pick(&[], &["--repeat", "2000", "--rounds", "1"]),
        )))],
        // Rollovers through the agent's netlink layer vs `ip macsec` under a frame stream; needs
        // kernel MACsec, so it runs in the VM. It prints `bench-result:` lines itself.
        "macsec" => vec![Where::Vm(
            with(
                vec![util::sh_quote(&agent), "bench-macsec".into()],
                mode.pick(&[], &["--rollovers", "2", "--cli-rollovers", "1"]),
            )
            .join(" "),
        )],
        "agent" => vec![
            // Per-message cost of the key exchange against AES-CMAC (host).
            Where::Host(with(
                vec![agent, "bench-agent".into()],
                mode.pick(&[], &["--messages", "1000"]),
            )),
            // The agent's zeroing allocator against the system allocator (host; about 3 s
            // whatever the mode, its rounds are sized by time).
            Where::Host(vec![mode.bin("qkd-macsec-bench-alloc")]),
            // Two real agents with 16 links each in the MACsec VM: start-to-secure, rekey
            // latency, rollovers, lost frames, RSS and CPU. The smoke run: one link, 2 s.
            Where::Vm(
                with(
                    vec![util::sh_quote(&mode.bin("qkd-macsec-bench-agent"))],
                    mode.pick(
                        &[],
                        &[
                            "--links",
                            "1",
                            "--seconds",
                            "2",
                            "--samples",
                            "target/bench-smoke/samples",
                        ],
                    ),
                )
                .join(" "),
            ),
        ],
        _ => Vec::new(),
    }
}

/// Builds what the benchmarks run: the agent and the benchmark programs of the tests crate.
fn build(mode: Mode) -> Result<()> {
    let mut build = Command::new("cargo");
    build.arg("build");
    if mode == Mode::Full {
        // Benchmarks measure the optimised build.
        build.arg("--release");
    }
    build
        .args(["-p", "qkd-macsec-agent"])
        // --bin applies to every -p: name both binaries, or the agent's is not built.
        .args(["-p", "qkd-macsec-tests", "--bin", "qkd-macsec-agent"])
        .args([
            "--bin",
            "qkd-macsec-bench-agent",
            "--bin",
            "qkd-macsec-bench-alloc",
            "--bin",
            "qkd-macsec-bench-ebpf",
        ])
        .current_dir(util::repo_root());
    util::run(&mut build)
}

/// `cargo xtask bench <area|all>`.
pub fn run(area: &str) -> Result<()> {
    let areas: Vec<&str> = match area {
        "all" => AREAS.to_vec(),
        a if AREAS.contains(&a) => vec![a],
        other => bail!(
            "unknown bench area {other:?}; expected one of {} or all",
            AREAS.join(", ")
        ),
    };
    build(Mode::Full)?;
    // Every area runs even when an earlier one fails; a failure (or an area with nothing
    // registered) is an error entry in the report and in results.json, and the exit status.
    let mut errors: Vec<(String, String)> = Vec::new();
    for a in &areas {
        eprintln!("[bench] area {a}");
        let r = if area_jobs(a, Mode::Full).is_empty() {
            Err(anyhow::anyhow!(
                "no benchmarks registered for area {a} (add them in xtask/src/bench.rs)"
            ))
        } else {
            run_area(a, Mode::Full)
        };
        record_area(Mode::Full, a, r, &mut errors)?;
    }
    finish(Mode::Full, &errors)
}

/// The `bench` stage of `cargo xtask test`: every area, every job, tiny counts, the debug build;
/// the host jobs first, then every VM job in one VM boot. Fails when any area fails.
pub fn smoke() -> Result<()> {
    let mode = Mode::Smoke;
    build(mode)?;
    // Start from nothing, so that what the report shows is this run's.
    let _ = fs::remove_dir_all(mode.dir());
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut vm_jobs: Vec<(&str, String)> = Vec::new();
    for a in AREAS {
        let jobs = area_jobs(a, mode);
        if jobs.is_empty() {
            errors.push((a.to_owned(), "no benchmarks registered".to_owned()));
            continue;
        }
        let mut r = Ok(());
        for job in jobs {
            match job {
                Where::Vm(body) => vm_jobs.push((a, body)),
                host => {
                    eprintln!("[bench-smoke] {a}: host job");
                    if let Err(e) = run_host_job(a, host, mode) {
                        r = Err(e);
                        break;
                    }
                }
            }
        }
        if let Err(e) = r {
            eprintln!("[bench-smoke] area {a} FAILED: {e:#}");
            errors.push((a.to_owned(), format!("{e:#}")));
        }
    }
    if !vm_jobs.is_empty() {
        eprintln!(
            "[bench-smoke] {} VM job(s) in one boot: {}",
            vm_jobs.len(),
            vm_jobs
                .iter()
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let bodies: Vec<String> = vm_jobs.iter().map(|(_, b)| b.clone()).collect();
        match run_vm_jobs(&bodies, mode) {
            Ok(outputs) => {
                for ((a, _), out) in vm_jobs.iter().zip(outputs) {
                    if let Err(e) = out.and_then(|o| collect(a, &o, mode)) {
                        eprintln!("[bench-smoke] area {a} (VM) FAILED: {e:#}");
                        if !errors.iter().any(|(x, _)| x == a) {
                            errors.push(((*a).to_owned(), format!("{e:#}")));
                        }
                    }
                }
            }
            Err(e) => {
                for (a, _) in &vm_jobs {
                    errors.push(((*a).to_owned(), format!("the VM boot failed: {e:#}")));
                }
            }
        }
    }
    for a in AREAS {
        let r = match errors.iter().find(|(x, _)| x == a) {
            Some((_, e)) => Err(anyhow::anyhow!("{e}")),
            None => Ok(()),
        };
        record_area(mode, a, r, &mut Vec::new())?;
    }
    finish(mode, &errors)
}

/// Records an area's success (a null error entry, dropped by [`finish`]) or failure.
fn record_area(
    mode: Mode,
    a: &str,
    r: Result<()>,
    errors: &mut Vec<(String, String)>,
) -> Result<()> {
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
    merge_into(&mode.results(), "", &m)
}

/// Drops null entries, writes the report, and fails when an area did.
fn finish(mode: Mode, errors: &[(String, String)]) -> Result<()> {
    // Error entries of areas that succeeded now are dropped (null), not kept from earlier runs.
    drop_nulls(&mode.results())?;
    let report = crate::report::write_report(&mode.dir(), errors)?;
    eprintln!("[bench] results in {}", mode.results().display());
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

fn drop_nulls(path: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let mut all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)?;
    all.retain(|_, v| !v.is_null());
    fs::write(path, serde_json::to_string_pretty(&all)? + "\n")?;
    Ok(())
}

/// Stores the `bench-samples: {json}` lines of `output` under the mode's samples/.
fn store_sample_lines(output: &str, mode: Mode) -> Result<()> {
    for line in output.lines() {
        if let Some(json) = line.trim().strip_prefix("bench-samples:") {
            let name = crate::report::store_samples(&mode.dir().join("samples"), json)?;
            eprintln!("[bench] samples {name}");
        }
    }
    Ok(())
}

/// Stores an output's samples and merges its results; fails when it reported none.
fn collect(a: &str, output: &str, mode: Mode) -> Result<()> {
    store_sample_lines(output, mode)?;
    let results = parse_results(output)?;
    if results.is_empty() {
        bail!("a benchmark of area {a} reported no results");
    }
    merge_into(&mode.results(), "", &results)
}

fn run_host_job(a: &str, job: Where, mode: Mode) -> Result<()> {
    match job {
        Where::Host(argv) => {
            let (prog, args) = argv.split_first().context("empty bench command")?;
            let mut c = Command::new(prog);
            c.args(args)
                .current_dir(util::repo_root())
                .stderr(Stdio::inherit());
            let output = util::stdout(&mut c)?;
            collect(a, &output, mode)
        }
        Where::HostMerges(argv) => {
            let (prog, args) = argv.split_first().context("empty bench command")?;
            let mut c = Command::new(prog);
            c.args(args).current_dir(util::repo_root());
            util::run(&mut c)
        }
        Where::Vm(_) => bail!("a VM job is not a host job"),
    }
}

fn run_area(a: &str, mode: Mode) -> Result<()> {
    for job in area_jobs(a, mode) {
        match job {
            Where::Vm(body) => {
                let out = run_vm_jobs(&[body], mode)?
                    .pop()
                    .context("the VM ran no job")??;
                collect(a, &out, mode)?;
            }
            host => run_host_job(a, host, mode)?,
        }
    }
    Ok(())
}

/// Runs VM jobs one after the other in ONE VM boot; returns each job's reported lines (results,
/// JSON and samples), or its failure. Files written in the VM are thrown away: sample files a
/// job wrote under the mode's samples/ come back as `bench-samples:` marks.
fn run_vm_jobs(bodies: &[String], mode: Mode) -> Result<Vec<Result<String>>> {
    let samples = mode
        .dir()
        .join("samples")
        .strip_prefix(util::repo_root())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "target/bench/samples".into());
    let mut script = String::new();
    for (i, body) in bodies.iter().enumerate() {
        script.push_str(&format!(
            "echo '---- bench job {i} ----'\n\
             touch /tmp/bench-start-{i}\n\
             ( {body}; echo $? > /tmp/bench-rc-{i} ) | while IFS= read -r l; do case \"$l\" in \
             'bench-result: '*|'bench-json: '*|'bench-samples: '*) mark \"job {i} $l\";; \
             *) echo \"$l\";; esac; done\n\
             for f in $(find {samples} -name '*.json' -newer /tmp/bench-start-{i} 2>/dev/null); do \
             mark \"job {i} bench-samples: $(tr -d '\\n' < \"$f\")\"; done\n\
             # The pipeline's status is the loop's: the benchmark's own comes from the file.\n\
             mark \"rc {i} $(cat /tmp/bench-rc-{i} 2>/dev/null || echo 125)\"\n"
        ));
    }
    let job = crate::vm::Job {
        cwd: util::repo_root(),
        env: crate::vm::passthrough_env(),
        body: script,
        timeout: crate::vm::timeout(None)?,
    };
    let out = crate::vm::run_job(&job)?;
    Ok(job_outputs(&out.marks, bodies, out.status))
}

/// Splits the marks of a batch of VM jobs by job: each job's `bench-*` lines, or its failure
/// (a non-zero status, or no status at all when the VM stopped before the job finished).
fn job_outputs(marks: &[String], bodies: &[String], vm_status: i32) -> Vec<Result<String>> {
    let mut results = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let rc = marks.iter().find_map(|m| {
            let (n, rc) = m.strip_prefix("rc ")?.split_once(' ')?;
            (n == i.to_string()).then(|| rc.trim().to_owned())
        });
        let prefix = format!("job {i} ");
        let lines: Vec<&str> = marks
            .iter()
            .filter_map(|m| m.strip_prefix(&prefix))
            .collect();
        results.push(match rc.as_deref() {
            Some("0") => Ok(lines.join("\n")),
            Some(rc) => Err(anyhow::anyhow!(
                "VM benchmark `{body}` exited with status {rc}"
            )),
            None => Err(anyhow::anyhow!(
                "VM benchmark `{body}` did not finish (VM status {vm_status})"
            )),
        });
    }
    results
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

/// Merges `new` into target/bench/results.json, keeping other keys, but first drops every key
/// starting with `prefix` (when not empty): a run that no longer reports a figure must not leave
/// the previous run's value behind.
pub fn merge_replacing(prefix: &str, new: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    merge_into(&Mode::Full.results(), prefix, new)
}

fn merge_into(path: &Path, prefix: &str, new: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    let mut all: serde_json::Map<String, serde_json::Value> = match fs::read_to_string(path) {
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
    fs::write(path, serde_json::to_string_pretty(&all)? + "\n")
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

    #[test]
    fn vm_batch_marks_are_split_by_job_and_failures_kept_apart() {
        let marks: Vec<String> = [
            "job 0 bench-result: macsec.a 1",
            "rc 0 0",
            "job 1 bench-result: agent.b 2",
            "job 1 bench-samples: {}",
            "rc 1 3",
            "job 10 bench-result: x.y 9",
        ]
        .iter()
        .map(|m| (*m).to_owned())
        .collect();
        let bodies: Vec<String> = ["m", "a", "never ran"]
            .iter()
            .map(|b| (*b).to_owned())
            .collect();
        let out = job_outputs(&marks, &bodies, 1);
        assert_eq!(out[0].as_ref().unwrap(), "bench-result: macsec.a 1");
        assert!(format!("{:#}", out[1].as_ref().unwrap_err()).contains("status 3"));
        assert!(format!("{:#}", out[2].as_ref().unwrap_err()).contains("did not finish"));
    }
}
