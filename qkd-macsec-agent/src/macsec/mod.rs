//! Kernel MACsec control plane: the link over rtnetlink, keys over the `macsec` generic netlink
//! family, make-before-break rollover and adoption of existing state.
//!
//! [`Macsec`] owns one route socket and one generic netlink socket; every operation takes
//! `&mut self`, so request/reply sequences never interleave. Adds are idempotent where the
//! intent allows it (an RX SC that exists, an SA that holds the same key id), deletes treat
//! "already gone" as success, and everything the kernel would reject only with EINVAL and a dmesg
//! line (key length, AN, PN, XPN parameters) is checked before the request is sent.
//!
//! See docs/macsec.md for the API walk-through and the rollover contract between two gateways.

mod bench;
mod genl;
mod link;
pub(crate) mod nl;
mod rollover;
mod types;

pub use bench::{run_bench, BenchOptions, BenchResult};
pub use rollover::{PeerRxConfirmation, RetireSchedule, RxPrepared, TxActivated};
pub use types::{
    An, Cipher, ClearStep, Cleared, KeyId, LinkConfig, MacsecLink, RxScState, RxScStats, SaKey,
    SaState, SaStats, Salt, Sci, SecyState, SecyStats, TxScStats, Validation, XpnParams,
};

use neli::consts::socket::NlFamily;
use nl::{NlConn, NlError};

/// What callers of this module act on. Messages name the object, the value and the remedy; they
/// never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum MacsecError {
    #[error("this kernel has no MACsec support ({detail}); load the module (`modprobe macsec`) or boot a kernel with CONFIG_MACSEC")]
    NoKernelSupport { detail: String },
    #[error("interface {name:?} does not exist; check the name or create it first")]
    InterfaceNotFound { name: String },
    #[error("MACsec interface {name:?} (ifindex {ifindex}) is gone; it was deleted behind the agent's back, re-create or re-adopt it")]
    InterfaceGone { name: String, ifindex: u32 },
    #[error("interface {name:?} exists but is not a MACsec link (kind {kind}); choose another name or delete it")]
    NotMacsec { name: String, kind: String },
    #[error("MACsec interface {name:?} exists with a different configuration ({mismatch}); delete it or align the config")]
    LinkMismatch { name: String, mismatch: String },
    #[error("{what} on {name:?} is busy (EBUSY) during {op}; {hint}")]
    Busy {
        op: &'static str,
        name: String,
        what: String,
        hint: &'static str,
    },
    #[error("{what} on {name:?} is not installed")]
    NotFound { name: String, what: String },
    #[error("{what} on {name:?} already holds key id {existing}; retire it before installing key id {wanted}")]
    SaOccupied {
        name: String,
        what: String,
        existing: KeyId,
        wanted: KeyId,
    },
    #[error("packet numbers exhausted on {name:?} {what}; install a new key on another AN and switch to it")]
    PnExhausted { name: String, what: String },
    #[error("cipher suite {cipher} is not supported by this kernel ({detail}); pick another cipher or a newer kernel")]
    CipherUnsupported { cipher: Cipher, detail: String },
    #[error(
        "a {cipher} key is {expected} bytes, got {got}; check the key size requested from the KME"
    )]
    KeyLength {
        cipher: Cipher,
        expected: usize,
        got: usize,
    },
    #[error("association number {value} is out of range; MACsec has AN 0..=3")]
    AnOutOfRange { value: u8 },
    #[error("packet number {pn} is invalid for {cipher}: {reason}")]
    InvalidPn {
        pn: u64,
        cipher: Cipher,
        reason: &'static str,
    },
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidArgument {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{op} needs CAP_NET_ADMIN; run the agent as root or grant the capability")]
    PermissionDenied { op: &'static str },
    #[error("{op} on {name:?} failed: {err}{}", .detail.as_deref().map(|d| format!(" (kernel: {d})")).unwrap_or_default())]
    Kernel {
        op: &'static str,
        name: String,
        err: std::io::Error,
        detail: Option<String>,
    },
    #[error("netlink {op} failed: {detail}")]
    Netlink { op: &'static str, detail: String },
}

/// [`Macsec::clear_sas`] could not remove everything: every failure, in the order met, and what
/// it did remove.
#[derive(Debug, thiserror::Error)]
#[error("removing the SAs of {name:?} failed {} time(s): {}; removed: {cleared}", .failures.len(), .failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ClearError {
    pub name: String,
    pub cleared: Cleared,
    pub failures: Vec<MacsecError>,
}

impl MacsecError {
    /// The errno the kernel gave, when this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            MacsecError::Kernel { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }
}

/// Turns a netlink failure into the generic error; callers match the errnos they give meaning
/// to before falling back to this.
fn kernel_err(op: &'static str, name: &str, e: NlError) -> MacsecError {
    match e {
        NlError::Kernel { errno, .. } if errno == libc::EPERM => {
            MacsecError::PermissionDenied { op }
        }
        NlError::Kernel { errno, msg } => MacsecError::Kernel {
            op,
            name: name.to_owned(),
            err: std::io::Error::from_raw_os_error(errno),
            detail: msg,
        },
        NlError::Io(err) => MacsecError::Kernel {
            op,
            name: name.to_owned(),
            err,
            detail: None,
        },
        NlError::Malformed(what) => MacsecError::Netlink {
            op,
            detail: what.to_owned(),
        },
        NlError::TooLarge => MacsecError::Netlink {
            op,
            detail: "request larger than the fixed message buffer".to_owned(),
        },
    }
}

fn errno_of(e: &NlError) -> Option<i32> {
    match e {
        NlError::Kernel { errno, .. } => Some(*errno),
        _ => None,
    }
}

/// The owner of the two netlink sockets that drive kernel MACsec.
pub struct Macsec {
    route: NlConn,
    genl: NlConn,
    family: u16,
}

impl std::fmt::Debug for Macsec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Macsec")
            .field("genl_family", &self.family)
            .finish_non_exhaustive()
    }
}

