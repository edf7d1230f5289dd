//! The whole agent on a real kernel (the test VM): two gateways in two network namespaces joined
//! by a veth pair, each running `qkd-macsec-agent run` with its own config; the KME simulator in
//! a third namespace reached over a separate management network (the protected link carries
//! only MACsec and LLDP, and a stall drops everything else on it).
//!
//! Checked: the link comes up keyed from QKD (both agents report not stalled, ping passes over
//! the MACsec interfaces), keys roll over (the KN advances) while ping keeps passing, a KME outage
//! longer than the key buffer stalls the link (ping fails, status says stalled, the alarm is
//! counted), and the link recovers by itself with a fresh key when the KME is back.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use qkd_macsec_tests::{add_ipv4, agent_bin, ip_bin, require_macsec, veth_pair, NetNs};

/// A private bpffs outside /sys (`ip netns exec` remounts /sys, hiding /sys/fs/bpf from the
/// agents it starts); unmounting on drop removes every pin the agents left.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Self {
        let p = PathBuf::from(format!("/run/qkd-bpffs-agent-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create bpffs mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&p)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t bpf bpf {} failed", p.display());
        Self(p)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Kill(Child, &'static str);

impl Drop for Kill {
    fn drop(&mut self) {
        // SIGTERM first so the agent shuts down cleanly; then make sure it is gone.
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.1);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(sock: &Path) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let v: serde_json::Value = serde_json::from_str(buf.trim()).ok()?;
    v.as_array()?.first()?.clone().into()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn ping(ns: &NetNs, to: &str) -> bool {
    ns.try_exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", to])
        .status
        .success()
}

fn config(
    dir: &Path,
    bpf: &Path,
    me: &str,
    peer: &str,
    lower: &str,
    mac: &str,
    kme: &str,
) -> PathBuf {
    let text = format!(
        r#"
[global]
bpffs_pin_dir = "{bpf}/qkd-{me}"
status_socket = "{dir}/{me}.sock"
state_dir = "{dir}/{me}.state"
ledger_dir = "{dir}/{me}.ledger"
log_level = "debug"

[[link]]
lower_interface = "{lower}"
macsec_interface = "{mac}"
cipher = "gcm-aes-256"
local_sae_id = "{me}"
peer_sae_id = "{peer}"
profile = "sak"
key_request_interval = "3s"

[link.kme]
url = "https://{kme}"
ca = "{dir}/certs/ca.pem"
cert = "{dir}/certs/{me}.pem"
key = "{dir}/certs/{me}.key"
availability_window = "10s"

[link.akl]
max_age = "12s"
rollover_at = 0.5
warn_at = 0.8

[link.sak]
buffer = 2

[link.keyx]
hello_interval = "1s"
"#,
        dir = dir.display(),
        bpf = bpf.display()
    );
    let p = dir.join(format!("{me}.toml"));
    std::fs::write(&p, text).expect("write config");
    p
}

#[test]
fn agents_key_roll_stall_and_recover() {
    require_macsec();
    let dir = std::env::temp_dir().join(format!("vm-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = agent_bin();
    let bpf = Bpffs::new();

    // Certificates for the KMEs (reachable at 10.88.1.1 and 10.88.2.1) and both SAEs.
    let out = std::process::Command::new(&bin)
        .args(["certs", "init", "--out"])
        .arg(dir.join("certs"))
        .args([
            "--host",
            "10.88.1.1",
            "--host",
            "10.88.2.1",
            "--sae",
            "sae-a",
            "--sae",
            "sae-b",
        ])
        .output()
        .expect("run certs init");
    assert!(
        out.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ns_a = NetNs::new("aga");
    let ns_b = NetNs::new("agb");
    let ns_k = NetNs::new("agk");
    for ns in [&ns_a, &ns_b, &ns_k] {
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    }
    // The protected link and the two management links.
    let _wire = veth_pair(&ns_a, "wa", &ns_b, "wb");
    // (Names that no `ip link` keyword starts with: iproute2 accepts keyword abbreviations.)
    let _ma = veth_pair(&ns_a, "mgmt0", &ns_k, "kme0");
    let _mb = veth_pair(&ns_b, "mgmt1", &ns_k, "kme1");
    add_ipv4(&ns_a, "mgmt0", "10.88.1.2/24");
    add_ipv4(&ns_k, "kme0", "10.88.1.1/24");
    add_ipv4(&ns_b, "mgmt1", "10.88.2.2/24");
    add_ipv4(&ns_k, "kme1", "10.88.2.1/24");

    let sim = ns_k.spawn_with(
        &[
            bin.to_str().unwrap(),
            "kme-sim",
            "--certs",
            dir.join("certs").to_str().unwrap(),
            "--listen-a",
            "10.88.1.1:8443",
            "--listen-b",
            "10.88.2.1:8444",
            "--sae-a",
            "sae-a",
            "--sae-b",
            "sae-b",
            "--key-rate",
            "50",
            "--prefill",
        ],
        |c| {
            c.stdout(Stdio::null());
        },
    );
    let _sim = Kill(sim, "kme-sim");
    std::thread::sleep(Duration::from_secs(2));

    let cfg_a = config(
        &dir,
        &bpf.0,
        "sae-a",
        "sae-b",
        "wa",
        "msa",
        "10.88.1.1:8443",
    );
    let cfg_b = config(
        &dir,
        &bpf.0,
        "sae-b",
        "sae-a",
        "wb",
        "msb",
        "10.88.2.1:8444",
    );
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let (la, lb) = (log("a.log"), log("b.log"));
    let a = ns_a.spawn_with(
        &[
            bin.to_str().unwrap(),
            "run",
            "--config",
            cfg_a.to_str().unwrap(),
        ],
        |c| {
            c.env("QKD_MACSEC_LOG", "info").stderr(la);
        },
    );
    let _a = Kill(a, "agent a");
    let b = ns_b.spawn_with(
        &[
            bin.to_str().unwrap(),
            "run",
            "--config",
            cfg_b.to_str().unwrap(),
        ],
        |c| {
            c.env("QKD_MACSEC_LOG", "info").stderr(lb);
        },
    );
    let _b = Kill(b, "agent b");
    let (sa, sb) = (dir.join("sae-a.sock"), dir.join("sae-b.sock"));
    let show_logs = || {
        format!(
            "\n--- a.log ---\n{}\n--- b.log ---\n{}",
            std::fs::read_to_string(dir.join("a.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("b.log")).unwrap_or_default()
        )
    };
    let up = |s: &Path| status(s).is_some_and(|v| v["stalled"] == false);

    // 1. Keyed from QKD.
    let t = Instant::now();
    while !(up(&sa) && up(&sb)) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "link never keyed{}",
            show_logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let va = status(&sa).unwrap();
    assert_eq!(va["role"], "master");
    assert_eq!(status(&sb).unwrap()["role"], "slave");
    add_ipv4(&ns_a, "msa", "10.77.0.1/24");
    add_ipv4(&ns_b, "msb", "10.77.0.2/24");
    wait_for("ping over MACsec", Duration::from_secs(20), || {
        ping(&ns_a, "10.77.0.2")
    });
    let kn0 = va["active_kn"].as_u64().unwrap();

    // 2. Rollover (AKL 12 s, rollover at 50 %): KN advances, ping keeps working.
    wait_for("a rollover", Duration::from_secs(30), || {
        status(&sa).is_some_and(|v| v["active_kn"].as_u64().is_some_and(|k| k > kn0))
    });
    assert!(
        ping(&ns_a, "10.77.0.2"),
        "ping after rollover{}",
        show_logs()
    );
    let ip_show = ns_a.exec_stdout(&[ip_bin(), "macsec", "show"]);
    eprintln!("ip macsec show (a):\n{ip_show}");

    // 3. KME outage: every 014 request fails; the buffer (2) and the active key run out.
    let ctl = |args: &[&str]| {
        let mut v = vec![bin.to_str().unwrap(), "kme-sim-ctl", "set"];
        v.extend_from_slice(args);
        let o = ns_k.exec(&v);
        assert!(o.status.success());
    };
    ctl(&["--fail-503", "true"]);
    wait_for("the stall", Duration::from_secs(90), || {
        status(&sa).is_some_and(|v| v["stalled"] == true)
    });
    let va = status(&sa).unwrap();
    assert!(va["alarms"].as_u64().unwrap() >= 1, "{va}");
    assert!(
        !ping(&ns_a, "10.77.0.2"),
        "traffic passed while stalled{}",
        show_logs()
    );

    // 4. KME back: recovery with a fresh key, without intervention.
    ctl(&["--fail-503", "false"]);
    wait_for("recovery", Duration::from_secs(60), || up(&sa) && up(&sb));
    wait_for("ping after recovery", Duration::from_secs(20), || {
        ping(&ns_a, "10.77.0.2")
    });
    let _ = std::fs::remove_dir_all(&dir);
}
