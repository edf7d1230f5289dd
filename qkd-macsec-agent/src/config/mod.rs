//! The gateway configuration: one TOML file per gateway, one or more `[[link]]`s.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere, so a typo is an error rather than a
//! silently ignored option) and every semantic rule is checked once at load by [`Config::validate`],
//! with messages that point at the field, e.g. `link[0].akl.warn_at: 0.95 must be below 1.0`.
//! `docs/sample-config.toml` documents every option and its default; the tests load it.
//!
//! Paths (CA, certificate, key, bpffs) are checked only for shape here: whether the files exist
//! and fit together is the job of `certs` (the `doctor` diagnostics) at startup, where the error
//! can say more than "not found".

mod duration;
mod params;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::{parse_duration, HumanDuration};

/// What went wrong loading a config file. Every variant names the file or the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field, a wrong type or an unparsable value. `field` is the path
    /// of the offending field as far as the parser got (e.g. `link[0].cipher`).
    #[error("{origin}: {field}: {message}")]
    Parse {
        origin: String,
        field: String,
        message: String,
    },
    /// A value that parsed but breaks a rule; `field` as above.
    #[error("{origin}: {field}: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted path of the field the error is about (empty for I/O errors).
    pub fn field(&self) -> &str {
        match self {
            ConfigError::Read { .. } => "",
            ConfigError::Parse { field, .. } | ConfigError::Invalid { field, .. } => field,
        }
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Options that are not per link. Optional; every field has a default.
    #[serde(default)]
    pub global: Global,
    /// One entry per protected Ethernet link. At least one.
    #[serde(default)]
    pub link: Vec<Link>,
}

/// Process-wide options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Global {
    /// Where the eBPF maps and programs are pinned. Default `/sys/fs/bpf/qkd-macsec`.
    pub bpffs_pin_dir: PathBuf,
    /// Unix socket serving the status (JSON). Default `/run/qkd-macsec-agent/status.sock`.
    pub status_socket: PathBuf,
    /// Where the agent records, per link, which key is active and since when (key_ID, AN, age;
    /// never key bytes), so that a restarted agent can adopt the kernel's SAs and keep
    /// enforcing their lifetime. Belongs on a tmpfs: the record must not outlive a reboot, which
    /// also clears the kernel's SAs. Default `/run/qkd-macsec-agent/state`.
    pub state_dir: PathBuf,
    /// Where the agent keeps, per link, the key_IDs of every QKD key it has installed, so that
    /// no restart, replayed message or KME that serves a key twice can make a key protect
    /// traffic twice (AES-GCM nonce reuse). Must survive reboots: not a tmpfs. Private to root
    /// (checked at every use). Default `/var/lib/qkd-macsec-agent`.
    pub ledger_dir: PathBuf,
    /// Address of the Prometheus-style metrics endpoint; absent = disabled (the default).
    /// Loopback only unless `metrics_allow_remote` (the endpoint has no TLS and no auth).
    pub metrics_address: Option<SocketAddr>,
    /// Allow a non-loopback `metrics_address`. Default false.
    pub metrics_allow_remote: bool,
    /// Group (name or numeric gid) that may read the status socket besides root. Default: none
    /// (root only). The socket is mode 0660, its directory 0750.
    pub status_group: Option<String>,
    /// Command run on every alarm raise and clear (docs/alarms.md). Default: none.
    pub alarm_hook: Option<AlarmHook>,
    /// `error`, `warn`, `info` (default), `debug` or `trace`. `QKD_MACSEC_LOG` overrides it.
    pub log_level: String,
}

/// An operator command run on alarms: an argv list (no shell), with the alarm in environment
/// variables (`QKD_MACSEC_ALARM_ID` etc., docs/alarms.md); never key material.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlarmHook {
    /// Program (absolute path) and its arguments.
    pub command: Vec<String>,
    /// Kill the hook after this long. Default `10s`.
    #[serde(default = "default_hook_timeout")]
    pub timeout: HumanDuration,
}

