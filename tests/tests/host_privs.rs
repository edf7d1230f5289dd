//! Least privilege on the host (root): the capability drop on a real multi-threaded process, and
//! the agent binary refusing key and config files other users could read or change.
//!
//! The drop is irreversible, so it runs in a child: this test binary started again with the
//! ignored test `child_drops_capabilities` selected, and examined from outside through
//! /proc/<pid>/task/*/status while it waits.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qkd_macsec_agent::privs::{self, mask, proc_caps, RUNTIME_CAPS};
use qkd_macsec_tests::{agent_bin, require_root};

const CHILD_ENV: &str = "QKD_PRIVS_CHILD";
/// The packaged systemd unit's CapabilityBoundingSet/AmbientCapabilities: NET_ADMIN, NET_RAW,
/// PERFMON, BPF.
const START_CAPS: [u32; 4] = [12, 13, 38, 39];

/// Run only as the child of `capabilities_drop_on_every_thread` (it makes its own process
/// unprivileged for good).
#[test]
#[ignore = "child process of capabilities_drop_on_every_thread"]
fn child_drops_capabilities() {
    let mode = std::env::var(CHILD_ENV).expect("only the parent tests start this");
    if mode == "nosetpcap" {
        // Start the way the packaged systemd unit starts the agent: only the four start-up
        // capabilities, no CAP_SETPCAP, so the bounding set cannot be changed any more.
        privs::drop_to(&START_CAPS).expect("reduce to the systemd unit's set");
    }
    // Threads of both kinds the agent has: tokio workers and plain threads, all started before
    // the drop, like the agent's runtime at the end of start-up.
    let (park_tx, park_rx) = std::sync::mpsc::channel::<()>();
    let park_rx = std::sync::Arc::new(std::sync::Mutex::new(park_rx));
    let plain: Vec<_> = (0..2)
        .map(|_| {
            let rx = park_rx.clone();
            std::thread::spawn(move || {
                let _ = rx.lock().unwrap().recv();
            })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(async { tokio::task::spawn_blocking(privs::drop_to_runtime).await });
    r.unwrap().expect("drop_to_runtime");
    // A capability that is gone: CAP_NET_RAW for a packet socket.
    // SAFETY: plain socket(2) call; the fd is closed below if it opened.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    let raw_err = std::io::Error::last_os_error();
    if fd >= 0 {
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
    }
    println!(
        "DROPPED packet_socket={}",
        if fd >= 0 {
            "opened".to_string()
        } else {
            raw_err.to_string()
        }
    );
    // A thread started after the drop inherits the reduced sets.
    let late = std::thread::spawn(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    });
    std::io::stdout().flush().unwrap();
    late.join().unwrap();
    drop(park_tx);
    for t in plain {
        t.join().unwrap();
    }
    drop(rt);
}

#[test]
fn capabilities_drop_on_every_thread() {
    drop_in_child("root", mask(&RUNTIME_CAPS));
}

/// Without CAP_SETPCAP (the systemd unit) the bounding set stays the unit's, the rest is the same.
#[test]
fn capabilities_drop_without_setpcap() {
    drop_in_child("nosetpcap", mask(&START_CAPS));
}

fn drop_in_child(mode: &str, want_bounding: u64) {
    require_root("dropping capabilities needs them first");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_drops_capabilities",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let dropped = loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break None;
        }
        // libtest prints "test child_drops_capabilities ... " on the same line first.
        if let Some((_, rest)) = line.trim().split_once("DROPPED ") {
            break Some(rest.to_owned());
        }
    };
    let dropped = dropped.unwrap_or_else(|| {
        let st = child.wait().unwrap();
        panic!("child ended ({st}) without dropping; see its output above")
    });
    assert!(
        dropped.contains("Operation not permitted"),
        "CAP_NET_RAW still usable after the drop: {dropped}"
    );
    let keep = mask(&RUNTIME_CAPS);
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Main, harness test thread, 2 plain threads, 3 workers, the late thread at least.
    assert!(tasks.len() >= 7, "only {} threads: {tasks:?}", tasks.len());
    for tid in &tasks {
        let c = proc_caps(&format!("{pid}/task/{tid}")).unwrap();
        assert_eq!(c.effective, keep, "thread {tid} CapEff: {c:?}");
        assert_eq!(c.permitted, keep, "thread {tid} CapPrm: {c:?}");
        assert_eq!(c.bounding, want_bounding, "thread {tid} CapBnd: {c:?}");
        assert_eq!((c.inheritable, c.ambient), (0, 0), "thread {tid}: {c:?}");
        assert!(c.no_new_privs, "thread {tid} without no_new_privs: {c:?}");
    }
    // The process as a whole, as an operator would check it.
    assert_eq!(proc_caps(&pid.to_string()).unwrap().effective, keep);
    drop(child.stdin.take());
    let st = child.wait().unwrap();
    assert!(st.success(), "child failed: {st}");
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("qkd-host-privs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `qkd-macsec-agent run --config cfg`; returns (success, stderr).
fn run_agent(cfg: &Path) -> (bool, String) {
    let out = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(cfg)
        .env("QKD_MACSEC_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("run the agent binary (cargo build -p qkd-macsec-agent first)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config in `d` whose KME client key is `d/kme.key` (mode 600) and whose state and ledger
/// directories are `d/state` and `d/ledger`; the link's interface does not exist, so an agent
/// that passes every file check stops at the network.
fn write_config(d: &TempDir) -> (PathBuf, PathBuf) {
    let key = d.0.join("kme.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
    let cfg = d.0.join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[global]
status_socket = "{dir}/gw.sock"
bpffs_pin_dir = "{dir}/bpf"
state_dir = "{dir}/state"
ledger_dir = "{dir}/ledger"
[[link]]
lower_interface = "qkdprivs-none0"
macsec_interface = "qkdprivs-m0"
local_sae_id = "SAE_A"
peer_sae_id = "SAE_B"
[link.kme]
url = "https://127.0.0.1:1"
ca = "{dir}/ca.pem"
cert = "{dir}/c.pem"
key = "{key}"
"#,
            dir = d.0.display(),
            key = key.display()
        ),
    )
    .unwrap();
    chmod(&key, 0o600);
    chmod(&cfg, 0o600);
    (cfg, key)
}

#[test]
fn agent_refuses_exposed_key_and_config_files() {
    require_root("chown to another user");
    let d = TempDir::new("files");
    let (cfg, key) = write_config(&d);
    chmod(&cfg, 0o644);

    chmod(&key, 0o640);
    let (ok, err) = run_agent(&cfg);
    assert!(!ok, "agent started with a group-readable key");
    for want in [
        key.display().to_string(),
        "0640".into(),
        "the group".into(),
        format!("chmod 600 {}", key.display()),
    ] {
        assert!(err.contains(&want), "missing {want:?} in: {err}");
    }

    chmod(&key, 0o604);
    let (ok, err) = run_agent(&cfg);
    assert!(
        !ok && err.contains("0604") && err.contains("other users"),
        "{err}"
    );

    chmod(&key, 0o600);
    std::os::unix::fs::chown(&key, Some(4242), None).unwrap();
    let (ok, err) = run_agent(&cfg);
    assert!(!ok, "agent started with a key owned by uid 4242");
    assert!(
        err.contains("uid 4242") && err.contains(&key.display().to_string()),
        "{err}"
    );
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();

    chmod(&cfg, 0o666);
    let (ok, err) = run_agent(&cfg);
    assert!(!ok, "agent started with a world-writable config");
    assert!(
        err.contains("config file")
            && err.contains("0666")
            && err.contains(&format!("chmod 600 {}", cfg.display())),
        "{err}"
    );

    // With both fixed the file checks pass and the agent gets as far as the network: it fails
    // on the missing interface or on MACsec, not on a file mode.
    chmod(&cfg, 0o600);
    let (_, err) = run_agent(&cfg);
    assert!(
        !err.contains("chmod") && !err.contains("chown"),
        "file checks still fail after the fix: {err}"
    );
}

/// Issue 17 item 5: the ledger of used keys and the key record are refused when another user
/// could have written them (a shortened ledger lets a key be installed twice; a rewritten record
/// extends an adopted key's lifetime), with the fix named.
#[test]
fn agent_refuses_state_that_others_could_have_written() {
    require_root("chown to another user");
    let d = TempDir::new("state");
    let (cfg, _) = write_config(&d);
    let ledger = d.0.join("ledger");
    std::fs::create_dir(&ledger).unwrap();

    chmod(&ledger, 0o777);
    let (ok, err) = run_agent(&cfg);
    assert!(!ok, "agent started with a world-writable ledger directory");
    assert!(
        err.contains(&ledger.display().to_string())
            && err.contains("0777")
            && err.contains("chmod go-w"),
        "{err}"
    );

    chmod(&ledger, 0o700);
    std::os::unix::fs::chown(&ledger, Some(4242), None).unwrap();
    let (ok, err) = run_agent(&cfg);
    assert!(
        !ok,
        "agent started with a ledger directory owned by uid 4242"
    );
    assert!(
        err.contains("uid 4242") && err.contains("chown root"),
        "{err}"
    );
    std::os::unix::fs::chown(&ledger, Some(0), None).unwrap();

    // A ledger file planted as a symlink.
    let elsewhere = d.0.join("elsewhere");
    std::fs::write(&elsewhere, "").unwrap();
    std::os::unix::fs::symlink(&elsewhere, ledger.join("SAE_A--SAE_B.used-keys")).unwrap();
    let (ok, err) = run_agent(&cfg);
    assert!(!ok && err.contains("symlink"), "{err}");
    std::fs::remove_file(ledger.join("SAE_A--SAE_B.used-keys")).unwrap();

    let (_, err) = run_agent(&cfg);
    assert!(
        !err.contains("chmod") && !err.contains("chown") && !err.contains("symlink"),
        "state checks still fail after the fix: {err}"
    );
}
