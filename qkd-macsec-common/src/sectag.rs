//! Userspace decoder of a MACsec frame's SecTAG (IEEE 802.1AE-2018 clause 9.3), with the validity
//! rules of clause 9.12 as Linux applies them on receive (drivers/net/macsec.c,
//! `macsec_validate_skb`). The XDP and TC programs apply the same rules in their own code (the
//! verifier wants a different shape); the `sectag_xdp` fuzz target checks that both agree on every
//! input, so this decoder is the readable statement of what the programs count as malformed.
//!
//! Pure and allocation-free: it only reads the slice it is given.

use core::fmt;

pub use crate::ETH_HLEN;
use crate::{
    ETH_P_MACSEC, MACSEC_MIN_NON_SHORT_LEN, MACSEC_PORT_ES, SL_RESERVED, TCI_AN_MASK, TCI_C, TCI_E,
    TCI_ES, TCI_SC, TCI_SCB, TCI_V,
};

/// Destination and source MAC addresses.
const MACS_LEN: usize = 12;
/// SecTAG without the SCI: TCI/AN, SL, PN.
pub const SECTAG_BASE_LEN: usize = 6;
/// Length of an explicit SCI.
pub const SCI_LEN: usize = 8;

/// Why a frame is not a valid MACsec frame. Every field is a header value, never payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecTagError {
    /// Shorter than an Ethernet header plus the six fixed SecTAG octets.
    TooShort { len: usize },
    /// The (untagged) EtherType is not 0x88E5.
    NotMacsec { ethertype: u16 },
    /// 9.5: the version bit must be 0.
    Version,
    /// 9.6: with SC set, ES and SCB must be clear.
    ScWithEsOrScb { tci: u8 },
    /// 9.7: the two high bits of the short-length octet are reserved, 0.
    ReservedShortLength { sl: u8 },
    /// 9.7 / 9.12: the frame length does not match the short length (SL != 0) or carries less
    /// than 48 octets of secure data (SL = 0).
    Length {
        /// Octets after the two MAC addresses.
        after_macs: usize,
        short_len: u8,
        /// EtherType + SecTAG + ICV.
        overhead: usize,
    },
}

impl fmt::Display for SecTagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort { len } => write!(
                f,
                "frame of {len} bytes is shorter than an Ethernet header plus a SecTAG ({})",
                ETH_HLEN + SECTAG_BASE_LEN
            ),
            Self::NotMacsec { ethertype } => {
                write!(f, "EtherType {ethertype:#06x} is not MACsec (0x88e5)")
            }
            Self::Version => write!(f, "SecTAG version bit is set (only version 0 exists)"),
            Self::ScWithEsOrScb { tci } => {
                write!(f, "SecTAG TCI {tci:#04x} has SC together with ES or SCB")
            }
            Self::ReservedShortLength { sl } => {
                write!(f, "SecTAG short-length octet {sl:#04x} has reserved bits set")
            }
            Self::Length {
                after_macs,
                short_len,
                overhead,
            } => write!(
                f,
                "frame has {after_macs} bytes after the MAC addresses; short length {short_len} with \
                 {overhead} bytes of EtherType, SecTAG and ICV needs {}",
                if short_len == 0 {
                    "at least 48 bytes of secure data"
                } else {
                    "exactly that many bytes of secure data"
                }
            ),
        }
    }
}

/// A decoded SecTAG of a frame that passed every structural check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecTag {
    /// TCI and AN octet as on the wire.
    pub tci_an: u8,
    /// Short length (0..=47; 0 = the secure data is 48 octets or longer).
    pub short_len: u8,
    /// Packet number (for XPN SAs the lower 32 bits of the 64-bit PN).
    pub pn: u32,
    /// The explicit SCI (wire bytes) when the SC bit is set.
    pub explicit_sci: Option<[u8; SCI_LEN]>,
    /// Source MAC of the frame (the implicit SCI's address part).
    pub src_mac: [u8; 6],
}