fn default_hook_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

impl Default for Global {
    fn default() -> Self {
        Self {
            bpffs_pin_dir: PathBuf::from("/sys/fs/bpf/qkd-macsec"),
            status_socket: PathBuf::from("/run/qkd-macsec-agent/status.sock"),
            state_dir: PathBuf::from("/run/qkd-macsec-agent/state"),
            ledger_dir: PathBuf::from("/var/lib/qkd-macsec-agent"),
            metrics_address: None,
            metrics_allow_remote: false,
            status_group: None,
            alarm_hook: None,
            log_level: "info".into(),
        }
    }
}

pub use crate::cipher::Cipher;
pub use crate::keyx::Role;
pub use crate::profile::ProfileKind;

/// Who fetches keys with `enc_keys` and announces them (master) and who fetches by key_ID with
/// `dec_keys` (slave).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleSetting {
    Master,
    Slave,
    /// The gateway whose local SAE-ID sorts first (bytewise) is master. Both ends compute the
    /// same answer from the same two IDs, so no negotiation is needed.
    Auto,
}

/// One protected link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// A label for logs and the status socket. Default: the MACsec interface name.
    #[serde(default)]
    pub name: Option<String>,
    /// The Ethernet interface MACsec runs on (and LLDP is sent on).
    pub lower_interface: String,
    /// The MACsec interface to create on top of it.
    pub macsec_interface: String,
    /// Cipher suite. Default `gcm-aes-256`.
    #[serde(default = "default_cipher")]
    pub cipher: Cipher,
    /// This gateway's SAE-ID at its KME.
    pub local_sae_id: String,
    /// The peer gateway's SAE-ID.
    pub peer_sae_id: String,
    /// `master`, `slave` or `auto` (default).
    #[serde(default = "default_role")]
    pub role: RoleSetting,
    /// `cak` or `sak` (default).
    #[serde(default = "default_profile")]
    pub profile: ProfileKind,
    /// 1/f_QKD: how often a new QKD key is requested. Default `5m`.
    #[serde(default = "default_key_request_interval")]
    pub key_request_interval: HumanDuration,
    /// The ETSI GS QKD 014 endpoint of this gateway's KME.
    pub kme: Kme,
    /// Active key lifetime of a SAK. All fields default.
    #[serde(default)]
    pub akl: Akl,
    /// `sak` profile options.
    #[serde(default)]
    pub sak: SakProfile,
    /// `cak` profile options.
    #[serde(default)]
    pub cak: CakProfile,
    /// The LLDP TLV that carries the key-ID exchange.
    #[serde(default)]
    pub lldp: Lldp,
    /// Key-ID exchange timing.
    #[serde(default)]
    pub keyx: KeyxTiming,
}

fn default_cipher() -> Cipher {
    Cipher::GcmAes256
}
fn default_role() -> RoleSetting {
    RoleSetting::Auto
}
fn default_profile() -> ProfileKind {
    ProfileKind::Sak
}
fn default_key_request_interval() -> HumanDuration {
    HumanDuration::from_secs(300)
}

/// The KME (ETSI GS QKD 014 over mutual TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kme {
    /// Base URL, `https://host[:port]` (the client appends `/api/v1/keys/...`).
    pub url: String,
    /// CA certificate (PEM) that signed the KME's server certificate.
    pub ca: PathBuf,
    /// This SAE's client certificate (PEM).
    pub cert: PathBuf,
    /// This SAE's private key (PEM).
    pub key: PathBuf,
    /// How long the peer KME keeps a key after the master fetched it. ETSI 014 does not define
    /// this; one vendor's KME dropped keys after 10 s. The master treats a key the slave has
    /// not acknowledged within this window as lost. Default `10s`.
    #[serde(default = "default_availability_window")]
    pub availability_window: HumanDuration,
    /// Timeout of one KME request. Default `5s`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
}

fn default_availability_window() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_request_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

