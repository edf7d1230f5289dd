//! The `ebpf` benchmark: per-packet cost of the programs under BPF_PROG_TEST_RUN (raw bpf()
//! command 10, the kernel times `repeat` runs of the program on one frame), against trivial
//! XDP_PASS and TC programs from the test object measured in the same run.
//!
//! The production object is loaded twice: as the agent loads it by default (`AYA_LOG_LEVEL` 0,
//! every log branch removed by the verifier) and with its log records enabled (DEBUG, as with
//! `QKD_MACSEC_LOG=...dataplane::kernel=debug`), so the run shows what logging costs where. The
//! verifier's instruction counts of both loads are reported too.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::time::Instant;

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::{SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use qkd_macsec_common::{
    mac_key, Counter, DataplaneConfig, Direction, Gcra, IfCounter, LldpRateLimits, SaReg,
    LLDP_DST_MAC, LLDP_OUI, LLDP_SUBTYPE, MAP_CONFIG, MAP_EVENTS, MAP_IF_STATS, MAP_SA_REG,
    PROG_TC, PROG_TC_PASS, PROG_XDP, PROG_XDP_PASS, TCI_SC, TCI_V,
};

use super::klog;
use super::maps::{choose_slot, new_entry, sum_counters, SaKey, Sci, SlotChoice};
use super::{chain, DataplaneError};

/// One reported number.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    /// Key in results.json, e.g. `xdp.macsec_ns_per_pkt`.
    pub key: String,
    /// The number: nanoseconds per packet (median over rounds) for `*_ns_per_pkt` and
    /// `*_over_baseline_ns` keys, a ratio for `*_ratio`, instructions for `*_insns`.
    pub value: f64,
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
/// Source of the LLDP frames measured on the rate-limited path (not the located peer).
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0x03];
const XDP_DROP: u32 = 1;

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

fn lldp_frame(src: [u8; 6]) -> Vec<u8> {
    let payload = [0x42u8; 64];
    let mut lldpdu = crate::lldp::LldpFrame {
        chassis_mac: src,
        port_id: "bench0".into(),
        ttl: 120,
        payload: payload.to_vec(),
    }
    .encode_lldpdu(LLDP_OUI, LLDP_SUBTYPE)
    .expect("bench LLDPDU encodes");
    let mut f = Vec::new();
    f.extend_from_slice(&LLDP_DST_MAC);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88CCu16.to_be_bytes());
    f.append(&mut lldpdu);
    f
}

fn load_err(what: &str) -> impl FnOnce(aya::EbpfError) -> DataplaneError + '_ {
    move |e| DataplaneError::Load {
        what: what.into(),
        detail: chain(&e),
    }
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        detail: chain(&e),
    }
}

fn prog_err(name: &str) -> impl FnOnce(aya::programs::ProgramError) -> DataplaneError + '_ {
    move |e| DataplaneError::Load {
        what: name.into(),
        detail: chain(&e),
    }
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
        .map_err(prog_err(name))
}

/// A loaded program's fd and the verifier's figures for it.
struct Prog {
    fd: i32,
    verified_insns: Option<u32>,
    xlated_insns: Option<u32>,
}

fn loaded(ebpf: &Ebpf, name: &str) -> Result<Prog, DataplaneError> {
    let p = ebpf.program(name).ok_or_else(|| DataplaneError::Load {
        what: name.into(),
        detail: "missing".into(),
    })?;
    let fd = p.fd().map_err(prog_err(name))?.as_fd().as_raw_fd();
    let info = p.info().map_err(prog_err(name))?;
    Ok(Prog {
        fd,
        verified_insns: info.verified_instruction_count(),
        xlated_insns: info.size_translated().map(|b| b / 8),
    })
}

/// The test object's baselines.
struct Baselines {
    _ebpf: Ebpf,
    xdp: i32,
    tc: i32,
}

fn load_baselines() -> Result<Baselines, DataplaneError> {
    let mut ebpf = EbpfLoader::new()
        .load(crate::EBPF_TEST_OBJECT)
        .map_err(load_err("the eBPF test object"))?;
    let p: &mut Xdp = prog(&mut ebpf, PROG_XDP_PASS)?;
    p.load().map_err(prog_err(PROG_XDP_PASS))?;
    let p: &mut SchedClassifier = prog(&mut ebpf, PROG_TC_PASS)?;
    p.load().map_err(prog_err(PROG_TC_PASS))?;
    Ok(Baselines {
        xdp: loaded(&ebpf, PROG_XDP_PASS)?.fd,
        tc: loaded(&ebpf, PROG_TC_PASS)?.fd,
        _ebpf: ebpf,
    })
}

