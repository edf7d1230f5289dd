//! Counter and event writes. Called from `outcome::settle` only.

use core::intrinsics::{atomic_and, atomic_or, AtomicOrdering};

use aya_ebpf::EbpfContext;
use qkd_macsec_common::{IfCounter, PnEvent, EVENT_PN, PN_THRESHOLDS};

use crate::frame::Frame;
use crate::macsec::SaHit;
use crate::maps::{QKD_EVENTS, QKD_IF_STATS, QKD_SA_STATS};
use crate::outcome::events_lost;

/// Adds a frame of `bytes` to an interface counter; returns this CPU's frame count after it (0
/// if the counter could not be found, which cannot happen with an in-range index).
#[inline(always)]
pub fn count(which: IfCounter, bytes: u64) -> u64 {
    let Some(c) = QKD_IF_STATS.get_ptr_mut(which as u32) else {
        return 0;
    };
    // SAFETY: per-CPU slot; this CPU is the only writer while the program runs.
    unsafe {
        (*c).frames += 1;
        (*c).bytes += bytes;
        (*c).frames
    }
}

/// Counts a registered SA's frame: frames, bytes, highest full PN; and fires the PN events of the
/// thresholds this frame reached.
#[inline(always)]
pub fn count_sa<C: EbpfContext>(ctx: &C, f: &Frame, hit: &SaHit) {
    let Some(st) = QKD_SA_STATS.get_ptr_mut(hit.slot) else {
        return;
    };
    let reg = hit.reg;
    // SAFETY: st is this CPU's slot (no concurrent writer); reg a valid shared map value.
    unsafe {
        let highest = (*st).highest_pn;
        let pn = if hit.xpn {
            // Recover the upper half the way an 802.1AE XPN receiver does: relative to the highest
            // PN seen (here: on this CPU), a lower half far below the last one means it wrapped.
            let reg_hi = (*reg).pn_hi;
            let seen_hi = (highest >> 32) as u32;
            let (hi, last_lo) = if seen_hi >= reg_hi {
                (seen_hi, highest as u32)
            } else {
                (reg_hi, 0)
            };
            let hi = if hit.pn_lo < last_lo && last_lo - hit.pn_lo > 0x8000_0000 {
                hi.wrapping_add(1)
            } else {
                hi
            };
            ((hi as u64) << 32) | hit.pn_lo as u64
        } else {
            hit.pn_lo as u64
        };
        (*st).frames += 1;
        (*st).bytes += f.len;
        if pn > highest {
            (*st).highest_pn = pn;
        }
        // One compare on the common path: the loop only runs once the PN reached the lowest
        // armed threshold.
        if pn < (*reg).next_check {
            return;
        }
        let mut t = 0;
        while t < PN_THRESHOLDS {
            let thr = (*reg).thresholds[t];
            let bit = 1u64 << t;
            if thr != 0 && pn >= thr && (*reg).fired & bit == 0 {
                fire(ctx, f, hit, pn, t, thr);
            }
            t += 1;
        }
    }
}

/// Sends the PN event of threshold `t` unless another CPU already did: the atomic fetch_or on the
/// shared `fired` word picks exactly one sender. Inlined: BPF calls take at most five arguments.
#[inline(always)]
fn fire<C: EbpfContext>(ctx: &C, f: &Frame, hit: &SaHit, pn: u64, t: usize, thr: u64) {
    let bit = 1u64 << t;
    // SAFETY: `fired` is a u64 inside a map value, 8-byte aligned; program writers use atomics.
    let fired = unsafe { core::ptr::addr_of_mut!((*hit.reg).fired) };
    // SAFETY: as above.
    let old: u64 = unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(fired, bit) };
    if old & bit != 0 {
        return;
    }
    match QKD_EVENTS.reserve::<PnEvent>(0) {
        Some(mut e) => {
            e.write(PnEvent {
                kind: EVENT_PN,
                ifindex: f.ifindex(),
                sci: hit.sci,
                pn,
                threshold: thr,
                slot: hit.slot,
                direction: f.dir as u8,
                an: hit.an,
                threshold_index: t as u8,
                _pad: 0,
            });
            e.submit(0);
        }
        None => {
            // No room: re-arm so the next frame retries, and say that an event was lost.
            // SAFETY: as above.
            unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(fired, !bit) };
            events_lost(ctx, f);
        }
    }
}
