//! MACsec frames (EtherType 0x88E5): SecTAG validation as the kernel's `macsec_validate_skb` does
//! it, the frame's SCI, and the lookup of its SA in the registration table. Classifies only; the
//! counting happens in `outcome::settle`.

use qkd_macsec_common::{
    sa_bucket, sa_slot,
    sectag::{header_error, SecTagError, SECTAG_BASE_LEN},
    DataplaneConfig, SaReg, ETH_HLEN, MACSEC_ICV_LEN, MACSEC_MIN_NON_SHORT_LEN, SA_PROBES,
    SA_VALID, SA_XPN, SL_RESERVED, TCI_AN_MASK, TCI_ES, TCI_SC, TCI_SCB, TCI_V,
};

use crate::frame::{load, Frame};
use crate::maps::QKD_SA_REG;
use crate::outcome::{Malformed, Outcome};

/// A frame of a registered SA: everything counting it needs.
pub struct SaHit {
    /// Slot in QKD_SA_REG / QKD_SA_STATS.
    pub slot: u32,
    /// The registration (shared across CPUs: `fired` is written atomically, the rest read only).
    pub reg: *mut SaReg,
    /// The SCI as stored in [`SaReg::sci`].
    pub sci: u64,
    /// Association number.
    pub an: u8,
    /// The PN's lower 32 bits from the SecTAG.
    pub pn_lo: u32,
    /// Extended packet numbering (the SA's [`SA_XPN`] flag).
    pub xpn: bool,
}

/// Validates the SecTAG and finds the frame's SA: [`Outcome::Sa`], [`Outcome::UnknownSa`] or
/// [`Outcome::Malformed`]. The caller checked the 14-byte Ethernet header.
#[inline(always)]
pub fn try_macsec(f: &Frame, cfg: *const DataplaneConfig) -> Outcome {
    let frame_len = f.len as usize;
    // One pointer, one check, every read through it (see toolchain.md's verifier pitfalls).
    let p = f.data + ETH_HLEN;
    if p + SECTAG_BASE_LEN > f.end {
        return malformed(SecTagError::TooShort { len: frame_len });
    }
    // SAFETY: p..p+6 checked above.
    let (tci, sl, pn_lo) = unsafe {
        (
            load::<u8>(p),
            load::<u8>(p + 1),
            u32::from_be(load::<u32>(p + 2)),
        )
    };
    let sc = tci & TCI_SC != 0;
    // The three header rules in one test: the valid path pays one branch, the reason is worked
    // out (in the kernel's order) only once the frame is known to be malformed.
    if tci & TCI_V != 0 || sl & SL_RESERVED != 0 || (sc && tci & (TCI_ES | TCI_SCB) != 0) {
        return match header_error(tci, sl) {
            Some(e) => malformed(e),
            None => malformed(SecTagError::Version), // unreachable: the test above failed
        };
    }
    // Length rule of 802.1AE 9.7 as the kernel applies it: the frame after the two MAC
    // addresses holds EtherType + SecTAG + secure data + ICV, the secure data exactly SL bytes
    // when SL != 0, and at least 48 bytes otherwise.
    let extra = 2 + SECTAG_BASE_LEN + if sc { 8 } else { 0 } + MACSEC_ICV_LEN;
    // p + 6 <= end, so frame_len >= 20: no underflow.
    let after_macs = frame_len - 12;
    let short_len = sl as usize;
    let len_ok = if short_len != 0 {
        after_macs == extra + short_len
    } else {
        after_macs >= extra + MACSEC_MIN_NON_SHORT_LEN
    };
    if !len_ok {
        return malformed(SecTagError::Length {
            after_macs,
            short_len: sl,
            overhead: extra,
        });
    }
    let sci = if sc {
        // Only TC can get here with the SCI outside the linear part (a failed pull).
        if p + 14 > f.end {
            return malformed(SecTagError::TooShort { len: frame_len });
        }
        // SAFETY: p..p+14 checked above.
        unsafe { load::<u64>(p + 6) }
    } else {
        // SAFETY: the caller checked the 14-byte Ethernet header.
        let mac =
            unsafe { (load::<u32>(f.data + 6) as u64) | ((load::<u16>(f.data + 10) as u64) << 32) };
        // Port 0x0001 in network order is bytes [0x00, 0x01], i.e. 0x01 in the top byte.
        let es_sci = mac | (1u64 << 56);
        if tci & TCI_ES != 0 {
            es_sci
        } else {
            // SAFETY: valid map value pointer.
            let implicit = unsafe { (*cfg).implicit_sci };
            if implicit != 0 {
                implicit
            } else {
                es_sci
            }
        }
    };
    let an = tci & TCI_AN_MASK;
    let bucket = sa_bucket(sci);
    let mut i = 0;
    while i < SA_PROBES {
        let slot = sa_slot(f.dir as u32, bucket + i, an as u32);
        let Some(reg) = QKD_SA_REG.get_ptr_mut(slot) else {
            break;
        };
        // SAFETY: valid map value pointer.
        let (rsci, rflags) = unsafe { ((*reg).sci, (*reg).flags) };
        if rflags & SA_VALID != 0 && rsci == sci {
            let xpn = rflags & SA_XPN != 0;
            if pn_lo == 0 && !xpn {
                return Outcome::Malformed(Malformed::PnZero);
            }
            return Outcome::Sa(SaHit {
                slot,
                reg,
                sci,
                an,
                pn_lo,
                xpn,
            });
        }
        i += 1;
    }
    if pn_lo == 0 {
        // PN 0 is valid only for XPN, and an unregistered SA is not known to be XPN.
        return Outcome::Malformed(Malformed::PnZero);
    }
    Outcome::UnknownSa { sci, an }
}

#[inline(always)]
fn malformed(e: SecTagError) -> Outcome {
    Outcome::Malformed(Malformed::SecTag(e))
}
