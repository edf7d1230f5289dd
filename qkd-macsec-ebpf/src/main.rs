//! The kernel side of qkd-macsec: XDP (ingress) and TC (egress) programs on the MACsec link's lower
//! device. Map layout and event format: docs/dataplane.md and qkd-macsec-common.
//!
//! Fast-path budget: a registered SA's frame costs one config lookup, one SA registration lookup
//! and one per-CPU stats lookup, all ARRAY maps (inlined lookups on current kernels), no hashing
//! beyond one multiply.
#![no_std]
#![no_main]
// The BPF target has no `atomic-cas`, so core::sync::atomic offers no fetch_or; the intrinsic
// lowers to BPF_ATOMIC | BPF_OR | BPF_FETCH (kernel >= 5.12).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic fetch-or intrinsic, see above")]
// aya-ebpf's #[classifier] expands to a `pub extern "C" fn` taking `*mut __sk_buff` that it
// dereferences; the lint fires on that generated wrapper, not on code written here.
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "triggered by the #[classifier] macro's generated wrapper"
)]

use core::intrinsics::{atomic_and, atomic_or, AtomicOrdering};

use aya_ebpf::{
    bindings::{__sk_buff, xdp_action, xdp_md},
    helpers::generated::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use qkd_macsec_common::{
    sa_bucket, sa_slot, Counter, DataplaneConfig, IfCounter, LldpEvent, PnEvent, ProbeClass, SaReg,
    SaStats, CFG_LLDP_DROP, CFG_STALL, ETH_P_LLDP, ETH_P_MACSEC, ETH_P_PAE, EVENTS_BYTES,
    EVENT_LLDP, EVENT_PN, IF_COUNTERS, LLDP_MAX_TLVS, LLDP_TLV_ORG, MACSEC_ICV_LEN,
    MACSEC_MIN_NON_SHORT_LEN, PN_THRESHOLDS, PROBE_CLASSES, SA_PROBES, SA_SLOTS, SA_VALID, SA_XPN,
    SL_RESERVED, TCI_AN_MASK, TCI_ES, TCI_SC, TCI_SCB, TCI_V,
};

/// Frames seen by `probe`, by class: the harness's proof that an XDP program loads and counts.
#[map(name = "PROBE_COUNTERS")]
static PROBE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_CLASSES, 0);

#[map(name = "QKD_CONFIG")]
static QKD_CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

#[map(name = "QKD_SA_REG")]
static QKD_SA_REG: Array<SaReg> = Array::with_max_entries(SA_SLOTS, 0);

#[map(name = "QKD_SA_STATS")]
static QKD_SA_STATS: PerCpuArray<SaStats> = PerCpuArray::with_max_entries(SA_SLOTS, 0);

#[map(name = "QKD_IF_STATS")]
static QKD_IF_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(IF_COUNTERS, 0);

#[map(name = "QKD_EVENTS")]
static QKD_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// TC verdicts: TC_ACT_UNSPEC / TCX_NEXT (both -1) lets the next program or the default decide.
const TC_NEXT: i32 = -1;
/// TC_ACT_SHOT / TCX_DROP.
const TC_DROP: i32 = 2;
const DIR_RX: u32 = 0;
const DIR_TX: u32 = 1;

