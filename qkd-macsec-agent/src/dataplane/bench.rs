//! The `ebpf` benchmark: per-packet cost of the programs under BPF_PROG_TEST_RUN (raw bpf()
//! command 10, the kernel times `repeat` runs of the program on one frame), against a trivial
//! XDP_PASS program from the same object measured in the same run.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{Array, MapData, RingBuf};
use aya::programs::{SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use qkd_macsec_common::{
    DataplaneConfig, Direction, SaReg, LLDP_DST_MAC, LLDP_OUI, LLDP_SUBTYPE, MAP_CONFIG,
    MAP_EVENTS, MAP_SA_REG, PROG_TC, PROG_TC_PASS, PROG_XDP, PROG_XDP_PASS, TCI_SC, TCI_V,
};

use super::maps::{choose_slot, new_entry, SaKey, Sci, SlotChoice};
use super::{chain, DataplaneError};

/// One measured number.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    /// Key in results.json, e.g. `xdp.macsec_ns_per_pkt`.
    pub key: String,
    /// Nanoseconds per packet (median over rounds).
    pub ns_per_pkt: f64,
}

/// bpf_attr for BPF_PROG_TEST_RUN (the `test` member), up to `batch_size`.
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

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs `fd` on `frame` `repeat` times; returns (mean ns per run as the kernel measured, retval).
fn test_run(fd: i32, frame: &[u8], repeat: u32) -> Result<(f64, u32), DataplaneError> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix; the buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(DataplaneError::Io {
            context: format!(
                "BPF_PROG_TEST_RUN (repeat {repeat}, {} byte frame)",
                frame.len()
            ),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok((f64::from(attr.duration), attr.retval))
}

const SRC: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x01];
const DST: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x02];

/// A MACsec frame with an explicit SCI, PN 5 and 64 bytes of secure data.
pub fn bench_macsec_frame(sci: Sci, an: u8, pn: u32) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&0x88E5u16.to_be_bytes());
    f.push(TCI_SC | 0x0C | an);
    f.push(0);
    f.extend_from_slice(&pn.to_be_bytes());
    f.extend_from_slice(&sci.wire_bytes());
    f.extend_from_slice(&[0xAB; 64 + 16]);
    f
}

fn ipv4_frame() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    // IPv4 + UDP header and payload; contents do not matter to the programs.
    f.extend_from_slice(&[
        0x45, 0, 0, 92, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 72, 0, 0]);
    f.extend_from_slice(&[0x11; 64]);
    f
}

fn lldp_frame() -> Vec<u8> {
    let payload = [0x42u8; 64];
    let mut lldpdu = crate::lldp::LldpFrame {
        chassis_mac: SRC,
        port_id: "bench0".into(),
        ttl: 120,
        payload: payload.to_vec(),
    }
    .encode_lldpdu(LLDP_OUI, LLDP_SUBTYPE)
    .expect("bench LLDPDU encodes");
    let mut f = Vec::new();
    f.extend_from_slice(&LLDP_DST_MAC);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&0x88CCu16.to_be_bytes());
    f.append(&mut lldpdu);
    f
}

fn load() -> Result<Ebpf, DataplaneError> {
    let mut ebpf =
        EbpfLoader::new()
            .load(crate::EBPF_OBJECT)
            .map_err(|e| DataplaneError::Load {
                what: "the eBPF object".into(),
                detail: chain(&e),
            })?;
    for name in [PROG_XDP, PROG_XDP_PASS] {
        let p: &mut Xdp = prog(&mut ebpf, name)?;
        p.load().map_err(|e| DataplaneError::Load {
            what: name.into(),
            detail: chain(&e),
        })?;
    }
    for name in [PROG_TC, PROG_TC_PASS] {
        let p: &mut SchedClassifier = prog(&mut ebpf, name)?;
        p.load().map_err(|e| DataplaneError::Load {
            what: name.into(),
            detail: chain(&e),
        })?;
    }
    Ok(ebpf)
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Load {
            what: name.into(),
            detail: "missing from the object".into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load {
            what: name.into(),
            detail: chain(&e),
        })
}

