//! Differential target: the userspace SecTAG decoder (qkd_macsec_common::sectag) against the XDP
//! program `qkd_xdp` on the same bytes, run in the kernel with BPF_PROG_TEST_RUN.
//!
//! The program's verdict on a MACsec frame is where it counts it: the frame's registered SA, the
//! unknown-SA counter or the malformed counter (plus the byte count). Before and after each run
//! the target reads those counters; exactly one must have moved, by one frame and the frame's
//! length, and it must be the one the userspace decoder predicts. Needs root (BPF); it panics at
//! start-up with the reason otherwise, so a run never passes without having compared anything.
#![no_main]

use std::cell::RefCell;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use libfuzzer_sys::fuzz_target;
use qkd_macsec_common::sectag::{parse, ETH_HLEN};
use qkd_macsec_common::{
    sa_bucket, sa_slot, Counter, DataplaneConfig, IfCounter, SaReg, SaStats, MACSEC_ICV_LEN,
    MAP_CONFIG, MAP_IF_STATS, MAP_SA_REG, MAP_SA_STATS, PROG_XDP, SA_PROBES, SA_VALID, SA_XPN,
};

/// SCI wire bytes of the registered SAs' peers.
const SCI_EXPLICIT: [u8; 8] = [2, 0, 0, 0, 0, 0x0a, 0, 1];
const SCI_IMPLICIT: [u8; 8] = [2, 0, 0, 0, 0, 0x0b, 0, 7];
const SCI_ES: [u8; 8] = [2, 0, 0, 0, 0, 0x01, 0, 1];
/// (SCI, AN, XPN) of every registered RX SA.
const SAS: [([u8; 8], u8, bool); 4] = [
    (SCI_EXPLICIT, 0, false),
    (SCI_EXPLICIT, 1, true),
    (SCI_IMPLICIT, 2, false),
    (SCI_ES, 3, true),
];
/// Largest frame handed to the kernel (an XDP test run takes at most about a page).
const MAX_FRAME: usize = 1514;
const XDP_PASS: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Malformed,
    UnknownSa,
    Sa(usize),
}

struct Rig {
    _ebpf: Ebpf,
    prog_fd: i32,
    if_stats: PerCpuArray<MapData, Counter>,
    sa_stats: PerCpuArray<MapData, SaStats>,
    slots: Vec<u32>,
    /// (frames, bytes) of [malformed, unknown, SA 0..] after the previous run.
    last: Vec<(u64, u64)>,
}

fn die(what: &str, e: impl std::fmt::Display) -> ! {
    panic!(
        "sectag_xdp needs root with BPF (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load qkd_xdp and \
         run it with BPF_PROG_TEST_RUN: {what}: {e}"
    )
}

impl Rig {
    fn new() -> Rig {
        let mut ebpf = EbpfLoader::new()
            .load(qkd_macsec_agent::EBPF_OBJECT)
            .unwrap_or_else(|e| die("loading the object", e));
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .expect("qkd_xdp in the object")
            .try_into()
            .expect("qkd_xdp is XDP");
        prog.load().unwrap_or_else(|e| die("loading qkd_xdp", e));
        let prog_fd = prog.fd().expect("loaded").as_fd().as_raw_fd();
        {
            let mut cfg: Array<&mut MapData, DataplaneConfig> =
                Array::try_from(ebpf.map_mut(MAP_CONFIG).expect("config map")).unwrap();
            let c = DataplaneConfig {
                implicit_sci: u64::from_ne_bytes(SCI_IMPLICIT),
                ..DataplaneConfig::DEFAULT
            };
            cfg.set(0, &c, 0)
                .unwrap_or_else(|e| die("writing the config", e));
        }
        let mut slots = Vec::new();
        {
            let mut reg: Array<&mut MapData, SaReg> =
                Array::try_from(ebpf.map_mut(MAP_SA_REG).expect("SA map")).unwrap();
            for (sci, an, xpn) in SAS {
                let sci = u64::from_ne_bytes(sci);
                // The program's probe sequence: first entry with this SCI, else first free.
                let slot = (0..SA_PROBES)
                    .map(|i| sa_slot(0, sa_bucket(sci) + i, u32::from(an)))
                    .find(|s| {
                        let e = reg.get(s, 0).unwrap();
                        e.flags & SA_VALID == 0 || e.sci == sci
                    })
                    .expect("a free slot in an almost empty table");
                let e = SaReg {
                    sci,
                    flags: SA_VALID | if xpn { SA_XPN } else { 0 },
                    ..SaReg::EMPTY
                };
                reg.set(slot, &e, 0).unwrap();
                slots.push(slot);
            }
        }
        let if_stats = PerCpuArray::try_from(ebpf.take_map(MAP_IF_STATS).unwrap()).unwrap();
        let sa_stats = PerCpuArray::try_from(ebpf.take_map(MAP_SA_STATS).unwrap()).unwrap();
        let mut rig = Rig {
            _ebpf: ebpf,
            prog_fd,
            if_stats,
            sa_stats,
            slots,
            last: Vec::new(),
        };
        rig.last = rig.counters();
        rig
    }