/// Counts frames by EtherType class and passes everything.
#[xdp]
pub fn probe(ctx: XdpContext) -> u32 {
    let class = classify(&ctx);
    if let Some(slot) = PROBE_COUNTERS.get_ptr_mut(class as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
    xdp_action::XDP_PASS
}

fn classify(ctx: &XdpContext) -> ProbeClass {
    let data = ctx.data();
    if data + ETH_HLEN > ctx.data_end() {
        return ProbeClass::Other;
    }
    // SAFETY: bounds checked against data_end just above.
    let ethertype = unsafe { u16::from_be(*((data + 12) as *const u16)) };
    match ethertype {
        ETH_P_LLDP => ProbeClass::Lldp,
        ETH_P_MACSEC => ProbeClass::Macsec,
        ETH_P_IP => ProbeClass::Ipv4,
        _ => ProbeClass::Other,
    }
}

/// The benchmark's baseline: the cheapest possible XDP program.
#[xdp]
pub fn qkd_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The TC benchmark's baseline.
#[classifier]
pub fn qkd_tc_pass(_ctx: TcContext) -> i32 {
    TC_NEXT
}

/// Ingress on the lower device: LLDP hand-off, RX SA counters, RX stall.
#[xdp]
pub fn qkd_xdp(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    let Some(cfg) = QKD_CONFIG.get_ptr(0) else {
        return xdp_action::XDP_PASS;
    };
    let stall = stalled(cfg);
    if data + ETH_HLEN > end {
        return if stall {
            count(IfCounter::RxStallDrop, (end - data) as u64);
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        };
    }
    // SAFETY: 14 bytes checked above.
    let ethertype = u16::from_be(unsafe { *((data + 12) as *const u16) });
    match ethertype {
        // LLDP always passes the stall (the key exchange must go on).
        ETH_P_LLDP => lldp(&ctx, cfg, data, end),
        ETH_P_PAE => xdp_action::XDP_PASS,
        _ if stall => {
            count(IfCounter::RxStallDrop, (end - data) as u64);
            xdp_action::XDP_DROP
        }
        ETH_P_MACSEC => {
            let ifindex = ctx.ingress_ifindex() as u32;
            macsec(DIR_RX, data, end, ifindex, cfg);
            xdp_action::XDP_PASS
        }
        _ => xdp_action::XDP_PASS,
    }
}

/// Egress on the lower device: TX SA counters, TX stall.
#[classifier]
pub fn qkd_tc(ctx: TcContext) -> i32 {
    let Some(cfg) = QKD_CONFIG.get_ptr(0) else {
        return TC_NEXT;
    };
    let stall = stalled(cfg);
    let skb_len = ctx.len() as u64;
    let mut data = ctx.data();
    let mut end = ctx.data_end();
    // The SecTAG (with SCI) must be in the linear part for direct access; pull it in if not.
    const WANT: usize = ETH_HLEN + 16;
    if data + WANT > end && skb_len as usize > end - data {
        let pull = if (skb_len as usize) < WANT {
            skb_len as u32
        } else {
            WANT as u32
        };
        // A failed pull leaves a short linear part, which the checks below handle. Either way
        // the helper call invalidated every packet pointer: re-read both.
        let _ = ctx.pull_data(pull);
        data = ctx.data();
        end = ctx.data_end();
    }
    if data + ETH_HLEN > end {
        if stall {
            count(IfCounter::TxStallDrop, skb_len);
            return TC_DROP;
        }
        return TC_NEXT;
    }
    // SAFETY: 14 bytes checked above.
    let ethertype = u16::from_be(unsafe { *((data + 12) as *const u16) });
    match ethertype {
        ETH_P_LLDP | ETH_P_PAE => TC_NEXT,
        _ if stall => {
            count(IfCounter::TxStallDrop, skb_len);
            TC_DROP
        }
        ETH_P_MACSEC => {
            // SAFETY: ctx is the program's __sk_buff.
            let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
            macsec_len(DIR_TX, data, end, skb_len as usize, ifindex, cfg);
            TC_NEXT
        }
        _ => TC_NEXT,
    }
}

/// The stall switch, or the active key's lifetime over ([`DataplaneConfig::key_deadline_ns`]):
/// the agent sets the switch itself when a key runs out, the deadline covers an agent that is not
/// there to do it. The clock is read only when a deadline is set.
#[inline(always)]
fn stalled(cfg: *const DataplaneConfig) -> bool {
    // SAFETY: a valid map value pointer; the agent rewrites it whole, a torn read of either field
    // at worst stalls one frame early or late.
    let (flags, deadline) = unsafe { ((*cfg).flags, (*cfg).key_deadline_ns) };
    // SAFETY: helper without arguments.
    flags & CFG_STALL != 0 || (deadline != 0 && unsafe { bpf_ktime_get_ns() } >= deadline)
}

/// A load from packet memory at `addr` (bounds already checked by the caller).
///
/// Deliberately a plain typed load, not `read_unaligned`: on the BPF target the latter becomes one
/// byte load plus shift per byte (23 instructions for an SCI), while the kernel accepts unaligned
/// packet loads on the architectures with efficient unaligned access (x86-64, arm64) and the JIT
/// emits one instruction.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must lie inside the packet (checked against data_end).
#[inline(always)]
unsafe fn pkt_load<T: Copy>(addr: usize) -> T {
    // SAFETY: see above; alignment is the JIT's business for packet pointers.
    unsafe { *(addr as *const T) }
}

#[inline(always)]
fn count(which: IfCounter, bytes: u64) {
    if let Some(c) = QKD_IF_STATS.get_ptr_mut(which as u32) {
        // SAFETY: per-CPU slot; this CPU is the only writer while the program runs.
        unsafe {
            (*c).frames += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn macsec(dir: u32, data: usize, end: usize, ifindex: u32, cfg: *const DataplaneConfig) {
    macsec_len(dir, data, end, end - data, ifindex, cfg)
}

/// Validates a SecTAG the way the kernel's macsec_validate_skb does and counts the frame to its
/// SA, the interface's unknown-SA bucket or the malformed bucket. `frame_len` is the whole frame
/// (for TC, `skb->len`, which may exceed the linear part `end - data`).
#[inline(always)]
fn macsec_len(
    dir: u32,
    data: usize,
    end: usize,
    frame_len: usize,
    ifindex: u32,
    cfg: *const DataplaneConfig,
) {
    let (malformed, unknown) = if dir == DIR_RX {
        (IfCounter::RxMalformed, IfCounter::RxUnknownSa)
    } else {
        (IfCounter::TxMalformed, IfCounter::TxUnknownSa)
    };
    let bytes = frame_len as u64;
    // One pointer, one check, every read through it (see toolchain.md's verifier pitfalls).
    let p = data + ETH_HLEN;
    if p + 6 > end {
        count(malformed, bytes);
        return;
    }
    // SAFETY: p..p+6 checked above.
    let (tci, sl, pn_lo) = unsafe {
        (
            *(p as *const u8),
            *((p + 1) as *const u8),
            u32::from_be(pkt_load::<u32>(p + 2)),
        )
    };
    let sc = tci & TCI_SC != 0;
    if tci & TCI_V != 0 || sl & SL_RESERVED != 0 || (sc && tci & (TCI_ES | TCI_SCB) != 0) {
        count(malformed, bytes);
        return;
    }
    // Length rule of 802.1AE 9.7 as the kernel applies it: the frame after the two MAC
    // addresses holds EtherType + SecTAG + secure data + ICV, the secure data exactly SL bytes
    // when SL != 0, and at least 48 bytes otherwise.
    let extra = 2 + 6 + if sc { 8 } else { 0 } + MACSEC_ICV_LEN;
    // p + 6 <= end, so frame_len >= 20: no underflow.
    let after_macs = frame_len - 12;
    let sl = sl as usize;
    let len_ok = if sl != 0 {
        after_macs == extra + sl
    } else {
        after_macs >= extra + MACSEC_MIN_NON_SHORT_LEN
    };
    if !len_ok {
        count(malformed, bytes);
        return;
    }
    let sci = if sc {
        if p + 14 > end {
            count(malformed, bytes);
            return;
        }
        // SAFETY: p..p+14 checked above.
        unsafe { pkt_load::<u64>(p + 6) }
    } else {
        // SAFETY: the caller checked the 14-byte Ethernet header.
        let mac = unsafe {
            (pkt_load::<u32>(data + 6) as u64) | ((pkt_load::<u16>(data + 10) as u64) << 32)
        };
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
    let an = (tci & TCI_AN_MASK) as u32;
    let bucket = sa_bucket(sci);
    let mut i = 0;
    while i < SA_PROBES {
        let slot = sa_slot(dir, bucket + i, an);
        let Some(reg) = QKD_SA_REG.get_ptr_mut(slot) else {
            break;
        };
        // SAFETY: valid map value pointer.
        let (rsci, rflags) = unsafe { ((*reg).sci, (*reg).flags) };
        if rflags & SA_VALID != 0 && rsci == sci {
            count_sa(
                dir, slot, reg, rflags, sci, an, pn_lo, bytes, ifindex, malformed,
            );
            return;
        }
        i += 1;
    }
    if pn_lo == 0 {
        // PN 0 is valid only for XPN, and an unregistered SA is not known to be XPN.
        count(malformed, bytes);
        return;
    }
    count(unknown, bytes);
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined hot path; a struct would cost copies"
)]
fn count_sa(
    dir: u32,
    slot: u32,
    reg: *mut SaReg,
    rflags: u32,
    sci: u64,
    an: u32,
    pn_lo: u32,
    bytes: u64,
    ifindex: u32,
    malformed: IfCounter,
) {
    let xpn = rflags & SA_XPN != 0;
    if pn_lo == 0 && !xpn {
        count(malformed, bytes);
        return;
    }
    let Some(st) = QKD_SA_STATS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: st is this CPU's slot (no concurrent writer); reg a valid shared map value.
    unsafe {
        let highest = (*st).highest_pn;
        let pn = if xpn {
            // Recover the upper half the way an 802.1AE XPN receiver does: relative to the highest
            // PN seen (here: on this CPU), a lower half far below the last one means it wrapped.
            let reg_hi = (*reg).pn_hi;
            let seen_hi = (highest >> 32) as u32;
            let (hi, last_lo) = if seen_hi >= reg_hi {
                (seen_hi, highest as u32)
            } else {
                (reg_hi, 0)
            };
            let hi = if pn_lo < last_lo && last_lo - pn_lo > 0x8000_0000 {
                hi.wrapping_add(1)
            } else {
                hi
            };
            ((hi as u64) << 32) | pn_lo as u64
        } else {
            pn_lo as u64
        };
        (*st).frames += 1;
        (*st).bytes += bytes;
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
                fire(dir, slot, reg, sci, an, pn, thr, t, ifindex);
            }
            t += 1;
        }
    }
}

/// Sends the PN event of threshold `t` unless another CPU already did: the atomic fetch_or on the
/// shared `fired` word picks exactly one sender. Inlined: BPF calls take at most five arguments.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into the hot path's cold branch"
)]
fn fire(
    dir: u32,
    slot: u32,
    reg: *mut SaReg,
    sci: u64,
    an: u32,
    pn: u64,
    thr: u64,
    t: usize,
    ifindex: u32,
) {
    let bit = 1u64 << t;
    // SAFETY: `fired` is a u64 inside a map value, 8-byte aligned; program writers use atomics.
    let fired = unsafe { core::ptr::addr_of_mut!((*reg).fired) };
    // SAFETY: as above.
    let old: u64 = unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(fired, bit) };
    if old & bit != 0 {
        return;
    }
    match QKD_EVENTS.reserve::<PnEvent>(0) {
        Some(mut e) => {
            e.write(PnEvent {
                kind: EVENT_PN,
                ifindex,
                sci,
                pn,
                threshold: thr,
                slot,
                direction: dir as u8,
                an: an as u8,
                threshold_index: t as u8,
                _pad: 0,
            });
            e.submit(0);
        }
        None => {
            // No room: re-arm so the next frame retries, and say that an event was lost.
            // SAFETY: as above.
            unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(fired, !bit) };
            count(IfCounter::EventsLost, 0);
        }
    }
}

