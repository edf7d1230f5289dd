//! The kernel side of qkd-macsec: XDP (ingress) and TC (egress) programs on the MACsec link's lower
//! device.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use qkd_macsec_common::{ProbeClass, ETH_P_LLDP, ETH_P_MACSEC, PROBE_CLASSES};

/// Frames seen by `probe`, by class: the harness's proof that an XDP program loads and counts.
#[map(name = "PROBE_COUNTERS")]
static PROBE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_CLASSES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