impl SecTag {
    /// Association number.
    pub fn an(&self) -> u8 {
        self.tci_an & TCI_AN_MASK
    }
    /// End station bit.
    pub fn es(&self) -> bool {
        self.tci_an & TCI_ES != 0
    }
    /// Single copy broadcast bit.
    pub fn scb(&self) -> bool {
        self.tci_an & TCI_SCB != 0
    }
    /// Encrypted (E) bit.
    pub fn encrypted(&self) -> bool {
        self.tci_an & TCI_E != 0
    }
    /// Changed text (C) bit.
    pub fn changed(&self) -> bool {
        self.tci_an & TCI_C != 0
    }
    /// Octets of SecTAG on the wire (6, or 14 with an explicit SCI).
    pub fn len(&self) -> usize {
        SECTAG_BASE_LEN
            + if self.explicit_sci.is_some() {
                SCI_LEN
            } else {
                0
            }
    }
    /// Never true: a SecTAG has at least six octets (here for clippy's `len` convention).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The SCI of the frame's secure channel, as wire bytes. Explicit when SC = 1; with ES = 1 the
    /// source MAC and port 1 (9.9); otherwise the receiver's assumption, which on a point-to-point
    /// link is the peer's SCI (`implicit`, when configured) and else again source MAC + port 1.
    pub fn sci(&self, implicit: Option<[u8; SCI_LEN]>) -> [u8; SCI_LEN] {
        if let Some(s) = self.explicit_sci {
            return s;
        }
        let mut es = [0u8; SCI_LEN];
        es[..6].copy_from_slice(&self.src_mac);
        es[6..].copy_from_slice(&MACSEC_PORT_ES.to_be_bytes());
        match implicit {
            Some(i) if !self.es() => i,
            _ => es,
        }
    }

    /// PN 0 is valid only for an XPN SA, where it is the lower half of a 64-bit PN (802.1AEbw
    /// figure 10-5); the kernel drops PN 0 on every other SA.
    pub fn pn_valid(&self, xpn: bool) -> bool {
        xpn || self.pn != 0
    }

    /// Writes the SecTAG (EtherType first) into `out`; returns the octets written, or None if
    /// `out` is too short. Inverse of [`parse`] for the header part.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let n = 2 + self.len();
        let out = out.get_mut(..n)?;
        out[..2].copy_from_slice(&ETH_P_MACSEC.to_be_bytes());
        out[2] = self.tci_an;
        out[3] = self.short_len;
        out[4..8].copy_from_slice(&self.pn.to_be_bytes());
        if let Some(s) = self.explicit_sci {
            out[8..16].copy_from_slice(&s);
        }
        Some(n)
    }
}

/// The first rule of 9.5-9.7 that the TCI/AN and short-length octets break, in the order
/// `macsec_validate_skb` checks them (version, SC with ES or SCB, reserved SL bits); `None` when
/// they are fine. Shared with the XDP and TC programs, which call it only once their one combined
/// test of the three rules has failed (the valid path pays a single branch).
#[inline(always)]
pub const fn header_error(tci: u8, sl: u8) -> Option<SecTagError> {
    if tci & TCI_V != 0 {
        Some(SecTagError::Version)
    } else if tci & TCI_SC != 0 && tci & (TCI_ES | TCI_SCB) != 0 {
        Some(SecTagError::ScWithEsOrScb { tci })
    } else if sl & SL_RESERVED != 0 {
        Some(SecTagError::ReservedShortLength { sl })
    } else {
        None
    }
}

