//! The eBPF data plane on a MACsec link's lower device: loading and attaching the XDP (ingress)
//! and TC (egress) programs, the typed map API the agent uses (SA registration, PN thresholds,
//! stall switch, counters) and the ring-buffer events (project LLDP TLVs, PN threshold crossings),
//! and the programs' own log records routed into tracing ([`klog`]).
//!
//! Everything the programs need to keep enforcing a stall lives in bpffs under
//! `<bpffs_root>/<ifname>/` (maps and links), so a killed agent leaves the stall in force and a
//! restarted one re-opens the same maps. Layout and formats: docs/dataplane.md.

mod bench;
mod events;
pub mod klog;
mod loader;
mod maps;
pub mod tool;

use std::io;
use std::path::PathBuf;

pub use bench::{run_benchmark, BenchResult};
pub use events::{DataplaneEvent, EventStream, LldpTlvEvent, PnCrossing};
pub use loader::{monotonic_ns, Dataplane, DataplaneOptions, TcBackend, XdpAttachMode};
pub use maps::{IfCounters, SaCounters, SaKey, SaSlot, Sci};
pub use qkd_macsec_common::{
    Counter, Direction, Gcra, LldpRateLimits, LLDP_SOURCES_MAX, PN_THRESHOLDS,
};

/// What went wrong in the data plane, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// No interface of that name exists (in this network namespace).
    #[error("interface {ifname:?} does not exist in this network namespace: check the name or create the link first")]
    InterfaceNotFound { ifname: String },
    /// The interface disappeared while the data plane used it.
    #[error("interface {ifname:?} is gone ({context}): the data plane on it has stopped; re-attach when the link is back")]
    InterfaceGone { ifname: String, context: String },
    /// The kernel refused a BPF operation for lack of privilege.
    #[error(
        "no permission to {what} (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root): {source}"
    )]
    NoPermission {
        what: String,
        #[source]
        source: io::Error,
    },
    /// bpffs is not mounted where the pins go.
    #[error("bpffs is not mounted at {path}: mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    BpffsMissing { path: PathBuf },
    /// The verifier rejected a program; `log` is the verifier's own explanation.
    #[error(
        "the kernel verifier rejected program {program}: {errno}\n--- verifier log ---\n{log}"
    )]
    Verifier {
        program: String,
        errno: io::Error,
        log: String,
    },
    /// Loading the object or a program failed for another reason.
    #[error("loading {what} failed: {detail}")]
    Load { what: String, detail: String },
    /// Attaching a program to the interface failed.
    #[error("attaching {program} to {ifname:?} failed: {detail}")]
    Attach {
        program: String,
        ifname: String,
        detail: String,
    },
    /// A map operation failed.
    #[error("map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    /// Creating, opening or removing a bpffs pin failed.
    #[error("bpffs pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// All slots an SA could use are taken by other SAs.
    #[error(
        "no free SA slot for {key}: {probes} slots probed are in use; unregister retired SAs first"
    )]
    SaTableFull { key: SaKey, probes: u32 },
    /// The SA is not registered.
    #[error("SA {key} is not registered with the data plane")]
    SaNotRegistered { key: SaKey },
    /// AN outside 0..=3.
    #[error("association number {an} is out of range (0..=3)")]
    BadAn { an: u8 },
    /// More thresholds than the program checks.
    #[error("{given} PN thresholds given, at most {max} are supported")]
    TooManyThresholds { given: usize, max: usize },
    /// A ring-buffer record that does not parse (a layout mismatch between program and agent).
    #[error("malformed event record ({len} bytes): {detail}")]
    BadEvent { len: usize, detail: String },
    /// The event stream was already taken.
    #[error("the event stream of {ifname:?} was already taken")]
    EventsTaken { ifname: String },
    /// Other I/O.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// The first OS error code in an error's source chain.
pub(crate) fn errno_of(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(code) = io.raw_os_error() {
                return Some(code);
            }
        }
        cur = e.source();
    }
    None
}

/// Full text of an error and its sources, for `detail` fields.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = e.source();
    }
    s
}
