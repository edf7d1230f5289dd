//! The project's LLDP: LLDPDUs carrying one organizationally specific TLV (OUI 5A:51:4B, subtype
//! 1 by default) whose payload is a key-exchange message (opaque here, defined by `keyx`), a
//! strict parser for them, and an AF_PACKET sender.
//!
//! An LLDPDU we build: Chassis ID (subtype 4, MAC address), Port ID (subtype 5, interface name),
//! TTL, the project TLV, End. The parser accepts exactly that shape (other optional TLVs allowed
//! between TTL and End) and names every deviation.

mod sender;

pub use qkd_macsec_common::{LLDP_DST_MAC, LLDP_OUI, LLDP_SUBTYPE};
pub use sender::LldpSender;

/// Largest payload of the project TLV: 511-byte information string minus OUI and subtype.
pub const MAX_PAYLOAD: usize = 507;
/// Chassis ID subtype "MAC address" (IEEE 802.1AB 8.5.2.2).
const CHASSIS_MAC: u8 = 4;
/// Port ID subtype "interface name" (IEEE 802.1AB 8.5.3.2).
const PORT_IFNAME: u8 = 5;
const TLV_END: u8 = 0;
const TLV_CHASSIS: u8 = 1;
const TLV_PORT: u8 = 2;
const TLV_TTL: u8 = 3;
const TLV_ORG: u8 = 127;

/// Why an LLDPDU or TLV was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LldpError {
    #[error("TLV header at offset {offset} is truncated ({available} of 2 bytes)")]
    TruncatedHeader { offset: usize, available: usize },
    #[error("TLV type {tlv_type} at offset {offset} says {len} bytes, only {available} remain")]
    LengthPastEnd {
        offset: usize,
        tlv_type: u8,
        len: usize,
        available: usize,
    },
    #[error("expected mandatory TLV type {expected} at offset {offset}, found type {found}")]
    MissingMandatory {
        expected: u8,
        found: u8,
        offset: usize,
    },
    #[error("mandatory TLV type {tlv_type} at offset {offset} is empty")]
    EmptyMandatory { tlv_type: u8, offset: usize },
    #[error("Chassis ID is not a MAC address (subtype {subtype}, {len} bytes); expected subtype 4 with 6 bytes")]
    BadChassisId { subtype: u8, len: usize },
    #[error("Port ID is not an interface name (subtype {subtype}) or not UTF-8")]
    BadPortId { subtype: u8 },
    #[error("TTL TLV has {len} bytes, expected 2")]
    BadTtl { len: usize },
    #[error("mandatory TLV type {tlv_type} repeated at offset {offset}")]
    DuplicateMandatory { tlv_type: u8, offset: usize },
    #[error("End TLV at offset {offset} has length {len}, expected 0")]
    BadEnd { offset: usize, len: usize },
    #[error("LLDPDU has no End TLV")]
    MissingEnd,
    #[error("organizationally specific TLV at offset {offset} is {len} bytes, shorter than OUI + subtype")]
    ShortOrgTlv { offset: usize, len: usize },
    #[error("TLV OUI {found:02X?} is not the configured {expected:02X?}")]
    WrongOui { found: [u8; 3], expected: [u8; 3] },
    #[error("TLV subtype {found} is not the configured {expected}")]
    WrongSubtype { found: u8, expected: u8 },
    #[error("LLDPDU carries no project TLV (OUI {oui:02X?} subtype {subtype})")]
    NoProjectTlv { oui: [u8; 3], subtype: u8 },
    #[error("LLDPDU carries the project TLV twice (second at offset {offset})")]
    DuplicateProjectTlv { offset: usize },
    #[error("payload of {len} bytes exceeds the TLV maximum of {MAX_PAYLOAD}")]
    PayloadTooLong { len: usize },
    #[error("port ID {len} bytes long; 1..=255 bytes fit the TLV")]
    BadPortIdLength { len: usize },
    #[error("frame of {len} bytes is not an LLDP frame (EtherType {ethertype:#06x})")]
    NotLldp { len: usize, ethertype: u16 },
    /// A socket operation failed; `errno` for callers that act on it (e.g. ENODEV).
    #[error("{op} interface {ifname:?} failed: {message}")]
    Io {
        op: &'static str,
        ifname: String,
        errno: Option<i32>,
        message: String,
    },
}

