//! The test object `qkd-macsec-test`: programs that only tests and benchmarks load
//! (qkd_macsec_agent::EBPF_TEST_OBJECT), kept out of the object the agent loads and attaches.
//!
//! - `probe` (XDP): counts frames by EtherType class in PROBE_COUNTERS and passes everything;
//!   the harness's proof that an XDP program loads, attaches and counts (tests/tests/host_xdp.rs).
//! - `qkd_xdp_pass`, `qkd_tc_pass`: the cheapest possible XDP and TC programs, the baselines of
//!   the `ebpf` benchmark (qkd-macsec-agent/src/dataplane/bench.rs).
#![no_std]
#![no_main]
// aya-ebpf's #[classifier] expands to a `pub extern "C" fn` taking `*mut __sk_buff` that it
// dereferences; the lint fires on that generated wrapper, not on code written here.
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "triggered by the #[classifier] macro's generated wrapper"
)]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_UNSPEC},
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use qkd_macsec_common::{
    ProbeClass, ETH_HLEN, ETH_P_IPV4, ETH_P_LLDP, ETH_P_MACSEC, PROBE_CLASSES,
};

/// Frames seen by `probe`, by class.
#[map(name = "PROBE_COUNTERS")]
static PROBE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_CLASSES, 0);

/// Counts frames by EtherType class and passes everything.
#[xdp]
pub fn probe(ctx: XdpContext) -> u32 {
    let class = try_classify(&ctx);
    if let Some(slot) = PROBE_COUNTERS.get_ptr_mut(class as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_classify(ctx: &XdpContext) -> ProbeClass {
    let data = ctx.data();
    if data + ETH_HLEN > ctx.data_end() {
        return ProbeClass::Other;
    }
    // SAFETY: bounds checked against data_end just above.
    let ethertype = unsafe { u16::from_be(*((data + 12) as *const u16)) };
    match ethertype {
        ETH_P_LLDP => ProbeClass::Lldp,
        ETH_P_MACSEC => ProbeClass::Macsec,
        ETH_P_IPV4 => ProbeClass::Ipv4,
        _ => ProbeClass::Other,
    }
}

/// The XDP benchmark's baseline: the cheapest possible XDP program.
#[xdp]
pub fn qkd_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The TC benchmark's baseline.
#[classifier]
pub fn qkd_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; qkd_macsec_ebpf::LICENSE_LEN] = qkd_macsec_ebpf::LICENSE;
