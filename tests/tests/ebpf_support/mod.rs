//! Support for the host eBPF tests: a two-namespace veth rig with the data plane attached on one
//! end, a packet capture, and builders for crafted frames (valid and malformed).
#![allow(
    dead_code,
    reason = "each host_ebpf_* test binary uses a different subset"
)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use qkd_macsec_agent::dataplane::{Dataplane, DataplaneOptions, Sci};
use qkd_macsec_agent::lldp::LldpSender;
#[allow(unused_imports, reason = "each test binary uses a different subset")]
pub use qkd_macsec_tests::{agent_bin, require_root, veth_pair, Mac, NetNs, NetNsEnter};

/// Interface names inside the rig's namespaces.
pub const A_IF: &str = "qa0";
pub const B_IF: &str = "qb0";

static RIG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Namespaces `a` (data plane on `qa0`) and `b` (peer `qb0`) joined by a veth pair, with IPv6
/// off so that no autoconfiguration traffic disturbs exact counts.
pub struct Rig {
    pub a: NetNs,
    pub b: NetNs,
    pub a_mac: Mac,
    pub b_mac: Mac,
    pub bpffs_root: PathBuf,
}

impl Rig {
    pub fn new(prefix: &str) -> Rig {
        require_root("BPF, XDP and network namespaces");
        let a = NetNs::new(&format!("{prefix}a"));
        let b = NetNs::new(&format!("{prefix}b"));
        for ns in [&a, &b] {
            for key in [
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ] {
                ns.exec(&["sysctl", "-q", "-w", key]);
            }
        }
        let pair = veth_pair(&a, A_IF, &b, B_IF);
        let n = RIG_COUNTER.fetch_add(1, Ordering::Relaxed);
        // A private bpffs per rig, outside /sys: `ip netns exec` remounts /sys, which would hide a
        // bpffs under /sys/fs/bpf from a child started that way; and nothing leaks into the
        // host's /sys/fs/bpf.
        let mount = PathBuf::from(format!(
            "/run/qkd-bpffs-{}-{prefix}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&mount).expect("create bpffs mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t bpf bpf {} failed", mount.display());
        let bpffs_root = mount.join("qkd-macsec");
        Rig {
            a,
            b,
            a_mac: pair.a_mac,
            b_mac: pair.b_mac,
            bpffs_root,
        }
    }

    pub fn options(&self) -> DataplaneOptions {
        DataplaneOptions {
            bpffs_root: self.bpffs_root.clone(),
            ..Default::default()
        }
    }

    /// Attaches the data plane on `qa0`; the caller must have entered `a`.
    pub fn attach(&self) -> Dataplane {
        Dataplane::attach(A_IF, &self.options())
            .unwrap_or_else(|e| panic!("attaching the data plane to {A_IF}: {e}"))
    }

    /// A sender on `qb0` (opened inside `b`).
    pub fn b_sender(&self) -> LldpSender {
        let _in_b = self.b.enter();
        LldpSender::open(B_IF).expect("AF_PACKET sender on qb0")
    }

    /// A sender on `qa0` (opened inside `a`): its frames leave through TC egress.
    pub fn a_sender(&self) -> LldpSender {
        let _in_a = self.a.enter();
        LldpSender::open(A_IF).expect("AF_PACKET sender on qa0")
    }

    /// A capture of frames arriving on `qa0` (after XDP).
    pub fn a_capture(&self) -> Capture {
        let _in_a = self.a.enter();
        Capture::open(A_IF)
    }

    /// A capture of frames arriving on `qb0` (after `qa0`'s TC egress).
    pub fn b_capture(&self) -> Capture {
        let _in_b = self.b.enter();
        Capture::open(B_IF)
    }

    pub fn enter_a(&self) -> NetNsEnter {
        self.a.enter()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Unmounting drops every pin of the rig (also those of a test that failed early).
        let mount = self.bpffs_root.parent().expect("mount point").to_path_buf();
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&mount)
            .status();
        let _ = std::fs::remove_dir(&mount);
    }
}

/// A packet socket receiving every incoming frame (not our own outgoing ones) on one interface.
pub struct Capture {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    pub fn open(ifname: &str) -> Capture {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: plain libc calls with valid arguments; results checked.
        unsafe {
            let ifindex = libc::if_nametoindex(c.as_ptr());
            assert!(ifindex != 0, "no interface {ifname}");
            let raw = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            );
            assert!(
                raw >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(raw);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(rc == 0, "bind capture: {}", std::io::Error::last_os_error());
            Capture { fd }
        }
    }