/// Active key lifetime of a SAK: whichever of time and packet number runs out first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Akl {
    /// Longest time a SAK may protect traffic. Default `10m`.
    pub max_age: HumanDuration,
    /// Highest PN (frames sent under one SAK) before it must be retired. Default: 0xC000_0000
    /// for non-XPN suites (as wpa_supplicant's MKA) and 2^62 for XPN suites; must not exceed
    /// the suite's PN space.
    pub max_pn: Option<u64>,
    /// Fraction of the lifetime at which a rollover to the next key is requested. Default 0.75.
    pub rollover_at: f64,
    /// Fraction of the lifetime at which a warning is raised if the key has not rolled over yet.
    /// Default 0.9. Must lie between `rollover_at` and 1.0.
    pub warn_at: f64,
}

impl Default for Akl {
    fn default() -> Self {
        Self {
            max_age: HumanDuration::from_secs(600),
            max_pn: None,
            rollover_at: 0.75,
            warn_at: 0.9,
        }
    }
}

impl Akl {
    /// `max_pn` with the per-suite default applied.
    pub fn effective_max_pn(&self, cipher: Cipher) -> u64 {
        self.max_pn.unwrap_or(if cipher.is_xpn() {
            1 << 62
        } else {
            0xC000_0000
        })
    }
}

/// Mode 2 options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SakProfile {
    /// k: how many SAKs to hold pre-fetched (and exchanged) ahead of need. Default 10.
    pub buffer: u32,
}

impl Default for SakProfile {
    fn default() -> Self {
        Self { buffer: 10 }
    }
}

/// Mode 1 options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CakProfile {
    /// How long one CAK may be used (SAKs derived from it). Default `30d`.
    pub lifetime: HumanDuration,
    /// n: consecutive failed key requests tolerated while the CAK lifetime lasts. Default 3.
    pub tolerated_failures: u32,
}

impl Default for CakProfile {
    fn default() -> Self {
        Self {
            lifetime: HumanDuration::from_secs(30 * 86_400),
            tolerated_failures: 3,
        }
    }
}

/// The organizationally specific LLDP TLV (IEEE 802.1AB clause 8.6) carrying the exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lldp {
    /// OUI or CID as `xx:xx:xx`. Default `5a:51:4b` (locally administered, "ZQK": the
    /// project's default, [`qkd_macsec_common::LLDP_OUI`]; use your organisation's own OUI/CID
    /// in production).
    pub oui: String,
    /// Organizationally defined subtype. Default 1.
    pub subtype: u8,
    /// TLVs per second the data plane hands to the agent from one source MAC other than the
    /// located peer's; the excess is dropped in XDP. Default 10.
    pub rate_per_source: u32,
    /// Burst of `rate_per_source`. Default 20.
    pub burst_per_source: u32,
    /// TLVs per second from all sources other than the located peer together (per link).
    /// Default 20.
    pub rate_others: u32,
    /// Burst of `rate_others`. Default 40.
    pub burst_others: u32,
    /// TLVs per second from the located peer's MAC (its own bucket, so that a flood from other
    /// sources cannot starve it). Default 100.
    pub rate_peer: u32,
    /// Burst of `rate_peer`. Default 200.
    pub burst_peer: u32,
}

/// Largest rate or burst accepted for the LLDP limits: far above what the exchange sends, low
/// enough that a typo (an extra few zeros) is caught.
pub const MAX_LLDP_RATE: u32 = 100_000;

impl Default for Lldp {
    fn default() -> Self {
        Self {
            oui: "5a:51:4b".into(),
            subtype: qkd_macsec_common::LLDP_SUBTYPE,
            rate_per_source: 10,
            burst_per_source: 20,
            rate_others: 20,
            burst_others: 40,
            rate_peer: 100,
            burst_peer: 200,
        }
    }
}

impl Lldp {
    /// The OUI as three bytes. Only valid after [`Config::validate`].
    pub fn oui_bytes(&self) -> [u8; 3] {
        parse_oui(&self.oui).unwrap_or([0; 3])
    }

