//! The Debian package from `cargo xtask package` (the host stage builds it first): installs with
//! dpkg into a scratch root, holds what it must with the right modes, its binary runs, its man
//! page renders, and its systemd unit passes `systemd-analyze verify`.
//!
//! `systemd-analyze verify` works here without systemd as PID 1 (checked with systemd 252 in a
//! container): it loads the unit, checks every directive, that ExecStart's binary exists and is
//! executable, and that the `man:` Documentation page exists. It cannot start the unit, so the
//! sandbox's effect on the running agent (capabilities, paths) is not verified here.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qkd_macsec_tests::require_root;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn the_deb() -> PathBuf {
    let dir = repo_root().join("target/package");
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the package first: cargo xtask package --debug (cargo xtask test does)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "expected one .deb in {}: {debs:?}",
        dir.display()
    );
    debs.into_iter().next().unwrap()
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[track_caller]
fn ok(cmd: &mut Command) -> String {
    let (good, out, err) = run(cmd);
    assert!(good, "{cmd:?} failed:\n{out}\n{err}");
    out
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn package_installs_and_its_unit_verifies() {
    require_root("dpkg --root installs files owned by root");
    let deb = the_deb();

    // Control fields.
    let fields = ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb));
    for f in [
        "Package: qkd-macsec-agent",
        "Depends: libc6",
        "Section: net",
        "Architecture: ",
    ] {
        assert!(fields.contains(f), "control lacks {f:?}:\n{fields}");
    }

    // A real install into a scratch root with its own dpkg database.
    let root = std::env::temp_dir().join(format!("qkd-pkg-root-{}", std::process::id()));
    let _cleanup = Scratch(root.clone());
    let _ = std::fs::remove_dir_all(&root);
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    // libc6 is not in the scratch root (it is on the machine); maintainer scripts run outside a
    // chroot with DPKG_ROOT set (the scratch root has no /bin/sh).
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-depends",
            "--force-script-chrootless",
            "--force-not-root",
            "-i",
        ])
        .arg(&deb));
    let status = ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "qkd-macsec-agent"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("/etc/qkd-macsec/agent.toml.sample"),
        "conffile not registered:\n{status}"
    );

    // Files and modes.
    let mode = |rel: &str| {
        let p = root.join(rel);
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("package lacks /{rel}: {e}"));
        m.permissions().mode() & 0o7777
    };
    assert_eq!(mode("usr/sbin/qkd-macsec-agent"), 0o755);
    assert_eq!(mode("lib/systemd/system/qkd-macsec-agent.service"), 0o644);
    assert_eq!(mode("etc/qkd-macsec/agent.toml.sample"), 0o644);
    assert_eq!(
        mode("etc/qkd-macsec"),
        0o750,
        "config dir holds key paths: not world-readable"
    );
    assert_eq!(mode("usr/lib/modules-load.d/qkd-macsec.conf"), 0o644);
    for page in [
        "qkd-macsec-agent.8.gz",
        "qkd-macsec-agent-run.8.gz",
        "qkd-macsec-agent-status.8.gz",
        "qkd-macsec-agent-check-config.8.gz",
    ] {
        assert_eq!(mode(&format!("usr/share/man/man8/{page}")), 0o644);
    }
    for doc in [
        "README.md",
        "copyright",
        "operator-guide.md",
        "metrics.md",
        "alarms.md",
        "status.md",
        "troubleshooting.md",
        "architecture.md",
    ] {
        mode(&format!("usr/share/doc/qkd-macsec-agent/{doc}"));
    }
    let modules =
        std::fs::read_to_string(root.join("usr/lib/modules-load.d/qkd-macsec.conf")).unwrap();
    assert!(modules.lines().any(|l| l.trim() == "macsec"), "{modules}");

    // The installed binary runs and accepts the installed sample config.
    let bin = root.join("usr/sbin/qkd-macsec-agent");
    let v = ok(Command::new(&bin).arg("--version"));
    assert!(v.starts_with("qkd-macsec-agent "), "{v}");
    let c = ok(Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(root.join("etc/qkd-macsec/agent.toml.sample")));
    assert!(c.contains("OK, 2 link(s)"), "{c}");

    // The man page renders and documents the subcommands.
    let man = ok(Command::new("man")
        .env("MANWIDTH", "100")
        .arg("-l")
        .arg(root.join("usr/share/man/man8/qkd-macsec-agent.8.gz")));
    for word in ["qkd-macsec-agent", "run", "status", "check-config"] {
        assert!(man.contains(word), "man page lacks {word}:\n{man}");
    }

    // systemd-analyze verify on the installed unit, with its absolute paths pointed into the
    // scratch root (verify has no usable --root without a whole systemd tree there).
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/qkd-macsec-agent.service")).unwrap();
    for needed in [
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF CAP_PERFMON CAP_NET_RAW CAP_SETPCAP",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET",
        "ReadWritePaths=/run/qkd-macsec-agent /sys/fs/bpf",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    let verify_dir = root.join("verify");
    std::fs::create_dir_all(&verify_dir).unwrap();
    let verify = |text: &str| -> (bool, String) {
        let p = verify_dir.join("qkd-macsec-agent.service");
        std::fs::write(
            &p,
            text.replace("/usr/sbin/", &format!("{}/usr/sbin/", root.display())),
        )
        .unwrap();
        let (good, out, err) = run(Command::new("systemd-analyze")
            .env("MANPATH", root.join("usr/share/man"))
            .arg("verify")
            .arg(&p));
        (good, format!("{out}{err}"))
    };
    let (good, out) = verify(&unit);
    assert!(
        good && out.trim().is_empty(),
        "systemd-analyze verify complained:\n{out}"
    );
    // The check can fail: systemd-analyze exits 0 on unknown keys, so any output is a failure.
    let (_, out) = verify(&unit.replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe"));
    assert!(
        out.contains("NoNewPrivileges") || out.contains("maybe"),
        "{out}"
    );
    let (good, _) = verify(&unit.replace(
        "ExecStart=/usr/sbin/qkd-macsec-agent",
        "ExecStart=/usr/sbin/qkd-macsec-agent-missing",
    ));
    assert!(!good, "verify accepted a missing ExecStart binary");

    // Removal takes the files with it, leaving the conffile until purge.
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-not-root",
            "-r",
            "qkd-macsec-agent",
        ]));
    assert!(!root.join("usr/sbin/qkd-macsec-agent").exists());
    assert!(root.join("etc/qkd-macsec/agent.toml.sample").exists());
}

