//! Dropping capabilities on every thread of the process, and reading them back from /proc.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::PrivsError;

/// A capability number (include/uapi/linux/capability.h).
pub type Cap = u32;
pub const CAP_NET_ADMIN: Cap = 12;
pub const CAP_BPF: Cap = 39;
const CAP_NET_RAW: Cap = 13;
const CAP_SYS_ADMIN: Cap = 21;
const CAP_PERFMON: Cap = 38;

/// What the agent keeps after start-up (see the module docs of `privs` for why).
pub const RUNTIME_CAPS: [Cap; 2] = [CAP_NET_ADMIN, CAP_BPF];

// Not (all) in the libc crate; values from include/uapi/linux/prctl.h and securebits.h.
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: Cap = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Capability sets and no_new_privs of one thread, from its /proc status file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcCaps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

/// Parses a `CapEff:`-style hex mask.
pub fn parse_cap_mask(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim(), 16).ok()
}

/// The capabilities `run` needs at start-up that the effective set (`CapEff:` of a /proc status
/// text) lacks, by name. CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as the kernel
/// accepts it for both.
pub fn missing_for_run(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(parse_cap_mask)
        .unwrap_or(0);
    let has = |cap: Cap| eff & mask(&[cap]) != 0;
    let mut missing = Vec::new();
    for (cap, name) in [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_NET_RAW, "CAP_NET_RAW"),
    ] {
        if !has(cap) {
            missing.push(name);
        }
    }
    for (cap, name) in [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")] {
        if !has(cap) && !has(CAP_SYS_ADMIN) {
            missing.push(name);
        }
    }
    missing
}

/// Reads the capability lines of `/proc/<path>/status`, e.g. `self`, `1234` or
/// `self/task/1235`.
pub fn proc_caps(path: &str) -> std::io::Result<ProcCaps> {
    let text = std::fs::read_to_string(format!("/proc/{path}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(parse_cap_mask)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("/proc/{path}/status has no {name} line"),
                )
            })
    };
    Ok(ProcCaps {
        inheritable: field("CapInh:")?,
        permitted: field("CapPrm:")?,
        effective: field("CapEff:")?,
        bounding: field("CapBnd:")?,
        ambient: field("CapAmb:")?,
        no_new_privs: field("NoNewPrivs:")? == 1,
    })
}

/// The mask of a set of capabilities.
pub fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

// What the signal handler applies; written before any signal is sent.
static KEEP: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(0);
/// Whether the bounding set and securebits can be changed (CAP_SETPCAP was effective).
static SETPCAP: AtomicU32 = AtomicU32::new(0);
static ACKED: AtomicU32 = AtomicU32::new(0);
/// errno of the first failure in a handler (0: none), and which step (index into STEPS).
static FAILED_ERRNO: AtomicI32 = AtomicI32::new(0);
static FAILED_STEP: AtomicU32 = AtomicU32::new(0);
const STEPS: [&str; 5] = [
    "prctl(PR_SET_NO_NEW_PRIVS)",
    "prctl(PR_SET_SECUREBITS)",
    "prctl(PR_CAPBSET_DROP)",
    "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
    "capset",
];

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Applies the drop to the calling thread with raw syscalls only (async-signal-safe: it runs in a
/// signal handler). Returns (step, errno) of the first failure.
///
/// Without CAP_SETPCAP (e.g. under the packaged systemd unit, whose CapabilityBoundingSet already
/// holds only the four start-up capabilities) the bounding set and the securebits stay as they
/// are; no_new_privs alone then keeps an `execve` from regaining anything (the kernel intersects
/// the new permitted set with the old one).
fn apply_on_this_thread(keep: u64, last_cap: u32, setpcap: bool) -> Result<(), (usize, i32)> {
    // SAFETY: prctl/capset with integer arguments and a pointer to live stack data.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err((0, errno()));
        }
        if setpcap {
            apply_bounding(keep, last_cap)?;
        }
        if libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            return Err((3, errno()));
        }
        apply_capset(keep)
    }
}

/// Securebits and bounding set (both need CAP_SETPCAP, which the capset afterwards removes).
///
/// # Safety
/// Only raw syscalls; callable from a signal handler.
unsafe fn apply_bounding(keep: u64, last_cap: u32) -> Result<(), (usize, i32)> {
    // SAFETY: prctl with integer arguments.
    unsafe {
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED;
        if libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) != 0 {
            return Err((1, errno()));
        }
        // The bounding set needs CAP_SETPCAP, which the capset below removes: this comes first.
        for cap in 0..=last_cap {
            if keep & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                return Err((2, errno()));
            }
        }
    }
    Ok(())
}

/// effective = permitted = `keep`, nothing inheritable.
///
/// # Safety
/// Only a raw syscall; callable from a signal handler.
unsafe fn apply_capset(keep: u64) -> Result<(), (usize, i32)> {
    // SAFETY: capset with pointers to live stack data.
    unsafe {
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: keep as u32,
                permitted: keep as u32,
                inheritable: 0,
            },
            CapData {
                effective: (keep >> 32) as u32,
                permitted: (keep >> 32) as u32,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
            return Err((4, errno()));
        }
    }
    Ok(())
}

extern "C" fn on_signal(_sig: libc::c_int) {
    let saved = errno();
    if let Err((step, e)) = apply_on_this_thread(
        KEEP.load(Ordering::SeqCst),
        LAST_CAP.load(Ordering::SeqCst),
        SETPCAP.load(Ordering::SeqCst) != 0,
    ) {
        if FAILED_ERRNO
            .compare_exchange(0, e.max(1), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            FAILED_STEP.store(step as u32, Ordering::SeqCst);
        }
    }
    ACKED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: restores the interrupted code's errno.
    unsafe { *libc::__errno_location() = saved };
}