    /// The data plane's rate limits (docs/dataplane.md).
    pub fn rate_limits(&self) -> qkd_macsec_common::LldpRateLimits {
        use qkd_macsec_common::Gcra;
        qkd_macsec_common::LldpRateLimits {
            per_source: Gcra::new(self.rate_per_source, self.burst_per_source),
            others: Gcra::new(self.rate_others, self.burst_others),
            peer: Gcra::new(self.rate_peer, self.burst_peer),
        }
    }
}

/// Key-ID exchange timing (see docs/protocol.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyxTiming {
    /// First retransmission delay of an unacknowledged announce. Default `250ms`.
    pub retransmit_initial: HumanDuration,
    /// Ceiling of the exponential backoff. Default `4s`.
    pub retransmit_max: HumanDuration,
    /// Interval of the status (hello) message while nothing else is sent. Default `5s`.
    pub hello_interval: HumanDuration,
    /// Received TLVs processed per second at most; the rest are dropped. Default 50.
    pub max_rx_per_sec: u32,
}

impl Default for KeyxTiming {
    fn default() -> Self {
        Self {
            retransmit_initial: HumanDuration::from_millis(250),
            retransmit_max: HumanDuration::from_secs(4),
            hello_interval: HumanDuration::from_secs(5),
            max_rx_per_sec: 50,
        }
    }
}

pub use crate::keyx::wire::MAX_SENDER_LEN as MAX_SAE_ID_LEN;

impl Link {
    /// The label used in logs.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.macsec_interface)
    }

    /// The role after resolving `auto`: the lexicographically smaller SAE-ID is master.
    pub fn role(&self) -> Role {
        match self.role {
            RoleSetting::Master => Role::Master,
            RoleSetting::Slave => Role::Slave,
            RoleSetting::Auto => {
                if self.local_sae_id.as_bytes() < self.peer_sae_id.as_bytes() {
                    Role::Master
                } else {
                    Role::Slave
                }
            }
        }
    }
}

