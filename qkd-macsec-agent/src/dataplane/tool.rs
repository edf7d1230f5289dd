//! Entry points of the agent's hidden `dataplane-hold` subcommand (a test helper) and of the
//! `ebpf` benchmark program (`qkd-macsec-bench-ebpf`, tests/src/bin/bench_ebpf.rs; kept out of the
//! agent binary, which thus does not carry the test object with the benchmark's baselines).

use std::io::Write as _;
use std::path::Path;

use super::{run_benchmark, Dataplane, DataplaneError, DataplaneOptions};

/// Attaches to `ifname`, optionally sets the stall, prints `ready <pin dir>` on stdout and then
/// sleeps until killed: the test helper for "the stall survives a killed agent".
pub fn hold(ifname: &str, bpffs_root: &Path, stall: bool) -> Result<(), DataplaneError> {
    let opts = DataplaneOptions {
        bpffs_root: bpffs_root.to_path_buf(),
        ..Default::default()
    };
    let mut dp = Dataplane::attach(ifname, &opts)?;
    if stall {
        dp.set_stall(true)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", dp.pin_dir().display()).map_err(|source| DataplaneError::Io {
        context: "writing the ready line".into(),
        source,
    })?;
    out.flush().map_err(|source| DataplaneError::Io {
        context: "flushing stdout".into(),
        source,
    })?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Runs the benchmark and prints one `bench-result: <key> <value>` line per number (the format
/// `cargo xtask bench ebpf` collects into target/bench/results.json). With `out`, also merges
/// them into that flat JSON object itself (for runs outside xtask).
pub fn bench(out: Option<&Path>, repeat: u32, rounds: usize) -> Result<(), DataplaneError> {
    let results = run_benchmark(repeat, rounds)?;
    for r in &results {
        println!("bench-result: {} {:.2}", r.key, r.value);
    }
    let Some(out) = out else {
        return Ok(());
    };
    let io = |context: String| move |source| DataplaneError::Io { context, source };
    let mut obj = match std::fs::read_to_string(out) {
        Ok(s) => match serde_json::from_str::<serde_json::Value>(&s) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                return Err(DataplaneError::Io {
                    context: format!("{} is not a JSON object; fix or delete it", out.display()),
                    source: std::io::Error::other("bad results file"),
                })
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(e) => return Err(io(format!("reading {}", out.display()))(e)),
    };
    for r in &results {
        obj.insert(
            r.key.clone(),
            serde_json::Value::from((r.value * 100.0).round() / 100.0),
        );
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(obj))
        .expect("a JSON object serialises");
    std::fs::write(out, text + "\n").map_err(io(format!("writing {}", out.display())))?;
    Ok(())
}
