//! Keeping key material out of core dumps, `/proc/<pid>/mem` and swap.
//!
//! [`protect_key_memory`] runs at the start of `run`, before any key (or the KME client key) is
//! read:
//!
//! - `prctl(PR_SET_DUMPABLE, 0)`: the kernel writes no core dump of this process, whatever
//!   `LimitCORE` or `kernel.core_pattern` say (a piped crash collector such as systemd-coredump
//!   gets nothing either), and ptrace, `/proc/<pid>/mem` and `/proc/<pid>/environ` need
//!   CAP_SYS_PTRACE, so a process of the same uid without it cannot read the agent's memory.
//!   Dropping capabilities later does not undo it: the kernel resets dumpability only when
//!   credentials change to something that is not a subset of the old ones.
//! - `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: no page of the agent is ever written to
//!   swap. ONFAULT locks pages as they are touched, so locking costs no memory the agent would
//!   not use anyway. Only under an unlimited RLIMIT_MEMLOCK: with MCL_FUTURE every later mapping
//!   (a heap arena, a thread stack) is checked against that limit unless the process holds
//!   CAP_IPC_LOCK at that moment (kernel `mlock_future_ok`), and the agent drops CAP_IPC_LOCK
//!   after start-up (`privs`), so under a finite limit allocations would start failing once the
//!   limit is reached. A finite limit is first raised to unlimited where that is allowed (the
//!   hard limit is already unlimited, or CAP_SYS_RESOURCE, which root has before the drop).
//!   Otherwise memory stays unlocked and `run` logs one warning. The packaged unit sets
//!   `LimitMEMLOCK=infinity`.

/// What [`protect_key_memory`] achieved.
#[derive(Debug)]
pub struct KeyMemory {
    /// `Ok` when `mlockall` locked the process's memory; otherwise why not (for the warning).
    pub locked: Result<(), String>,
}

/// Turns core dumps off and, where the memory-lock limit allows, locks all memory (see the module
/// docs). Fails only if the kernel refuses `PR_SET_DUMPABLE`, which it never does for 0.
pub fn protect_key_memory() -> std::io::Result<KeyMemory> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(KeyMemory {
        locked: lock_all_memory(),
    })
}

/// Whether this process is dumpable (`PR_GET_DUMPABLE`).
pub fn dumpable() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) > 0 }
}

fn limit_text(v: libc::rlim_t) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".to_owned()
    } else {
        format!("{v} bytes")
    }
}

fn lock_all_memory() -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_MEMLOCK): {}",
            std::io::Error::last_os_error()
        ));
    }
    if lim.rlim_cur != libc::RLIM_INFINITY {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit to read from.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
            return Err(format!(
                "RLIMIT_MEMLOCK is {} (hard limit {}) and cannot be raised to unlimited ({}); locking under a finite limit would make later allocations fail",
                limit_text(lim.rlim_cur),
                limit_text(lim.rlim_max),
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: mlockall with flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } != 0 {
        return Err(format!("mlockall: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child processes the tests below start (the hardening cannot be undone, and
    /// MCL_FUTURE would affect the whole test binary).
    const CHILD: &str = "QKD_MACSEC_TEST_MEMORY_CHILD";

    /// Runs this test binary again with only `test` and `CHILD=mode`; panics unless it passes.
    fn in_child(test: &str, mode: &str) {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, mode)
            .output()
            .expect("starting the test binary again");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child ({mode}) failed:\n{text}");
        assert!(
            text.contains("1 passed"),
            "child ({mode}) ran nothing:\n{text}"
        );
        eprintln!("child ({mode}):\n{text}");
    }

    fn vm_lck_kb() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmLck line")
    }

    fn may_raise_memlock() -> bool {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit to write into.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) },
            0
        );
        const CAP_SYS_RESOURCE: u32 = 24;
        let eff = crate::privs::proc_caps("self").expect("caps").effective;
        lim.rlim_max == libc::RLIM_INFINITY || eff & (1 << CAP_SYS_RESOURCE) != 0
    }

    /// Allocates and touches 64 MiB in many blocks: under MCL_FUTURE with a finite limit this is
    /// what would fail.
    fn allocate_a_lot() {
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1 << 20]).collect();
        assert_eq!(blocks.iter().map(Vec::len).sum::<usize>(), 64 << 20);
    }

    #[test]
    fn protection_turns_dumps_off_and_locks_memory_when_the_limit_allows() {
        match std::env::var(CHILD).as_deref() {
            Err(_) => in_child(
                "privs::memory::tests::protection_turns_dumps_off_and_locks_memory_when_the_limit_allows",
                "default",
            ),
            Ok(_) => {
                assert!(dumpable(), "a fresh process is dumpable");
                assert_eq!(vm_lck_kb(), 0, "nothing locked yet");
                let must_lock = may_raise_memlock();
                let r = protect_key_memory().expect("PR_SET_DUMPABLE");
                assert!(!dumpable(), "PR_GET_DUMPABLE is 0 after the hardening");
                let locked_kb = vm_lck_kb();
                eprintln!("locked: {:?}, VmLck {locked_kb} kB", r.locked);
                match &r.locked {
                    Ok(()) => assert!(locked_kb > 0, "mlockall succeeded but VmLck is 0"),
                    Err(why) => {
                        assert!(
                            !must_lock,
                            "the limit could be raised, yet memory was not locked: {why}"
                        );
                        assert_eq!(locked_kb, 0);
                    }
                }
                allocate_a_lot();
            }
        }
    }

    /// Under a small limit that cannot be raised (no CAP_SYS_RESOURCE, finite hard limit) memory
    /// stays unlocked, the reason names the limit, and allocations keep working.
    #[test]
    fn a_small_memlock_limit_leaves_memory_unlocked_and_allocations_working() {
        match std::env::var(CHILD).as_deref() {
            Err(_) => in_child(
                "privs::memory::tests::a_small_memlock_limit_leaves_memory_unlocked_and_allocations_working",
                "small-limit",
            ),
            Ok(_) => {
                let small = libc::rlimit {
                    rlim_cur: 64 << 10,
                    rlim_max: 64 << 10,
                };
                // SAFETY: a valid rlimit; lowering is always allowed.
                assert_eq!(
                    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &small) },
                    0
                );
                crate::privs::drop_to(&[]).expect("dropping every capability");
                let r = protect_key_memory().expect("PR_SET_DUMPABLE");
                assert!(!dumpable());
                let why = r.locked.expect_err("nothing may be locked under 64 KiB");
                assert!(why.contains("65536 bytes"), "{why}");
                assert_eq!(vm_lck_kb(), 0);
                allocate_a_lot();
            }
        }
    }
}
