//! `qkd-macsec-soak`: the chaos soak. Two gateways on a bridged wire (with an eavesdropper's
//! port), UDP streams both ways for the whole run, and a seeded schedule of faults, one at a
//! time: KME outages, latency and 503s, an eavesdropper raising the QBER, LLDP loss, LLDP
//! duplicated and reordered by kernel netem, recorded key-exchange TLVs replayed shuffled, and
//! `kill -9` of an agent with a restart. Ends by itself; the JSON summary is the last stdout line
//! (and `--summary-file`). Run through `cargo xtask soak`, which boots the MACsec VM.
//!
//! Everything is observed from outside the agents (kernel MACsec dumps, AF_PACKET captures, the
//! streams). Three figures must be 0, else the exit status is non-zero:
//! - `lost_while_valid`: stream datagrams lost outside stall windows and outside windows in
//!   which a side's active TX key was past its lifetime (each widened by [`LOSS_MARGIN`]);
//! - `plaintext_frames`: non-MACsec, non-LLDP frames a gateway put on the wire;
//! - `accepted_under_expired_key`: frames an RX SA accepted after its key's lifetime ended
//!   (see [`qkd_macsec_tests::soak::expired_key_report`] for the sampling granularity).

// The summary is one `serde_json::json!` object with ~50 keys, deeper than the default limit.
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use qkd_macsec_agent::macsec::Macsec;
use qkd_macsec_tests::soak::{
    expired_key_report, schedule, Fault, FaultKind, FaultParams, KeySample, RxSaCount,
    ScheduleShape, SplitMix64,
};
use qkd_macsec_tests::testbed::{
    capture_lldp, inject_frames, key_short, lost_outside, tail, LinkSpec, Running, Side,
    StreamReport, TestbedOptions, Wire,
};
use qkd_macsec_tests::NetNs;

