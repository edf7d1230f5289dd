//! `cargo xtask demo`: builds the agent and the demo program (`qkd-macsec-demo`, in the tests
//! crate, sharing its testbed with the end-to-end tests) and runs the demo: on the host when its
//! kernel can create MACsec links, otherwise inside the MACsec VM. The last stdout line is the
//! demo's JSON summary either way; the exit status is the demo's.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::util::{self, sh_quote};
use crate::{setup, vm};

pub struct Options {
    pub seconds: u64,
    pub profile: String,
    pub pps: u32,
    /// `host`, `vm` or `auto` (VM only when the host kernel lacks MACsec).
    pub place: String,
}

pub fn run(opts: &Options) -> Result<u8> {
    let t = Instant::now();
    if !util::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    // Set-up steps only when something is missing: a complete set-up is a no-op apart from
    // checks, but those still cost seconds, so look first.
    if which("bpf-linker").is_none() || setup::existing_vm_image().is_none() {
        eprintln!("[demo] set-up incomplete; running `cargo xtask setup` steps");
        setup::run(setup::Options::default())?;
    }
    eprintln!("[demo] building the agent and the demo program");
    // One cargo invocation, so both binaries share one feature resolution and nothing is built
    // twice.
    util::run(
        util::cmd(
            "cargo",
            &[
                "build",
                "-p",
                "qkd-macsec-agent",
                "-p",
                "qkd-macsec-tests",
                "--bins",
            ],
        )
        .current_dir(util::repo_root()),
    )?;
    let bin = util::repo_root().join("target/debug/qkd-macsec-demo");
    let in_vm = match opts.place.as_str() {
        "vm" => true,
        "host" => false,
        "auto" => !host_has_macsec(),
        other => bail!("--place {other:?}: expected auto, host or vm"),
    };
    let mut argv = vec![
        bin.to_string_lossy().into_owned(),
        "--seconds".into(),
        opts.seconds.to_string(),
        "--profile".into(),
        opts.profile.clone(),
        "--pps".into(),
        opts.pps.to_string(),
    ];
    let code = if in_vm {
        eprintln!("[demo] the host kernel has no MACsec: running the demo inside the MACsec VM");
        // The console is the only way back out of the VM: the summary travels as a mark, in hex
        // because the job shell's echo would interpret backslashes in the JSON.
        let summary = "/tmp/qkd-macsec-demo-summary.json";
        argv.extend(["--summary-file".into(), summary.into()]);
        let words: Vec<String> = argv.iter().map(|w| sh_quote(w)).collect();
        let body = format!(
            "{}\nrc=$?\n[ -s {summary} ] && mark \"summary $(od -An -v -tx1 {summary} | tr -d ' \\n')\"\nexit $rc\n",
            words.join(" ")
        );
        let job = vm::Job {
            cwd: util::repo_root(),
            env: vm::passthrough_env(),
            body,
            timeout: vm::timeout(Some(opts.seconds + 600))?,
        };
        let out = vm::run_job(&job)?;
        eprintln!(
            "[demo] VM: boot {:.1} s, total {:.1} s; wall time {:.1} s",
            out.boot.as_secs_f64(),
            out.elapsed.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        let summary = out
            .marks
            .iter()
            .rev()
            .find_map(|m| m.strip_prefix("summary "))
            .and_then(unhex);
        match summary {
            // Repeated as the very last stdout line: the VM console may interleave kernel
            // messages after the demo's own last line.
            Some(s) => println!("{s}"),
            None => bail!(
                "the demo in the VM produced no summary (exit status {}); see its output above",
                out.status
            ),
        }
        u8::try_from(out.status).unwrap_or(1)
    } else {
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("cannot start {}", argv[0]))?;
        eprintln!("[demo] wall time {:.1} s", t.elapsed().as_secs_f64());
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)
    };
    Ok(code)
}

/// Decodes the hex the VM job sends the summary in; None when it is not valid UTF-8 hex.
fn unhex(s: &str) -> Option<String> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Whether this kernel can create a MACsec link: tried in a throw-away namespace.
fn host_has_macsec() -> bool {
    let ns = format!("qkd-demo-probe-{}", std::process::id());
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip");
    let ok = |args: &[&str]| {
        Command::new(ip)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&["netns", "add", &ns]) {
        return false;
    }
    let has = ok(&[
        "-n", &ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
    ]) && ok(&[
        "-n", &ns, "link", "add", "link", "p0", "ms0", "type", "macsec",
    ]);
    ok(&["netns", "del", &ns]);
    has
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(prog)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::unhex;

    #[test]
    fn unhex_decodes_the_vm_summary() {
        assert_eq!(unhex("7b2261223a317d").as_deref(), Some("{\"a\":1}"));
        assert_eq!(unhex("7b2"), None);
        assert_eq!(unhex("zz"), None);
    }
}
