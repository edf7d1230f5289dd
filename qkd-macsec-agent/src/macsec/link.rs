//! The MACsec link over rtnetlink: create, find, delete, bring up, switch the encoding SA.

use super::nl::{
    attrs, get_str, get_u32, get_u64, get_u8, MsgWriter, NlError, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use super::{
    errno_of, kernel_err, An, Cipher, LinkConfig, Macsec, MacsecError, MacsecLink, Sci, Validation,
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

const IFLA_MACSEC_SCI: u16 = 1;
const IFLA_MACSEC_ICV_LEN: u16 = 3;
const IFLA_MACSEC_CIPHER_SUITE: u16 = 4;
const IFLA_MACSEC_WINDOW: u16 = 5;
const IFLA_MACSEC_ENCODING_SA: u16 = 6;
const IFLA_MACSEC_ENCRYPT: u16 = 7;
const IFLA_MACSEC_PROTECT: u16 = 8;
const IFLA_MACSEC_INC_SCI: u16 = 9;
const IFLA_MACSEC_ES: u16 = 10;
const IFLA_MACSEC_SCB: u16 = 11;
const IFLA_MACSEC_REPLAY_PROTECT: u16 = 12;
const IFLA_MACSEC_VALIDATION: u16 = 13;

const IFF_UP: u32 = 1;

/// struct ifinfomsg: family, pad, type, index, flags, change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

/// Any link as rtnetlink reports it; `kind`/`data` come from IFLA_LINKINFO.
#[derive(Debug, Clone)]
pub(crate) struct RawLink {
    pub(crate) ifindex: u32,
    pub(crate) name: String,
    pub(crate) lower: u32,
    pub(crate) mac: [u8; 6],
    pub(crate) up: bool,
    pub(crate) kind: Option<String>,
    pub(crate) data: Vec<u8>,
}

pub(crate) fn parse_link(payload: &[u8]) -> Option<RawLink> {
    let hdr = payload.get(..16)?;
    let ifindex = u32::from_ne_bytes(hdr[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(hdr[8..12].try_into().ok()?);
    let mut link = RawLink {
        ifindex,
        name: String::new(),
        lower: 0,
        mac: [0; 6],
        up: flags & IFF_UP != 0,
        kind: None,
        data: Vec::new(),
    };
    for (ty, p) in attrs(&payload[16..]) {
        match ty {
            IFLA_IFNAME => link.name = get_str(p)?,
            IFLA_LINK => link.lower = get_u32(p)?,
            IFLA_ADDRESS if p.len() == 6 => link.mac.copy_from_slice(p),
            IFLA_LINKINFO => {
                for (ity, ip) in attrs(p) {
                    match ity {
                        IFLA_INFO_KIND => link.kind = get_str(ip),
                        IFLA_INFO_DATA => link.data = ip.to_vec(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

/// Reads the IFLA_INFO_DATA of a macsec link into a [`MacsecLink`].
pub(crate) fn macsec_from_raw(raw: &RawLink) -> Result<MacsecLink, MacsecError> {
    let bad = |what: &str| MacsecError::Netlink {
        op: "parse macsec link info",
        detail: format!("{}: {what}", raw.name),
    };
    let mut sci = None;
    let mut cipher_id = None;
    let mut l = MacsecLink {
        name: raw.name.clone(),
        ifindex: raw.ifindex,
        lower_ifindex: raw.lower,
        mac: raw.mac,
        up: raw.up,
        cipher: Cipher::GcmAes128,
        sci: Sci(0),
        icv_len: 16,
        encoding_sa: An::new(0)?,
        encrypt: false,
        protect: false,
        include_sci: false,
        end_station: false,
        scb: false,
        replay_protect: false,
        window: 0,
        validation: Validation::Strict,
    };
    for (ty, p) in attrs(&raw.data) {
        let flag = || get_u8(p).map(|v| v != 0).ok_or_else(|| bad("short flag"));
        match ty {
            IFLA_MACSEC_SCI => sci = Sci::from_wire(p),
            IFLA_MACSEC_ICV_LEN => l.icv_len = get_u8(p).ok_or_else(|| bad("icv_len"))?,
            IFLA_MACSEC_CIPHER_SUITE => cipher_id = get_u64(p),
            IFLA_MACSEC_WINDOW => l.window = get_u32(p).ok_or_else(|| bad("window"))?,
            IFLA_MACSEC_ENCODING_SA => {
                l.encoding_sa = An::new(get_u8(p).ok_or_else(|| bad("encoding_sa"))?)?
            }
            IFLA_MACSEC_ENCRYPT => l.encrypt = flag()?,
            IFLA_MACSEC_PROTECT => l.protect = flag()?,
            IFLA_MACSEC_INC_SCI => l.include_sci = flag()?,
            IFLA_MACSEC_ES => l.end_station = flag()?,
            IFLA_MACSEC_SCB => l.scb = flag()?,
            IFLA_MACSEC_REPLAY_PROTECT => l.replay_protect = flag()?,
            IFLA_MACSEC_VALIDATION => {
                l.validation = get_u8(p)
                    .and_then(Validation::from_kernel)
                    .ok_or_else(|| bad("validation"))?
            }
            _ => {}
        }
    }
    l.sci = sci.ok_or_else(|| bad("no SCI"))?;
    let id = cipher_id.ok_or_else(|| bad("no cipher suite"))?;
    l.cipher = Cipher::from_id(id).ok_or_else(|| MacsecError::CipherUnsupported {
        cipher: Cipher::GcmAes128,
        detail: format!("link {} uses unknown cipher id {id:#018x}", raw.name),
    })?;
    Ok(l)
}

impl Macsec {
    /// Looks up any link by name; `None` when it does not exist.
    pub(crate) fn raw_link_by_name(&mut self, name: &str) -> Result<Option<RawLink>, MacsecError> {
        let mut m = MsgWriter::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.header(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        self.get_one_link(m, name)
    }

    pub(crate) fn raw_link_by_index(
        &mut self,
        ifindex: u32,
    ) -> Result<Option<RawLink>, MacsecError> {
        let mut m = MsgWriter::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.header(&ifinfomsg(ifindex, 0, 0));
        self.get_one_link(m, &format!("ifindex {ifindex}"))
    }

    fn get_one_link(&mut self, m: MsgWriter, what: &str) -> Result<Option<RawLink>, MacsecError> {
        match self.route.request_collect(m) {
            Ok(replies) => Ok(replies.iter().find_map(|p| parse_link(p))),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(kernel_err("get link", what, e)),
        }
    }

    /// Finds a MACsec link by name. `Ok(None)` when no interface has that name; an error when
    /// the name belongs to a link of another kind.
    pub fn find_link(&mut self, name: &str) -> Result<Option<MacsecLink>, MacsecError> {
        let Some(raw) = self.raw_link_by_name(name)? else {
            return Ok(None);
        };
        if raw.kind.as_deref() != Some("macsec") {
            return Err(MacsecError::NotMacsec {
                name: name.to_owned(),
                kind: raw.kind.unwrap_or_else(|| "none".to_owned()),
            });
        }
        macsec_from_raw(&raw).map(Some)
    }

    /// Re-reads a link the caller holds, failing with [`MacsecError::InterfaceGone`] when it
    /// vanished.
    pub fn refresh_link(&mut self, link: &MacsecLink) -> Result<MacsecLink, MacsecError> {
        match self.raw_link_by_index(link.ifindex)? {
            Some(raw) if raw.kind.as_deref() == Some("macsec") => macsec_from_raw(&raw),
            _ => Err(MacsecError::InterfaceGone {
                name: link.name.clone(),
                ifindex: link.ifindex,
            }),
        }
    }

    /// Creates the MACsec link described by `cfg` (not yet up). If a MACsec link of that name
    /// already exists with the same settings it is returned as is (idempotent); a different one
    /// is an error, never silently replaced.
    pub fn create_link(&mut self, cfg: &LinkConfig) -> Result<MacsecLink, MacsecError> {
        cfg.check()?;
        let lower =
            self.raw_link_by_name(&cfg.lower)?
                .ok_or_else(|| MacsecError::InterfaceNotFound {
                    name: cfg.lower.clone(),
                })?;
        let sci = Sci::from_mac_port(lower.mac, cfg.port);

        let mut m = MsgWriter::new(
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        m.header(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, &cfg.name);
        m.attr_u32(IFLA_LINK, lower.ifindex);
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "macsec");
        let data = m.nest_begin(IFLA_INFO_DATA);
        m.attr(IFLA_MACSEC_SCI, &sci.wire());
        m.attr_u8(IFLA_MACSEC_ICV_LEN, cfg.icv_len);
        m.attr_u64(IFLA_MACSEC_CIPHER_SUITE, cfg.cipher.id());
        if cfg.replay_protect {
            // The kernel insists on a window whenever replay protection is on.
            m.attr_u32(IFLA_MACSEC_WINDOW, cfg.window);
        }
        m.attr_u8(IFLA_MACSEC_ENCODING_SA, cfg.encoding_sa.get());
        m.attr_u8(IFLA_MACSEC_ENCRYPT, cfg.encrypt.into());
        m.attr_u8(IFLA_MACSEC_PROTECT, cfg.protect.into());
        m.attr_u8(IFLA_MACSEC_INC_SCI, cfg.include_sci.into());
        m.attr_u8(IFLA_MACSEC_ES, cfg.end_station.into());
        m.attr_u8(IFLA_MACSEC_SCB, cfg.scb.into());
        m.attr_u8(IFLA_MACSEC_REPLAY_PROTECT, cfg.replay_protect.into());
        m.attr_u8(IFLA_MACSEC_VALIDATION, cfg.validation.to_kernel());
        m.nest_end(data);
        m.nest_end(info);

        match self.route.request_ack(m) {
            Ok(()) => {}
            Err(e) => match errno_of(&e) {
                Some(libc::EEXIST) => return self.adopt_matching(cfg, &lower),
                Some(libc::EOPNOTSUPP) => {
                    return Err(MacsecError::NoKernelSupport {
                        detail: "link kind \"macsec\" unknown to rtnetlink".to_owned(),
                    })
                }
                Some(libc::EINVAL) if cfg.cipher.is_xpn() => {
                    return Err(MacsecError::CipherUnsupported {
                        cipher: cfg.cipher,
                        detail: format!("rtnetlink refused the link: {}", describe(&e)),
                    })
                }
                Some(libc::EBUSY) => {
                    return Err(MacsecError::Busy {
                        op: "create link",
                        name: cfg.lower.clone(),
                        what: format!("SCI {sci}"),
                        hint: "another MACsec link on this lower device uses the same SCI; pick another port",
                    })
                }
                Some(libc::ENODEV) => {
                    return Err(MacsecError::InterfaceNotFound {
                        name: cfg.lower.clone(),
                    })
                }
                _ => return Err(kernel_err("create macsec link", &cfg.name, e)),
            },
        }
        tracing::info!(name = %cfg.name, lower = %cfg.lower, cipher = %cfg.cipher, %sci, "created macsec link");
        self.find_link(&cfg.name)?
            .ok_or_else(|| MacsecError::InterfaceNotFound {
                name: cfg.name.clone(),
            })
    }

    fn adopt_matching(
        &mut self,
        cfg: &LinkConfig,
        lower: &RawLink,
    ) -> Result<MacsecLink, MacsecError> {
        let link = self
            .find_link(&cfg.name)?
            .ok_or_else(|| MacsecError::InterfaceNotFound {
                name: cfg.name.clone(),
            })?;
        let mut mismatch = link.mismatches(cfg);
        if link.lower_ifindex != lower.ifindex {
            mismatch.push(format!(
                "lower: have ifindex {}, want {} ({})",
                link.lower_ifindex, lower.ifindex, cfg.lower
            ));
        }
        if !mismatch.is_empty() {
            return Err(MacsecError::LinkMismatch {
                name: cfg.name.clone(),
                mismatch: mismatch.join("; "),
            });
        }
        Ok(link)
    }

    /// Deletes a MACsec link by name; a missing link is success.
    pub fn delete_link(&mut self, name: &str) -> Result<(), MacsecError> {
        let Some(raw) = self.raw_link_by_name(name)? else {
            return Ok(());
        };
        if raw.kind.as_deref() != Some("macsec") {
            return Err(MacsecError::NotMacsec {
                name: name.to_owned(),
                kind: raw.kind.unwrap_or_else(|| "none".to_owned()),
            });
        }
        let mut m = MsgWriter::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.header(&ifinfomsg(raw.ifindex, 0, 0));
        match self.route.request_ack(m) {
            Ok(()) => {
                tracing::info!(name, "deleted macsec link");
                Ok(())
            }
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(kernel_err("delete macsec link", name, e)),
        }
    }

    /// Sets the link administratively up (idempotent).
    pub fn set_up(&mut self, link: &MacsecLink) -> Result<(), MacsecError> {
        self.set_updown(link.ifindex, &link.name, true)
    }

    pub(crate) fn set_updown(
        &mut self,
        ifindex: u32,
        name: &str,
        up: bool,
    ) -> Result<(), MacsecError> {
        let mut m = MsgWriter::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.header(&ifinfomsg(ifindex, if up { IFF_UP } else { 0 }, IFF_UP));
        match self.route.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Err(MacsecError::InterfaceGone {
                name: name.to_owned(),
                ifindex,
            }),
            Err(e) => Err(kernel_err("set link up", name, e)),
        }
    }

    /// Makes `an` the SA the link transmits with. The SA should exist and be active, otherwise
    /// the SecY is not operational and transmits nothing.
    pub fn set_encoding_sa(&mut self, link: &MacsecLink, an: An) -> Result<(), MacsecError> {
        let mut m = MsgWriter::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.header(&ifinfomsg(link.ifindex, 0, 0));
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "macsec");
        let data = m.nest_begin(IFLA_INFO_DATA);
        m.attr_u8(IFLA_MACSEC_ENCODING_SA, an.get());
        m.nest_end(data);
        m.nest_end(info);
        match self.route.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Err(MacsecError::InterfaceGone {
                name: link.name.clone(),
                ifindex: link.ifindex,
            }),
            Err(e) => Err(kernel_err("set encoding SA", &link.name, e)),
        }
    }

    /// Creates a veth pair `a` <-> `b` (both down). Scaffolding for the benchmark, which runs
    /// in a fresh VM without iproute2 doing the setup for it.
    pub fn create_veth_pair(&mut self, a: &str, b: &str) -> Result<(), MacsecError> {
        let mut m = MsgWriter::new(
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        m.header(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, a);
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.nest_begin(IFLA_INFO_DATA);
        let peer = m.nest_begin(VETH_INFO_PEER);
        m.header(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, b);
        m.nest_end(peer);
        m.nest_end(data);
        m.nest_end(info);
        self.route
            .request_ack(m)
            .map_err(|e| kernel_err("create veth pair", a, e))
    }

    /// Deletes any link by name (scaffolding cleanup); missing is success.
    pub fn delete_any_link(&mut self, name: &str) -> Result<(), MacsecError> {
        let Some(raw) = self.raw_link_by_name(name)? else {
            return Ok(());
        };
        let mut m = MsgWriter::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.header(&ifinfomsg(raw.ifindex, 0, 0));
        match self.route.request_ack(m) {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(kernel_err("delete link", name, e)),
        }
    }

    /// Brings any link up by name (scaffolding).
    pub fn set_link_up_by_name(&mut self, name: &str) -> Result<(), MacsecError> {
        let raw = self
            .raw_link_by_name(name)?
            .ok_or_else(|| MacsecError::InterfaceNotFound {
                name: name.to_owned(),
            })?;
        self.set_updown(raw.ifindex, name, true)
    }
}

fn describe(e: &NlError) -> String {
    match e {
        NlError::Kernel { errno, msg } => {
            let base = std::io::Error::from_raw_os_error(*errno).to_string();
            match msg {
                Some(m) => format!("{base}: {m}"),
                None => base,
            }
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::nl;
    use super::*;

    fn link_msg(kind: &str, data: impl FnOnce(&mut MsgWriter)) -> Vec<u8> {
        let mut m = MsgWriter::new(RTM_NEWLINK, 0);
        m.header(&ifinfomsg(7, IFF_UP, 0));
        m.attr_str(IFLA_IFNAME, "macsec0");
        m.attr_u32(IFLA_LINK, 3);
        m.attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]);
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, kind);
        let d = m.nest_begin(IFLA_INFO_DATA);
        data(&mut m);
        m.nest_end(d);
        m.nest_end(info);
        m.bytes()[nl::NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn parses_macsec_link_info() {
        let sci = Sci::from_mac_port([2, 0, 0, 0, 0, 1], 1);
        let p = link_msg("macsec", |m| {
            m.attr(IFLA_MACSEC_SCI, &sci.wire());
            m.attr_u8(IFLA_MACSEC_ICV_LEN, 16);
            m.attr_u64(IFLA_MACSEC_CIPHER_SUITE, Cipher::GcmAesXpn256.id());
            m.attr_u32(IFLA_MACSEC_WINDOW, 0);
            m.attr_u8(IFLA_MACSEC_ENCODING_SA, 2);
            m.attr_u8(IFLA_MACSEC_ENCRYPT, 1);
            m.attr_u8(IFLA_MACSEC_PROTECT, 1);
            m.attr_u8(IFLA_MACSEC_INC_SCI, 1);
            m.attr_u8(IFLA_MACSEC_ES, 0);
            m.attr_u8(IFLA_MACSEC_SCB, 0);
            m.attr_u8(IFLA_MACSEC_REPLAY_PROTECT, 1);
            m.attr_u8(IFLA_MACSEC_VALIDATION, 2);
        });
        let raw = parse_link(&p).unwrap();
        assert_eq!((raw.ifindex, raw.lower, raw.up), (7, 3, true));
        let l = macsec_from_raw(&raw).unwrap();
        assert_eq!(l.cipher, Cipher::GcmAesXpn256);
        assert_eq!(l.sci, sci);
        assert_eq!(l.encoding_sa.get(), 2);
        assert!(l.encrypt && l.protect && l.include_sci && l.replay_protect);
        assert_eq!(l.validation, Validation::Strict);
        let mut cfg = LinkConfig::new("macsec0", "veth0", Cipher::GcmAesXpn256);
        assert!(l.mismatches(&cfg).is_empty(), "{:?}", l.mismatches(&cfg));
        cfg.cipher = Cipher::GcmAes128;
        assert_eq!(l.mismatches(&cfg).len(), 1);
    }

    #[test]
    fn unknown_cipher_id_is_typed() {
        let p = link_msg("macsec", |m| {
            m.attr(IFLA_MACSEC_SCI, &[0; 8]);
            m.attr_u64(IFLA_MACSEC_CIPHER_SUITE, 0xdead);
        });
        let raw = parse_link(&p).unwrap();
        assert!(matches!(
            macsec_from_raw(&raw),
            Err(MacsecError::CipherUnsupported { .. })
        ));
    }
}
