//! Shared support for the integration tests of qkd-macsec.
//!
//! - [`require_root`]: privileged tests fail loudly without root; they never skip silently.
//! - [`NetNs`]: a uniquely named network namespace that is deleted on drop, with helpers to run
//!   commands in it ([`NetNs::exec`], [`NetNs::spawn`]) or to move the current thread into it
//!   ([`NetNs::enter`]).
//! - [`veth_pair`], [`add_ipv4`]: wiring between namespaces.
//! - [`agent_bin`]: the path of the built `qkd-macsec-agent` binary.
//! - [`require_macsec`]: fails loudly when the running kernel cannot create MACsec links (that is,
//!   outside the test VM).
//!
//! Test scaffolding may call iproute2; product code never shells out.
//!
//! Addresses: tests use 10.x addresses only, and only inside namespaces they created.
//!
//! [`testbed`]: two gateways with real agents, the KME simulator, traffic streams and wire
//! captures, shared by `cargo xtask demo` and the end-to-end VM tests.

pub mod soak;
pub mod testbed;

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Panics with a clear message unless the process runs as root (effective uid 0).
///
/// `what` names what needs the privilege, e.g. "network namespaces" or "loading XDP programs".
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root for {what} (effective uid is {euid}); run it through `cargo xtask test`"
    );
}

/// Panics with a clear message unless the running kernel supports MACsec links.
///
/// The host kernel has no MACsec; such tests belong in `tests/tests/vm_*.rs` and run in the VM.
pub fn require_macsec() {
    use std::sync::OnceLock;
    // Checked once per test binary: each check costs several process starts in the VM.
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    require_root("creating MACsec links");
    let verdict = CHECK.get_or_init(|| {
        let probe = NetNs::new("macsecprobe");
        // veth rather than dummy as the lower device: the host kernel has veth but no dummy.
        probe.ip(&[
            "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
        ]);
        let out = try_run(&[
            ip_bin(),
            "-n",
            probe.name(),
            "link",
            "add",
            "link",
            "probe0",
            "macsec0",
            "type",
            "macsec",
        ]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    });
    if let Err(why) = verdict {
        panic!(
            "this test needs a kernel with MACsec, but creating a MACsec link failed ({why}); \
             run it inside the test VM through `cargo xtask test` (or `cargo xtask vm-run`)"
        );
    }
}

/// Path of iproute2's `ip`. Called by path because busybox's `ip` applet may shadow it in $PATH.
pub fn ip_bin() -> &'static str {
    static CANDIDATES: [&str; 4] = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];
    CANDIDATES
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "iproute2 `ip` not found (looked at {CANDIDATES:?}); install it with `cargo xtask setup`"
            )
        })
}

/// Formats a command line for error messages.
fn show_cmd<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command on the host (outside any namespace); panics with the command and its stderr when
/// it cannot be started or exits non-zero.
pub fn run(args: &[&str]) -> Output {
    let out = try_run(args);
    check_output(args, &out);
    out
}

/// Runs a command on the host and returns its output whatever the exit status; panics only when the
/// program cannot be started.
pub fn try_run(args: &[&str]) -> Output {
    let (prog, rest) = args.split_first().expect("run: empty command line");
    Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", show_cmd(args)))
}

