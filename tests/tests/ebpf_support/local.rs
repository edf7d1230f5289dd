//! Stand-in for the shared support library's namespace helpers (tests/src/lib.rs, being written
//! by the `vm` helper): same names and behaviour, replaced by `qkd_macsec_tests::*` once merged.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub fn require_root(what: &str) {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "this test needs root for {what} (euid {euid})");
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

static N: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        require_root("network namespaces");
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v);
    }
    pub fn spawn_with(
        &self,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> std::process::Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        adjust(&mut cmd);
        cmd.spawn().expect("spawn in netns")
    }
    pub fn enter(&self) -> NetNsEnter {
        let original = File::open("/proc/thread-self/ns/net").unwrap();
        let target = File::open(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        NetNsEnter {
            original,
            _not_send: PhantomData,
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub struct NetNsEnter {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetNsEnter {
    fn drop(&mut self) {
        // SAFETY: valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

pub struct VethPair {
    pub a_mac: Mac,
    pub b_mac: Mac,
}

pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> VethPair {
    let n = N.fetch_add(1, Ordering::Relaxed) as u8;
    let a_mac = Mac([2, 0, 0, 0, n, 1]);
    let b_mac = Mac([2, 0, 0, 0, n, 2]);
    let fmt = |m: Mac| {
        m.0.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    a.exec(&[
        "ip",
        "link",
        "add",
        a_if,
        "address",
        &fmt(a_mac),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "address",
        &fmt(b_mac),
        "netns",
        b.name(),
    ]);
    a.exec(&["ip", "link", "set", a_if, "up"]);
    b.exec(&["ip", "link", "set", b_if, "up"]);
    VethPair { a_mac, b_mac }
}

pub fn agent_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("qkd-macsec-agent");
    assert!(
        bin.is_file(),
        "build the agent first: cargo build -p qkd-macsec-agent"
    );
    bin
}