fn parse_oui(s: &str) -> Option<[u8; 3]> {
    let mut out = [0u8; 3];
    let mut parts = s.split([':', '-']);
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors (usually the path).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_err = |field: String, e: &dyn std::fmt::Display| ConfigError::Parse {
            origin: origin.to_owned(),
            field,
            // toml's message carries line, column and the offending line; keep it whole.
            message: e.to_string().trim_end().to_owned(),
        };
        let de = toml::Deserializer::parse(text).map_err(|e| parse_err("(syntax)".into(), &e))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            // An unknown key at the top level has an empty path (found by the `config` fuzz
            // target with `"" = 1`): still say where.
            let field = match e.path().to_string() {
                p if p.is_empty() || p == "." => "(top level)".to_owned(),
                p => p,
            };
            parse_err(field, e.inner())
        })?;
        cfg.validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                origin: origin.to_owned(),
                field,
                message,
            })?;
        Ok(cfg)
    }

    /// Every rule a parsed config must satisfy. Returns `(field, message)` of the first breach.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let g = &self.global;
        if !matches!(
            g.log_level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err((
                "global.log_level".into(),
                format!(
                    "{:?} is not a level; use error, warn, info, debug or trace",
                    g.log_level
                ),
            ));
        }
        for (name, p) in [
            ("global.bpffs_pin_dir", &g.bpffs_pin_dir),
            ("global.status_socket", &g.status_socket),
            ("global.state_dir", &g.state_dir),
            ("global.ledger_dir", &g.ledger_dir),
        ] {
            if !p.is_absolute() {
                return Err((
                    name.into(),
                    format!("{} must be an absolute path", p.display()),
                ));
            }
        }
        if let Some(a) = g.metrics_address {
            if !a.ip().is_loopback() && !g.metrics_allow_remote {
                return Err((
                    "global.metrics_address".into(),
                    format!(
                        "{a} is not a loopback address; the metrics endpoint has no TLS or authentication. Use 127.0.0.1 or [::1] (and a reverse proxy), or set global.metrics_allow_remote = true"
                    ),
                ));
            }
        }
        if let Some(grp) = &g.status_group {
            if grp.is_empty()
                || grp.len() > 32
                || grp.chars().any(|c| c.is_whitespace() || c == ':')
            {
                return Err((
                    "global.status_group".into(),
                    format!("{grp:?} is not a group name or gid"),
                ));
            }
        }
        if let Some(h) = &g.alarm_hook {
            match h.command.first() {
                None => {
                    return Err((
                        "global.alarm_hook.command".into(),
                        "is empty; give the program's absolute path and its arguments".into(),
                    ))
                }
                Some(p) if !Path::new(p).is_absolute() => {
                    return Err((
                        "global.alarm_hook.command".into(),
                        format!("{p:?} must be an absolute path (the hook runs without a shell or PATH search)"),
                    ))
                }
                Some(_) => {}
            }
            if h.timeout.get() < Duration::from_millis(100)
                || h.timeout.get() > Duration::from_secs(300)
            {
                return Err((
                    "global.alarm_hook.timeout".into(),
                    format!("{} must be between 100ms and 5m", h.timeout),
                ));
            }
        }
        if self.link.is_empty() {
            return Err((
                "link".into(),
                "no [[link]] configured; add at least one".into(),
            ));
        }
        let mut macsec_names = HashSet::new();
        let mut lowers = HashSet::new();
        let mut pairs = HashSet::new();
        for (i, l) in self.link.iter().enumerate() {
            let f = |name: &str| format!("link[{i}].{name}");
            validate_link(l, &f)?;
            if !macsec_names.insert(l.macsec_interface.as_str()) {
                return Err((
                    f("macsec_interface"),
                    format!("{:?} is used by an earlier link", l.macsec_interface),
                ));
            }
            if !lowers.insert(l.lower_interface.as_str()) {
                return Err((
                    f("lower_interface"),
                    format!(
                        "{:?} is used by an earlier link; one MACsec link per interface",
                        l.lower_interface
                    ),
                ));
            }
            if !pairs.insert((l.local_sae_id.as_str(), l.peer_sae_id.as_str())) {
                return Err((
                    f("peer_sae_id"),
                    format!(
                        "the SAE pair {:?} -> {:?} is used by an earlier link; key_IDs would be ambiguous",
                        l.local_sae_id, l.peer_sae_id
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn validate_ifname(field: String, v: &str) -> Result<(), (String, String)> {
    // Linux IFNAMSIZ is 16 including the NUL; dev_valid_name() rejects '/', ':' and whitespace.
    if v.is_empty() || v.len() > 15 {
        return Err((
            field,
            format!("{v:?} must be 1 to 15 bytes long (Linux IFNAMSIZ)"),
        ));
    }
    if v == "." || v == ".." || v.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err((
            field,
            format!(
                "{v:?} is not a valid interface name ('/', ':' and whitespace are not allowed)"
            ),
        ));
    }
    Ok(())
}

fn validate_sae_id(field: String, v: &str) -> Result<(), (String, String)> {
    if v.is_empty() || v.len() > MAX_SAE_ID_LEN {
        return Err((
            field,
            format!("{v:?} must be 1 to {MAX_SAE_ID_LEN} bytes long"),
        ));
    }
    // The SAE-ID is a path segment of the ETSI 014 URL and travels in the TLV: keep it to
    // characters that need no escaping anywhere.
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
    {
        return Err((
            field,
            format!("{v:?} may only contain ASCII letters, digits, '-', '_', '.' and '~'"),
        ));
    }
    Ok(())
}

fn validate_fraction(field: String, v: f64) -> Result<(), (String, String)> {
    if !v.is_finite() || v <= 0.0 {
        return Err((field, format!("{v} must be above 0.0")));
    }
    if v >= 1.0 {
        return Err((field, format!("{v} must be below 1.0")));
    }
    Ok(())
}

fn validate_link(l: &Link, f: &dyn Fn(&str) -> String) -> Result<(), (String, String)> {
    if let Some(n) = &l.name {
        if n.is_empty() || n.len() > 64 || n.chars().any(char::is_control) {
            return Err((
                f("name"),
                format!("{n:?} must be 1 to 64 printable characters"),
            ));
        }
    }
    validate_ifname(f("lower_interface"), &l.lower_interface)?;
    validate_ifname(f("macsec_interface"), &l.macsec_interface)?;
    if l.lower_interface == l.macsec_interface {
        return Err((
            f("macsec_interface"),
            format!(
                "{:?} is also the lower interface; pick a different name",
                l.macsec_interface
            ),
        ));
    }
    validate_sae_id(f("local_sae_id"), &l.local_sae_id)?;
    validate_sae_id(f("peer_sae_id"), &l.peer_sae_id)?;
    if l.local_sae_id == l.peer_sae_id {
        return Err((
            f("peer_sae_id"),
            format!(
                "{:?} equals local_sae_id; the two gateways need distinct SAE-IDs",
                l.peer_sae_id
            ),
        ));
    }
    let min_interval = Duration::from_secs(1);
    if l.key_request_interval.get() < min_interval {
        return Err((
            f("key_request_interval"),
            format!(
                "{} is below the minimum of 1s; a KME cannot sustain that and the exchange cannot complete",
                l.key_request_interval
            ),
        ));
    }

    // KME
    let url = &l.kme.url;
    let Some(rest) = url.strip_prefix("https://") else {
        return Err((
            f("kme.url"),
            format!("{url:?} must start with https:// (ETSI GS QKD 014 requires TLS)"),
        ));
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err((
            f("kme.url"),
            format!("{url:?} must be https://host[:port][/prefix] without query or fragment"),
        ));
    }
    for (name, p) in [
        ("kme.ca", &l.kme.ca),
        ("kme.cert", &l.kme.cert),
        ("kme.key", &l.kme.key),
    ] {
        if p.as_os_str().is_empty() {
            return Err((
                f(name),
                "must not be empty; give the PEM file's path".into(),
            ));
        }
    }
    if l.kme.availability_window.get() < Duration::from_secs(1) {
        return Err((
            f("kme.availability_window"),
            format!("{} is below the minimum of 1s", l.kme.availability_window),
        ));
    }
    if l.kme.request_timeout.get().is_zero() {
        return Err((f("kme.request_timeout"), "0s must be above zero".into()));
    }

    // AKL
    let akl = &l.akl;
    if akl.max_age.get() < Duration::from_secs(1) {
        return Err((
            f("akl.max_age"),
            format!("{} is below the minimum of 1s", akl.max_age),
        ));
    }
    if let Some(pn) = akl.max_pn {
        if pn == 0 {
            return Err((f("akl.max_pn"), "0 must be above zero".into()));
        }
        if pn > l.cipher.max_pn() {
            return Err((
                f("akl.max_pn"),
                format!(
                    "{pn:#x} exceeds the PN space of {} ({:#x}); use an XPN suite or a smaller value",
                    l.cipher.ip_name(),
                    l.cipher.max_pn()
                ),
            ));
        }
    }
    validate_fraction(f("akl.rollover_at"), akl.rollover_at)?;
    validate_fraction(f("akl.warn_at"), akl.warn_at)?;
    if akl.warn_at <= akl.rollover_at {
        return Err((
            f("akl.warn_at"),
            format!(
                "{} must be above akl.rollover_at ({}): the warning says a requested rollover is late",
                akl.warn_at, akl.rollover_at
            ),
        ));
    }

    // Profiles
    match l.profile {
        ProfileKind::Sak => {
            if !(1..=64).contains(&l.sak.buffer) {
                return Err((
                    f("sak.buffer"),
                    format!("{} must be between 1 and 64", l.sak.buffer),
                ));
            }
            // One key is consumed per rollover (at the latest, at akl.rollover_at of max_age)
            // and one fetched per request interval: if fetching is slower, the buffer drains
            // however well the KME works, and k only postpones the stall.
            let rollover_period = akl.max_age.get().mul_f64(akl.rollover_at);
            if l.key_request_interval.get() > rollover_period {
                return Err((
                    f("key_request_interval"),
                    format!(
                        "{} is longer than one SAK lasts ({} = akl.max_age × akl.rollover_at); the key buffer would drain",
                        l.key_request_interval,
                        HumanDuration(rollover_period)
                    ),
                ));
            }
        }
        ProfileKind::Cak => {
            let c = &l.cak;
            // n tolerated failures means n+1 request intervals must fit in one CAK lifetime.
            let need = l
                .key_request_interval
                .get()
                .checked_mul(c.tolerated_failures.saturating_add(1))
                .unwrap_or(Duration::MAX);
            if c.lifetime.get() <= need {
                return Err((
                    f("cak.lifetime"),
                    format!(
                        "{} must exceed key_request_interval × (cak.tolerated_failures + 1) = {} × {}, or {} failed requests would outlive the CAK",
                        c.lifetime,
                        l.key_request_interval,
                        u64::from(c.tolerated_failures) + 1,
                        c.tolerated_failures
                    ),
                ));
            }
        }
    }

    // LLDP
    if parse_oui(&l.lldp.oui).is_none() {
        return Err((
            f("lldp.oui"),
            format!(
                "{:?} is not an OUI; write three hex bytes like \"5a:51:4b\"",
                l.lldp.oui
            ),
        ));
    }

    for (name, v) in [
        ("lldp.rate_per_source", l.lldp.rate_per_source),
        ("lldp.burst_per_source", l.lldp.burst_per_source),
        ("lldp.rate_others", l.lldp.rate_others),
        ("lldp.burst_others", l.lldp.burst_others),
        ("lldp.rate_peer", l.lldp.rate_peer),
        ("lldp.burst_peer", l.lldp.burst_peer),
    ] {
        if v == 0 {
            return Err((
                f(name),
                "0 would drop every key-exchange TLV; use at least 1".into(),
            ));
        }
        if v > MAX_LLDP_RATE {
            return Err((
                f(name),
                format!("{v} is above the maximum of {MAX_LLDP_RATE}; the exchange sends a few TLVs per second"),
            ));
        }
    }
    if l.lldp.rate_per_source > l.lldp.rate_others {
        return Err((
            f("lldp.rate_per_source"),
            format!(
                "{} must not exceed lldp.rate_others ({}): one source cannot get more than all of them together",
                l.lldp.rate_per_source, l.lldp.rate_others
            ),
        ));
    }

    // Key-ID exchange timing
    let k = &l.keyx;
    if k.retransmit_initial.get() < Duration::from_millis(10) {
        return Err((
            f("keyx.retransmit_initial"),
            format!("{} is below the minimum of 10ms", k.retransmit_initial),
        ));
    }
    if k.retransmit_max < k.retransmit_initial {
        return Err((
            f("keyx.retransmit_max"),
            format!(
                "{} must be at least keyx.retransmit_initial ({})",
                k.retransmit_max, k.retransmit_initial
            ),
        ));
    }
    if k.retransmit_max.get() >= l.kme.availability_window.get() {
        return Err((
            f("keyx.retransmit_max"),
            format!(
                "{} must be below kme.availability_window ({}), or a lost announce is retried only after the key is gone",
                k.retransmit_max, l.kme.availability_window
            ),
        ));
    }
    if k.hello_interval.get() < Duration::from_millis(100) {
        return Err((
            f("keyx.hello_interval"),
            format!("{} is below the minimum of 100ms", k.hello_interval),
        ));
    }
    if k.max_rx_per_sec == 0 {
        return Err((
            f("keyx.max_rx_per_sec"),
            "0 would drop every message; use at least 1".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
