//! Keys: TX SAs, RX SCs and RX SAs over the `macsec` generic netlink family, and the state dump.
//! Attribute layout: include/uapi/linux/if_macsec.h.

use super::nl::{
    attrs, get_pn, get_u32, get_u64, get_u8, MsgWriter, NlError, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use super::{
    errno_of, kernel_err, An, Cipher, ClearError, ClearStep, Cleared, KeyId, Macsec, MacsecError,
    MacsecLink, RxScState, RxScStats, SaKey, SaState, SaStats, Sci, SecyState, SecyStats,
    TxScStats, Validation,
};

const MACSEC_GENL_VERSION: u8 = 1;

const CMD_GET_TXSC: u8 = 0;
const CMD_ADD_RXSC: u8 = 1;
const CMD_DEL_RXSC: u8 = 2;
const CMD_ADD_TXSA: u8 = 4;
const CMD_DEL_TXSA: u8 = 5;
const CMD_UPD_TXSA: u8 = 6;
const CMD_ADD_RXSA: u8 = 7;
const CMD_DEL_RXSA: u8 = 8;
const CMD_UPD_RXSA: u8 = 9;

const ATTR_IFINDEX: u16 = 1;
const ATTR_RXSC_CONFIG: u16 = 2;
const ATTR_SA_CONFIG: u16 = 3;
const ATTR_SECY: u16 = 4;
const ATTR_TXSA_LIST: u16 = 5;
const ATTR_RXSC_LIST: u16 = 6;
const ATTR_TXSC_STATS: u16 = 7;
const ATTR_SECY_STATS: u16 = 8;

const SECY_SCI: u16 = 1;
const SECY_ENCODING_SA: u16 = 2;
const SECY_WINDOW: u16 = 3;
const SECY_CIPHER_SUITE: u16 = 4;
const SECY_ICV_LEN: u16 = 5;
const SECY_PROTECT: u16 = 6;
const SECY_REPLAY: u16 = 7;
const SECY_OPER: u16 = 8;
const SECY_VALIDATE: u16 = 9;
const SECY_ENCRYPT: u16 = 10;
const SECY_INC_SCI: u16 = 11;
const SECY_ES: u16 = 12;
const SECY_SCB: u16 = 13;

const RXSC_SCI: u16 = 1;
const RXSC_ACTIVE: u16 = 2;
const RXSC_SA_LIST: u16 = 3;
const RXSC_STATS: u16 = 4;

const SA_AN: u16 = 1;
const SA_ACTIVE: u16 = 2;
const SA_PN: u16 = 3;
const SA_KEY: u16 = 4;
const SA_KEYID: u16 = 5;
const SA_STATS: u16 = 6;
const SA_SSCI: u16 = 8;
const SA_SALT: u16 = 9;

/// Which SA a request is about, for error messages.
fn sa_what(sci: Option<Sci>, an: An) -> String {
    match sci {
        Some(s) => format!("RX SA {an} of SC {s}"),
        None => format!("TX SA {an}"),
    }
}

fn check_pn(cipher: Cipher, pn: u64) -> Result<(), MacsecError> {
    if pn == 0 {
        return Err(MacsecError::InvalidPn {
            pn,
            cipher,
            reason: "packet numbers start at 1",
        });
    }
    if pn > cipher.max_pn() {
        return Err(MacsecError::InvalidPn {
            pn,
            cipher,
            reason: "above 2^32-1; only the XPN cipher suites have 64-bit packet numbers",
        });
    }
    Ok(())
}

fn put_pn(m: &mut MsgWriter, cipher: Cipher, pn: u64) {
    // The kernel checks the attribute length against the SecY: u64 for XPN, u32 otherwise.
    if cipher.is_xpn() {
        m.attr_u64(SA_PN, pn);
    } else {
        m.attr_u32(SA_PN, pn as u32);
    }
}

impl Macsec {
    fn genl_msg(&self, cmd: u8, flags: u16) -> MsgWriter {
        let mut m = MsgWriter::new(self.family, NLM_F_REQUEST | flags);
        m.header(&[cmd, MACSEC_GENL_VERSION, 0, 0]);
        m
    }

    /// Writes SA_CONFIG with the key. The writer's buffer is the only copy of the key outside
    /// `key` and the kernel; it is wiped when the request is dropped after the send.
    fn put_sa_with_key(
        m: &mut MsgWriter,
        cipher: Cipher,
        an: An,
        pn: u64,
        key: &SaKey,
        active: bool,
    ) {
        let sa = m.nest_begin(ATTR_SA_CONFIG);
        m.attr_u8(SA_AN, an.get());
        put_pn(m, cipher, pn);
        m.attr(SA_KEY, key.key.expose());
        m.attr(SA_KEYID, &key.key_id.0);
        m.attr_u8(SA_ACTIVE, active.into());
        if let Some(x) = &key.xpn {
            // The kernel keeps the SSCI as it goes into the IV: big-endian (iproute2 agrees).
            m.attr(SA_SSCI, &x.ssci.to_be_bytes());
            m.attr(SA_SALT, x.salt.expose());
        }
        m.nest_end(sa);
    }

    /// After ENODEV: tells a vanished interface apart from a missing SC/SA.
    fn enodev(&mut self, link: &MacsecLink, what: String) -> MacsecError {
        match self.raw_link_by_index(link.ifindex) {
            Ok(Some(_)) => MacsecError::NotFound {
                name: link.name.clone(),
                what,
            },
            Ok(None) => MacsecError::InterfaceGone {
                name: link.name.clone(),
                ifindex: link.ifindex,
            },
            Err(e) => e,
        }
    }

    /// After EBUSY on an add: the AN already holds an SA. Same key id: the add already
    /// happened (idempotent success). Different: a typed error naming both ids.
    fn occupied(
        &mut self,
        link: &MacsecLink,
        sci: Option<Sci>,
        an: An,
        key_id: KeyId,
    ) -> Result<(), MacsecError> {
        let state = self.state(link)?;
        let existing = match sci {
            None => state.tx_sa(an),
            Some(s) => state.rx_sc(s).and_then(|sc| sc.sa(an)),
        };
        match existing {
            Some(sa) if sa.key_id == key_id => Ok(()),
            Some(sa) => Err(MacsecError::SaOccupied {
                name: link.name.clone(),
                what: sa_what(sci, an),
                existing: sa.key_id,
                wanted: key_id,
            }),
            None => Err(MacsecError::Busy {
                op: "add SA",
                name: link.name.clone(),
                what: sa_what(sci, an),
                hint: "the kernel reported the AN busy but no SA is there; retry",
            }),
        }
    }

    fn key_op_err(
        &mut self,
        op: &'static str,
        link: &MacsecLink,
        cipher: Cipher,
        what: String,
        e: NlError,
    ) -> MacsecError {
        match errno_of(&e) {
            Some(libc::ENODEV) => self.enodev(link, what),
            // The AEAD transform could not be allocated: gcm(aes) missing from the kernel.
            Some(libc::ENOENT) => MacsecError::CipherUnsupported {
                cipher,
                detail: format!("{op}: kernel crypto has no gcm(aes)"),
            },
            _ => kernel_err(op, &link.name, e),
        }
    }

    /// Installs TX SA `an` with `key`, starting at packet number `pn`. Installing the same key
    /// id on the same AN again is success; another key on an occupied AN is
    /// [`MacsecError::SaOccupied`].
    pub fn add_tx_sa(
        &mut self,
        link: &MacsecLink,
        an: An,
        pn: u64,
        key: &SaKey,
        active: bool,
    ) -> Result<(), MacsecError> {
        key.check(link.cipher)?;
        check_pn(link.cipher, pn)?;
        let mut m = self.genl_msg(CMD_ADD_TXSA, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        Self::put_sa_with_key(&mut m, link.cipher, an, pn, key, active);
        match self.genl.request_ack(m) {
            Ok(()) => {
                tracing::debug!(link = %link.name, %an, key_id = %key.key_id, pn, active, "TX SA installed");
                Ok(())
            }
            Err(e) if errno_of(&e) == Some(libc::EBUSY) => {
                self.occupied(link, None, an, key.key_id)
            }
            Err(e) => Err(self.key_op_err("add TX SA", link, link.cipher, sa_what(None, an), e)),
        }
    }

    /// Changes a TX SA's active flag and/or next PN (the kernel refuses key changes).
    pub fn update_tx_sa(
        &mut self,
        link: &MacsecLink,
        an: An,
        active: Option<bool>,
        pn: Option<u64>,
    ) -> Result<(), MacsecError> {
        if let Some(pn) = pn {
            check_pn(link.cipher, pn)?;
        } else if active == Some(true) {
            // Re-activating an SA whose PNs ran out would make the kernel reuse PN 0.
            if let Some(sa) = self.state(link)?.tx_sa(an) {
                if sa.pn_exhausted() {
                    return Err(MacsecError::PnExhausted {
                        name: link.name.clone(),
                        what: sa_what(None, an),
                    });
                }
            }
        }
        let mut m = self.genl_msg(CMD_UPD_TXSA, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sa = m.nest_begin(ATTR_SA_CONFIG);
        m.attr_u8(SA_AN, an.get());
        if let Some(a) = active {
            m.attr_u8(SA_ACTIVE, a.into());
        }
        if let Some(pn) = pn {
            put_pn(&mut m, link.cipher, pn);
        }
        m.nest_end(sa);
        self.genl
            .request_ack(m)
            .map_err(|e| self.key_op_err("update TX SA", link, link.cipher, sa_what(None, an), e))
    }

    pub fn set_tx_sa_active(
        &mut self,
        link: &MacsecLink,
        an: An,
        active: bool,
    ) -> Result<(), MacsecError> {
        self.update_tx_sa(link, an, Some(active), None)
    }

    /// Deletes TX SA `an`; a missing SA is success. The kernel refuses to delete an active TX
    /// SA: deactivate it first (see [`Macsec::retire_tx`]).
    pub fn del_tx_sa(&mut self, link: &MacsecLink, an: An) -> Result<(), MacsecError> {
        let mut m = self.genl_msg(CMD_DEL_TXSA, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sa = m.nest_begin(ATTR_SA_CONFIG);
        m.attr_u8(SA_AN, an.get());
        m.nest_end(sa);
        match self.genl.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EBUSY) => Err(MacsecError::Busy {
                op: "delete TX SA",
                name: link.name.clone(),
                what: sa_what(None, an),
                hint: "the SA is active; deactivate it before deleting",
            }),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => {
                match self.enodev(link, sa_what(None, an)) {
                    MacsecError::NotFound { .. } => Ok(()),
                    other => Err(other),
                }
            }
            Err(e) => Err(kernel_err("delete TX SA", &link.name, e)),
        }
    }

    /// Adds the receive channel for a peer's SCI; an existing one is success.
    pub fn add_rx_sc(&mut self, link: &MacsecLink, sci: Sci) -> Result<(), MacsecError> {
        let mut m = self.genl_msg(CMD_ADD_RXSC, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sc = m.nest_begin(ATTR_RXSC_CONFIG);
        m.attr(RXSC_SCI, &sci.wire());
        m.attr_u8(RXSC_ACTIVE, 1);
        m.nest_end(sc);
        match self.genl.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => {
                Err(self.key_op_err("add RX SC", link, link.cipher, format!("RX SC {sci}"), e))
            }
        }
    }

    /// Removes a receive channel (and its SAs); a missing one is success.
    pub fn del_rx_sc(&mut self, link: &MacsecLink, sci: Sci) -> Result<(), MacsecError> {
        let mut m = self.genl_msg(CMD_DEL_RXSC, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sc = m.nest_begin(ATTR_RXSC_CONFIG);
        m.attr(RXSC_SCI, &sci.wire());
        m.nest_end(sc);
        match self.genl.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => {
                match self.enodev(link, format!("RX SC {sci}")) {
                    MacsecError::NotFound { .. } => Ok(()),
                    other => Err(other),
                }
            }
            Err(e) => Err(kernel_err("delete RX SC", &link.name, e)),
        }
    }

    /// Installs RX SA `an` on the peer's channel `sci` (the channel must exist, see
    /// [`Macsec::add_rx_sc`]). `pn` is the lowest packet number accepted.
    pub fn add_rx_sa(
        &mut self,
        link: &MacsecLink,
        sci: Sci,
        an: An,
        pn: u64,
        key: &SaKey,
        active: bool,
    ) -> Result<(), MacsecError> {
        key.check(link.cipher)?;
        check_pn(link.cipher, pn)?;
        let mut m = self.genl_msg(CMD_ADD_RXSA, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sc = m.nest_begin(ATTR_RXSC_CONFIG);
        m.attr(RXSC_SCI, &sci.wire());
        m.nest_end(sc);
        Self::put_sa_with_key(&mut m, link.cipher, an, pn, key, active);
        match self.genl.request_ack(m) {
            Ok(()) => {
                tracing::debug!(link = %link.name, %sci, %an, key_id = %key.key_id, pn, active, "RX SA installed");
                Ok(())
            }
            Err(e) if errno_of(&e) == Some(libc::EBUSY) => {
                self.occupied(link, Some(sci), an, key.key_id)
            }
            Err(e) => {
                Err(self.key_op_err("add RX SA", link, link.cipher, format!("RX SC {sci}"), e))
            }
        }
    }

    pub fn update_rx_sa(
        &mut self,
        link: &MacsecLink,
        sci: Sci,
        an: An,
        active: Option<bool>,
        pn: Option<u64>,
    ) -> Result<(), MacsecError> {
        if let Some(pn) = pn {
            check_pn(link.cipher, pn)?;
        }
        let mut m = self.genl_msg(CMD_UPD_RXSA, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sc = m.nest_begin(ATTR_RXSC_CONFIG);
        m.attr(RXSC_SCI, &sci.wire());
        m.nest_end(sc);
        let sa = m.nest_begin(ATTR_SA_CONFIG);
        m.attr_u8(SA_AN, an.get());
        if let Some(a) = active {
            m.attr_u8(SA_ACTIVE, a.into());
        }
        if let Some(pn) = pn {
            put_pn(&mut m, link.cipher, pn);
        }
        m.nest_end(sa);
        self.genl.request_ack(m).map_err(|e| {
            self.key_op_err("update RX SA", link, link.cipher, sa_what(Some(sci), an), e)
        })
    }

    pub fn set_rx_sa_active(
        &mut self,
        link: &MacsecLink,
        sci: Sci,
        an: An,
        active: bool,
    ) -> Result<(), MacsecError> {
        self.update_rx_sa(link, sci, an, Some(active), None)
    }

    /// Deletes RX SA `an` of channel `sci`; a missing SA (or channel) is success.
    pub fn del_rx_sa(&mut self, link: &MacsecLink, sci: Sci, an: An) -> Result<(), MacsecError> {
        let mut m = self.genl_msg(CMD_DEL_RXSA, NLM_F_ACK);
        m.attr_u32(ATTR_IFINDEX, link.ifindex);
        let sc = m.nest_begin(ATTR_RXSC_CONFIG);
        m.attr(RXSC_SCI, &sci.wire());
        m.nest_end(sc);
        let sa = m.nest_begin(ATTR_SA_CONFIG);
        m.attr_u8(SA_AN, an.get());
        m.nest_end(sa);
        match self.genl.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EBUSY) => Err(MacsecError::Busy {
                op: "delete RX SA",
                name: link.name.clone(),
                what: sa_what(Some(sci), an),
                hint: "the SA is active; deactivate it before deleting",
            }),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => {
                match self.enodev(link, sa_what(Some(sci), an)) {
                    MacsecError::NotFound { .. } => Ok(()),
                    other => Err(other),
                }
            }
            Err(e) => Err(kernel_err("delete RX SA", &link.name, e)),
        }
    }

    /// Removes every TX SA, RX SA and RX SC of `link` (the SecY itself stays): active SAs are
    /// deactivated first (an active SA cannot be deleted, EBUSY). Idempotent: whatever is already
    /// gone counts as removed. Every step is tried even after one fails; the error then carries
    /// all failures and what was removed. For keys nobody can vouch for any more (a restarted
    /// agent without a usable record): the SecY stops transmitting and accepting until new SAs
    /// are installed.
    pub fn clear_sas(&mut self, link: &MacsecLink) -> Result<Cleared, ClearError> {
        let state = self.state(link).map_err(|e| ClearError {
            name: link.name.clone(),
            cleared: Cleared::default(),
            failures: vec![e],
        })?;
        let mut cleared = Cleared::default();
        let mut failures = Vec::new();
        for step in state.clear_plan() {
            let r = match step {
                ClearStep::DeactivateTx(an) => self.set_tx_sa_active(link, an, false),
                ClearStep::DeleteTx(an, kid) => self
                    .del_tx_sa(link, an)
                    .map(|()| cleared.tx_sas.push((an, kid))),
                ClearStep::DeactivateRx(sci, an) => self.set_rx_sa_active(link, sci, an, false),
                ClearStep::DeleteRx(sci, an, kid) => self
                    .del_rx_sa(link, sci, an)
                    .map(|()| cleared.rx_sas.push((sci, an, kid))),
                ClearStep::DeleteRxSc(sci) => {
                    self.del_rx_sc(link, sci).map(|()| cleared.rx_scs.push(sci))
                }
            };
            match r {
                // Deactivating what is already gone: its delete step follows and succeeds.
                Ok(()) | Err(MacsecError::NotFound { .. }) => {}
                Err(e) => failures.push(e),
            }
        }
        if failures.is_empty() {
            Ok(cleared)
        } else {
            Err(ClearError {
                name: link.name.clone(),
                cleared,
                failures,
            })
        }
    }

    /// Dumps every MACsec SecY in this network namespace.
    pub fn dump_all(&mut self) -> Result<Vec<SecyState>, MacsecError> {
        let m = self.genl_msg(CMD_GET_TXSC, NLM_F_DUMP);
        let replies = self
            .genl
            .request_collect(m)
            .map_err(|e| kernel_err("dump macsec state", "-", e))?;
        replies
            .iter()
            .map(|p| {
                parse_secy(p.get(4..).unwrap_or_default()).ok_or(MacsecError::Netlink {
                    op: "dump macsec state",
                    detail: "unparsable SecY message".to_owned(),
                })
            })
            .collect()
    }

    /// The full kernel state of one link: SecY settings, TX SAs, RX SCs and SAs with their
    /// active flags, next PNs and statistics.
    pub fn state(&mut self, link: &MacsecLink) -> Result<SecyState, MacsecError> {
        // The kernel's dump has no ifindex filter: it walks every SecY of the namespace.
        self.dump_all()?
            .into_iter()
            .find(|s| s.ifindex == link.ifindex)
            .ok_or_else(|| MacsecError::InterfaceGone {
                name: link.name.clone(),
                ifindex: link.ifindex,
            })
    }
}

fn stat(p: &[u8]) -> u64 {
    match p.len() {
        4 => get_u32(p).map(u64::from).unwrap_or(0),
        _ => get_u64(p).unwrap_or(0),
    }
}

fn parse_sa(p: &[u8]) -> Option<SaState> {
    let mut an = None;
    let mut sa = SaState {
        an: An::new(0).ok()?,
        active: false,
        next_pn: 0,
        key_id: KeyId::default(),
        ssci: None,
        stats: SaStats::default(),
    };
    for (ty, v) in attrs(p) {
        match ty {
            SA_AN => an = get_u8(v).and_then(|a| An::new(a).ok()),
            SA_ACTIVE => sa.active = get_u8(v)? != 0,
            SA_PN => sa.next_pn = get_pn(v)?,
            SA_KEYID => sa.key_id = KeyId(v.get(..16)?.try_into().ok()?),
            SA_SSCI => {
                sa.ssci = v
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
            }
            SA_STATS => {
                for (st, sv) in attrs(v) {
                    let x = stat(sv);
                    match st {
                        1 => sa.stats.in_pkts_ok = x,
                        2 => sa.stats.in_pkts_invalid = x,
                        3 => sa.stats.in_pkts_not_valid = x,
                        4 => sa.stats.in_pkts_not_using_sa = x,
                        5 => sa.stats.in_pkts_unused_sa = x,
                        6 => sa.stats.out_pkts_protected = x,
                        7 => sa.stats.out_pkts_encrypted = x,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    sa.an = an?;
    Some(sa)
}

fn parse_rxsc(p: &[u8]) -> Option<RxScState> {
    let mut sc = RxScState {
        sci: Sci(0),
        active: false,
        sas: Vec::new(),
        stats: RxScStats::default(),
    };
    for (ty, v) in attrs(p) {
        match ty {
            RXSC_SCI => sc.sci = Sci::from_wire(v)?,
            RXSC_ACTIVE => sc.active = get_u8(v)? != 0,
            RXSC_SA_LIST => {
                for (_, sa) in attrs(v) {
                    sc.sas.push(parse_sa(sa)?);
                }
            }
            RXSC_STATS => {
                let s = &mut sc.stats;
                for (st, sv) in attrs(v) {
                    let x = stat(sv);
                    match st {
                        1 => s.in_octets_validated = x,
                        2 => s.in_octets_decrypted = x,
                        3 => s.in_pkts_unchecked = x,
                        4 => s.in_pkts_delayed = x,
                        5 => s.in_pkts_ok = x,
                        6 => s.in_pkts_invalid = x,
                        7 => s.in_pkts_late = x,
                        8 => s.in_pkts_not_valid = x,
                        9 => s.in_pkts_not_using_sa = x,
                        10 => s.in_pkts_unused_sa = x,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(sc)
}

/// Parses one GET_TXSC dump message (attributes after the genl header).
pub(crate) fn parse_secy(p: &[u8]) -> Option<SecyState> {
    let mut s = SecyState {
        ifindex: 0,
        sci: Sci(0),
        cipher: Cipher::GcmAes128,
        icv_len: 16,
        encoding_sa: An::new(0).ok()?,
        window: 0,
        protect: false,
        replay_protect: false,
        operational: false,
        validation: Validation::Strict,
        encrypt: false,
        include_sci: false,
        end_station: false,
        scb: false,
        tx_sas: Vec::new(),
        rx_scs: Vec::new(),
        txsc_stats: TxScStats::default(),
        secy_stats: SecyStats::default(),
    };
    for (ty, v) in attrs(p) {
        match ty {
            ATTR_IFINDEX => s.ifindex = get_u32(v)?,
            ATTR_SECY => {
                for (st, sv) in attrs(v) {
                    let flag = || get_u8(sv).map(|x| x != 0);
                    match st {
                        SECY_SCI => s.sci = Sci::from_wire(sv)?,
                        SECY_ENCODING_SA => s.encoding_sa = An::new(get_u8(sv)?).ok()?,
                        SECY_WINDOW => s.window = get_u32(sv)?,
                        SECY_CIPHER_SUITE => s.cipher = Cipher::from_id(get_u64(sv)?)?,
                        SECY_ICV_LEN => s.icv_len = get_u8(sv)?,
                        SECY_PROTECT => s.protect = flag()?,
                        SECY_REPLAY => s.replay_protect = flag()?,
                        SECY_OPER => s.operational = flag()?,
                        SECY_VALIDATE => s.validation = Validation::from_kernel(get_u8(sv)?)?,
                        SECY_ENCRYPT => s.encrypt = flag()?,
                        SECY_INC_SCI => s.include_sci = flag()?,
                        SECY_ES => s.end_station = flag()?,
                        SECY_SCB => s.scb = flag()?,
                        _ => {}
                    }
                }
            }
            ATTR_TXSA_LIST => {
                for (_, sa) in attrs(v) {
                    s.tx_sas.push(parse_sa(sa)?);
                }
            }
            ATTR_RXSC_LIST => {
                for (_, sc) in attrs(v) {
                    s.rx_scs.push(parse_rxsc(sc)?);
                }
            }
            ATTR_TXSC_STATS => {
                let t = &mut s.txsc_stats;
                for (st, sv) in attrs(v) {
                    let x = stat(sv);
                    match st {
                        1 => t.out_pkts_protected = x,
                        2 => t.out_pkts_encrypted = x,
                        3 => t.out_octets_protected = x,
                        4 => t.out_octets_encrypted = x,
                        _ => {}
                    }
                }
            }
            ATTR_SECY_STATS => {
                let t = &mut s.secy_stats;
                for (st, sv) in attrs(v) {
                    let x = stat(sv);
                    match st {
                        1 => t.out_pkts_untagged = x,
                        2 => t.in_pkts_untagged = x,
                        3 => t.out_pkts_too_long = x,
                        4 => t.in_pkts_no_tag = x,
                        5 => t.in_pkts_bad_tag = x,
                        6 => t.in_pkts_unknown_sci = x,
                        7 => t.in_pkts_no_sci = x,
                        8 => t.in_pkts_overrun = x,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::super::nl;
    use super::*;
    use crate::macsec::Salt;
    use crate::secret::SecretBytes;

    #[test]
    fn parses_a_dump_message() {
        let sci = Sci(0x0200_0000_0001_0001);
        let peer = Sci(0x0200_0000_0002_0001);
        let mut m = MsgWriter::new(0x20, 0);
        m.header(&[CMD_GET_TXSC, 1, 0, 0]);
        m.attr_u32(ATTR_IFINDEX, 9);
        let secy = m.nest_begin(ATTR_SECY);
        m.attr(SECY_SCI, &sci.wire());
        m.attr_u8(SECY_ENCODING_SA, 1);
        m.attr_u64(SECY_CIPHER_SUITE, Cipher::GcmAesXpn128.id());
        m.attr_u8(SECY_OPER, 1);
        m.attr_u8(SECY_VALIDATE, 2);
        m.nest_end(secy);
        let txl = m.nest_begin(ATTR_TXSA_LIST);
        let one = m.nest_begin(1);
        m.attr_u8(SA_AN, 1);
        m.attr_u64(SA_PN, (1 << 32) + 5);
        m.attr(SA_KEYID, &[7; 16]);
        m.attr(SA_SSCI, &3u32.to_be_bytes());
        m.attr_u8(SA_ACTIVE, 1);
        let st = m.nest_begin(SA_STATS);
        m.attr_u32(7, 42);
        m.nest_end(st);
        m.nest_end(one);
        m.nest_end(txl);
        let rxl = m.nest_begin(ATTR_RXSC_LIST);
        let sc = m.nest_begin(1);
        m.attr_u8(RXSC_ACTIVE, 1);
        m.attr(RXSC_SCI, &peer.wire());
        let sas = m.nest_begin(RXSC_SA_LIST);
        let rsa = m.nest_begin(1);
        m.attr_u8(SA_AN, 0);
        m.attr_u64(SA_PN, 1);
        m.attr(SA_KEYID, &[8; 16]);
        m.attr_u8(SA_ACTIVE, 0);
        m.nest_end(rsa);
        m.nest_end(sas);
        let rst = m.nest_begin(RXSC_STATS);
        m.attr_u64(5, 1000);
        m.nest_end(rst);
        m.nest_end(sc);
        m.nest_end(rxl);
        let secy_stats = m.nest_begin(ATTR_SECY_STATS);
        m.attr_u64(6, 3);
        m.nest_end(secy_stats);

        let body = &m.bytes()[nl::NLMSG_HDRLEN + 4..];
        let s = parse_secy(body).expect("parses");
        assert_eq!(s.ifindex, 9);
        assert_eq!(s.sci, sci);
        assert_eq!(s.cipher, Cipher::GcmAesXpn128);
        assert!(s.operational);
        let tx = s.tx_sa(An::new(1).unwrap()).unwrap();
        assert_eq!(tx.next_pn, (1 << 32) + 5);
        assert_eq!(tx.key_id, KeyId([7; 16]));
        assert_eq!(tx.ssci, Some(3));
        assert!(tx.active);
        assert_eq!(tx.stats.out_pkts_encrypted, 42);
        let rx = s.rx_sc(peer).unwrap();
        assert!(rx.active);
        assert_eq!(rx.stats.in_pkts_ok, 1000);
        let rsa = rx.sa(An::new(0).unwrap()).unwrap();
        assert!(!rsa.active);
        assert_eq!(rsa.key_id, KeyId([8; 16]));
        assert_eq!(s.secy_stats.in_pkts_unknown_sci, 3);
    }

    #[test]
    fn sa_config_carries_key_pn_width_and_xpn() {
        let key = SaKey::new(SecretBytes::new(vec![0x5a; 16]), KeyId([1; 16]))
            .with_xpn(0x01020304, Salt::new([9; 12]));
        let mut m = MsgWriter::new(0x20, 0);
        Macsec::put_sa_with_key(
            &mut m,
            Cipher::GcmAesXpn128,
            An::new(2).unwrap(),
            77,
            &key,
            true,
        );
        let outer: Vec<_> = attrs(&m.bytes()[nl::NLMSG_HDRLEN..]).collect();
        assert_eq!(outer[0].0, ATTR_SA_CONFIG);
        let inner: Vec<_> = attrs(outer[0].1).collect();
        let get = |t| {
            inner
                .iter()
                .find(|(ty, _)| *ty == t)
                .map(|(_, p)| *p)
                .unwrap()
        };
        assert_eq!(get(SA_AN), &[2]);
        assert_eq!(get(SA_PN).len(), 8, "XPN carries a 64-bit PN");
        assert_eq!(get(SA_KEY), &[0x5a; 16]);
        assert_eq!(
            get(SA_SSCI),
            &[1, 2, 3, 4],
            "SSCI is big-endian on the wire"
        );
        assert_eq!(get(SA_SALT), &[9; 12]);

        let plain = SaKey::new(SecretBytes::new(vec![1; 16]), KeyId([1; 16]));
        let mut m = MsgWriter::new(0x20, 0);
        Macsec::put_sa_with_key(
            &mut m,
            Cipher::GcmAes128,
            An::new(0).unwrap(),
            77,
            &plain,
            false,
        );
        let outer: Vec<_> = attrs(&m.bytes()[nl::NLMSG_HDRLEN..]).collect();
        let inner: Vec<_> = attrs(outer[0].1).collect();
        let pn = inner.iter().find(|(t, _)| *t == SA_PN).unwrap().1;
        assert_eq!(pn.len(), 4, "plain suites carry a 32-bit PN");
        assert!(inner.iter().all(|(t, _)| *t != SA_SALT && *t != SA_SSCI));
    }

    #[test]
    fn pn_checks() {
        assert!(check_pn(Cipher::GcmAes128, 0).is_err());
        assert!(check_pn(Cipher::GcmAes128, 1 << 32).is_err());
        assert!(check_pn(Cipher::GcmAes128, u64::from(u32::MAX)).is_ok());
        assert!(check_pn(Cipher::GcmAesXpn256, 1 << 40).is_ok());
    }
}
