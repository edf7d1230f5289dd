//! `cargo xtask soak --minutes N`: builds the agent and the soak program (`qkd-macsec-soak`, in
//! the tests crate) like the demo, runs the seeded chaos soak (inside the MACsec VM when the host
//! kernel lacks MACsec), prints its JSON summary as the last stdout line and merges it into
//! target/bench/results.json as flat `soak.*` keys. The exit status is the soak's.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::{bench, demo, util, vm};

pub struct Options {
    pub minutes: u64,
    pub seed: Option<u64>,
    pub profile: String,
    pub pps: u32,
}

/// Time beyond the soak itself for the VM job: boot, eBPF verification under TCG (tens of
/// seconds per agent), securing the link (up to the soak's 240 s timeout) and teardown.
const VM_MARGIN_S: u64 = 900;

pub fn run(opts: &Options) -> Result<u8> {
    let t = Instant::now();
    if !util::is_root() {
        bail!("the soak creates network namespaces and loads eBPF programs: run it as root");
    }
    if opts.minutes == 0 {
        bail!("--minutes 0: the soak needs at least 2 minutes (30 s warm-up, 60 s cool-down)");
    }
    demo::prepare("soak")?;
    let bin = util::repo_root().join("target/debug/qkd-macsec-soak");
    let mut argv = vec![
        bin.to_string_lossy().into_owned(),
        "--minutes".into(),
        opts.minutes.to_string(),
        "--profile".into(),
        opts.profile.clone(),
        "--pps".into(),
        opts.pps.to_string(),
    ];
    if let Some(s) = opts.seed {
        argv.extend(["--seed".into(), s.to_string()]);
    }
    let (status, summary) = if demo::host_has_macsec() {
        let file =
            std::env::temp_dir().join(format!("qkd-macsec-soak-{}.json", std::process::id()));
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("--summary-file")
            .arg(&file)
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("cannot start {}", argv[0]))?;
        let summary = std::fs::read_to_string(&file).ok();
        let _ = std::fs::remove_file(&file);
        (status.code().unwrap_or(1), summary)
    } else {
        eprintln!("[soak] the host kernel has no MACsec: running the soak inside the MACsec VM");
        let timeout = vm::timeout(Some(opts.minutes * 60 + VM_MARGIN_S))?;
        let (out, summary) = vm::run_with_summary(&argv, "soak", timeout)?;
        eprintln!(
            "[soak] VM: boot {:.1} s, total {:.1} s",
            out.boot.as_secs_f64(),
            out.elapsed.as_secs_f64()
        );
        (out.status, summary)
    };
    eprintln!("[soak] wall time {:.1} s", t.elapsed().as_secs_f64());
    let Some(summary) = summary else {
        bail!("the soak produced no summary (exit status {status}); see its output above");
    };
    let obj: serde_json::Value = serde_json::from_str(summary.trim())
        .with_context(|| format!("the soak's summary is not JSON: {summary}"))?;
    let flat = flatten("soak", &obj)?;
    bench::merge_replacing("soak.", &flat)?;
    eprintln!(
        "[soak] {} figures merged into target/bench/results.json under soak.*",
        flat.len()
    );
    // Last stdout line, as with the demo: the VM console may interleave kernel messages.
    println!("{}", summary.trim());
    Ok(u8::try_from(status).unwrap_or(1))
}

/// The summary as flat `soak.*` keys: numbers as they are, booleans as 0/1, strings kept
/// (profile, error), nested objects joined with dots; lists (the per-injection log) and nulls
/// are left out of results.json (they stay in the printed summary).
fn flatten(prefix: &str, v: &serde_json::Value) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    let serde_json::Value::Object(m) = v else {
        bail!("the soak's summary is not a JSON object: {v}");
    };
    for (k, v) in m {
        let key = format!("{prefix}.{k}");
        match v {
            serde_json::Value::Null | serde_json::Value::Array(_) => {}
            serde_json::Value::Bool(b) => {
                out.insert(key, serde_json::json!(u8::from(*b)));
            }
            serde_json::Value::Object(_) => out.extend(flatten(&key, v)?),
            _ => {
                out.insert(key, v.clone());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::flatten;

    #[test]
    fn summary_flattens_to_soak_keys() {
        let v = serde_json::json!({
            "ok": true,
            "seed": 1_764_000_000_000_u64,
            "profile": "sak",
            "error": null,
            "injections": [{"kind": "kme_503"}],
            "faults": {"kme_503": {"count": 2, "max_recover_s": 1.5, "mean_recover_s": null}},
        });
        let f = flatten("soak", &v).unwrap();
        assert_eq!(f["soak.ok"], 1);
        assert_eq!(f["soak.seed"], 1_764_000_000_000_u64);
        assert_eq!(f["soak.profile"], "sak");
        assert_eq!(f["soak.faults.kme_503.count"], 2);
        assert_eq!(f["soak.faults.kme_503.max_recover_s"], 1.5);
        assert!(!f.contains_key("soak.error"));
        assert!(!f.contains_key("soak.injections"));
        assert!(!f.contains_key("soak.faults.kme_503.mean_recover_s"));
        assert_eq!(f.len(), 5);
        assert!(flatten("soak", &serde_json::json!([1])).is_err());
    }
}