fn io_err(step: impl Into<String>, source: std::io::Error) -> PrivsError {
    PrivsError::Drop {
        step: step.into(),
        source,
    }
}

fn done(c: &ProcCaps, keep: u64, bounding: u64) -> bool {
    c.effective == keep
        && c.permitted == keep
        && c.inheritable == 0
        && c.ambient == 0
        && c.bounding == bounding
        && c.no_new_privs
}

/// Thread ids of this process.
fn tids() -> Result<Vec<u32>, PrivsError> {
    let rd =
        std::fs::read_dir("/proc/self/task").map_err(|e| io_err("listing /proc/self/task", e))?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect())
}

/// Reduces every thread of this process to [`RUNTIME_CAPS`] (effective = permitted = bounding,
/// nothing inheritable or ambient), sets no_new_privs and locks the no-root securebits; then
/// checks every thread in /proc. Call once, after start-up; it cannot be undone.
pub fn drop_to_runtime() -> Result<(), PrivsError> {
    drop_to(&RUNTIME_CAPS)
}

/// [`drop_to_runtime`] with another set (tests).
pub fn drop_to(caps: &[Cap]) -> Result<(), PrivsError> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let before =
        proc_caps("thread-self").map_err(|e| io_err("reading /proc/thread-self/status", e))?;
    let setpcap = before.effective & (1u64 << CAP_SETPCAP) != 0;
    // Nothing can be added to the permitted set; keep what of `caps` we have (an agent started
    // with CAP_SYS_ADMIN instead of CAP_BPF on an old kernel keeps only CAP_NET_ADMIN).
    let keep = mask(caps) & before.permitted;
    // The bounding set we end with: `keep` when we may change it, else what we were given.
    let bounding = if setpcap { keep } else { before.bounding };
    KEEP.store(keep, Ordering::SeqCst);
    LAST_CAP.store(last_cap, Ordering::SeqCst);
    SETPCAP.store(u32::from(setpcap), Ordering::SeqCst);
    FAILED_ERRNO.store(0, Ordering::SeqCst);
    let sig = libc::SIGRTMIN() + 3;
    // SAFETY: installs a handler that only makes raw syscalls and touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(io_err("sigaction", std::io::Error::last_os_error()));
        }
    }
    apply_on_this_thread(keep, last_cap, setpcap).map_err(|(step, e)| {
        io_err(
            format!("{} on the calling thread", STEPS[step]),
            std::io::Error::from_raw_os_error(e),
        )
    })?;
    // SAFETY: no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid() as u32) };
    // New threads inherit their creator's sets, so a thread started while this runs is covered
    // either by its creator having been done already or by the next round.
    for _round in 0..20 {
        ACKED.store(0, Ordering::SeqCst);
        let mut sent = 0;
        for tid in tids()? {
            if tid == me {
                continue;
            }
            match proc_caps(&format!("self/task/{tid}")) {
                Ok(c) if done(&c, keep, bounding) => continue,
                Ok(_) => {}
                Err(_) => continue, // exited meanwhile
            }
            // SAFETY: signals a thread of this process; the handler is installed.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } == 0 {
                sent += 1;
            }
        }
        if sent == 0 {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while ACKED.load(Ordering::SeqCst) < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = FAILED_ERRNO.load(Ordering::SeqCst);
        if e != 0 {
            let step = STEPS[FAILED_STEP.load(Ordering::SeqCst) as usize];
            return Err(io_err(
                format!("{step} on another thread"),
                std::io::Error::from_raw_os_error(e),
            ));
        }
    }
    // SAFETY: a stray late signal must not kill the process (an RT signal's default action).
    unsafe { libc::signal(sig, libc::SIG_IGN) };
    for tid in tids()? {
        let Ok(c) = proc_caps(&format!("self/task/{tid}")) else {
            continue;
        };
        let checks = [
            ("CapEff", c.effective, keep),
            ("CapPrm", c.permitted, keep),
            ("CapBnd", c.bounding, bounding),
            ("CapInh", c.inheritable, 0),
            ("CapAmb", c.ambient, 0),
            ("NoNewPrivs", u64::from(c.no_new_privs), 1),
        ];
        if let Some((field, value, want)) = checks.into_iter().find(|(_, v, w)| v != w) {
            return Err(PrivsError::NotDropped {
                tid,
                field,
                value,
                want,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_status_lines_parse() {
        assert_eq!(mask(&RUNTIME_CAPS), (1 << 12) | (1 << 39));
        assert_eq!(parse_cap_mask("000001ffffffffff\n"), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_mask("zz"), None);
        // Our own status file has every line the check reads.
        let c = proc_caps("self").unwrap();
        assert_eq!(c.ambient & !c.permitted, 0);
    }

    #[test]
    fn capabilities_are_read_from_capeff() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(missing_for_run(root).is_empty());
        assert_eq!(
            missing_for_run("CapEff:\t0000000000000000\n"),
            ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON"]
        );
        // NET_ADMIN + NET_RAW + BPF + PERFMON: exactly the packaged unit's set.
        let unit = format!(
            "CapEff:\t{:016x}\n",
            (1u64 << 12) | (1 << 13) | (1 << 38) | (1 << 39)
        );
        assert!(missing_for_run(&unit).is_empty());
        // CAP_SYS_ADMIN stands in for BPF and PERFMON (kernels before 5.8).
        let old = format!("CapEff:\t{:016x}\n", (1u64 << 12) | (1 << 13) | (1 << 21));
        assert!(missing_for_run(&old).is_empty());
        assert_eq!(missing_for_run("garbage"), missing_for_run("CapEff:\t0\n"));
    }
}
