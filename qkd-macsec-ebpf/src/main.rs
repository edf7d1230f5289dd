//! The production object `qkd-macsec`: XDP (ingress) and TC (egress) programs on the MACsec link's
//! lower device. Map layout and event format: docs/dataplane.md and qkd-macsec-common.
//!
//! Shape (the aya examples' one): each program is a thin entry that builds the [`Frame`], asks its
//! `try_*` function what the frame is ([`Outcome`]) and hands that to [`outcome::settle`], the one
//! place that turns outcomes into counters, PN events, log records and a verdict. The `try_*`
//! functions and what they call (`macsec`, `lldp`) only classify; they write no counter.
//!
//! Fast-path budget: a registered SA's frame costs one config lookup, one SA registration lookup
//! and one per-CPU stats lookup, all ARRAY maps (inlined lookups on current kernels), no hashing
//! beyond one multiply, and no log call: log records (aya-log) are written only on the rare
//! outcomes (malformed SecTAG, unknown SA, rate-limited TLV, stall drop, lost event), and only
//! when the loader enabled them (`AYA_LOG_LEVEL`, see qkd-macsec-agent/src/dataplane/klog.rs).
#![no_std]
#![no_main]
// The BPF target has no `atomic-cas`, so core::sync::atomic offers no fetch_or; the intrinsic
// lowers to BPF_ATOMIC | BPF_OR | BPF_FETCH (kernel >= 5.12).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic fetch-or intrinsic, see counters::fire"
)]
// aya-ebpf's #[classifier] expands to a `pub extern "C" fn` taking `*mut __sk_buff` that it
// dereferences; the lint fires on that generated wrapper, not on code written here.
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "triggered by the #[classifier] macro's generated wrapper"
)]

mod counters;
mod frame;
mod lldp;
mod macsec;
mod maps;
mod outcome;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_ktime_get_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use qkd_macsec_common::{DataplaneConfig, CFG_STALL, ETH_P_LLDP, ETH_P_MACSEC, ETH_P_PAE};

use frame::Frame;
use maps::QKD_CONFIG;
use outcome::{Outcome, Verdict};

/// Ingress on the lower device: LLDP hand-off, RX SA counters, RX stall.
#[xdp]
pub fn qkd_xdp(ctx: XdpContext) -> u32 {
    let frame = Frame::xdp(&ctx);
    let outcome = try_qkd_xdp(&ctx, &frame);
    match outcome::settle(&ctx, &frame, outcome) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// Egress on the lower device: TX SA counters, TX stall.
#[classifier]
pub fn qkd_tc(ctx: TcContext) -> i32 {
    let frame = Frame::tc(&ctx);
    let outcome = try_qkd_tc(&frame);
    match outcome::settle(&ctx, &frame, outcome) {
        // TC_ACT_UNSPEC / TCX_NEXT (both -1): the next program or the default decides.
        Verdict::Pass => TC_ACT_UNSPEC,
        // TC_ACT_SHOT / TCX_DROP.
        Verdict::Drop => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn try_qkd_xdp(ctx: &XdpContext, f: &Frame) -> Outcome {
    let Some(cfg) = QKD_CONFIG.get_ptr(0) else {
        return Outcome::Pass;
    };
    let stall = stalled(cfg);
    let Some(ethertype) = f.ethertype() else {
        return if stall {
            Outcome::StallDrop
        } else {
            Outcome::Pass
        };
    };
    match ethertype {
        // LLDP always passes the stall (the key exchange must go on).
        ETH_P_LLDP => Outcome::Lldp(lldp::try_lldp(ctx, cfg, f.data, f.end)),
        ETH_P_PAE => Outcome::Pass,
        _ if stall => Outcome::StallDrop,
        ETH_P_MACSEC => macsec::try_macsec(f, cfg),
        _ => Outcome::Pass,
    }
}

#[inline(always)]
fn try_qkd_tc(f: &Frame) -> Outcome {
    let Some(cfg) = QKD_CONFIG.get_ptr(0) else {
        return Outcome::Pass;
    };
    let stall = stalled(cfg);
    let Some(ethertype) = f.ethertype() else {
        return if stall {
            Outcome::StallDrop
        } else {
            Outcome::Pass
        };
    };
    match ethertype {
        ETH_P_LLDP | ETH_P_PAE => Outcome::Pass,
        _ if stall => Outcome::StallDrop,
        ETH_P_MACSEC => macsec::try_macsec(f, cfg),
        _ => Outcome::Pass,
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; qkd_macsec_ebpf::LICENSE_LEN] = qkd_macsec_ebpf::LICENSE;