fn check_output<S: AsRef<OsStr>>(args: &[S], out: &Output) {
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstderr: {}\nstdout: {}",
        show_cmd(args),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace created for one test and deleted when dropped.
///
/// The name is `<prefix>-<pid>-<counter>`, so parallel tests and test binaries never collide.
/// Deleting the namespace also destroys its interfaces (and a veth pair with either end inside it).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a fresh namespace with `lo` up. Panics (with the reason) when that fails, e.g.
    /// without root.
    pub fn new(prefix: &str) -> NetNs {
        require_root("creating network namespaces");
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run(&[ip_bin(), "netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "dev", "lo", "up"]);
        ns
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's bind mount (usable with setns(2)).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn command(&self, args: &[&str]) -> Command {
        assert!(!args.is_empty(), "NetNs::exec: empty command line");
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Runs `args` inside the namespace; panics with the command and its stderr when it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        let out = self.try_exec(args);
        check_output(&self.described(args), &out);
        out
    }

    /// Runs `args` inside the namespace and returns the output whatever the exit status.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", show_cmd(&self.described(args))))
    }

    /// Runs `args` inside the namespace and returns its stdout as a string; panics on failure.
    pub fn exec_stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.exec(args).stdout).into_owned()
    }

    /// Runs iproute2's `ip -n NAME args...`; panics with the command and stderr when it fails.
    ///
    /// Cheaper than `exec(&["ip", ...])`: one process, no mount namespace (this matters in the
    /// emulated VM, where every exec costs a few hundred milliseconds).
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec![ip_bin(), "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs several `ip` commands (one per entry, without the leading `ip`) in this namespace in
    /// a single `ip -batch` process; panics naming the batch when any of them fails.
    pub fn ip_batch(&self, commands: &[&str]) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(ip_bin())
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `ip -batch`: {e}"));
        let mut script = commands.join("\n");
        script.push('\n');
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .expect("writing the ip batch");
        let out = child.wait_with_output().expect("waiting for ip -batch");
        assert!(
            out.status.success(),
            "`ip -n {} -batch -` failed ({}):\nbatch:\n{script}stderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    /// Starts `args` inside the namespace (stdin null, stdout/stderr inherited) and returns the
    /// child; the caller waits for or kills it.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.spawn_with(args, |_| {})
    }

    /// Like [`NetNs::spawn`], letting the caller adjust the command (pipes, env) before start.
    pub fn spawn_with(&self, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Child {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null());
        adjust(&mut cmd);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", show_cmd(&self.described(args))))
    }

    /// Moves the current thread into the namespace until the guard drops.
    ///
    /// Sockets opened and threads spawned while entered belong to the namespace. The guard is not
    /// `Send`: setns(2) affects only the calling thread, so it must be dropped on that thread.
    pub fn enter(&self) -> NetNsEnter {
        let original = File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("cannot open /proc/thread-self/ns/net: {e}"));
        let target = File::open(self.path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()));
        setns_net(&target, &format!("namespace {}", self.name));
        NetNsEnter {
            original,
            _not_send: PhantomData,
        }
    }

    fn described(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            ip_bin().to_owned(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs").field("name", &self.name).finish()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = try_run(&[ip_bin(), "netns", "del", &self.name]);
        if !out.status.success() {
            // Not a panic: drop may run during unwinding, and a double panic aborts and hides the
            // original failure.
            eprintln!(
                "warning: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

fn setns_net(file: &File, what: &str) {
    // SAFETY: file is an open namespace file descriptor; CLONE_NEWNET only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns into {what} failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Guard from [`NetNs::enter`]: restores the thread's original network namespace on drop.
pub struct NetNsEnter {
    original: File,
    /// setns(2) is per thread: the guard must stay on the thread that entered.
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetNsEnter {
    fn drop(&mut self) {
        setns_net(&self.original, "the original network namespace");
    }
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The two ends of a veth pair made by [`veth_pair`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethPair {
    pub a_if: String,
    pub a_mac: Mac,
    pub b_if: String,
    pub b_mac: Mac,
}

static VETH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, both up, with fixed MACs.
///
/// The MACs are locally administered and deterministic: `02:00:00:00:<n>:01` for the `a` end and
/// `02:00:00:00:<n>:02` for the `b` end, where `n` counts pairs made by this process (0, 1, ...), so
/// several pairs in one test never share a MAC. Interface names must be at most 15 bytes.
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> VethPair {
    assert!(
        a_if.len() <= 15 && b_if.len() <= 15,
        "interface names are limited to 15 bytes: {a_if:?}, {b_if:?}"
    );
    let n = VETH_COUNTER.fetch_add(1, Ordering::Relaxed) as u8;
    let a_mac = Mac([0x02, 0, 0, 0, n, 0x01]);
    let b_mac = Mac([0x02, 0, 0, 0, n, 0x02]);
    // Created inside `a` so that no name ever appears in the host namespace. `name` and `dev` are
    // explicit: ip matches keyword prefixes, so a bare "ma" would be read as "master".
    a.ip_batch(&[
        &format!(
            "link add name {a_if} address {a_mac} type veth peer name {b_if} address {b_mac} netns {}",
            b.name()
        ),
        &format!("link set dev {a_if} up"),
    ]);
    b.ip(&["link", "set", "dev", b_if, "up"]);
    VethPair {
        a_if: a_if.to_owned(),
        a_mac,
        b_if: b_if.to_owned(),
        b_mac,
    }
}

/// Adds an IPv4 address in CIDR form (e.g. `10.77.0.1/24`) to `ifname` in `ns`.
///
/// Only 10.x addresses, and only in namespaces the test created.
pub fn add_ipv4(ns: &NetNs, ifname: &str, cidr: &str) {
    assert!(
        cidr.starts_with("10."),
        "tests use 10.x addresses only (inside their own namespaces), got {cidr}"
    );
    ns.ip(&["addr", "add", cidr, "dev", ifname]);
}

/// The ifindex of `ifname` inside `ns`.
pub fn ifindex(ns: &NetNs, ifname: &str) -> u32 {
    let path = format!("/sys/class/net/{ifname}/ifindex");
    let s = ns.exec_stdout(&["cat", &path]);
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad ifindex {s:?} for {ifname} in {}: {e}", ns.name()))
}

/// Path of the built `qkd-macsec-agent` binary: `target/<profile>/qkd-macsec-agent`, next to the
/// directory of the running test binary (which lives in `target/<profile>/deps`).
///
/// Panics with what to do when it has not been built.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the running test binary");
    let deps = exe.parent().expect("test binary has no parent directory");
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps directory has no parent")
    } else {
        deps
    };
    let bin = profile_dir.join("qkd-macsec-agent");
    assert!(
        bin.is_file(),
        "agent binary {} not built; run `cargo build -p qkd-macsec-agent` (or `cargo xtask test`, \
         which builds it) first",
        bin.display()
    );
    bin
}

/// Pins the calling thread (or, in a `pre_exec` hook, the process about to start) to CPU 0.
///
/// Why the end-to-end tests use it: Linux 6.1's `macsec_encrypt()` takes the TX SA from
/// `encoding_sa` and `macsec_fill_sectag()` reads `encoding_sa` again, so a frame encrypted on
/// another CPU at the instant of a switch carries the new AN with the old key and the peer drops
/// it (docs/macsec.md, "Kernel findings"). With the senders and the agents on one CPU (transmit
/// runs with bottom halves disabled) that kernel race cannot occur, and a lost frame is the
/// agent's own fault. Returns the error instead of panicking so it can run after fork.
pub fn pin_to_cpu0() -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it, and
    // neither allocates (safe between fork and exec).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_formats_with_colons() {
        assert_eq!(
            Mac([0x02, 0, 0xab, 0, 0x10, 0xff]).to_string(),
            "02:00:ab:00:10:ff"
        );
    }

    #[test]
    fn show_cmd_joins_words() {
        assert_eq!(show_cmd(&["ip", "link", "show"]), "ip link show");
    }
}
