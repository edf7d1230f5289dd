//! Harness proof for XDP on the host: the test eBPF object (`qkd_macsec_agent::EBPF_TEST_OBJECT`,
//! built next to the production object) loads with aya, its `probe` program attaches to a veth
//! inside a fresh namespace, and PROBE_COUNTERS counts exactly the frames sent to it, by class.
//!
//! Determinism: IPv6 is disabled in both namespaces (no router solicitations or MLD reports) and
//! the neighbours are static (no ARP), so every frame that reaches the veth is one this test sent.

use std::ffi::CString;
use std::io;
use std::mem;

use aya::maps::PerCpuArray;
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use qkd_macsec_common::{
    ProbeClass, ETH_P_LLDP, ETH_P_MACSEC, MAP_PROBE_COUNTERS, PROBE_CLASSES, PROG_PROBE,
};
use qkd_macsec_tests::{add_ipv4, require_root, veth_pair, Mac, NetNs};

const PINGS: u64 = 3;
const LLDP_FRAMES: u64 = 4;
const MACSEC_FRAMES: u64 = 5;
/// IEEE 802 "local experimental" EtherType: lands in ProbeClass::Other.
const ETH_P_EXPERIMENTAL: u16 = 0x88B5;
const OTHER_FRAMES: u64 = 2;

fn quiet_namespace(prefix: &str) -> NetNs {
    let ns = NetNs::new(prefix);
    ns.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]);
    ns
}

/// An Ethernet frame padded to the 60-byte minimum.
fn frame(dst: [u8; 6], src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// Sends raw frames out of `ifname` through an AF_PACKET socket (in the current namespace).
fn send_raw(ifname: &str, frames: &[Vec<u8>]) -> io::Result<()> {
    let c_if = CString::new(ifname).expect("no NUL in interface name");
    // SAFETY: plain libc calls with valid pointers and lengths; the fd is closed below.
    unsafe {
        let ifindex = libc::if_nametoindex(c_if.as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0: this socket only sends, it receives nothing.
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut result = Ok(());
        for f in frames {
            addr.sll_addr[..6].copy_from_slice(&f[..6]);
            let n = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if n != f.len() as isize {
                result = Err(io::Error::last_os_error());
                break;
            }
        }
        libc::close(fd);
        result
    }
}

fn counters(ebpf: &Ebpf) -> [u64; PROBE_CLASSES as usize] {
    let map = ebpf
        .map(MAP_PROBE_COUNTERS)
        .unwrap_or_else(|| panic!("map {MAP_PROBE_COUNTERS} missing from the eBPF object"));
    let array = PerCpuArray::<_, u64>::try_from(map).expect("PROBE_COUNTERS is a PerCpuArray<u64>");
    let mut out = [0u64; PROBE_CLASSES as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = array
            .get(&(i as u32), 0)
            .expect("reading PROBE_COUNTERS")
            .iter()
            .sum();
    }
    out
}

fn probe_counts_frames_by_class(mode: XdpMode) {
    require_root("loading XDP programs and creating network namespaces");
    let a = quiet_namespace("qmt-xdp-a");
    let b = quiet_namespace("qmt-xdp-b");
    let pair = veth_pair(&a, "xa", &b, "xb");
    add_ipv4(&a, "xa", "10.203.0.1/24");
    add_ipv4(&b, "xb", "10.203.0.2/24");
    a.ip(&[
        "neigh",
        "replace",
        "10.203.0.2",
        "lladdr",
        &pair.b_mac.to_string(),
        "dev",
        "xa",
        "nud",
        "permanent",
    ]);
    b.ip(&[
        "neigh",
        "replace",
        "10.203.0.1",
        "lladdr",
        &pair.a_mac.to_string(),
        "dev",
        "xb",
        "nud",
        "permanent",
    ]);

    // Load and attach while this thread is inside `b`: interface lookups are per namespace.
    let guard = b.enter();
    let mut ebpf =
        Ebpf::load(qkd_macsec_agent::EBPF_TEST_OBJECT).expect("loading the eBPF test object");
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_PROBE)
        .expect("program `probe` missing from the eBPF test object")
        .try_into()
        .expect("`probe` is an XDP program");
    prog.load().expect("the verifier rejected `probe`");
    let ifindex = {
        let name = CString::new("xb").unwrap();
        // SAFETY: valid NUL-terminated string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    assert_ne!(ifindex, 0, "xb not found inside {}", b.name());
    prog.attach(ifindex, mode)
        .unwrap_or_else(|e| panic!("attaching `probe` to xb in {mode:?} mode: {e}"));
    drop(guard);

    assert_eq!(
        counters(&ebpf),
        [0; 4],
        "counters not zero before any traffic"
    );

    let mut frames = Vec::new();
    for i in 0..LLDP_FRAMES {
        // Nearest-bridge LLDP group address; payload is a chassis-ID-ish TLV plus End TLV.
        let payload = [0x02, 0x07, 0x04, 0, 0, 0, 0, 0, i as u8, 0x00, 0x00];
        frames.push(frame(
            [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e],
            pair.a_mac,
            ETH_P_LLDP,
            &payload,
        ));
    }
    for i in 0..MACSEC_FRAMES {
        // A SecTAG-shaped header; the probe classifies by EtherType only.
        let payload = [0x2c, 0x00, 0, 0, 0, i as u8 + 1];
        frames.push(frame(pair.b_mac.0, pair.a_mac, ETH_P_MACSEC, &payload));
    }
    for _ in 0..OTHER_FRAMES {
        frames.push(frame(pair.b_mac.0, pair.a_mac, ETH_P_EXPERIMENTAL, b"qkd"));
    }
    {
        let _in_a = a.enter();
        send_raw("xa", &frames).expect("sending raw frames from xa");
    }
    a.exec(&[
        "ping",
        "-c",
        &PINGS.to_string(),
        "-i",
        "0.2",
        "-W",
        "2",
        "10.203.0.2",
    ]);

    let got = counters(&ebpf);
    let mut want = [0u64; 4];
    want[ProbeClass::Lldp as usize] = LLDP_FRAMES;
    want[ProbeClass::Macsec as usize] = MACSEC_FRAMES;
    want[ProbeClass::Ipv4 as usize] = PINGS;
    want[ProbeClass::Other as usize] = OTHER_FRAMES;
    assert_eq!(
        got, want,
        "PROBE_COUNTERS [other, lldp, macsec, ipv4] in {mode:?} mode"
    );
}

#[test]
fn probe_counts_exactly_in_driver_mode() {
    probe_counts_frames_by_class(XdpMode::Driver);
}

#[test]
fn probe_counts_exactly_in_skb_mode() {
    probe_counts_frames_by_class(XdpMode::Skb);
}