/// The content of one of our LLDPDUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LldpFrame {
    /// Chassis ID: the sender's MAC.
    pub chassis_mac: [u8; 6],
    /// Port ID: the sender's interface name.
    pub port_id: String,
    /// Time to live in seconds.
    pub ttl: u16,
    /// Payload of the project TLV (after OUI and subtype).
    pub payload: Vec<u8>,
}

fn push_tlv(out: &mut Vec<u8>, tlv_type: u8, value: &[u8]) {
    debug_assert!(value.len() <= 511);
    let h = (u16::from(tlv_type) << 9) | value.len() as u16;
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(value);
}

impl LldpFrame {
    /// The LLDPDU (no Ethernet header) with the project TLV under `oui`/`subtype`.
    pub fn encode_lldpdu(&self, oui: [u8; 3], subtype: u8) -> Result<Vec<u8>, LldpError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(LldpError::PayloadTooLong {
                len: self.payload.len(),
            });
        }
        let port = self.port_id.as_bytes();
        if port.is_empty() || port.len() > 255 {
            return Err(LldpError::BadPortIdLength { len: port.len() });
        }
        let mut out = Vec::with_capacity(32 + port.len() + self.payload.len());
        let mut chassis = vec![CHASSIS_MAC];
        chassis.extend_from_slice(&self.chassis_mac);
        push_tlv(&mut out, TLV_CHASSIS, &chassis);
        let mut p = vec![PORT_IFNAME];
        p.extend_from_slice(port);
        push_tlv(&mut out, TLV_PORT, &p);
        push_tlv(&mut out, TLV_TTL, &self.ttl.to_be_bytes());
        let mut org = Vec::with_capacity(4 + self.payload.len());
        org.extend_from_slice(&oui);
        org.push(subtype);
        org.extend_from_slice(&self.payload);
        push_tlv(&mut out, TLV_ORG, &org);
        push_tlv(&mut out, TLV_END, &[]);
        Ok(out)
    }

    /// A whole Ethernet frame to the nearest-bridge address, from `src_mac`.
    pub fn encode_frame(
        &self,
        src_mac: [u8; 6],
        oui: [u8; 3],
        subtype: u8,
    ) -> Result<Vec<u8>, LldpError> {
        let mut f = Vec::with_capacity(14 + 64 + self.payload.len());
        f.extend_from_slice(&LLDP_DST_MAC);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&qkd_macsec_common::ETH_P_LLDP.to_be_bytes());
        f.extend(self.encode_lldpdu(oui, subtype)?);
        Ok(f)
    }

    /// Parses an Ethernet frame holding one of our LLDPDUs (untagged, EtherType 0x88CC).
    pub fn parse_frame(frame: &[u8], oui: [u8; 3], subtype: u8) -> Result<Self, LldpError> {
        let ethertype = if frame.len() >= 14 {
            u16::from_be_bytes([frame[12], frame[13]])
        } else {
            0
        };
        if ethertype != qkd_macsec_common::ETH_P_LLDP {
            return Err(LldpError::NotLldp {
                len: frame.len(),
                ethertype,
            });
        }
        Self::parse_lldpdu(&frame[14..], oui, subtype)
    }

    /// Parses an LLDPDU strictly (see the module docs).
    pub fn parse_lldpdu(pdu: &[u8], oui: [u8; 3], subtype: u8) -> Result<Self, LldpError> {
        let mut off = 0usize;
        let mut index = 0usize;
        let mut chassis_mac = None;
        let mut port_id = None;
        let mut ttl = None;
        let mut payload: Option<Vec<u8>> = None;
        loop {
            let available = pdu.len().saturating_sub(off);
            if available == 0 {
                return Err(LldpError::MissingEnd);
            }
            if available < 2 {
                return Err(LldpError::TruncatedHeader {
                    offset: off,
                    available,
                });
            }
            let h = u16::from_be_bytes([pdu[off], pdu[off + 1]]);
            let tlv_type = (h >> 9) as u8;
            let len = usize::from(h & 0x1ff);
            if len > available - 2 {
                return Err(LldpError::LengthPastEnd {
                    offset: off,
                    tlv_type,
                    len,
                    available: available - 2,
                });
            }
            let value = &pdu[off + 2..off + 2 + len];
            let expected = match index {
                0 => Some(TLV_CHASSIS),
                1 => Some(TLV_PORT),
                2 => Some(TLV_TTL),
                _ => None,
            };
            if let Some(expected) = expected {
                if tlv_type != expected {
                    return Err(LldpError::MissingMandatory {
                        expected,
                        found: tlv_type,
                        offset: off,
                    });
                }
                if len == 0 {
                    return Err(LldpError::EmptyMandatory {
                        tlv_type,
                        offset: off,
                    });
                }
            }
            match tlv_type {
                TLV_END => {
                    if len != 0 {
                        return Err(LldpError::BadEnd { offset: off, len });
                    }
                    break;
                }
                TLV_CHASSIS | TLV_PORT | TLV_TTL if expected.is_none() => {
                    return Err(LldpError::DuplicateMandatory {
                        tlv_type,
                        offset: off,
                    });
                }
                TLV_CHASSIS => {
                    if value[0] != CHASSIS_MAC || len != 7 {
                        return Err(LldpError::BadChassisId {
                            subtype: value[0],
                            len: len - 1,
                        });
                    }
                    chassis_mac = Some(<[u8; 6]>::try_from(&value[1..7]).expect("6 bytes"));
                }
                TLV_PORT => {
                    // 802.1AB 8.5.3: the port ID is 1..=255 octets (the encoder's bound too;
                    // found by the lldp fuzz target's decode/encode round trip).
                    if len - 1 > 255 {
                        return Err(LldpError::BadPortIdLength { len: len - 1 });
                    }
                    let name = std::str::from_utf8(&value[1..]).ok();
                    match name {
                        Some(n) if value[0] == PORT_IFNAME && !n.is_empty() => {
                            port_id = Some(n.to_owned());
                        }
                        _ => return Err(LldpError::BadPortId { subtype: value[0] }),
                    }
                }
                TLV_TTL => {
                    if len != 2 {
                        return Err(LldpError::BadTtl { len });
                    }
                    ttl = Some(u16::from_be_bytes([value[0], value[1]]));
                }
                TLV_ORG => {
                    if len < 4 {
                        return Err(LldpError::ShortOrgTlv { offset: off, len });
                    }
                    if value[..3] == oui && value[3] == subtype {
                        if payload.is_some() {
                            return Err(LldpError::DuplicateProjectTlv { offset: off });
                        }
                        payload = Some(value[4..].to_vec());
                    }
                }
                _ => {}
            }
            off += 2 + len;
            index += 1;
        }
        if index < 3 {
            // End before the mandatory TLVs (index 0..2 would have failed above unless End).
            return Err(LldpError::MissingMandatory {
                expected: [TLV_CHASSIS, TLV_PORT, TLV_TTL][index],
                found: TLV_END,
                offset: off,
            });
        }
        let payload = payload.ok_or(LldpError::NoProjectTlv { oui, subtype })?;
        Ok(Self {
            chassis_mac: chassis_mac.expect("index >= 3 implies a Chassis ID"),
            port_id: port_id.expect("index >= 3 implies a Port ID"),
            ttl: ttl.expect("index >= 3 implies a TTL"),
            payload,
        })
    }
}

