//! `qkd-macsec-agent run` on the host: what an operator sees when the gateway cannot run it.
//! Missing privileges and a kernel without MACsec are each reported at start, in plain words
//! with the remedy, and the agent exits non-zero instead of running half-configured.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use qkd_macsec_tests::testbed::{render_config, GatewayFiles, LinkSpec, Side};
use qkd_macsec_tests::{agent_bin, ip_bin, require_root, veth_pair, NetNs};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qkd-start-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A complete, valid gateway config (with real certificates) in `dir`.
fn valid_config(dir: &Path) -> GatewayFiles {
    let certs = dir.join("certs");
    let out = Command::new(agent_bin())
        .args(["certs", "init", "--out"])
        .arg(&certs)
        .args(["--host", "10.201.1.1"])
        .output()
        .expect("certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = GatewayFiles {
        config: dir.join("gw.toml"),
        log: dir.join("gw.log"),
        status_socket: dir.join("gw.sock"),
        bpffs_pin_dir: dir.join("bpffs"),
        state_dir: dir.join("state"),
        ledger_dir: dir.join("ledger"),
    };
    let text = render_config(Side::A, &LinkSpec::fast("cak"), &certs, &files);
    std::fs::write(&files.config, text).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&files.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    files
}

/// Waits for the child with a bound, killing it if it keeps running (which is the failure).
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> Output {
    let t = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the agent kept running for {limit:?} where it must refuse to start; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_without_privileges_names_the_missing_capabilities() {
    require_root("switching to an unprivileged uid");
    let dir = tmpdir("nopriv");
    let files = valid_config(&dir);
    use std::os::unix::process::CommandExt as _;
    let child = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&files.config)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent as nobody");
    let out = wait_bounded(child, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without privileges: {err}");
    for want in [
        "lacks the capabilities",
        "CAP_NET_ADMIN",
        "CAP_BPF",
        "CAP_NET_RAW",
        "systemd unit",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
}

#[test]
fn run_on_a_kernel_without_macsec_says_so_and_exits() {
    require_root("network namespaces and the agent");
    let ns = NetNs::new("startnomacsec");
    let peer = NetNs::new("startpeer");
    veth_pair(&ns, "wan0", &peer, "wan0");
    let probe = ns.try_exec(&[
        ip_bin(),
        "link",
        "add",
        "link",
        "wan0",
        "probe0",
        "type",
        "macsec",
    ]);
    assert!(
        !probe.status.success(),
        "this host kernel has MACsec, so the no-MACsec start-up diagnostic cannot be shown here; \
         the VM tests cover the agent on a MACsec kernel"
    );
    let dir = tmpdir("nomacsec");
    let files = valid_config(&dir);
    let bin = agent_bin().to_string_lossy().into_owned();
    let cfg = files.config.to_string_lossy().into_owned();
    let child = ns.spawn_with(&[&bin, "run", "--config", &cfg], |c| {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    });
    let out = wait_bounded(child, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran without kernel MACsec: {err}");
    assert!(err.contains("no MACsec support"), "{err}");
    assert!(
        err.contains("modprobe macsec"),
        "the remedy is named: {err}"
    );
    // Nothing was left behind in the kernel: no half-made MACsec link.
    let links = ns.exec_stdout(&[ip_bin(), "-o", "link", "show"]);
    assert!(!links.contains("macsec0"), "{links}");
}
