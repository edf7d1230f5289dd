//! The eBPF programs' own log records (aya-log) in the agent's tracing.
//!
//! The programs write a record only for rare outcomes an operator debugging a link wants to see:
//! a malformed SecTAG, a frame of an unregistered SA, a project TLV over its rate limit, a frame
//! dropped by the stall, an event lost to a full ring; each sampled (the first of its kind on a
//! CPU, then every 256th), never for a registered SA's frame or a delivered TLV
//! (qkd-macsec-ebpf/src/outcome.rs). They come out as tracing events at DEBUG under the target
//! [`TARGET`], with the interface (`ifname`) and the direction (`dir`, `rx` or `tx`).
//!
//! Whether the programs write records at all is decided when they are loaded: the loader sets
//! the object's `AYA_LOG_LEVEL` to DEBUG only when tracing has DEBUG enabled for [`TARGET`]
//! (e.g. `QKD_MACSEC_LOG=info,qkd_macsec_agent::dataplane::kernel=debug`), and to 0 otherwise.
//! `AYA_LOG_LEVEL` lives in the object's frozen `.rodata`, so with 0 the verifier removes every
//! log branch and the programs are as if aya-log were not there (`cargo xtask bench ebpf`
//! measures both). Changing the level needs a restart of the agent.
//!
//! Capabilities: the record ring (`AYA_LOGS`) is created with the other maps and taken out of the
//! object, mmap()ed and wrapped by [`KernelLog::new`] inside [`super::Dataplane::attach`], i.e.
//! during start-up while the agent still holds CAP_BPF and CAP_PERFMON
//! (qkd-macsec-agent/src/privs). Reading it later needs no capability: the agent's event stream
//! drains it together with the event ring ([`super::EventStream`]).

use std::os::fd::AsRawFd;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{chain, DataplaneError};

/// The tracing target of the programs' records.
pub const TARGET: &str = "qkd_macsec_agent::dataplane::kernel";

/// aya-log's level numbers (`aya_log::Level`): 0 disables every record.
const LEVEL_OFF: u8 = 0;
const LEVEL_DEBUG: u8 = aya_log::Level::Debug as u8;

/// The `AYA_LOG_LEVEL` to load the programs with: DEBUG when tracing would show the records.
pub fn load_level() -> u8 {
    if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        LEVEL_DEBUG
    } else {
        LEVEL_OFF
    }
}

/// Name of the global the loader overrides (`aya_log::LEVEL`).
pub const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// A `log::Log` that turns aya-log's records into tracing events of one interface.
struct Bridge {
    ifname: String,
}

impl log::Log for Bridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // Every record the programs write is a DEBUG one; the level is kept should that change.
        let ifname = self.ifname.as_str();
        let dir = record.target();
        match record.level() {
            log::Level::Error => {
                tracing::error!(target: TARGET, ifname, dir, "{}", record.args())
            }
            log::Level::Warn => tracing::warn!(target: TARGET, ifname, dir, "{}", record.args()),
            log::Level::Info => tracing::info!(target: TARGET, ifname, dir, "{}", record.args()),
            log::Level::Debug => {
                tracing::debug!(target: TARGET, ifname, dir, "{}", record.args())
            }
            log::Level::Trace => {
                tracing::trace!(target: TARGET, ifname, dir, "{}", record.args())
            }
        }
    }

    fn flush(&self) {}
}

/// The record ring of one interface's programs, taken out of their object.
pub struct KernelLog {
    logger: EbpfLogger<Bridge>,
}

impl KernelLog {
    /// Takes the record ring out of `ebpf` (loaded, programs not necessarily yet). Keep the
    /// result at least until the programs are loaded: the ring's fd is in their instructions.
    pub fn new(ebpf: &mut Ebpf, ifname: &str) -> Result<Self, DataplaneError> {
        let logger = EbpfLogger::init_with_logger(
            ebpf,
            Bridge {
                ifname: ifname.to_owned(),
            },
        )
        .map_err(|e| DataplaneError::Load {
            what: "the eBPF log ring (aya-log)".into(),
            detail: chain(&e),
        })?;
        Ok(Self { logger })
    }

    /// Registers the ring with tokio (needs a runtime with IO enabled).
    pub(crate) fn into_async(self) -> Result<AsyncKernelLog, DataplaneError> {
        // SAFETY: the logger owns its ring's map fd and keeps it open, unchanged, for as long as
        // the AsyncFd owns the logger.
        let fd =
            unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) }.map_err(|e| {
                DataplaneError::Io {
                    context: "registering the eBPF log ring with tokio".into(),
                    source: e.into_parts().1,
                }
            })?;
        Ok(AsyncKernelLog { fd })
    }

    /// Writes every record in the ring to tracing.
    pub fn flush(&mut self) {
        self.logger.flush();
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.logger.as_raw_fd()
    }
}

/// [`KernelLog`] registered with tokio, drained by the event stream.
pub(crate) struct AsyncKernelLog {
    fd: AsyncFd<KernelLog>,
}

impl AsyncKernelLog {
    /// Writes every record in the ring to tracing, without waiting.
    pub fn flush(&mut self) {
        self.fd.get_mut().flush();
    }

    /// Waits until the ring has records, then writes them. Cancel-safe: nothing is taken from
    /// the ring before the wait completes.
    pub async fn wait_and_flush(&mut self) -> Result<(), DataplaneError> {
        let mut guard = self
            .fd
            .readable_mut()
            .await
            .map_err(|source| DataplaneError::Io {
                context: "waiting on the eBPF log ring".into(),
                source,
            })?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
        Ok(())
    }
}