/// The production object, configured for the benchmark.
struct Production {
    ebpf: Ebpf,
    xdp: Prog,
    tc: Prog,
    events: RingBuf<MapData>,
    /// The log record ring, drained between calls when logging is on.
    logs: Option<RingBuf<MapData>>,
    rx: SaKey,
}

/// Limits under which the measured LLDP hand-off is never throttled but still runs the whole
/// GCRA check: the peer's bucket refills one token per nanosecond, while a run takes hundreds.
const UNTHROTTLED_PEER: Gcra = Gcra::new(1_000_000_000, 1_000_000);
/// The rate-limited path's source bucket: one TLV per second, burst 1.
const ONE_PER_SECOND: Gcra = Gcra::new(1, 1);

fn load_production(log_level: u8) -> Result<Production, DataplaneError> {
    let mut ebpf = EbpfLoader::new()
        .override_global(klog::LEVEL_GLOBAL, &log_level, true)
        .load(crate::EBPF_OBJECT)
        .map_err(load_err("the eBPF object"))?;
    let p: &mut Xdp = prog(&mut ebpf, PROG_XDP)?;
    p.load().map_err(prog_err(PROG_XDP))?;
    let p: &mut SchedClassifier = prog(&mut ebpf, PROG_TC)?;
    p.load().map_err(prog_err(PROG_TC))?;
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
            Array::try_from(ebpf.map_mut(MAP_CONFIG).expect("config map"))
                .map_err(map_err(MAP_CONFIG))?;
        // The LLDP frames come from the located peer, whose bucket never runs dry at benchmark
        // speed: `xdp.lldp` measures the hand-off, not the limit (the default limits would let
        // 200 frames through and drop the rest). Other sources keep the defaults except for
        // their own bucket, tightened so that `xdp.lldp_rate_limited` is the dropped path from
        // its second frame on.
        let c = DataplaneConfig {
            peer_mac: mac_key(SRC),
            lldp_limits: LldpRateLimits {
                peer: UNTHROTTLED_PEER,
                per_source: ONE_PER_SECOND,
                ..LldpRateLimits::DEFAULT
            },
            ..DataplaneConfig::DEFAULT
        };
        cfg.set(0, &c, 0).map_err(map_err(MAP_CONFIG))?;
    }
    {
        let mut reg: Array<&mut MapData, SaReg> =
            Array::try_from(ebpf.map_mut(MAP_SA_REG).expect("reg map"))
                .map_err(map_err(MAP_SA_REG))?;
        for key in [rx, tx] {
            let SlotChoice::Free(slot) = choose_slot(&key, |_| Ok(SaReg::EMPTY))? else {
                unreachable!("empty table has a free slot")
            };
            // Thresholds armed but far away: the per-packet threshold compare is part of the cost.
            let e = new_entry(&key, false, 0, [1 << 40, 1 << 41, 0, 0]);
            reg.set(slot, &e, 0).map_err(map_err(MAP_SA_REG))?;
        }
    }
    let events = RingBuf::try_from(ebpf.take_map(MAP_EVENTS).expect("events map"))
        .map_err(map_err(MAP_EVENTS))?;
    let logs = if log_level == 0 {
        None
    } else {
        Some(
            RingBuf::try_from(ebpf.take_map("AYA_LOGS").expect("aya-log's ring"))
                .map_err(map_err("AYA_LOGS"))?,
        )
    };
    Ok(Production {
        xdp: loaded(&ebpf, PROG_XDP)?,
        tc: loaded(&ebpf, PROG_TC)?,
        ebpf,
        events,
        logs,
        rx,
    })
}

impl Production {
    /// Empties both rings; returns the number of events.
    fn drain(&mut self) -> u32 {
        let mut n = 0;
        while self.events.next().is_some() {
            n += 1;
        }
        if let Some(l) = &mut self.logs {
            while l.next().is_some() {}
        }
        n
    }