/// Decodes and validates the SecTAG of an untagged Ethernet frame (from the destination MAC, no
/// FCS) whose ICV is `icv_len` octets. The PN-zero rule depends on the SA, see
/// [`SecTag::pn_valid`].
pub fn parse(frame: &[u8], icv_len: usize) -> Result<SecTag, SecTagError> {
    let Some(head) = frame.get(..ETH_HLEN + SECTAG_BASE_LEN) else {
        return Err(SecTagError::TooShort { len: frame.len() });
    };
    let ethertype = u16::from_be_bytes([head[12], head[13]]);
    if ethertype != ETH_P_MACSEC {
        return Err(SecTagError::NotMacsec { ethertype });
    }
    let tci = head[14];
    let sl = head[15];
    if let Some(e) = header_error(tci, sl) {
        return Err(e);
    }
    let sc = tci & TCI_SC != 0;
    let overhead = 2 + SECTAG_BASE_LEN + if sc { SCI_LEN } else { 0 } + icv_len;
    let after_macs = frame.len() - MACS_LEN;
    let secure = after_macs.checked_sub(overhead);
    let len_ok = match (sl, secure) {
        (_, None) => false,
        (0, Some(s)) => s >= MACSEC_MIN_NON_SHORT_LEN,
        (sl, Some(s)) => s == usize::from(sl),
    };
    if !len_ok {
        return Err(SecTagError::Length {
            after_macs,
            short_len: sl,
            overhead,
        });
    }
    let explicit_sci = if sc {
        // The length rule guarantees the SCI is inside the frame.
        let mut s = [0u8; SCI_LEN];
        s.copy_from_slice(&frame[20..28]);
        Some(s)
    } else {
        None
    };
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&head[6..12]);
    Ok(SecTag {
        tci_an: tci,
        short_len: sl,
        pn: u32::from_be_bytes([head[16], head[17], head[18], head[19]]),
        explicit_sci,
        src_mac,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::MACSEC_ICV_LEN;

    const SRC: [u8; 6] = [2, 0, 0, 0, 0xaa, 1];
    const SCI: [u8; 8] = [2, 0, 0, 0, 0xaa, 1, 0, 7];

    fn frame(tci: u8, sl: u8, pn: u32, sci: Option<[u8; 8]>, secure: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&SRC);
        f.extend_from_slice(&ETH_P_MACSEC.to_be_bytes());
        f.push(tci);
        f.push(sl);
        f.extend_from_slice(&pn.to_be_bytes());
        if let Some(s) = sci {
            f.extend_from_slice(&s);
        }
        f.resize(f.len() + secure + MACSEC_ICV_LEN, 0xab);
        f
    }

    #[test]
    fn explicit_sci_frame_decodes_and_reencodes() {
        let f = frame(TCI_SC | TCI_E | TCI_C | 2, 0, 9, Some(SCI), 64);
        let t = parse(&f, MACSEC_ICV_LEN).unwrap();
        assert_eq!((t.an(), t.pn, t.sci(None)), (2, 9, SCI));
        assert!(t.encrypted() && t.changed() && !t.es());
        let mut out = [0u8; 16];
        assert_eq!(t.encode(&mut out), Some(16));
        assert_eq!(&out[..], &f[12..28]);
    }

    #[test]
    fn implicit_sci_follows_es_then_configuration() {
        let es = parse(&frame(TCI_ES, 0, 1, None, 48), MACSEC_ICV_LEN).unwrap();
        assert_eq!(es.sci(Some(SCI)), [2, 0, 0, 0, 0xaa, 1, 0, 1]);
        let plain = parse(&frame(0, 0, 1, None, 48), MACSEC_ICV_LEN).unwrap();
        assert_eq!(plain.sci(Some(SCI)), SCI);
        assert_eq!(plain.sci(None), [2, 0, 0, 0, 0xaa, 1, 0, 1]);
    }

    #[test]
    fn short_length_must_match_exactly() {
        assert!(parse(&frame(0, 10, 1, None, 10), MACSEC_ICV_LEN).is_ok());
        for secure in [9, 11] {
            assert!(matches!(
                parse(&frame(0, 10, 1, None, secure), MACSEC_ICV_LEN),
                Err(SecTagError::Length { short_len: 10, .. })
            ));
        }
        assert!(parse(&frame(0, 0, 1, None, 47), MACSEC_ICV_LEN).is_err());
    }

    #[test]
    fn header_rules_are_enforced() {
        let e = |tci, sl| parse(&frame(tci, sl, 1, Some(SCI), 64), MACSEC_ICV_LEN).unwrap_err();
        assert_eq!(e(TCI_V | TCI_SC, 0), SecTagError::Version);
        assert!(matches!(
            e(TCI_SC | TCI_ES, 0),
            SecTagError::ScWithEsOrScb { .. }
        ));
        assert!(matches!(
            e(TCI_SC | TCI_SCB, 0),
            SecTagError::ScWithEsOrScb { .. }
        ));
        assert!(matches!(
            e(TCI_SC, 0x40),
            SecTagError::ReservedShortLength { sl: 0x40 }
        ));
        let mut ip = frame(0, 0, 1, None, 48);
        ip[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(
            parse(&ip, MACSEC_ICV_LEN),
            Err(SecTagError::NotMacsec { ethertype: 0x0800 })
        );
        assert_eq!(
            parse(&ip[..19], MACSEC_ICV_LEN),
            Err(SecTagError::TooShort { len: 19 })
        );
    }

    #[test]
    fn pn_zero_only_for_xpn() {
        let t = parse(&frame(0, 0, 0, None, 48), MACSEC_ICV_LEN).unwrap();
        assert!(!t.pn_valid(false));
        assert!(t.pn_valid(true));
    }
}