fn fd_of(ebpf: &Ebpf, name: &str) -> Result<i32, DataplaneError> {
    let p = ebpf.program(name).ok_or_else(|| DataplaneError::Load {
        what: name.into(),
        detail: "missing".into(),
    })?;
    let fd = p.fd().map_err(|e| DataplaneError::Load {
        what: name.into(),
        detail: chain(&e),
    })?;
    Ok(fd.as_fd().as_raw_fd())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark: `repeat` runs per measurement, `rounds` rounds (interleaved, median).
pub fn run_benchmark(repeat: u32, rounds: usize) -> Result<Vec<BenchResult>, DataplaneError> {
    let mut ebpf = load()?;
    let rx = SaKey {
        direction: Direction::Rx,
        sci: Sci::from_mac_port(SRC, 1),
        an: 1,
    };
    let tx = SaKey {
        direction: Direction::Tx,
        ..rx
    };
    {
        let mut cfg: Array<&mut MapData, DataplaneConfig> =
            Array::try_from(ebpf.map_mut(MAP_CONFIG).expect("config map")).map_err(|e| {
                DataplaneError::Map {
                    map: MAP_CONFIG,
                    detail: chain(&e),
                }
            })?;
        cfg.set(0, &DataplaneConfig::DEFAULT, 0)
            .map_err(|e| DataplaneError::Map {
                map: MAP_CONFIG,
                detail: chain(&e),
            })?;
    }
    {
        let mut reg: Array<&mut MapData, SaReg> =
            Array::try_from(ebpf.map_mut(MAP_SA_REG).expect("reg map")).map_err(|e| {
                DataplaneError::Map {
                    map: MAP_SA_REG,
                    detail: chain(&e),
                }
            })?;
        for key in [rx, tx] {
            let SlotChoice::Free(slot) = choose_slot(&key, |_| Ok(SaReg::EMPTY))? else {
                unreachable!("empty table has a free slot")
            };
            // Thresholds armed but far away: the per-packet threshold compare is part of the cost.
            let e = new_entry(&key, false, 0, [1 << 40, 1 << 41, 0, 0]);
            reg.set(slot, &e, 0).map_err(|e| DataplaneError::Map {
                map: MAP_SA_REG,
                detail: chain(&e),
            })?;
        }
    }
    let mut ring =
        RingBuf::try_from(ebpf.take_map(MAP_EVENTS).expect("events map")).map_err(|e| {
            DataplaneError::Map {
                map: MAP_EVENTS,
                detail: chain(&e),
            }
        })?;

    let xdp = fd_of(&ebpf, PROG_XDP)?;
    let pass = fd_of(&ebpf, PROG_XDP_PASS)?;
    let tc = fd_of(&ebpf, PROG_TC)?;
    let tc_pass = fd_of(&ebpf, PROG_TC_PASS)?;
    let macsec = bench_macsec_frame(rx.sci, rx.an, 5);
    let unknown = bench_macsec_frame(Sci::from_mac_port(DST, 7), 0, 5);
    let ipv4 = ipv4_frame();
    // Rejected right after the TCI: the parse cost without any SA lookup.
    let mut malformed = macsec.clone();
    malformed[14] |= TCI_V;
    let lldp = lldp_frame();

    let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        samples
            .entry("xdp.baseline_ns_per_pkt")
            .or_default()
            .push(test_run(pass, &ipv4, repeat)?.0);
        samples
            .entry("xdp.ipv4_ns_per_pkt")
            .or_default()
            .push(test_run(xdp, &ipv4, repeat)?.0);
        samples
            .entry("xdp.macsec_ns_per_pkt")
            .or_default()
            .push(test_run(xdp, &macsec, repeat)?.0);
        samples
            .entry("xdp.macsec_unknown_sa_ns_per_pkt")
            .or_default()
            .push(test_run(xdp, &unknown, repeat)?.0);
        samples
            .entry("xdp.macsec_malformed_ns_per_pkt")
            .or_default()
            .push(test_run(xdp, &malformed, repeat)?.0);
        samples
            .entry("tc.baseline_ns_per_pkt")
            .or_default()
            .push(test_run(tc_pass, &macsec, repeat)?.0);
        samples
            .entry("tc.macsec_ns_per_pkt")
            .or_default()
            .push(test_run(tc, &macsec, repeat)?.0);
        // Every LLDP run delivers an event: keep each call below the ring's capacity and drain it
        // between calls so the measurement is of real deliveries, not of a full ring.
        let per_call = 256u32;
        let calls = (repeat / per_call / 16).max(1);
        let mut total = 0.0;
        for _ in 0..calls {
            total += test_run(xdp, &lldp, per_call)?.0;
            let mut n = 0;
            while ring.next().is_some() {
                n += 1;
            }
            if n != per_call {
                return Err(DataplaneError::Io {
                    context: format!("LLDP bench: {n} events for {per_call} runs"),
                    source: std::io::Error::other("event count mismatch"),
                });
            }
        }
        samples
            .entry("xdp.lldp_ns_per_pkt")
            .or_default()
            .push(total / f64::from(calls));
    }
    let mut out: Vec<BenchResult> = samples
        .into_iter()
        .map(|(k, v)| BenchResult {
            key: k.to_owned(),
            ns_per_pkt: median(v),
        })
        .collect();
    let base_of = |prefix: &str| {
        out.iter()
            .find(|r| r.key == format!("{prefix}.baseline_ns_per_pkt"))
            .map_or(0.0, |r| r.ns_per_pkt)
    };
    let (xdp_base, tc_base) = (base_of("xdp"), base_of("tc"));
    let extra: Vec<BenchResult> = out
        .iter()
        .filter(|r| !r.key.contains("baseline"))
        .map(|r| BenchResult {
            key: r.key.replace("_ns_per_pkt", "_over_baseline_ns"),
            ns_per_pkt: r.ns_per_pkt
                - if r.key.starts_with("tc.") {
                    tc_base
                } else {
                    xdp_base
                },
        })
        .collect();
    out.extend(extra);
    Ok(out)
}