    fn counters(&self) -> Vec<(u64, u64)> {
        let sum = |v: &[(u64, u64)]| v.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let ifc = |c: IfCounter| {
            let v = self.if_stats.get(&(c as u32), 0).unwrap();
            sum(&v.iter().map(|c| (c.frames, c.bytes)).collect::<Vec<_>>())
        };
        let mut out = vec![ifc(IfCounter::RxMalformed), ifc(IfCounter::RxUnknownSa)];
        for s in &self.slots {
            let v = self.sa_stats.get(s, 0).unwrap();
            out.push(sum(&v
                .iter()
                .map(|c| (c.frames, c.bytes))
                .collect::<Vec<_>>()));
        }
        out
    }

    /// Runs the program once on `frame`; returns (retval, where the frame was counted).
    fn run(&mut self, frame: &[u8]) -> (u32, Option<Verdict>) {
        let mut attr = TestRunAttr {
            prog_fd: self.prog_fd as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: attr is a valid prefix of bpf_attr for BPF_PROG_TEST_RUN; `frame` outlives the
        // call and no output buffer is given.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10, // BPF_PROG_TEST_RUN
                &mut attr as *mut TestRunAttr,
                std::mem::size_of::<TestRunAttr>() as u32,
            )
        };
        assert!(
            rc == 0,
            "BPF_PROG_TEST_RUN on {} bytes: {}",
            frame.len(),
            std::io::Error::last_os_error()
        );
        let now = self.counters();
        let moved: Vec<usize> = (0..now.len()).filter(|&i| now[i] != self.last[i]).collect();
        let verdict = match moved[..] {
            [] => None,
            [i] => {
                let (df, db) = (now[i].0 - self.last[i].0, now[i].1 - self.last[i].1);
                assert_eq!((df, db), (1, frame.len() as u64), "counter {i} moved oddly");
                Some(match i {
                    0 => Verdict::Malformed,
                    1 => Verdict::UnknownSa,
                    n => Verdict::Sa(n - 2),
                })
            }
            _ => panic!("one frame moved several counters: {moved:?}"),
        };
        self.last = now;
        (attr.retval, verdict)
    }
}

/// The prefix of bpf_attr that BPF_PROG_TEST_RUN reads.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What the userspace decoder says the program must do with `frame`.
fn expected(frame: &[u8]) -> Verdict {
    let Ok(t) = parse(frame, MACSEC_ICV_LEN) else {
        return Verdict::Malformed;
    };
    let sci = t.sci(Some(SCI_IMPLICIT));
    match SAS.iter().position(|&(s, an, _)| s == sci && an == t.an()) {
        Some(i) if t.pn_valid(SAS[i].2) => Verdict::Sa(i),
        Some(_) => Verdict::Malformed,
        // Unregistered: not known to be XPN, so PN 0 is invalid.
        None if t.pn_valid(false) => Verdict::UnknownSa,
        None => Verdict::Malformed,
    }
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    // Every input is a MACsec frame: the EtherType is forced (the program's other paths are
    // LLDP and pass-through, covered by the host tests), and the kernel needs an Ethernet header.
    let mut frame = data[..data.len().min(MAX_FRAME)].to_vec();
    if frame.len() < ETH_HLEN {
        frame.resize(ETH_HLEN, 0);
    }
    frame[12..14].copy_from_slice(&[0x88, 0xE5]);
    RIG.with(|r| {
        let mut r = r.borrow_mut();
        let rig = r.get_or_insert_with(Rig::new);
        let (retval, got) = rig.run(&frame);
        assert_eq!(
            retval, XDP_PASS,
            "qkd_xdp does not pass MACsec frames when not stalled"
        );
        let want = expected(&frame);
        assert_eq!(
            got,
            Some(want),
            "XDP and userspace disagree on frame {:02x?}",
            &frame[..frame.len().min(40)]
        );
    });
});