impl Macsec {
    /// Opens both sockets and resolves the `macsec` generic netlink family. Fails with
    /// [`MacsecError::NoKernelSupport`] on a kernel without MACsec.
    pub fn open() -> Result<Self, MacsecError> {
        let route = NlConn::open(NlFamily::Route)
            .map_err(|e| kernel_err("open rtnetlink socket", "-", e))?;
        let mut genl = NlConn::open(NlFamily::Generic)
            .map_err(|e| kernel_err("open generic netlink socket", "-", e))?;
        let family = match genl.resolve_genl_family("macsec") {
            Ok(id) => id,
            Err(e) if errno_of(&e) == Some(libc::ENOENT) => {
                return Err(MacsecError::NoKernelSupport {
                    detail: "generic netlink family \"macsec\" not found".to_owned(),
                })
            }
            Err(e) => return Err(kernel_err("resolve generic netlink family macsec", "-", e)),
        };
        tracing::debug!(family, "macsec generic netlink family resolved");
        Ok(Self {
            route,
            genl,
            family,
        })
    }
}

/// What [`Macsec::adopt`] found: the link and its full key state, left untouched.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub link: MacsecLink,
    pub state: SecyState,
}

impl Macsec {
    /// Reads an existing MACsec link named `cfg.name` and its state (SCs, SAs, encoding SA, next
    /// PNs) without changing anything, so a restarted agent carries on where the previous one
    /// stopped and traffic is never interrupted. `Ok(None)`: nothing to adopt, create the link.
    /// A link whose settings differ from `cfg` is an error: it is not ours to reconfigure.
    pub fn adopt(&mut self, cfg: &LinkConfig) -> Result<Option<Adopted>, MacsecError> {
        cfg.check()?;
        let Some(link) = self.find_link(&cfg.name)? else {
            return Ok(None);
        };
        let mut mismatch = link.mismatches(cfg);
        match self.raw_link_by_name(&cfg.lower)? {
            Some(lower) if lower.ifindex == link.lower_ifindex => {}
            Some(lower) => mismatch.push(format!(
                "lower: have ifindex {}, want {} ({})",
                link.lower_ifindex, lower.ifindex, cfg.lower
            )),
            None => {
                return Err(MacsecError::InterfaceNotFound {
                    name: cfg.lower.clone(),
                })
            }
        }
        if !mismatch.is_empty() {
            return Err(MacsecError::LinkMismatch {
                name: cfg.name.clone(),
                mismatch: mismatch.join("; "),
            });
        }
        let state = self.state(&link)?;
        tracing::info!(
            link = %link.name,
            encoding_sa = %state.encoding_sa,
            tx_sas = state.tx_sas.len(),
            rx_scs = state.rx_scs.len(),
            "adopted existing MACsec state"
        );
        Ok(Some(Adopted { link, state }))
    }

    /// Adopts the link if it exists (matching `cfg`), otherwise creates it.
    pub fn ensure_link(&mut self, cfg: &LinkConfig) -> Result<Adopted, MacsecError> {
        if let Some(a) = self.adopt(cfg)? {
            return Ok(a);
        }
        let link = self.create_link(cfg)?;
        let state = self.state(&link)?;
        Ok(Adopted { link, state })
    }
}