/// The maintainer scripts for real: `dpkg -i` inside a chroot whose root is an overlay of this
/// machine's own root (the upper layer on a tmpfs in a private mount namespace, so nothing
/// reaches the host). The scripted install above sets DPKG_ROOT, under which the postinst
/// skips group creation; here it must create the `qkd-macsec` group the unit's
/// SupplementaryGroups names, keep it on reinstall, and a purge must remove the files.
#[test]
fn maintainer_scripts_create_the_group_in_a_throwaway_system() {
    require_root("a mount namespace with an overlay of / and dpkg -i in a chroot");
    let deb = the_deb();
    let group_before = run(Command::new("getent").args(["group", "qkd-macsec"])).0;
    let dir = std::env::temp_dir().join(format!("qkd-pkg-chroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Scratch(dir.clone());
    // Each step prints a marker line the test looks for; `set -e` stops at the first failure.
    let script = r#"
set -eu
d="$1"; deb="$2"
mount -t tmpfs tmpfs "$d"
mkdir -p "$d/upper" "$d/work" "$d/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$d/root"
mount -t proc proc "$d/root/proc"
mount --rbind /dev "$d/root/dev"
cp "$deb" "$d/root/qkd.deb"
in_root() { chroot "$d/root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
if in_root getent group qkd-macsec >/dev/null; then echo "STEP group-existed"; in_root delgroup --system qkd-macsec >/dev/null; fi
in_root dpkg -i /qkd.deb
echo "STEP installed"
in_root getent group qkd-macsec | sed 's/^/GROUP /'
in_root dpkg -s qkd-macsec-agent | grep '^Status:' | sed 's/^/STATUS /'
test -x "$d/root/usr/sbin/qkd-macsec-agent" && echo "STEP binary"
in_root dpkg -i /qkd.deb
echo "STEP reinstalled"
in_root getent group qkd-macsec | wc -l | sed 's/^/GROUPCOUNT /'
in_root dpkg --purge qkd-macsec-agent
echo "STEP purged"
test ! -e "$d/root/usr/sbin/qkd-macsec-agent" && echo "STEP binary-gone"
test ! -e "$d/root/etc/qkd-macsec/agent.toml.sample" && echo "STEP conffile-gone"
"#;
    let out = ok(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&dir)
        .arg(&deb));
    for want in [
        "STEP installed",
        "GROUP qkd-macsec:x:",
        "STATUS Status: install ok installed",
        "STEP binary",
        "STEP reinstalled",
        "GROUPCOUNT 1",
        "STEP purged",
        "STEP binary-gone",
        "STEP conffile-gone",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(want)),
            "missing {want:?} in:\n{out}"
        );
    }
    // The overlay kept every change away from this machine.
    assert_eq!(
        run(Command::new("getent").args(["group", "qkd-macsec"])).0,
        group_before,
        "the host's group database changed"
    );
    assert!(!Path::new("/qkd.deb").exists());
}