    fn if_counter(&self, c: IfCounter) -> Result<Counter, DataplaneError> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(MAP_IF_STATS).expect("if stats map"))
                .map_err(map_err(MAP_IF_STATS))?;
        let v = stats.get(&(c as u32), 0).map_err(map_err(MAP_IF_STATS))?;
        Ok(sum_counters(v.iter()))
    }

    /// Runs `frame` through the XDP program `repeat` times and empties the rings afterwards.
    fn xdp(&mut self, frame: &[u8], repeat: u32) -> Result<f64, DataplaneError> {
        let r = test_run(self.xdp.fd, frame, repeat)?.0;
        self.drain();
        Ok(r)
    }

    fn tc(&mut self, frame: &[u8], repeat: u32) -> Result<f64, DataplaneError> {
        let r = test_run(self.tc.fd, frame, repeat)?.0;
        self.drain();
        Ok(r)
    }

    /// The unthrottled LLDP hand-off: every run delivers an event. Keeps each call below the
    /// ring's capacity and drains it between calls so the measurement is of real deliveries,
    /// not of a full ring; fails if a single frame was not delivered.
    fn lldp_delivered(&mut self, frame: &[u8], repeat: u32) -> Result<f64, DataplaneError> {
        let per_call = 256u32;
        let calls = (repeat / per_call / 16).max(1);
        let mut total = 0.0;
        for _ in 0..calls {
            total += test_run(self.xdp.fd, frame, per_call)?.0;
            let n = self.drain();
            if n != per_call {
                return Err(DataplaneError::Io {
                    context: format!(
                        "LLDP bench: {n} events for {per_call} runs (the peer's bucket must not                          throttle the measured hand-off)"
                    ),
                    source: std::io::Error::other("event count mismatch"),
                });
            }
        }
        Ok(total / f64::from(calls))
    }

    /// The rate-limited path: a project TLV from a source whose bucket is empty (walk, bucket
    /// lookup, reject, drop; no ring record). Checks that (almost) every run was a drop.
    fn lldp_rate_limited(&mut self, frame: &[u8], repeat: u32) -> Result<f64, DataplaneError> {
        // Empty the source's bucket first (its one token).
        test_run(self.xdp.fd, frame, 2)?;
        self.drain();
        let before = self.if_counter(IfCounter::LldpRateLimited)?.frames;
        let t = Instant::now();
        let (ns, retval) = test_run(self.xdp.fd, frame, repeat)?;
        let delivered = self.drain();
        let limited = self.if_counter(IfCounter::LldpRateLimited)?.frames - before;
        // One token per second of the call may have let a frame through, no more.
        let allowed = t.elapsed().as_secs() + 1;
        if retval != XDP_DROP
            || u64::from(delivered) > allowed
            || limited + u64::from(delivered) != u64::from(repeat)
        {
            return Err(DataplaneError::Io {
                context: format!(
                    "LLDP rate-limited bench: {limited} of {repeat} runs rate-limited,                      {delivered} delivered (at most {allowed} allowed), last verdict {retval}"
                ),
                source: std::io::Error::other("the measured path was not the rate-limited one"),
            });
        }
        Ok(ns)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the benchmark: `repeat` runs per measurement, `rounds` rounds (interleaved, median).
pub fn run_benchmark(repeat: u32, rounds: usize) -> Result<Vec<BenchResult>, DataplaneError> {
    let base = load_baselines()?;
    let mut off = load_production(0)?;
    let mut dbg = load_production(aya_log::Level::Debug as u8)?;
    let load_before = loadavg();

    let rx = off.rx;
    let macsec = bench_macsec_frame(rx.sci, rx.an, 5);
    let unknown = bench_macsec_frame(Sci::from_mac_port(DST, 7), 0, 5);
    let ipv4 = ipv4_frame();
    // Rejected right after the TCI: the parse cost without any SA lookup.
    let mut malformed = macsec.clone();
    malformed[14] |= TCI_V;
    let lldp = lldp_frame(SRC);
    let lldp_other = lldp_frame(OTHER);

    let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut add = |k: &'static str, v: f64| samples.entry(k).or_default().push(v);
    // The logging comparisons run as PAIRS interleaved pairs of repeat / PAIRS runs each: the
    // kernel reports whole nanoseconds per run, so two paths a fraction of a nanosecond apart
    // need many samples, whose mean resolves what one median cannot.
    const PAIRS: u32 = 8;
    let sub = (repeat / PAIRS).max(1);
    for _ in 0..rounds {
        add(
            "xdp.baseline_ns_per_pkt",
            test_run(base.xdp, &ipv4, repeat)?.0,
        );
        add("xdp.ipv4_ns_per_pkt", off.xdp(&ipv4, repeat)?);
        add(
            "xdp.macsec_unknown_sa_ns_per_pkt",
            off.xdp(&unknown, repeat)?,
        );
        add(
            "tc.baseline_ns_per_pkt",
            test_run(base.tc, &macsec, repeat)?.0,
        );
        add("xdp.lldp_ns_per_pkt", off.lldp_delivered(&lldp, repeat)?);
        for _ in 0..PAIRS {
            // Without and with the log records compiled in and enabled.
            add("xdp.macsec_ns_per_pkt", off.xdp(&macsec, sub)?);
            add("xdp.macsec_log_debug_ns_per_pkt", dbg.xdp(&macsec, sub)?);
            add("tc.macsec_ns_per_pkt", off.tc(&macsec, sub)?);
            add("tc.macsec_log_debug_ns_per_pkt", dbg.tc(&macsec, sub)?);
            add("xdp.macsec_malformed_ns_per_pkt", off.xdp(&malformed, sub)?);
            add(
                "xdp.macsec_malformed_log_debug_ns_per_pkt",
                dbg.xdp(&malformed, sub)?,
            );
            add(
                "xdp.lldp_rate_limited_ns_per_pkt",
                off.lldp_rate_limited(&lldp_other, sub)?,
            );
            add(
                "xdp.lldp_rate_limited_log_debug_ns_per_pkt",
                dbg.lldp_rate_limited(&lldp_other, sub)?,
            );
        }
    }
    let mean = |k: &str| {
        samples
            .get(k)
            .map_or(f64::NAN, |v| v.iter().sum::<f64>() / v.len() as f64)
    };
    // What enabling the log records costs, path by path (1.0: nothing), from the means.
    let ratios: Vec<BenchResult> = [
        ("xdp.macsec_log_debug_ns_per_pkt", "xdp.macsec_ns_per_pkt"),
        ("tc.macsec_log_debug_ns_per_pkt", "tc.macsec_ns_per_pkt"),
        (
            "xdp.macsec_malformed_log_debug_ns_per_pkt",
            "xdp.macsec_malformed_ns_per_pkt",
        ),
        (
            "xdp.lldp_rate_limited_log_debug_ns_per_pkt",
            "xdp.lldp_rate_limited_ns_per_pkt",
        ),
    ]
    .into_iter()
    .map(|(on, off_key)| BenchResult {
        key: on.replace("_ns_per_pkt", "_ratio"),
        value: mean(on) / mean(off_key),
    })
    .collect();
    let mut out: Vec<BenchResult> = samples
        .into_iter()
        .map(|(k, v)| BenchResult {
            key: k.to_owned(),
            value: median(v),
        })
        .collect();
    let value_of = |out: &[BenchResult], key: &str| {
        out.iter()
            .find(|r| r.key == key)
            .map_or(f64::NAN, |r| r.value)
    };
    let (xdp_base, tc_base) = (
        value_of(&out, "xdp.baseline_ns_per_pkt"),
        value_of(&out, "tc.baseline_ns_per_pkt"),
    );
    let mut extra: Vec<BenchResult> = out
        .iter()
        .filter(|r| !r.key.contains("baseline") && r.key.ends_with("_ns_per_pkt"))
        .map(|r| BenchResult {
            key: r.key.replace("_ns_per_pkt", "_over_baseline_ns"),
            value: r.value
                - if r.key.starts_with("tc.") {
                    tc_base
                } else {
                    xdp_base
                },
        })
        .collect();
    extra.extend(ratios);
    for (prefix, p_off, p_dbg) in [("xdp", &off.xdp, &dbg.xdp), ("tc", &off.tc, &dbg.tc)] {
        for (suffix, p) in [("", p_off), ("_log_debug", p_dbg)] {
            for (what, v) in [
                ("verified_insns", p.verified_insns),
                ("xlated_insns", p.xlated_insns),
            ] {
                if let Some(v) = v {
                    extra.push(BenchResult {
                        key: format!("{prefix}.{what}{suffix}"),
                        value: f64::from(v),
                    });
                }
            }
        }
    }
    extra.push(BenchResult {
        key: "xdp.bench_loadavg".into(),
        value: (load_before + loadavg()) / 2.0,
    });
    out.extend(extra);
    Ok(out)
}
