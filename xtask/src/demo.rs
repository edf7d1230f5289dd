//! `cargo xtask demo`: builds the agent and the demo program (`qkd-macsec-demo`, in the tests
//! crate, sharing its testbed with the end-to-end tests) and runs the demo: on the host when its
//! kernel can create MACsec links, otherwise inside the MACsec VM. The last stdout line is the
//! demo's JSON summary either way; the exit status is the demo's.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::util;
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
    prepare("demo")?;
    let bin = util::repo_root().join("target/debug/qkd-macsec-demo");
    let in_vm = match opts.place.as_str() {
        "vm" => true,
        "host" => false,
        "auto" => !host_has_macsec(),
        other => bail!("--place {other:?}: expected auto, host or vm"),
    };
    let argv = vec![
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
        let (out, summary) =
            vm::run_with_summary(&argv, "demo", vm::timeout(Some(opts.seconds + 600))?)?;
        eprintln!(
            "[demo] VM: boot {:.1} s, total {:.1} s; wall time {:.1} s",
            out.boot.as_secs_f64(),
            out.elapsed.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
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

/// What the demo and the soak need before they run: the set-up steps when something is missing,
/// then one debug build of the agent and the tests crate's programs.
pub fn prepare(tag: &str) -> Result<()> {
    // Set-up steps only when something is missing: a complete set-up is a no-op apart from
    // checks, but those still cost seconds, so look first.
    if which("bpf-linker").is_none() || setup::existing_vm_image().is_none() {
        eprintln!("[{tag}] set-up incomplete; running `cargo xtask setup` steps");
        setup::run(setup::Options::default())?;
    }
    eprintln!("[{tag}] building the agent and the test programs");
    // One cargo invocation, so all binaries share one feature resolution and nothing is built
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
    Ok(())
}

/// Whether this kernel can create a MACsec link: tried in a throw-away namespace.
pub fn host_has_macsec() -> bool {
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
