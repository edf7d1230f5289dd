//! Value types of the MACsec control plane: cipher suites, SCIs, association numbers, key ids,
//! XPN parameters, the link configuration and the state read back from the kernel.

use std::fmt;
use std::str::FromStr;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::MacsecError;
use crate::secret::SecretBytes;

pub use crate::cipher::Cipher;

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ip_name().to_uppercase())
    }
}

impl FromStr for Cipher {
    type Err = MacsecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.ip_name().eq_ignore_ascii_case(s))
            .ok_or_else(|| MacsecError::InvalidArgument {
                field: "cipher",
                value: s.to_owned(),
                reason: "expected gcm-aes-128, gcm-aes-256, gcm-aes-xpn-128 or gcm-aes-xpn-256",
            })
    }
}

/// Secure Channel Identifier: the sender's MAC address followed by a 16-bit port, as one
/// big-endian number (the way `ip macsec show` prints it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sci(pub u64);

impl Sci {
    pub fn from_mac_port(mac: [u8; 6], port: u16) -> Self {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&mac);
        b[6..].copy_from_slice(&port.to_be_bytes());
        Sci(u64::from_be_bytes(b))
    }

    pub fn mac(self) -> [u8; 6] {
        let b = self.0.to_be_bytes();
        [b[0], b[1], b[2], b[3], b[4], b[5]]
    }

    pub fn port(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The kernel keeps an SCI as a big-endian 64-bit value and copies it raw into attributes.
    pub(crate) fn wire(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub(crate) fn from_wire(p: &[u8]) -> Option<Self> {
        Some(Sci(u64::from_be_bytes(p.get(..8)?.try_into().ok()?)))
    }
}

impl fmt::Display for Sci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Association Number 0..=3: which of the four SA slots of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct An(u8);

impl An {
    pub fn new(value: u8) -> Result<Self, MacsecError> {
        if value < 4 {
            Ok(An(value))
        } else {
            Err(MacsecError::AnOutOfRange { value })
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// The next slot in rotation, the one a rollover moves to.
    pub fn next(self) -> Self {
        An((self.0 + 1) % 4)
    }
}

impl fmt::Display for An {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The kernel's 16-byte key identifier of an SA. The agent derives it from the ETSI 014 key_ID
/// (a UUID) so that `ip macsec show` and the state dump name the QKD key in use. Not secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// Parses a UUID in its textual form (with or without hyphens, any case).
    pub fn from_uuid(uuid: &str) -> Result<Self, MacsecError> {
        let hex: Vec<u8> = uuid.bytes().filter(|b| *b != b'-').collect();
        let bad = || MacsecError::InvalidArgument {
            field: "key_ID",
            value: uuid.to_owned(),
            reason: "expected a UUID (32 hex digits, hyphens optional)",
        };
        let grouped_ok = uuid.len() == 32
            || (uuid.len() == 36
                && [8, 13, 18, 23]
                    .iter()
                    .all(|&i| uuid.as_bytes().get(i) == Some(&b'-')));
        if hex.len() != 32 || !grouped_ok {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
        }
        Ok(KeyId(out))
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The 12-byte XPN salt. It is derived from keying material, so it is wiped and never shown.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Salt([u8; 12]);

impl Salt {
    pub fn new(bytes: [u8; 12]) -> Self {
        Salt(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, MacsecError> {
        let arr: [u8; 12] = bytes.try_into().map_err(|_| MacsecError::InvalidArgument {
            field: "salt",
            value: format!("{} bytes", bytes.len()),
            reason: "an XPN salt is exactly 12 bytes",
        })?;
        Ok(Salt(arr))
    }

    pub fn expose(&self) -> &[u8; 12] {
        &self.0
    }
}

impl fmt::Debug for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Salt(redacted)")
    }
}

/// The per-SA parameters of the XPN cipher suites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XpnParams {
    /// Short SCI: a 32-bit stand-in for the SCI in the XPN IV, unique per SC under one key.
    pub ssci: u32,
    pub salt: Salt,
}

/// Everything that goes into one SA besides its AN and PN: the SAK, its id, and for XPN the
/// SSCI and salt.
#[derive(Debug)]
pub struct SaKey {
    pub key: SecretBytes,
    pub key_id: KeyId,
    pub xpn: Option<XpnParams>,
}

impl SaKey {
    pub fn new(key: SecretBytes, key_id: KeyId) -> Self {
        Self {
            key,
            key_id,
            xpn: None,
        }
    }

    pub fn with_xpn(mut self, ssci: u32, salt: Salt) -> Self {
        self.xpn = Some(XpnParams { ssci, salt });
        self
    }

    /// Checks the key against the link's cipher before anything reaches the kernel: the kernel
    /// answers a wrong length only with EINVAL and a line in dmesg.
    pub fn check(&self, cipher: Cipher) -> Result<(), MacsecError> {
        if self.key.len() != cipher.key_len() {
            return Err(MacsecError::KeyLength {
                cipher,
                expected: cipher.key_len(),
                got: self.key.len(),
            });
        }
        match (cipher.is_xpn(), &self.xpn) {
            (true, None) => Err(MacsecError::InvalidArgument {
                field: "xpn",
                value: cipher.to_string(),
                reason: "XPN cipher suites need an SSCI and a 12-byte salt for every SA",
            }),
            (false, Some(_)) => Err(MacsecError::InvalidArgument {
                field: "xpn",
                value: cipher.to_string(),
                reason: "SSCI/salt given for a non-XPN cipher suite; drop them or use an XPN suite",
            }),
            _ => Ok(()),
        }
    }
}

/// validateFrames of IEEE 802.1AE 10.7.8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Validation {
    Disabled,
    Check,
    #[default]
    Strict,
}

impl Validation {
    pub(crate) fn to_kernel(self) -> u8 {
        match self {
            Validation::Disabled => 0,
            Validation::Check => 1,
            Validation::Strict => 2,
        }
    }

    pub(crate) fn from_kernel(v: u8) -> Option<Self> {
        match v {
            0 => Some(Validation::Disabled),
            1 => Some(Validation::Check),
            2 => Some(Validation::Strict),
            _ => None,
        }
    }
}

/// What to create: a MACsec SecY over a lower Ethernet device. Defaults follow the project's
/// security stance: encrypt, protect, replay protection with window 0, strict validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Name of the MACsec interface (at most 15 bytes).
    pub name: String,
    /// The Ethernet device it sits on.
    pub lower: String,
    pub cipher: Cipher,
    /// ICV length in bytes: 16 (default) or 8, 12..15.
    pub icv_len: u8,
    pub encrypt: bool,
    pub protect: bool,
    pub include_sci: bool,
    pub end_station: bool,
    pub scb: bool,
    pub replay_protect: bool,
    /// Replay window in packets (0: strictly increasing PNs).
    pub window: u32,
    pub validation: Validation,
    /// Port part of the SCI (the MAC part is the lower device's address).
    pub port: u16,
    /// The AN the TX side starts on.
    pub encoding_sa: An,
}

impl LinkConfig {
    pub fn new(name: &str, lower: &str, cipher: Cipher) -> Self {
        Self {
            name: name.to_owned(),
            lower: lower.to_owned(),
            cipher,
            icv_len: 16,
            encrypt: true,
            protect: true,
            include_sci: true,
            end_station: false,
            scb: false,
            replay_protect: true,
            window: 0,
            validation: Validation::Strict,
            port: 1,
            encoding_sa: An(0),
        }
    }

    /// The combinations the kernel would reject, caught with a message naming the field.
    pub fn check(&self) -> Result<(), MacsecError> {
        if self.name.is_empty() || self.name.len() > 15 || self.name.contains(['/', ' ']) {
            return Err(MacsecError::InvalidArgument {
                field: "name",
                value: self.name.clone(),
                reason: "an interface name is 1..15 bytes without '/' or spaces",
            });
        }
        if !(self.icv_len == 8 || (12..=16).contains(&self.icv_len)) {
            return Err(MacsecError::InvalidArgument {
                field: "icv_len",
                value: self.icv_len.to_string(),
                reason: "GCM supports ICV lengths 8 and 12..16 bytes",
            });
        }
        let exclusive = [self.include_sci, self.end_station, self.scb]
            .iter()
            .filter(|b| **b)
            .count();
        if exclusive > 1 {
            return Err(MacsecError::InvalidArgument {
                field: "include_sci/end_station/scb",
                value: format!(
                    "include_sci={} end_station={} scb={}",
                    self.include_sci, self.end_station, self.scb
                ),
                reason: "at most one of include_sci, end_station and scb may be set",
            });
        }
        if self.cipher.is_xpn() && self.window > (1 << 30) {
            return Err(MacsecError::InvalidArgument {
                field: "window",
                value: self.window.to_string(),
                reason: "XPN replay windows are limited to 2^30",
            });
        }
        if !self.replay_protect && self.window != 0 {
            return Err(MacsecError::InvalidArgument {
                field: "window",
                value: self.window.to_string(),
                reason: "a replay window needs replay_protect = true",
            });
        }
        Ok(())
    }
}

/// A MACsec interface as the kernel reports it (rtnetlink view).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacsecLink {
    pub name: String,
    pub ifindex: u32,
    pub lower_ifindex: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub cipher: Cipher,
    pub sci: Sci,
    pub icv_len: u8,
    pub encoding_sa: An,
    pub encrypt: bool,
    pub protect: bool,
    pub include_sci: bool,
    pub end_station: bool,
    pub scb: bool,
    pub replay_protect: bool,
    pub window: u32,
    pub validation: Validation,
}

impl MacsecLink {
    /// Which settings differ from `cfg` (empty when the link matches it). The lower device and
    /// the port are compared by the caller, which knows the lower's ifindex and MAC.
    pub fn mismatches(&self, cfg: &LinkConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |what: &str, have: String, want: String| {
            if have != want {
                out.push(format!("{what}: have {have}, want {want}"));
            }
        };
        cmp("cipher", self.cipher.to_string(), cfg.cipher.to_string());
        cmp("icv_len", self.icv_len.to_string(), cfg.icv_len.to_string());
        cmp("encrypt", self.encrypt.to_string(), cfg.encrypt.to_string());
        cmp("protect", self.protect.to_string(), cfg.protect.to_string());
        cmp(
            "include_sci",
            self.include_sci.to_string(),
            cfg.include_sci.to_string(),
        );
        cmp(
            "end_station",
            self.end_station.to_string(),
            cfg.end_station.to_string(),
        );
        cmp("scb", self.scb.to_string(), cfg.scb.to_string());
        cmp(
            "replay_protect",
            self.replay_protect.to_string(),
            cfg.replay_protect.to_string(),
        );
        if cfg.replay_protect {
            cmp("window", self.window.to_string(), cfg.window.to_string());
        }
        cmp(
            "validation",
            format!("{:?}", self.validation),
            format!("{:?}", cfg.validation),
        );
        cmp("port", self.sci.port().to_string(), cfg.port.to_string());
        out
    }
}

/// Per-SA counters (u32 in the kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaStats {
    pub in_pkts_ok: u64,
    pub in_pkts_invalid: u64,
    pub in_pkts_not_valid: u64,
    pub in_pkts_not_using_sa: u64,
    pub in_pkts_unused_sa: u64,
    pub out_pkts_protected: u64,
    pub out_pkts_encrypted: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxScStats {
    pub in_octets_validated: u64,
    pub in_octets_decrypted: u64,
    pub in_pkts_unchecked: u64,
    pub in_pkts_delayed: u64,
    pub in_pkts_ok: u64,
    pub in_pkts_invalid: u64,
    pub in_pkts_late: u64,
    pub in_pkts_not_valid: u64,
    pub in_pkts_not_using_sa: u64,
    pub in_pkts_unused_sa: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxScStats {
    pub out_pkts_protected: u64,
    pub out_pkts_encrypted: u64,
    pub out_octets_protected: u64,
    pub out_octets_encrypted: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecyStats {
    pub out_pkts_untagged: u64,
    pub in_pkts_untagged: u64,
    pub out_pkts_too_long: u64,
    pub in_pkts_no_tag: u64,
    pub in_pkts_bad_tag: u64,
    pub in_pkts_unknown_sci: u64,
    pub in_pkts_no_sci: u64,
    pub in_pkts_overrun: u64,
}

/// One installed SA (TX or RX) as dumped by the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaState {
    pub an: An,
    pub active: bool,
    /// The next packet number the SA will send (TX) or the lowest it will accept (RX).
    pub next_pn: u64,
    pub key_id: KeyId,
    pub ssci: Option<u32>,
    pub stats: SaStats,
}

impl SaState {
    /// An SA whose packet numbers ran out: the kernel wraps the next PN to 0 (a value never
    /// valid for an installed SA) and sets the SA inactive.
    pub fn pn_exhausted(&self) -> bool {
        self.next_pn == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxScState {
    pub sci: Sci,
    pub active: bool,
    pub sas: Vec<SaState>,
    pub stats: RxScStats,
}

impl RxScState {
    pub fn sa(&self, an: An) -> Option<&SaState> {
        self.sas.iter().find(|s| s.an == an)
    }
}

/// The whole SecY as the `macsec` generic netlink family dumps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecyState {
    pub ifindex: u32,
    pub sci: Sci,
    pub cipher: Cipher,
    pub icv_len: u8,
    pub encoding_sa: An,
    pub window: u32,
    pub protect: bool,
    pub replay_protect: bool,
    /// Operational: the encoding SA exists and is active, so frames can be sent.
    pub operational: bool,
    pub validation: Validation,
    pub encrypt: bool,
    pub include_sci: bool,
    pub end_station: bool,
    pub scb: bool,
    pub tx_sas: Vec<SaState>,
    pub rx_scs: Vec<RxScState>,
    pub txsc_stats: TxScStats,
    pub secy_stats: SecyStats,
}

impl SecyState {
    pub fn tx_sa(&self, an: An) -> Option<&SaState> {
        self.tx_sas.iter().find(|s| s.an == an)
    }

    pub fn rx_sc(&self, sci: Sci) -> Option<&RxScState> {
        self.rx_scs.iter().find(|s| s.sci == sci)
    }

    /// True when the SecY holds no SA and no RX SC at all.
    pub fn is_bare(&self) -> bool {
        self.tx_sas.is_empty() && self.rx_scs.is_empty()
    }

    /// The first AN after `an` (mod 4) on which no SA is installed, TX or RX on any channel;
    /// `an.next()` when every other AN holds one. A restarted agent that removed what it found
    /// starts its first rollover there: the peer may still transmit on any AN we held an RX SA
    /// for (its active key, or the target of a rollover the previous agent did not finish), and
    /// a rollover onto the peer's active AN is refused by the peer.
    pub fn first_free_an_after(&self, an: An) -> An {
        let occupied =
            |a: An| self.tx_sa(a).is_some() || self.rx_scs.iter().any(|sc| sc.sa(a).is_some());
        let mut a = an.next();
        for _ in 0..3 {
            if !occupied(a) {
                return a;
            }
            a = a.next();
        }
        an.next()
    }

    /// The steps that remove every SA and RX SC of this SecY, in order: each TX SA (deactivated
    /// first when active: the kernel refuses to delete an active SA with EBUSY), then each RX
    /// SA the same way, then each RX SC. See [`crate::macsec::Macsec::clear_sas`].
    pub fn clear_plan(&self) -> Vec<ClearStep> {
        let mut plan = Vec::new();
        for sa in &self.tx_sas {
            if sa.active {
                plan.push(ClearStep::DeactivateTx(sa.an));
            }
            plan.push(ClearStep::DeleteTx(sa.an, sa.key_id));
        }
        for sc in &self.rx_scs {
            for sa in &sc.sas {
                if sa.active {
                    plan.push(ClearStep::DeactivateRx(sc.sci, sa.an));
                }
                plan.push(ClearStep::DeleteRx(sc.sci, sa.an, sa.key_id));
            }
            plan.push(ClearStep::DeleteRxSc(sc.sci));
        }
        plan
    }
}

/// One request of [`SecyState::clear_plan`]. Key ids name what goes (never key bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearStep {
    DeactivateTx(An),
    DeleteTx(An, KeyId),
    DeactivateRx(Sci, An),
    DeleteRx(Sci, An, KeyId),
    DeleteRxSc(Sci),
}

/// What [`crate::macsec::Macsec::clear_sas`] removed: SAs by AN and kernel key id, channels by
/// SCI. An object that was already gone when its turn came counts as removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleared {
    pub tx_sas: Vec<(An, KeyId)>,
    pub rx_sas: Vec<(Sci, An, KeyId)>,
    pub rx_scs: Vec<Sci>,
}

impl Cleared {
    pub fn is_empty(&self) -> bool {
        self.tx_sas.is_empty() && self.rx_sas.is_empty() && self.rx_scs.is_empty()
    }
}

impl fmt::Display for Cleared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(
            self.tx_sas
                .iter()
                .map(|(an, kid)| format!("TX SA {an} (key id {kid})")),
        );
        parts.extend(
            self.rx_sas
                .iter()
                .map(|(sci, an, kid)| format!("RX SA {an} of SC {sci} (key id {kid})")),
        );
        parts.extend(self.rx_scs.iter().map(|sci| format!("RX SC {sci}")));
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_ids_round_trip() {
        for c in Cipher::ALL {
            assert_eq!(Cipher::from_id(c.id()), Some(c));
            assert_eq!(c.ip_name().parse::<Cipher>().unwrap(), c);
        }
        assert_eq!(
            Cipher::from_id(0x0080_0200_0100_0001),
            Some(Cipher::GcmAes128)
        );
        assert!(Cipher::from_id(7).is_none());
        assert!("aes-ccm".parse::<Cipher>().is_err());
    }

    #[test]
    fn sci_layout_is_mac_then_port() {
        let sci = Sci::from_mac_port([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1);
        assert_eq!(sci.to_string(), "5254001234560001");
        assert_eq!(sci.wire(), [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 1]);
        assert_eq!(Sci::from_wire(&sci.wire()), Some(sci));
        assert_eq!(sci.port(), 1);
        assert_eq!(sci.mac(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    }

    #[test]
    fn an_range() {
        assert!(An::new(3).is_ok());
        assert!(matches!(
            An::new(4),
            Err(MacsecError::AnOutOfRange { value: 4 })
        ));
        assert_eq!(An::new(3).unwrap().next(), An::new(0).unwrap());
    }

    #[test]
    fn key_id_from_uuid() {
        let k = KeyId::from_uuid("0123abcd-4567-89ef-0123-456789abcdef").unwrap();
        assert_eq!(k.to_hex(), "0123abcd456789ef0123456789abcdef");
        assert_eq!(
            KeyId::from_uuid("0123ABCD456789EF0123456789ABCDEF").unwrap(),
            k
        );
        for bad in [
            "",
            "xyz",
            "0123abcd-4567-89ef-0123-456789abcde",
            "0123abcd4-567-89ef-0123-456789abcdef",
            "g123abcd-4567-89ef-0123-456789abcdef",
        ] {
            assert!(KeyId::from_uuid(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sa_key_checks_length_and_xpn() {
        let k16 = || SaKey::new(SecretBytes::new(vec![1; 16]), KeyId::default());
        assert!(k16().check(Cipher::GcmAes128).is_ok());
        assert!(matches!(
            k16().check(Cipher::GcmAes256),
            Err(MacsecError::KeyLength {
                expected: 32,
                got: 16,
                ..
            })
        ));
        assert!(k16().check(Cipher::GcmAesXpn128).is_err());
        let x = k16().with_xpn(1, Salt::new([2; 12]));
        assert!(x.check(Cipher::GcmAesXpn128).is_ok());
        assert!(x.check(Cipher::GcmAes128).is_err());
        let shown = format!("{x:?}");
        assert!(
            shown.contains("redacted") && !shown.contains("[2, 2"),
            "{shown}"
        );
    }

    fn sa(an: u8, active: bool, kid: u8) -> SaState {
        SaState {
            an: An::new(an).unwrap(),
            active,
            next_pn: 1,
            key_id: KeyId([kid; 16]),
            ssci: None,
            stats: SaStats::default(),
        }
    }

    fn secy(encoding: u8, tx: Vec<SaState>, rx: Vec<(u64, Vec<SaState>)>) -> SecyState {
        SecyState {
            ifindex: 1,
            sci: Sci(1),
            cipher: Cipher::GcmAes256,
            icv_len: 16,
            encoding_sa: An::new(encoding).unwrap(),
            window: 0,
            protect: true,
            replay_protect: true,
            operational: true,
            validation: Validation::Strict,
            encrypt: true,
            include_sci: true,
            end_station: false,
            scb: false,
            tx_sas: tx,
            rx_scs: rx
                .into_iter()
                .map(|(sci, sas)| RxScState {
                    sci: Sci(sci),
                    active: true,
                    sas,
                    stats: RxScStats::default(),
                })
                .collect(),
            txsc_stats: TxScStats::default(),
            secy_stats: SecyStats::default(),
        }
    }

    #[test]
    fn clear_plan_deactivates_before_deleting_and_takes_everything() {
        let an = |a| An::new(a).unwrap();
        let s = secy(
            0,
            vec![sa(0, true, 1), sa(3, false, 2)],
            vec![(7, vec![sa(0, true, 1), sa(3, false, 2)]), (8, vec![])],
        );
        assert_eq!(
            s.clear_plan(),
            vec![
                ClearStep::DeactivateTx(an(0)),
                ClearStep::DeleteTx(an(0), KeyId([1; 16])),
                ClearStep::DeleteTx(an(3), KeyId([2; 16])),
                ClearStep::DeactivateRx(Sci(7), an(0)),
                ClearStep::DeleteRx(Sci(7), an(0), KeyId([1; 16])),
                ClearStep::DeleteRx(Sci(7), an(3), KeyId([2; 16])),
                ClearStep::DeleteRxSc(Sci(7)),
                ClearStep::DeleteRxSc(Sci(8)),
            ]
        );
        assert!(!s.is_bare());
        assert!(secy(2, vec![], vec![]).clear_plan().is_empty());
        assert!(secy(2, vec![], vec![]).is_bare());
    }

    #[test]
    fn first_free_an_skips_every_an_holding_an_sa() {
        let an = |a| An::new(a).unwrap();
        // The usual restart: TX and the peer's RX on the encoding AN.
        for enc in 0..4u8 {
            let s = secy(
                enc,
                vec![sa(enc, true, 1)],
                vec![(7, vec![sa(enc, true, 1)])],
            );
            assert_eq!(
                s.first_free_an_after(an(enc)),
                an((enc + 1) % 4),
                "AN {enc}"
            );
        }
        // Killed mid-rollover: the RX SA for the next AN is in (the peer may already send on
        // it), so the first rollover goes one further.
        let s = secy(
            3,
            vec![sa(3, true, 1)],
            vec![(7, vec![sa(3, true, 1), sa(0, true, 2)])],
        );
        assert_eq!(s.first_free_an_after(an(3)), an(1));
        // Nothing installed: just the next one.
        assert_eq!(secy(1, vec![], vec![]).first_free_an_after(an(1)), an(2));
        // Everything taken: the next one all the same.
        let full = secy(
            0,
            vec![sa(0, true, 1), sa(1, false, 2)],
            vec![(7, vec![sa(2, true, 3)]), (8, vec![sa(3, true, 4)])],
        );
        assert_eq!(full.first_free_an_after(an(0)), an(1));
    }

    #[test]
    fn cleared_names_key_ids_only() {
        let c = Cleared {
            tx_sas: vec![(An::new(0).unwrap(), KeyId([0xab; 16]))],
            rx_sas: vec![(Sci(7), An::new(1).unwrap(), KeyId([0xcd; 16]))],
            rx_scs: vec![Sci(7)],
        };
        let shown = c.to_string();
        assert!(shown.starts_with("TX SA 0 (key id abab"), "{shown}");
        assert!(shown.contains("RX SA 1 of SC 0000000000000007"), "{shown}");
        assert!(shown.ends_with("RX SC 0000000000000007"), "{shown}");
        assert_eq!(Cleared::default().to_string(), "nothing");
        assert!(Cleared::default().is_empty() && !c.is_empty());
    }

    #[test]
    fn link_config_rejects_bad_combinations() {
        let ok = LinkConfig::new("macsec0", "veth0", Cipher::GcmAes256);
        assert!(ok.check().is_ok());
        let mut c = ok.clone();
        c.icv_len = 9;
        assert!(c.check().is_err());
        let mut c = ok.clone();
        c.end_station = true;
        assert!(c.check().is_err(), "es with include_sci");
        let mut c = ok.clone();
        c.name = "a-very-long-interface-name".into();
        assert!(c.check().is_err());
        let mut c = ok.clone();
        c.replay_protect = false;
        c.window = 5;
        assert!(c.check().is_err());
    }
}