/// Losses this close to a stall or expired-key window are counted as part of it: the monitor
/// and the key sampler see state changes up to one period (50 ms, 100 ms) late, and the TCG VM
/// adds scheduling noise of a few hundred milliseconds.
const LOSS_MARGIN: Duration = Duration::from_millis(300);
/// Period of the expired-key sampler.
const KEY_SAMPLE_PERIOD: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
#[command(
    name = "qkd-macsec-soak",
    about = "Chaos soak of two QKD-keyed MACsec gateways"
)]
struct Args {
    /// Length of the soak once the link is secured, minutes (warm-up and cool-down included).
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Seed of the fault schedule (default: derived from the clock; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Key profile of the link: cak or sak.
    #[arg(long, default_value = "sak", value_parser = ["cak", "sak"])]
    profile: String,
    /// Datagrams per second in each direction.
    #[arg(long, default_value_t = 100)]
    pps: u32,
    /// Active key lifetime (AKL max_age), seconds.
    #[arg(long, default_value_t = 20)]
    akl_s: u64,
    /// AKL fraction at which keys roll.
    #[arg(long, default_value_t = 0.4)]
    rollover_at: f64,
    /// AKL fraction at which the agents warn.
    #[arg(long, default_value_t = 0.8)]
    warn_at: f64,
    /// How long the agents get to secure the link (and a restarted agent to re-key), seconds.
    #[arg(long, default_value_t = 240)]
    secure_timeout: u64,
    /// Agent log filter (QKD_MACSEC_LOG).
    #[arg(long, default_value = "info")]
    agent_log: String,
    /// Print the fault schedule for the seed and length, then exit (no testbed, no root).
    #[arg(long)]
    plan_only: bool,
    /// Also write the summary JSON to this file (used by `cargo xtask soak` inside the VM).
    #[arg(long)]
    summary_file: Option<std::path::PathBuf>,
}

/// What happened to one scheduled fault.
#[derive(Debug)]
struct Injection {
    fault: Fault,
    /// Actual start and end (a fault starts late when the previous recovery ran over).
    started: Instant,
    ended: Instant,
    /// From the end of the fault until both sides were secured again with a fresh key; None:
    /// not recovered before the next fault was due.
    recover: Option<Duration>,
    note: String,
}

#[derive(Default)]
struct Outcome {
    error: Option<String>,
    start_to_secure_s: Option<f64>,
    injections: Vec<Injection>,
    skipped: u64,
    agent_restarts: u64,
    agent_crashes: Vec<String>,
    rollovers: [u64; 2],
    stalls: u64,
    recoveries: u64,
    stall_s: f64,
    streams: Vec<StreamReport>,
    lost_while_valid: Vec<(f64, String)>,
    /// The same losses grouped into bursts (one line each).
    loss_bursts: Vec<String>,
    plaintext_frames: u64,
    plaintext_stream_frames: u64,
    macsec_frames: u64,
    lldp_frames: u64,
    invalid_frames: u64,
    /// Rejected RX frames per side (see [`SamplerState::rejected`]) and when, as bursts.
    rejected_frames: [u64; 2],
    rejected_bursts: Vec<String>,
    accepted_under_expired_key: u64,
    expired_violations: Vec<String>,
    keys_tracked: usize,
    key_samples: usize,
    sampler_errors: Vec<String>,
    expired_tx_windows: usize,
    end_secured: bool,
    traffic_s: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        // Milliseconds since the epoch: unique enough, and exact in a JSON double.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64)
    });
    let t0 = Instant::now();
    let total = Duration::from_secs(args.minutes * 60);
    let plan = schedule(seed, total, &ScheduleShape::default());
    say(&format!(
        "soak: seed {seed} ({} min, profile {}, {} datagrams/s each way, AKL {} s rolled at {:.0}%); \
         re-run this schedule with --seed {seed}",
        args.minutes,
        args.profile,
        args.pps,
        args.akl_s,
        args.rollover_at * 100.0
    ));
    for f in &plan {
        say(&format!(
            "soak: planned {:>7.1} s  {:<16} for {:>5.1} s  {:?}",
            f.at.as_secs_f64(),
            f.kind.name(),
            f.dur.as_secs_f64(),
            f.params
        ));
    }
    if args.plan_only {
        return ExitCode::SUCCESS;
    }
    let mut out = Outcome::default();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        run(&args, seed, total, &plan, &mut out)
    }));
    if let Err(p) = r {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        out.error = Some(msg);
    }
    let summary = summarise(&args, seed, &plan, &out, t0);
    let line = summary.to_string();
    if let Some(p) = &args.summary_file {
        if let Err(e) = std::fs::write(p, &line) {
            eprintln!("soak: cannot write {}: {e}", p.display());
        }
    }
    let ok = summary["ok"].as_bool().unwrap_or(false);
    if let Some(e) = &out.error {
        eprintln!("soak: FAILED: {e}");
    } else if !ok {
        eprintln!("soak: FAILED: see the figures above (seed {seed})");
    }
    println!("{line}");
    let _ = std::io::stdout().flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn summarise(
    args: &Args,
    seed: u64,
    plan: &[Fault],
    out: &Outcome,
    t0: Instant,
) -> serde_json::Value {
    let sum = |f: fn(&StreamReport) -> u64| out.streams.iter().map(f).sum::<u64>();
    let mut per_kind = serde_json::Map::new();
    for k in FaultKind::ALL {
        let mine: Vec<&Injection> = out
            .injections
            .iter()
            .filter(|i| i.fault.kind == k)
            .collect();
        let rec: Vec<f64> = mine
            .iter()
            .filter_map(|i| i.recover.map(|d| d.as_secs_f64()))
            .collect();
        per_kind.insert(
            k.name().into(),
            serde_json::json!({
                "count": mine.len(),
                "unrecovered": mine.iter().filter(|i| i.recover.is_none()).count(),
                "max_recover_s": rec.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
                "mean_recover_s": (!rec.is_empty()).then(|| rec.iter().sum::<f64>() / rec.len() as f64),
            }),
        );
    }
    let injections: Vec<serde_json::Value> = out
        .injections
        .iter()
        .map(|i| {
            serde_json::json!({
                "kind": i.fault.kind.name(),
                "planned_at_s": i.fault.at.as_secs_f64(),
                "dur_s": i.fault.dur.as_secs_f64(),
                "params": format!("{:?}", i.fault.params),
                "held_s": (i.ended - i.started).as_secs_f64(),
                "recover_s": i.recover.map(|d| d.as_secs_f64()),
                "note": i.note,
            })
        })
        .collect();
    let recovered: Vec<f64> = out
        .injections
        .iter()
        .filter_map(|i| i.recover.map(|d| d.as_secs_f64()))
        .collect();
    let unrecovered = out
        .injections
        .iter()
        .filter(|i| i.recover.is_none())
        .count();
    let lost_while_valid = out.lost_while_valid.len() as u64;
    // Beyond the three must-be-zero figures: an agent that died by itself, a link still broken
    // after the cool-down, or a sampler that saw nothing also fail the soak.
    let ok = out.error.is_none()
        && out.streams.len() == 2
        && out.streams.iter().all(|r| r.received > 0)
        && lost_while_valid == 0
        && out.plaintext_frames == 0
        && out.accepted_under_expired_key == 0
        && out.key_samples > 0
        && out.keys_tracked > 0
        && out.agent_crashes.is_empty()
        && out.end_secured;
    serde_json::json!({
        "ok": ok,
        "seed": seed,
        "minutes": args.minutes,
        "profile": args.profile,
        "pps": args.pps,
        "akl_max_age_s": args.akl_s,
        "rollover_at": args.rollover_at,
        "faults_planned": plan.len(),
        "faults_injected": out.injections.len(),
        "faults_skipped": out.skipped,
        "faults_unrecovered": unrecovered,
        "max_recover_s": recovered.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        "faults": per_kind,
        "injections": injections,
        "rollovers": out.rollovers[0].min(out.rollovers[1]),
        "rollovers_gw_a": out.rollovers[0],
        "rollovers_gw_b": out.rollovers[1],
        "stalls": out.stalls,
        "recoveries": out.recoveries,
        "stall_s": out.stall_s,
        "agent_restarts": out.agent_restarts,
        "agent_crashes": out.agent_crashes.len(),
        "sent_frames": sum(|r| r.sent),
        "received_frames": sum(|r| r.received),
        "lost_frames": sum(|r| r.lost),
        "lost_while_valid": lost_while_valid,
        "lost_while_valid_at": out.loss_bursts.iter().take(50).collect::<Vec<_>>(),
        "loss_margin_ms": LOSS_MARGIN.as_millis() as u64,
        "reordered_frames": sum(|r| r.reordered),
        "duplicated_frames": sum(|r| r.duplicated),
        "plaintext_frames": out.plaintext_frames,
        "plaintext_stream_frames": out.plaintext_stream_frames,
        "macsec_frames": out.macsec_frames,
        "lldp_frames": out.lldp_frames,
        "invalid_frames": out.invalid_frames,
        "rx_rejected_gw_a": out.rejected_frames[0],
        "rx_rejected_gw_b": out.rejected_frames[1],
        "rx_rejected_at": out.rejected_bursts.iter().take(50).collect::<Vec<_>>(),
        "accepted_under_expired_key": out.accepted_under_expired_key,
        "accepted_under_expired_key_at": out.expired_violations.iter().take(50).collect::<Vec<_>>(),
        "keys_tracked": out.keys_tracked,
        "key_samples": out.key_samples,
        "key_sample_period_ms": KEY_SAMPLE_PERIOD.as_millis() as u64,
        "key_sampler_errors": out.sampler_errors.len(),
        "expired_tx_windows": out.expired_tx_windows,
        "end_secured": out.end_secured,
        "start_to_secure_s": out.start_to_secure_s,
        "traffic_s": out.traffic_s,
        "wall_s": t0.elapsed().as_secs_f64(),
        "error": out.error,
    })
}

