//! Least privilege: the capabilities the agent keeps once it has started, the file checks it
//! makes before it starts, and keeping key material out of core dumps and swap (`memory`).
//!
//! # What the running agent keeps
//!
//! Start-up opens everything that needs broad privilege: the rtnetlink and generic netlink
//! sockets, the eBPF programs, maps and links (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN), the AF_PACKET
//! LLDP socket (CAP_NET_RAW) and the status socket. After that the agent keeps only:
//!
//! - **CAP_NET_ADMIN**: it keeps issuing `macsec` generic netlink commands (add/delete/update
//!   SAs, switch the encoding SA) and rtnetlink link changes for the whole of its life.
//! - **CAP_BPF**: map updates and lookups on already-open fds need no capability on kernels that
//!   dropped the syscall-wide `unprivileged_bpf_disabled` check (6.5+), but Debian 12's 6.1 kernel
//!   (the test VM, and gateways running Debian 12) still refuses every bpf(2) command without
//!   CAP_BPF when `kernel.unprivileged_bpf_disabled` is set, which is Debian's default.
//!
//! Dropped for good (effective, permitted, inheritable, ambient and bounding sets): everything
//! else, including CAP_PERFMON, CAP_NET_RAW, CAP_SYS_ADMIN, CAP_DAC_OVERRIDE and CAP_SETPCAP. The
//! agent never re-attaches programs at run time: when a lower interface disappears the link stops
//! with an error (`DataplaneError::InterfaceGone`) and the service manager restarts the agent,
//! which then starts with full privileges again. `PR_SET_NO_NEW_PRIVS` is set as well (an
//! `execve`, e.g. of the alarm hook, cannot regain anything), and when the agent holds
//! CAP_SETPCAP (plain root) the bounding set is cut to the same two and the securebits `NOROOT`
//! and `NO_SETUID_FIXUP` are set and locked. Under the packaged systemd unit there is no
//! CAP_SETPCAP; the unit's CapabilityBoundingSet (NET_ADMIN, BPF, PERFMON, NET_RAW) then stays.
//! An agent that lacks CAP_BPF (CAP_SYS_ADMIN on kernels before 5.8) keeps only CAP_NET_ADMIN.
//!
//! Linux keeps capabilities per thread, and the tokio runtime already runs several threads when
//! start-up ends, so [`drop_to_runtime`] applies the change on every thread of the process (the
//! way glibc's `setuid` and libcap's psx do: a signal whose handler makes the same syscalls on
//! its thread), then reads `/proc/self/task/*/status` back and fails unless every thread shows
//! exactly the kept set.

mod caps;
mod files;
mod gate;
mod memory;

pub use caps::{
    drop_to, drop_to_runtime, mask, missing_for_run, parse_cap_mask, proc_caps, Cap, ProcCaps,
    CAP_BPF, CAP_NET_ADMIN, RUNTIME_CAPS,
};
pub use files::{check_config_file, check_private_key_file};
pub use gate::{drop_when_started, StartupToken};
pub use memory::{dumpable, protect_key_memory, KeyMemory};

/// The start-up file checks: the config file, then every link's KME client key.
pub fn check_startup_files(
    config_path: &std::path::Path,
    cfg: &crate::config::Config,
) -> Result<(), PrivsError> {
    check_config_file(config_path)?;
    for link in &cfg.link {
        check_private_key_file(&link.kme.key)?;
    }
    Ok(())
}

use std::path::PathBuf;

/// What can go wrong; every message names the thing and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PrivsError {
    #[error("{what} {path} has mode {mode:04o}, which lets {who} {access} it; run `chmod {fix:o} {path}`")]
    FileMode {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        who: &'static str,
        access: &'static str,
        fix: u32,
    },
    #[error("{what} {path} is owned by uid {owner}, neither root nor this agent (uid {euid}); another user could change it: run `chown root {path}` (or the agent's user)")]
    FileOwner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("cannot check {what} {path}: {source}")]
    Stat {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dropping capabilities failed at {step}: {source}")]
    Drop {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "after dropping capabilities, thread {tid} still has {field} {value:#x} (want {want:#x})"
    )]
    NotDropped {
        tid: u32,
        field: &'static str,
        value: u64,
        want: u64,
    },
}