/// Checks one TLV information string (as the XDP event delivers it) and returns its payload.
pub fn project_payload(info: &[u8], oui: [u8; 3], subtype: u8) -> Result<&[u8], LldpError> {
    if info.len() < 4 {
        return Err(LldpError::ShortOrgTlv {
            offset: 0,
            len: info.len(),
        });
    }
    let found: [u8; 3] = info[..3].try_into().expect("3 bytes");
    if found != oui {
        return Err(LldpError::WrongOui {
            found,
            expected: oui,
        });
    }
    if info[3] != subtype {
        return Err(LldpError::WrongSubtype {
            found: info[3],
            expected: subtype,
        });
    }
    Ok(&info[4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LldpFrame {
        LldpFrame {
            chassis_mac: [0x02, 0, 0, 0, 1, 1],
            port_id: "eth1".into(),
            ttl: 120,
            payload: b"key-ids".to_vec(),
        }
    }

    fn pdu() -> Vec<u8> {
        sample().encode_lldpdu(LLDP_OUI, LLDP_SUBTYPE).unwrap()
    }

    fn parse(p: &[u8]) -> Result<LldpFrame, LldpError> {
        LldpFrame::parse_lldpdu(p, LLDP_OUI, LLDP_SUBTYPE)
    }

    #[test]
    fn round_trips_and_has_the_documented_layout() {
        let p = pdu();
        assert_eq!(parse(&p).unwrap(), sample());
        // Chassis ID: type 1, len 7, subtype 4, MAC.
        assert_eq!(&p[..9], &[0x02, 0x07, 4, 0x02, 0, 0, 0, 1, 1]);
        // Ends with End TLV.
        assert_eq!(&p[p.len() - 2..], &[0, 0]);
        let frame = sample()
            .encode_frame([2, 0, 0, 0, 1, 1], LLDP_OUI, LLDP_SUBTYPE)
            .unwrap();
        assert_eq!(&frame[..6], &LLDP_DST_MAC);
        assert_eq!(&frame[12..14], &[0x88, 0xCC]);
        assert_eq!(
            LldpFrame::parse_frame(&frame, LLDP_OUI, LLDP_SUBTYPE).unwrap(),
            sample()
        );
    }

    #[test]
    fn max_payload_fits_and_one_more_byte_does_not() {
        let mut f = sample();
        f.payload = vec![7; MAX_PAYLOAD];
        let p = f.encode_lldpdu(LLDP_OUI, LLDP_SUBTYPE).unwrap();
        assert_eq!(parse(&p).unwrap().payload.len(), MAX_PAYLOAD);
        f.payload.push(0);
        assert_eq!(
            f.encode_lldpdu(LLDP_OUI, LLDP_SUBTYPE),
            Err(LldpError::PayloadTooLong { len: 508 })
        );
    }

    #[test]
    fn truncated_header_and_length_past_end() {
        let p = pdu();
        // Cut inside the End TLV's header.
        assert_eq!(
            parse(&p[..p.len() - 1]),
            Err(LldpError::TruncatedHeader {
                offset: p.len() - 2,
                available: 1
            })
        );
        // Cut inside the project TLV's value.
        let cut = p.len() - 4;
        assert!(matches!(
            parse(&p[..cut]),
            Err(LldpError::LengthPastEnd { tlv_type: 127, .. })
        ));
    }

    #[test]
    fn missing_end_is_an_error() {
        let p = pdu();
        assert_eq!(parse(&p[..p.len() - 2]), Err(LldpError::MissingEnd));
        let mut bad_end = p.clone();
        let n = bad_end.len();
        bad_end[n - 1] = 1;
        bad_end.push(0);
        assert!(matches!(
            parse(&bad_end),
            Err(LldpError::BadEnd { len: 1, .. })
        ));
    }

    #[test]
    fn zero_length_and_misordered_mandatory_tlvs() {
        let mut z = Vec::new();
        push_tlv(&mut z, 1, &[]);
        push_tlv(&mut z, 0, &[]);
        assert_eq!(
            parse(&z),
            Err(LldpError::EmptyMandatory {
                tlv_type: 1,
                offset: 0
            })
        );
        let mut o = Vec::new();
        push_tlv(&mut o, 2, &[5, b'x']);
        push_tlv(&mut o, 0, &[]);
        assert!(matches!(
            parse(&o),
            Err(LldpError::MissingMandatory {
                expected: 1,
                found: 2,
                ..
            })
        ));
        let mut e = Vec::new();
        push_tlv(&mut e, 0, &[]);
        assert!(matches!(
            parse(&e),
            Err(LldpError::MissingMandatory { expected: 1, .. })
        ));
        let mut ttl0 = Vec::new();
        push_tlv(&mut ttl0, 1, &[4, 2, 0, 0, 0, 0, 1]);
        push_tlv(&mut ttl0, 2, &[5, b'e']);
        push_tlv(&mut ttl0, 3, &[]);
        push_tlv(&mut ttl0, 0, &[]);
        assert!(matches!(
            parse(&ttl0),
            Err(LldpError::EmptyMandatory { tlv_type: 3, .. })
        ));
    }

    #[test]
    fn wrong_oui_or_subtype_means_no_project_tlv() {
        let p = sample().encode_lldpdu([0x00, 0x80, 0xC2], 1).unwrap();
        assert_eq!(
            parse(&p),
            Err(LldpError::NoProjectTlv {
                oui: LLDP_OUI,
                subtype: LLDP_SUBTYPE
            })
        );
        let p = sample().encode_lldpdu(LLDP_OUI, 2).unwrap();
        assert!(matches!(parse(&p), Err(LldpError::NoProjectTlv { .. })));
        assert_eq!(
            project_payload(&[0, 0x80, 0xC2, 1, 9], LLDP_OUI, LLDP_SUBTYPE),
            Err(LldpError::WrongOui {
                found: [0, 0x80, 0xC2],
                expected: LLDP_OUI
            })
        );
        assert_eq!(
            project_payload(&[0x5A, 0x51, 0x4B, 3], LLDP_OUI, LLDP_SUBTYPE),
            Err(LldpError::WrongSubtype {
                found: 3,
                expected: 1
            })
        );
        assert_eq!(
            project_payload(&[0x5A, 0x51, 0x4B, 1, 8], LLDP_OUI, LLDP_SUBTYPE),
            Ok(&[8u8][..])
        );
    }

    #[test]
    fn duplicates_and_bad_ids_are_rejected() {
        let mut p = pdu();
        // Insert a second project TLV before End.
        let n = p.len();
        let mut extra = Vec::new();
        push_tlv(&mut extra, 127, &[0x5A, 0x51, 0x4B, 1, 0]);
        p.splice(n - 2..n - 2, extra);
        assert!(matches!(
            parse(&p),
            Err(LldpError::DuplicateProjectTlv { .. })
        ));
        let mut c = Vec::new();
        push_tlv(&mut c, 1, &[7, b'h', b'o', b's', b't']);
        assert!(matches!(
            parse(&c),
            Err(LldpError::BadChassisId { subtype: 7, .. })
        ));
        let mut d = Vec::new();
        push_tlv(&mut d, 1, &[4, 2, 0, 0, 0, 0, 1]);
        push_tlv(&mut d, 2, &[5, b'e']);
        push_tlv(&mut d, 3, &[0, 120]);
        push_tlv(&mut d, 1, &[4, 2, 0, 0, 0, 0, 1]);
        push_tlv(&mut d, 0, &[]);
        assert!(matches!(
            parse(&d),
            Err(LldpError::DuplicateMandatory { tlv_type: 1, .. })
        ));
        let mut s = Vec::new();
        push_tlv(&mut s, 1, &[4, 2, 0, 0, 0, 0, 1]);
        push_tlv(&mut s, 2, &[5, b'e']);
        push_tlv(&mut s, 3, &[0, 120]);
        push_tlv(&mut s, 127, &[0x5A, 0x51]);
        push_tlv(&mut s, 0, &[]);
        assert!(matches!(
            parse(&s),
            Err(LldpError::ShortOrgTlv { len: 2, .. })
        ));
    }

    #[test]
    fn not_an_lldp_frame() {
        assert!(matches!(
            LldpFrame::parse_frame(&[0; 20], LLDP_OUI, LLDP_SUBTYPE),
            Err(LldpError::NotLldp { ethertype: 0, .. })
        ));
        assert!(matches!(
            LldpFrame::parse_frame(&[0; 5], LLDP_OUI, LLDP_SUBTYPE),
            Err(LldpError::NotLldp { len: 5, .. })
        ));
    }

    /// Regression (fuzz target `lldp`, decode/encode round trip): a 300-byte port ID decoded,
    /// but the encoder (rightly) refuses more than 255, so the agent accepted frames it could not
    /// have sent. 802.1AB bounds the port ID to 1..=255 octets; 255 still decodes.
    #[test]
    fn port_id_longer_than_255_is_rejected() {
        let build = |n: usize| {
            let mut p = Vec::new();
            push_tlv(&mut p, 1, &[4, 2, 0, 0, 0, 0, 1]);
            let mut port = vec![5];
            port.resize(1 + n, b'p');
            push_tlv(&mut p, 2, &port);
            push_tlv(&mut p, 3, &[0, 120]);
            push_tlv(&mut p, 127, &[0x5A, 0x51, 0x4B, 1, 9]);
            push_tlv(&mut p, 0, &[]);
            p
        };
        let ok = parse(&build(255)).unwrap();
        let again = ok.encode_lldpdu(LLDP_OUI, LLDP_SUBTYPE).unwrap();
        assert_eq!(parse(&again).unwrap(), ok);
        assert!(matches!(
            parse(&build(256)),
            Err(LldpError::BadPortIdLength { len: 256 })
        ));
        assert!(matches!(
            parse(&build(300)),
            Err(LldpError::BadPortIdLength { len: 300 })
        ));
    }
}