/// Walks an LLDPDU strictly (Chassis ID, Port ID, TTL first, non-empty, every TLV inside the frame,
/// an End TLV) and hands the configured organizationally specific TLV to userspace.
#[inline(never)]
fn lldp(ctx: &XdpContext, cfg: *const DataplaneConfig, data: usize, end: usize) -> u32 {
    let raw = ctx.as_ptr() as *mut xdp_md;
    let frame_len = (end - data) as u32;
    // SAFETY: valid map value pointer.
    let (oui, subtype, drop) = unsafe {
        (
            (*cfg).lldp_oui,
            (*cfg).lldp_subtype,
            (*cfg).flags & CFG_LLDP_DROP != 0,
        )
    };
    let want = u32::from_be_bytes([oui[0], oui[1], oui[2], subtype]);
    let mut off: u32 = ETH_HLEN as u32;
    let mut found_off: u32 = 0;
    let mut found_len: u32 = 0;
    let mut well_formed = false;
    let mut i: u32 = 0;
    while i < LLDP_MAX_TLVS {
        let mut hdr = [0u8; 2];
        // SAFETY: helper call with a 2-byte stack buffer.
        if unsafe { bpf_xdp_load_bytes(raw, off, hdr.as_mut_ptr().cast(), 2) } != 0 {
            break; // truncated TLV header or no End TLV before the frame ends
        }
        let h = u16::from_be_bytes(hdr) as u32;
        let ty = h >> 9;
        let len = h & 0x1ff;
        if ty == 0 {
            well_formed = len == 0 && i >= 3;
            break;
        }
        let mandatory_ok = match i {
            0 => ty == 1 && len >= 2,
            1 => ty == 2 && len >= 2,
            2 => ty == 3 && len == 2,
            _ => ty > 3,
        };
        if !mandatory_ok || off + 2 + len > frame_len {
            break;
        }
        if ty == LLDP_TLV_ORG as u32 && len >= 4 && found_len == 0 {
            let mut id = [0u8; 4];
            // SAFETY: helper call with a 4-byte stack buffer.
            if unsafe { bpf_xdp_load_bytes(raw, off + 2, id.as_mut_ptr().cast(), 4) } == 0
                && u32::from_be_bytes(id) == want
            {
                found_off = off + 2;
                found_len = len;
            }
        }
        off += 2 + len;
        i += 1;
    }
    if !well_formed {
        count(IfCounter::LldpMalformed, frame_len as u64);
        return xdp_action::XDP_PASS;
    }
    if found_len == 0 {
        count(IfCounter::LldpIgnored, frame_len as u64);
        return xdp_action::XDP_PASS;
    }
    let Some(mut e) = QKD_EVENTS.reserve::<LldpEvent>(0) else {
        count(IfCounter::EventsLost, 0);
        return xdp_action::XDP_PASS;
    };
    let ev = e.as_mut_ptr();
    // Bound the copy length for the verifier: 4..=511 fits the 512-byte record field.
    let n = found_len & 0x1ff;
    // SAFETY: ev points at a reserved LldpEvent; data..data+14 was checked by the caller.
    let rc = unsafe {
        (*ev).kind = EVENT_LLDP;
        (*ev).ifindex = ctx.ingress_ifindex() as u32;
        (*ev).src_mac = core::ptr::read_unaligned((data + 6) as *const [u8; 6]);
        (*ev).info_len = n as u16;
        bpf_xdp_load_bytes(raw, found_off, (*ev).info.as_mut_ptr().cast(), n)
    };
    if rc != 0 {
        e.discard(0);
        count(IfCounter::LldpMalformed, frame_len as u64);
        return xdp_action::XDP_PASS;
    }
    e.submit(0);
    count(IfCounter::LldpDelivered, frame_len as u64);
    if drop {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