/// The key sampler's shared state.
#[derive(Default)]
struct SamplerState {
    samples: Vec<KeySample>,
    /// First time each key was seen as an active encoding TX SA (either side).
    first_tx: BTreeMap<[u8; 16], Instant>,
    latest_tx: [Option<[u8; 16]>; 2],
    /// Per side, the time and total of frames the RX SCs rejected (invalid, not valid, no SA,
    /// unused SA) whenever that total grew: when and where frames were refused.
    rejected: Vec<(Instant, usize, u64)>,
    last_rejected: [u64; 2],
    errors: Vec<String>,
}

/// Samples both gateways' kernel MACsec state every [`KEY_SAMPLE_PERIOD`] for the expired-key
/// accounting: a separate sampler from the testbed's monitor, since the monitor keeps only the
/// current view and this needs every RX SA's counter in every sample.
struct KeySampler {
    origin: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    state: Arc<Mutex<SamplerState>>,
}

impl KeySampler {
    fn start(gw: [Arc<NetNs>; 2]) -> KeySampler {
        let origin = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(SamplerState::default()));
        let threads = gw
            .into_iter()
            .enumerate()
            .map(|(side, ns)| {
                let stop = Arc::clone(&stop);
                let state = Arc::clone(&state);
                std::thread::spawn(move || {
                    let mut m = {
                        let _in = ns.enter();
                        match Macsec::open() {
                            Ok(m) => m,
                            Err(e) => {
                                lock(&state).errors.push(format!("side {side}: {e}"));
                                return;
                            }
                        }
                    };
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let dump = m.dump_all();
                        let now = Instant::now();
                        let mut st = lock(&state);
                        match dump {
                            Ok(v) => {
                                let secy = v.first();
                                let tx_key = secy.and_then(|s| {
                                    s.tx_sa(s.encoding_sa)
                                        .filter(|t| t.active)
                                        .map(|t| t.key_id.0)
                                });
                                let rx = secy
                                    .map(|s| {
                                        s.rx_scs
                                            .iter()
                                            .flat_map(|sc| {
                                                sc.sas.iter().map(|sa| RxSaCount {
                                                    sci: sc.sci.0,
                                                    an: sa.an.get(),
                                                    key: sa.key_id.0,
                                                    in_pkts_ok: sa.stats.in_pkts_ok,
                                                })
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                if let Some(k) = tx_key {
                                    st.first_tx.entry(k).or_insert(now);
                                }
                                st.latest_tx[side] = tx_key;
                                let rejected: u64 = secy.map_or(0, |s| {
                                    s.rx_scs
                                        .iter()
                                        .map(|sc| {
                                            sc.stats.in_pkts_invalid
                                                + sc.stats.in_pkts_not_valid
                                                + sc.stats.in_pkts_not_using_sa
                                                + sc.stats.in_pkts_unused_sa
                                        })
                                        .sum()
                                });
                                if rejected > st.last_rejected[side] {
                                    let grew = rejected - st.last_rejected[side];
                                    st.rejected.push((now, side, grew));
                                }
                                // A re-created SC starts from 0 again: follow it down too.
                                st.last_rejected[side] = rejected;
                                st.samples.push(KeySample {
                                    at: now - origin,
                                    side,
                                    tx_key,
                                    rx,
                                });
                            }
                            Err(e) => {
                                if st.errors.len() < 100 {
                                    st.errors.push(format!("side {side}: {e}"));
                                }
                            }
                        }
                        drop(st);
                        next += KEY_SAMPLE_PERIOD;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                })
            })
            .collect();
        KeySampler {
            origin,
            stop,
            threads,
            state,
        }
    }

    /// Both sides' current TX keys are active and within their lifetime.
    fn tx_keys_fresh(&self, max_age: Duration) -> bool {
        let st = lock(&self.state);
        st.latest_tx.iter().all(|k| {
            k.and_then(|k| st.first_tx.get(&k))
                .is_some_and(|t| t.elapsed() < max_age)
        })
    }

    fn stop(mut self) -> SamplerState {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        std::mem::take(&mut *lock(&self.state))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tc_bin() -> &'static str {
    ["/usr/sbin/tc", "/sbin/tc", "/usr/bin/tc", "/bin/tc"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("tc")
}

/// The wire's bridge ports towards the gateways: netem on their egress shapes what each gateway
/// receives.
const GW_PORTS: [&str; 2] = ["pa", "pb"];

/// Puts LLDP (and only LLDP) on each gateway port through a netem qdisc, idle (no delay) until
/// a fault changes it: a 4-band prio root whose priomap sends everything to band 1, and a
/// matchall filter for EtherType 0x88CC to band 4, which holds the netem.
fn netem_setup(wire: &NetNs) {
    let tc = tc_bin();
    for p in GW_PORTS {
        let mut root = vec![
            tc,
            "-n",
            wire.name(),
            "qdisc",
            "add",
            "dev",
            p,
            "root",
            "handle",
            "1:",
            "prio",
            "bands",
            "4",
            "priomap",
        ];
        root.extend(["0"; 16]);
        qkd_macsec_tests::run(&root);
        qkd_macsec_tests::run(&[
            tc,
            "-n",
            wire.name(),
            "qdisc",
            "add",
            "dev",
            p,
            "parent",
            "1:4",
            "handle",
            "40:",
            "netem",
            "delay",
            "0ms",
        ]);
        qkd_macsec_tests::run(&[
            tc,
            "-n",
            wire.name(),
            "filter",
            "add",
            "dev",
            p,
            "parent",
            "1:",
            "protocol",
            "0x88cc",
            "prio",
            "1",
            "matchall",
            "classid",
            "1:4",
        ]);
    }
}

/// Changes the LLDP netem on both gateway ports (`netem` options, e.g. `loss 100%`).
fn netem_set(wire: &NetNs, opts: &[&str]) {
    let tc = tc_bin();
    for p in GW_PORTS {
        let mut c = vec![
            tc,
            "-n",
            wire.name(),
            "qdisc",
            "change",
            "dev",
            p,
            "parent",
            "1:4",
            "handle",
            "40:",
            "netem",
        ];
        c.extend_from_slice(opts);
        qkd_macsec_tests::run(&c);
    }
}

/// `tc -s qdisc show` of both gateway ports (netem's drop/duplicate counters prove the
/// faults hit the wire).
fn netem_show(wire: &NetNs) -> String {
    let tc = tc_bin();
    GW_PORTS
        .iter()
        .map(|p| {
            let o =
                qkd_macsec_tests::run(&[tc, "-n", wire.name(), "-s", "qdisc", "show", "dev", p]);
            format!("{p}:\n{}", String::from_utf8_lossy(&o.stdout).trim_end())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Soak<'a> {
    run: Running,
    args: &'a Args,
    sampler: KeySampler,
    eve: Arc<NetNs>,
    /// An agent deliberately down (killed, not yet restarted).
    down: Option<Side>,
    out: &'a mut Outcome,
    t0: Instant,
}

impl Soak<'_> {
    fn wire(&self) -> &NetNs {
        self.run
            .bed
            .wire_ns
            .as_ref()
            .expect("bridged testbed has a wire namespace")
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.args.akl_s)
    }

    /// Health check, about once a second: an agent that exited without being killed is
    /// recorded with its log tail and restarted, so the soak goes on.
    fn tick(&mut self) {
        for side in Side::BOTH {
            if self.down == Some(side) || self.run.bed.agent_running(side) {
                continue;
            }
            let at = self.t0.elapsed().as_secs_f64();
            let st = self.run.bed.stop_agent(side, Duration::ZERO);
            let log = tail(&self.run.bed.files[side as usize].log, 30);
            say(&format!(
                "soak: [{at:.1}s] AGENT {} EXITED by itself ({st:?}); restarting. Log tail:\n{log}",
                side.label()
            ));
            self.out
                .agent_crashes
                .push(format!("{at:.1}s {} {st:?}: {log}", side.label()));
            self.run.bed.start_agent(side, &self.args.agent_log);
        }
    }

    /// Sleeps until `until`, ticking.
    fn hold(&mut self, until: Instant) {
        loop {
            self.tick();
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(500)));
        }
    }

    /// The link keys again after a fault: both sides secured with no stall open, no agent
    /// down, both TX keys within their lifetime, and a rollover on both sides since `base`
    /// (the rollover count when the fault ended). The rollover is what proves that both agents
    /// (a restarted one included) exchange and install keys again, not only that the kernel
    /// still holds the old SAs.
    fn recovered(&self, base: u64) -> bool {
        let link_ok = self.run.monitor.snapshot(|s| {
            s.rollovers[0].min(s.rollovers[1]) > base
                && Side::BOTH.iter().all(|&side| {
                    s.latest[side as usize].secured()
                        && s.stalls(side).iter().all(|(_, e)| e.is_some())
                })
        });
        link_ok && self.down.is_none() && self.sampler.tx_keys_fresh(self.max_age())
    }

    fn kme(&self, args: &[&str]) {
        let mut full = vec!["set"];
        full.extend_from_slice(args);
        self.run.bed.kme_ctl(&full);
    }

    /// Runs one fault for its duration and undoes it; returns a note for the log.
    /// Holds a fault for `dur` from now: from when it took effect, since starting a helper
    /// process in the loaded emulated VM can take seconds.
    fn hold_for(&mut self, dur: Duration) {
        self.hold(Instant::now() + dur);
    }

    fn inject(&mut self, f: &Fault, idx: usize, seed: u64) -> String {
        let end = Instant::now() + f.dur;
        match (f.kind, f.params) {
            (FaultKind::KmeOutage, FaultParams::Kme { kme }) => {
                self.kme(&["--kme", kme.arg(), "--drop-connections", "true"]);
                self.hold_for(f.dur);
                self.kme(&["--kme", kme.arg(), "--drop-connections", "false"]);
                format!("kme {}", kme.arg())
            }
            (FaultKind::Kme503, FaultParams::Kme { kme }) => {
                self.kme(&["--kme", kme.arg(), "--fail-503", "true"]);
                self.hold_for(f.dur);
                self.kme(&["--kme", kme.arg(), "--fail-503", "false"]);
                format!("kme {}", kme.arg())
            }
            (FaultKind::KmeLatency, FaultParams::Latency { kme, ms }) => {
                self.kme(&["--kme", kme.arg(), "--latency-ms", &ms.to_string()]);
                self.hold_for(f.dur);
                self.kme(&["--kme", kme.arg(), "--latency-ms", "0"]);
                format!("kme {} {ms} ms", kme.arg())
            }
            (FaultKind::Eavesdropper, FaultParams::Qber { qber }) => {
                // Back to whatever the simulator had (its default is 0.02), not a constant.
                let before = self.run.bed.kme_ctl(&["show"]);
                let normal = before["qber"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("kme-sim-ctl show has no qber: {before}"));
                self.kme(&["--qber", &qber.to_string()]);
                self.hold_for(f.dur);
                self.kme(&["--qber", &normal.to_string()]);
                format!("qber {qber} then {normal}")
            }
            (FaultKind::LldpLoss, _) => {
                netem_set(self.wire(), &["loss", "100%"]);
                self.hold_for(f.dur);
                let stats = netem_show(self.wire());
                netem_set(self.wire(), &["delay", "0ms"]);
                format!("netem loss 100%; {}", netem_counts(&stats))
            }
            (FaultKind::LldpDupReorder, _) => {
                netem_set(
                    self.wire(),
                    &["delay", "150ms", "150ms", "duplicate", "30%"],
                );
                self.hold_for(f.dur);
                let stats = netem_show(self.wire());
                netem_set(self.wire(), &["delay", "0ms"]);
                format!(
                    "netem delay 150ms 150ms duplicate 30%; {}",
                    netem_counts(&stats)
                )
            }
            (FaultKind::TlvReplay, FaultParams::Replay { capture_s }) => {
                let rec = capture_lldp(&self.eve, "wan0", Duration::from_secs(capture_s));
                self.hold(end);
                // Shuffled and duplicated, from a generator derived from the soak's seed so the
                // replay order is reproducible too.
                let mut rng = SplitMix64::new(seed ^ (idx as u64).wrapping_mul(0x9e37_79b9));
                let mut frames: Vec<Vec<u8>> = Vec::new();
                for f in &rec {
                    for _ in 0..rng.range(1, 3) {
                        frames.push(f.clone());
                    }
                }
                for i in (1..frames.len()).rev() {
                    let j = rng.range(0, i as u64) as usize;
                    frames.swap(i, j);
                }
                inject_frames(&self.eve, "wan0", &frames);
                format!(
                    "recorded {} LLDPDUs for {capture_s} s, replayed {} shuffled",
                    rec.len(),
                    frames.len()
                )
            }
            (FaultKind::AgentKill, FaultParams::Kill { a_side }) => {
                let side = if a_side { Side::A } else { Side::B };
                self.run.bed.kill9_agent(side);
                self.down = Some(side);
                self.hold_for(f.dur);
                self.run.bed.start_agent(side, &self.args.agent_log);
                self.down = None;
                self.out.agent_restarts += 1;
                format!("killed {}", side.label())
            }
            (k, p) => panic!("fault {k} with parameters {p:?}: the schedule never makes this"),
        }
    }
}

/// The `Sent ... dropped N` and `duplicates` lines of `tc -s` output, condensed.
fn netem_counts(stats: &str) -> String {
    stats
        .lines()
        .filter(|l| l.contains("netem") || l.contains("Sent"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn run(args: &Args, seed: u64, total: Duration, plan: &[Fault], out: &mut Outcome) {
    let mut spec = LinkSpec::fast(if args.profile == "sak" { "sak" } else { "cak" });
    spec.akl_max_age = format!("{}s", args.akl_s);
    spec.akl_rollover_at = args.rollover_at;
    spec.akl_warn_at = args.warn_at;
    let opts = TestbedOptions {
        wire: Wire::Bridged,
        agent_log: args.agent_log.clone(),
        one_cpu: true,
        ..Default::default()
    };
    let run = Running::up(
        "soak",
        &opts,
        &spec,
        Duration::from_secs(args.secure_timeout),
    );
    out.start_to_secure_s = Some(run.start_to_secure.as_secs_f64());
    say(&format!(
        "soak: link secured {:.1} s after start; files in {}",
        run.start_to_secure.as_secs_f64(),
        run.bed.dir.display()
    ));
    let eve = run.bed.eve.clone().expect("bridged testbed has eve");
    let wire = run
        .bed
        .wire_ns
        .as_ref()
        .expect("bridged testbed has a wire namespace");
    netem_setup(wire);
    say(&format!(
        "soak: LLDP netem on the wire:\n{}",
        netem_show(wire)
    ));
    let sampler = KeySampler::start([
        Arc::clone(run.bed.ns(Side::A)),
        Arc::clone(run.bed.ns(Side::B)),
    ]);
    let [ab, ba] = run.streams(args.pps);
    let t0 = Instant::now();
    let wall0 = SystemTime::now();
    let to_wall = |t: Instant| match t.checked_duration_since(t0) {
        Some(d) => wall0 + d,
        None => wall0 - t0.duration_since(t),
    };
    let mut incidents: Vec<SystemTime> = Vec::new();
    let end = t0 + total;
    let mut soak = Soak {
        run,
        args,
        sampler,
        eve,
        down: None,
        out,
        t0,
    };
    for (idx, f) in plan.iter().enumerate() {
        let due = t0 + f.at;
        soak.hold(due);
        if Instant::now() + f.dur > end {
            say(&format!(
                "soak: skipping {} (planned at {:.1} s): the previous recovery ran into the cool-down",
                f.kind,
                f.at.as_secs_f64()
            ));
            soak.out.skipped += 1;
            continue;
        }
        let started = Instant::now();
        let ro = soak.run.rollovers();
        say(&format!(
            "soak: [{:.1}s] {} for {:.1} s {:?} (rollovers so far {ro})",
            t0.elapsed().as_secs_f64(),
            f.kind,
            f.dur.as_secs_f64(),
            f.params
        ));
        let note = soak.inject(f, idx, seed);
        let ended = Instant::now();
        let base = soak.run.rollovers();
        // Waited for until the next fault is due (or the end of the run).
        let deadline = plan
            .get(idx + 1)
            .map_or(end, |n| t0 + n.at)
            .max(ended + Duration::from_secs(5));
        let recover = loop {
            soak.tick();
            if soak.recovered(base) {
                break Some(ended.elapsed());
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        say(&format!(
            "soak: [{:.1}s] {} over ({note}); {}",
            t0.elapsed().as_secs_f64(),
            f.kind,
            recover.map_or(
                "NOT recovered before the next fault".to_owned(),
                |d| format!("recovered {:.1} s later", d.as_secs_f64())
            )
        ));
        soak.out.injections.push(Injection {
            fault: *f,
            started,
            ended,
            recover,
            note,
        });
    }
    soak.hold(end);
    let Soak {
        run, sampler, out, ..
    } = soak;
    out.end_secured = run
        .monitor
        .snapshot(|s| s.latest.iter().all(|v| v.secured()));
    let ab = ab.finish(Duration::from_secs(1));
    let ba = ba.finish(Duration::ZERO);
    out.traffic_s = t0.elapsed().as_secs_f64();
    let origin = sampler.origin;
    let keys = sampler.stop();
    let rep = expired_key_report(&keys.samples, Duration::from_secs(args.akl_s));
    out.key_samples = keys.samples.len();
    out.keys_tracked = rep.keys_tracked;
    out.sampler_errors = keys.errors.clone();
    out.accepted_under_expired_key = rep.accepted_under_expired_key;
    out.expired_tx_windows = rep.expired_tx_windows.len();
    let fault_at = |t: Instant| -> String { out_fault_at(&out.injections, t, t0) };
    out.expired_violations = rep
        .violations
        .iter()
        .map(|v| {
            let t = origin + v.at;
            incidents.push(to_wall(t));
            format!(
                "{:.2}s {} key {} {} frames ({})",
                t.saturating_duration_since(t0).as_secs_f64(),
                Side::BOTH[v.side].label(),
                key_short(&v.key),
                v.frames,
                fault_at(t)
            )
        })
        .collect();
    let st = run.monitor.snapshot(|s| {
        let mut w = s.stalls(Side::A);
        w.extend(s.stalls(Side::B));
        (w, s.rollovers, s.latest.clone())
    });
    let (stalls, rollovers, latest) = st;
    out.rollovers = rollovers;
    out.stalls = stalls.len() as u64;
    out.recoveries = stalls.iter().filter(|(_, e)| e.is_some()).count() as u64;
    out.stall_s = stalls
        .iter()
        .map(|(s, e)| {
            e.unwrap_or_else(Instant::now)
                .duration_since(*s)
                .as_secs_f64()
        })
        .sum();
    out.invalid_frames = latest.iter().map(|v| v.in_invalid + v.in_not_valid).sum();
    for side in Side::BOTH {
        let mine: Vec<(Instant, u64)> = keys
            .rejected
            .iter()
            .filter(|(_, s, _)| *s == side as usize)
            .map(|(t, _, n)| (*t, *n))
            .collect();
        out.rejected_frames[side as usize] = mine.iter().map(|(_, n)| n).sum();
        let times: Vec<Instant> = mine.iter().map(|(t, _)| *t).collect();
        for (first, last, _) in bursts(&times, Duration::from_secs(1)) {
            let n: u64 = mine
                .iter()
                .filter(|(t, _)| *t >= first && *t <= last)
                .map(|(_, n)| n)
                .sum();
            incidents.push(to_wall(first));
            out.rejected_bursts.push(format!(
                "{:.2}-{:.2}s (UTC {}) {n} frames rejected by {} ({})",
                first.saturating_duration_since(t0).as_secs_f64(),
                last.saturating_duration_since(t0).as_secs_f64(),
                &utc(to_wall(first))[11..23],
                side.label(),
                fault_at(first)
            ));
        }
    }
    for b in &out.rejected_bursts {
        say(&format!("soak: RX REJECTED: {b}"));
    }
    let mut excused = stalls.clone();
    excused.extend(
        rep.expired_tx_windows
            .iter()
            .map(|(s, e)| (origin + *s, e.map(|e| origin + e))),
    );
    for (dir, r) in [("gw-a>gw-b", &ab), ("gw-b>gw-a", &ba)] {
        let lost = lost_outside(r, &excused, LOSS_MARGIN);
        for t in &lost {
            let desc = format!("{dir} ({})", fault_at(*t));
            out.lost_while_valid
                .push((t.saturating_duration_since(t0).as_secs_f64(), desc));
        }
        for (first, last, n) in bursts(&lost, Duration::from_secs(1)) {
            incidents.push(to_wall(first));
            out.loss_bursts.push(format!(
                "{:.2}-{:.2}s (UTC {}) {n} datagrams {dir} ({})",
                first.saturating_duration_since(t0).as_secs_f64(),
                last.saturating_duration_since(t0).as_secs_f64(),
                &utc(to_wall(first))[11..23],
                fault_at(first)
            ));
        }
        say(&format!(
            "soak: {dir}: sent {} received {} lost {} (send errors {}) reordered {} duplicated {}",
            r.sent, r.received, r.lost, r.send_errors, r.reordered, r.duplicated
        ));
    }
    for b in &out.loss_bursts {
        say(&format!("soak: LOST WHILE KEYS VALID: {b}"));
    }
    for v in &out.expired_violations {
        say(&format!("soak: ACCEPTED UNDER EXPIRED KEY: {v}"));
    }
    let wc = run.capture.counts(|_| true);
    out.plaintext_frames = wc.plaintext;
    out.plaintext_stream_frames = wc.plaintext_stream;
    out.macsec_frames = wc.macsec;
    out.lldp_frames = wc.lldp;
    out.streams = vec![ab, ba];
    if let Some(wire) = run.bed.wire_ns.as_ref() {
        say(&format!(
            "soak: LLDP netem at the end:\n{}",
            netem_show(wire)
        ));
    }
    if !incidents.is_empty() {
        let logs = [
            ("gw-a", run.bed.agent_log(Side::A)),
            ("gw-b", run.bed.agent_log(Side::B)),
        ];
        say(&format!(
            "soak: agent logs around the incidents:\n{}",
            log_excerpts(&logs, &incidents)
        ));
    }
    if !out.agent_crashes.is_empty() {
        say(&format!(
            "soak: agent logs (tail):\n{}",
            run.bed.logs_tail(60)
        ));
    }
    say("soak: stopping agents and the KME simulator, deleting namespaces");
    drop(run);
}

/// Sorted times grouped into bursts (a gap longer than `gap` starts a new one): (first, last,
/// count).
fn bursts(times: &[Instant], gap: Duration) -> Vec<(Instant, Instant, usize)> {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut out: Vec<(Instant, Instant, usize)> = Vec::new();
    for t in sorted {
        match out.last_mut() {
            Some((_, last, n)) if t.duration_since(*last) <= gap => {
                *last = t;
                *n += 1;
            }
            _ => out.push((t, t, 1)),
        }
    }
    out
}

/// `t` as RFC 3339 UTC with microseconds, the format of the agents' log timestamps, so that
/// the two compare as strings.
fn utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// The agents' log lines from 3 s before to 2 s after each incident (incidents closer than 5 s
/// merged, at most 6), ANSI colours removed: what to read when a must-be-zero figure is not 0.
fn log_excerpts(logs: &[(&str, String)], incidents: &[SystemTime]) -> String {
    let mut times: Vec<SystemTime> = incidents.to_vec();
    times.sort();
    let mut merged: Vec<SystemTime> = Vec::new();
    for t in times {
        if merged
            .last()
            .is_none_or(|m| t.duration_since(*m).unwrap_or_default() > Duration::from_secs(5))
        {
            merged.push(t);
        }
    }
    let mut out = String::new();
    for t in merged.iter().take(6) {
        let from = utc(*t - Duration::from_secs(3));
        let to = utc(*t + Duration::from_secs(2));
        out.push_str(&format!("==== incident at {} ====\n", utc(*t)));
        for (name, text) in logs {
            out.push_str(&format!("---- {name} ----\n"));
            let mut n = 0;
            for line in text.lines() {
                let plain = strip_ansi(line);
                let ts = plain.get(..27).unwrap_or("");
                if ts >= from.as_str() && ts <= to.as_str() {
                    n += 1;
                    if n <= 40 {
                        out.push_str(&plain);
                        out.push('\n');
                    }
                }
            }
            if n > 40 {
                out.push_str(&format!("({} more lines)\n", n - 40));
            }
        }
    }
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The fault active at `t` (or the one whose recovery was under way), for loss reports.
fn out_fault_at(inj: &[Injection], t: Instant, t0: Instant) -> String {
    for i in inj {
        if t >= i.started && t <= i.ended {
            return format!("during {} {:?}", i.fault.kind, i.fault.params);
        }
    }
    if let Some(i) = inj.iter().rev().find(|i| i.ended <= t) {
        return format!(
            "{:.1} s after {} ended at {:.1} s",
            t.duration_since(i.ended).as_secs_f64(),
            i.fault.kind,
            i.ended.saturating_duration_since(t0).as_secs_f64()
        );
    }
    "before any fault".into()
}

/// Progress goes to stdout, each line stamped with the UTC time (the agents' logs use the same
/// clock); only the summary (the last line) is machine-read.
fn say(s: &str) {
    println!("{} {s}", &utc(SystemTime::now())[11..23]);
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_group_into_bursts() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let b = bursts(
            &[ms(3000), ms(0), ms(10), ms(900), ms(5000)],
            Duration::from_secs(1),
        );
        assert_eq!(
            b,
            vec![
                (ms(0), ms(900), 3),
                (ms(3000), ms(3000), 1),
                (ms(5000), ms(5000), 1)
            ]
        );
        assert!(bursts(&[], Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn utc_matches_the_agent_log_format() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        assert_eq!(utc(t), "2026-11-18T11:06:40.123456Z");
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn log_excerpts_pick_lines_around_incidents() {
        let log = "\u{1b}[2m2026-11-18T11:06:36.000000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m early\n\
                   \u{1b}[2m2026-11-18T11:06:38.000000Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m inside\n\
                   2026-11-18T11:06:43.000000Z  INFO late\n";
        let t = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        let ex = log_excerpts(
            &[("gw-a", log.to_owned())],
            &[t, t + Duration::from_secs(1)],
        );
        assert!(
            ex.contains("2026-11-18T11:06:38.000000Z  WARN inside"),
            "{ex}"
        );
        assert!(!ex.contains("early") && !ex.contains("late"), "{ex}");
        assert_eq!(ex.matches("==== incident").count(), 1, "{ex}");
    }
}