    /// Every incoming frame that arrives within `wait`.
    pub fn collect(&self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            // SAFETY: recvfrom into buf and a zeroed sockaddr_ll of the right size.
            let (n, pkttype) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                );
                (n, sll.sll_pkttype)
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            out.push(buf[..n as usize].to_vec());
        }
        out
    }
}

/// Frames carrying `marker` anywhere (the tests put a unique marker in each payload).
pub fn with_marker<'a>(frames: &'a [Vec<u8>], marker: &[u8]) -> Vec<&'a Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.windows(marker.len()).any(|w| w == marker))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Frame builders

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + body.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A plain IPv4/UDP-looking frame with `marker` in the payload.
pub fn ipv4(src: [u8; 6], dst: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut body = vec![
        0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2,
    ];
    body.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 28, 0, 0]);
    body.extend_from_slice(marker);
    body.resize(body.len().max(46), 0);
    eth(dst, src, 0x0800, &body)
}

/// An EAPOL frame (to the PAE group address) with `marker`.
pub fn eapol(src: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut body = vec![3, 0, 0, marker.len() as u8];
    body.extend_from_slice(marker);
    body.resize(body.len().max(46), 0);
    eth([0x01, 0x80, 0xC2, 0, 0, 0x03], src, 0x888E, &body)
}

/// A VLAN-tagged (802.1Q, VID 10) frame of `inner_ethertype`.
pub fn vlan(src: [u8; 6], dst: [u8; 6], inner_ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut b = vec![0x00, 0x0A];
    b.extend_from_slice(&inner_ethertype.to_be_bytes());
    b.extend_from_slice(body);
    eth(dst, src, 0x8100, &b)
}

/// A SecTAG description for [`macsec`].
#[derive(Clone, Copy, Debug)]
pub struct SecTag {
    pub tci: u8,
    pub an: u8,
    pub sl: u8,
    pub pn: u32,
    pub sci: Option<Sci>,
}

impl SecTag {
    /// SC=1 with `sci`, E and C set, SL 0.
    pub fn with_sci(sci: Sci, an: u8, pn: u32) -> SecTag {
        SecTag {
            tci: 0x20 | 0x0C,
            an,
            sl: 0,
            pn,
            sci: Some(sci),
        }
    }
}

/// A MACsec frame: SecTAG, `secure_len` bytes of secure data (marker first), 16-byte ICV.
pub fn macsec(
    src: [u8; 6],
    dst: [u8; 6],
    tag: SecTag,
    secure_len: usize,
    marker: &[u8],
) -> Vec<u8> {
    let mut b = vec![tag.tci | tag.an, tag.sl];
    b.extend_from_slice(&tag.pn.to_be_bytes());
    if let Some(sci) = tag.sci {
        b.extend_from_slice(&sci.wire_bytes());
    }
    let mut data = marker.to_vec();
    data.resize(secure_len.max(marker.len()), 0x5A);
    b.extend_from_slice(&data);
    b.extend_from_slice(&[0xC1; 16]);
    eth(dst, src, 0x88E5, &b)
}

/// Raw TLV bytes.
pub fn tlv(tlv_type: u8, value: &[u8]) -> Vec<u8> {
    let h = (u16::from(tlv_type) << 9) | value.len() as u16;
    let mut v = h.to_be_bytes().to_vec();
    v.extend_from_slice(value);
    v
}

/// The three mandatory TLVs of an LLDPDU from `mac`.
pub fn lldp_head(mac: [u8; 6]) -> Vec<u8> {
    let mut v = Vec::new();
    let mut chassis = vec![4];
    chassis.extend_from_slice(&mac);
    v.extend(tlv(1, &chassis));
    v.extend(tlv(2, b"\x05qb0"));
    v.extend(tlv(3, &[0, 120]));
    v
}

/// An LLDP frame from `src` whose LLDPDU is `pdu`.
pub fn lldp(src: [u8; 6], pdu: &[u8]) -> Vec<u8> {
    eth([0x01, 0x80, 0xC2, 0, 0, 0x0E], src, 0x88CC, pdu)
}
