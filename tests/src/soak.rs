//! The pure parts of the chaos soak (`qkd-macsec-soak`, run by `cargo xtask soak`): the seeded
//! fault schedule and the expired-key accounting. Both are plain functions of their inputs so
//! that they are unit-tested here; the binary (tests/src/bin/soak.rs) drives the testbed.
//!
//! Why a home-made PRNG: the schedule must be a pure function of (seed, length) across Rust and
//! crate releases, so that a failing soak can be re-run with the same faults at the same times.
//! splitmix64 is ten lines and has no version to drift.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// splitmix64 (Steele, Lea, Flood 2014): small, fast, and good enough to pick fault times.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (modulo bias is irrelevant at these ranges).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "range {lo}..={hi}");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + unit * (hi - lo)
    }
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The KME drops live connections and refuses new ones.
    KmeOutage,
    /// The KME answers late.
    KmeLatency,
    /// The KME answers every ETSI 014 request with 503.
    Kme503,
    /// The QKD link's QBER rises above the abort threshold: no new key.
    Eavesdropper,
    /// Every LLDP frame on the wire is dropped.
    LldpLoss,
    /// LLDP frames on the wire are delayed with jitter (reordered) and duplicated.
    LldpDupReorder,
    /// A third station records the key-ID exchange and replays it, shuffled and duplicated.
    TlvReplay,
    /// `kill -9` of one agent, restarted after a pause.
    AgentKill,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::KmeOutage,
        FaultKind::KmeLatency,
        FaultKind::Kme503,
        FaultKind::Eavesdropper,
        FaultKind::LldpLoss,
        FaultKind::LldpDupReorder,
        FaultKind::TlvReplay,
        FaultKind::AgentKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KmeOutage => "kme_outage",
            FaultKind::KmeLatency => "kme_latency",
            FaultKind::Kme503 => "kme_503",
            FaultKind::Eavesdropper => "eavesdropper",
            FaultKind::LldpLoss => "lldp_loss",
            FaultKind::LldpDupReorder => "lldp_dup_reorder",
            FaultKind::TlvReplay => "tlv_replay",
            FaultKind::AgentKill => "agent_kill",
        }
    }

    /// How long a fault of this kind lasts, seconds (inclusive range). Up to 40 s for the KME
    /// faults: longer than the 20 s key lifetime the soak uses, so that some outages drain the
    /// key buffer and stall the link (and the recovery is exercised), others do not.
    fn duration_s(self) -> (u64, u64) {
        match self {
            FaultKind::KmeOutage | FaultKind::Kme503 | FaultKind::Eavesdropper => (5, 40),
            FaultKind::KmeLatency => (5, 30),
            FaultKind::LldpLoss => (2, 30),
            FaultKind::LldpDupReorder => (5, 30),
            FaultKind::TlvReplay => (6, 20),
            // The time the agent stays dead; its restart (tens of seconds in the emulated VM)
            // is part of the recovery, not of the fault.
            FaultKind::AgentKill => (0, 5),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which KME a KME fault hits (`kme-sim-ctl set --kme`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KmeSel {
    A,
    B,
    Both,
}

impl KmeSel {
    pub fn arg(self) -> &'static str {
        match self {
            KmeSel::A => "a",
            KmeSel::B => "b",
            KmeSel::Both => "both",
        }
    }
}

/// The parameters of one fault.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultParams {
    Kme {
        kme: KmeSel,
    },
    Latency {
        kme: KmeSel,
        ms: u64,
    },
    Qber {
        qber: f64,
    },
    None,
    /// Record for `capture_s`, replay at the end of the fault.
    Replay {
        capture_s: u64,
    },
    /// Kill gw-a's agent (`a_side`) or gw-b's.
    Kill {
        a_side: bool,
    },
}

/// One fault of the schedule: times are offsets from the start of traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    pub at: Duration,
    pub dur: Duration,
    pub kind: FaultKind,
    pub params: FaultParams,
}

impl Fault {
    pub fn end(&self) -> Duration {
        self.at + self.dur
    }
}

/// Shape of a schedule.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleShape {
    /// No fault before this (the link settles, streams start).
    pub warmup: Duration,
    /// No fault in the last stretch, so that the link can recover before the final counts.
    pub cooldown: Duration,
    /// Quiet gap between two faults, seconds (inclusive range).
    pub gap_s: (u64, u64),
}

impl Default for ScheduleShape {
    fn default() -> Self {
        Self {
            warmup: Duration::from_secs(30),
            cooldown: Duration::from_secs(60),
            gap_s: (15, 45),
        }
    }
}

/// The fault schedule of a soak of length `total`: a pure function of `seed`, `total` and
/// `shape`. Kinds are drawn in shuffled rounds (every kind once per round), so a long soak
/// exercises every kind evenly and a short one still gets a varied mix. Faults never overlap:
/// each is followed by a quiet gap, and the last one ends before the cool-down.
pub fn schedule(seed: u64, total: Duration, shape: &ScheduleShape) -> Vec<Fault> {
    let mut rng = SplitMix64::new(seed);
    let limit = total.saturating_sub(shape.cooldown);
    let mut t = shape.warmup;
    let mut out = Vec::new();
    let mut bag: Vec<FaultKind> = Vec::new();
    loop {
        if bag.is_empty() {
            bag = FaultKind::ALL.to_vec();
            // Fisher-Yates.
            for i in (1..bag.len()).rev() {
                let j = rng.range(0, i as u64) as usize;
                bag.swap(i, j);
            }
        }
        let kind = bag.pop().expect("refilled above");
        let (lo, hi) = kind.duration_s();
        let dur = Duration::from_millis(rng.range(lo * 1000, hi * 1000));
        let kme = match rng.range(0, 2) {
            0 => KmeSel::A,
            1 => KmeSel::B,
            _ => KmeSel::Both,
        };
        let params = match kind {
            FaultKind::KmeOutage | FaultKind::Kme503 => FaultParams::Kme { kme },
            FaultKind::KmeLatency => FaultParams::Latency {
                kme,
                ms: rng.range(200, 3000),
            },
            FaultKind::Eavesdropper => FaultParams::Qber {
                qber: (rng.range_f64(0.15, 0.30) * 1000.0).round() / 1000.0,
            },
            FaultKind::LldpLoss | FaultKind::LldpDupReorder => FaultParams::None,
            FaultKind::TlvReplay => FaultParams::Replay {
                capture_s: rng.range(3, 5),
            },
            FaultKind::AgentKill => FaultParams::Kill {
                a_side: rng.range(0, 1) == 0,
            },
        };
        if t + dur > limit {
            break;
        }
        out.push(Fault {
            at: t,
            dur,
            kind,
            params,
        });
        t += dur + Duration::from_secs(rng.range(shape.gap_s.0, shape.gap_s.1));
    }
    out
}

/// One sample of one side's kernel MACsec state, reduced to what the expired-key check needs.
/// `at` is the time since a common origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySample {
    pub at: Duration,
    /// 0 = gw-a, 1 = gw-b.
    pub side: usize,
    /// Key id of the encoding TX SA when it exists and is active.
    pub tx_key: Option<[u8; 16]>,
    /// Every RX SA: (SCI, AN, key id, in_pkts_ok).
    pub rx: Vec<RxSaCount>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxSaCount {
    pub sci: u64,
    pub an: u8,
    pub key: [u8; 16],
    pub in_pkts_ok: u64,
}

/// Frames one RX SA accepted between two samples that both lie after its key's expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiredAccept {
    pub side: usize,
    pub key: [u8; 16],
    /// Time of the later of the two samples.
    pub at: Duration,
    pub frames: u64,
}

/// What [`expired_key_report`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpiredKeyReport {
    /// Keys seen as an active encoding TX SA (whose expiry is therefore known).
    pub keys_tracked: usize,
    /// Frames accepted under a key after its expiry (must be 0).
    pub accepted_under_expired_key: u64,
    pub violations: Vec<ExpiredAccept>,
    /// Per side, the windows in which that side's encoding TX SA carried an expired key: from
    /// the key's expiry to the first sample with a fresh (or no) TX key; `None` = still open.
    pub expired_tx_windows: Vec<(Duration, Option<Duration>)>,
}

/// The activation of each key: the earliest sample, on either side, in which it was the active
/// encoding TX SA. Sampled, so at most one sample period late.
pub fn activations(samples: &[KeySample]) -> BTreeMap<[u8; 16], Duration> {
    let mut act: BTreeMap<[u8; 16], Duration> = BTreeMap::new();
    for s in samples {
        if let Some(k) = s.tx_key {
            act.entry(k)
                .and_modify(|t| *t = (*t).min(s.at))
                .or_insert(s.at);
        }
    }
    act
}

/// Frames accepted under expired keys, from samples of both sides (any order).
///
/// A key expires `max_age` after its activation ([`activations`]). For every RX SA, the growth
/// of `in_pkts_ok` between two consecutive samples of the same side that both lie at or after
/// that key's expiry is counted: those frames were accepted under an expired key. Granularity:
/// a frame accepted between the expiry and the first sample after it is not counted, and the
/// activation is first-seen (up to one period late), so the check is lenient by at most one
/// sample period. An RX SA whose counter went down was re-installed: that pair is skipped.
pub fn expired_key_report(samples: &[KeySample], max_age: Duration) -> ExpiredKeyReport {
    let act = activations(samples);
    let expiry = |k: &[u8; 16]| act.get(k).map(|a| *a + max_age);
    let mut rep = ExpiredKeyReport {
        keys_tracked: act.len(),
        ..Default::default()
    };
    for side in 0..2 {
        let mut mine: Vec<&KeySample> = samples.iter().filter(|s| s.side == side).collect();
        mine.sort_by_key(|s| s.at);
        for pair in mine.windows(2) {
            let (prev, cur) = (pair[0], pair[1]);
            for sa in &cur.rx {
                let Some(exp) = expiry(&sa.key) else {
                    continue;
                };
                if prev.at < exp {
                    continue;
                }
                let Some(before) = prev
                    .rx
                    .iter()
                    .find(|p| p.sci == sa.sci && p.an == sa.an && p.key == sa.key)
                else {
                    continue;
                };
                if sa.in_pkts_ok > before.in_pkts_ok {
                    let frames = sa.in_pkts_ok - before.in_pkts_ok;
                    rep.accepted_under_expired_key += frames;
                    rep.violations.push(ExpiredAccept {
                        side,
                        key: sa.key,
                        at: cur.at,
                        frames,
                    });
                }
            }
        }
        let mut open: Option<Duration> = None;
        for s in &mine {
            let expired_since = s.tx_key.and_then(|k| expiry(&k)).filter(|e| s.at >= *e);
            match (open, expired_since) {
                (None, Some(e)) => open = Some(e),
                (Some(start), None) => {
                    rep.expired_tx_windows.push((start, Some(s.at)));
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(start) = open {
            rep.expired_tx_windows.push((start, None));
        }
    }
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN30: Duration = Duration::from_secs(30 * 60);

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        let shape = ScheduleShape::default();
        let a = schedule(42, MIN30, &shape);
        assert_eq!(a, schedule(42, MIN30, &shape));
        assert_ne!(a, schedule(43, MIN30, &shape));
        assert!(!a.is_empty());
    }

    #[test]
    fn a_30_minute_schedule_has_every_kind_without_overlap_and_ends_before_the_cooldown() {
        let shape = ScheduleShape::default();
        for seed in [0, 1, 7, 42, 1_700_000_000_000, u64::MAX] {
            let s = schedule(seed, MIN30, &shape);
            for k in FaultKind::ALL {
                assert!(
                    s.iter().any(|f| f.kind == k),
                    "seed {seed}: no {k} in {s:?}"
                );
            }
            assert!(s[0].at >= shape.warmup, "seed {seed}: {:?}", s[0]);
            for w in s.windows(2) {
                assert!(
                    w[0].end() + Duration::from_secs(shape.gap_s.0) <= w[1].at,
                    "seed {seed}: overlap or short gap {w:?}"
                );
            }
            let last = s.last().expect("non-empty");
            assert!(
                last.end() <= MIN30 - shape.cooldown,
                "seed {seed}: {last:?}"
            );
            for f in &s {
                let (lo, hi) = f.kind.duration_s();
                assert!(f.dur >= Duration::from_secs(lo) && f.dur <= Duration::from_secs(hi));
                match f.params {
                    FaultParams::Latency { ms, .. } => assert!((200..=3000).contains(&ms)),
                    FaultParams::Qber { qber } => assert!((0.15..=0.30).contains(&qber)),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_soak_shorter_than_warmup_and_cooldown_has_no_fault() {
        assert!(schedule(1, Duration::from_secs(80), &ScheduleShape::default()).is_empty());
        let four = schedule(1, Duration::from_secs(240), &ScheduleShape::default());
        assert!(!four.is_empty());
        assert!(four.last().unwrap().end() <= Duration::from_secs(180));
    }

    fn key(b: u8) -> [u8; 16] {
        [b; 16]
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sample(side: usize, at_ms: u64, tx: Option<u8>, rx: &[(u8, u8, u64)]) -> KeySample {
        KeySample {
            at: ms(at_ms),
            side,
            tx_key: tx.map(key),
            rx: rx
                .iter()
                .map(|&(an, k, ok)| RxSaCount {
                    sci: 1,
                    an,
                    key: key(k),
                    in_pkts_ok: ok,
                })
                .collect(),
        }
    }

    #[test]
    fn frames_accepted_after_expiry_are_counted_and_before_are_not() {
        let max_age = ms(1000);
        // Key 1 active from 0 (side 0) and 100 (side 1): expires at 1000. Key 2 from 900.
        let samples = vec![
            sample(0, 0, Some(1), &[(0, 1, 0)]),
            sample(1, 100, Some(1), &[(0, 1, 0)]),
            sample(0, 900, Some(2), &[(0, 1, 50), (1, 2, 0)]),
            // Samples at 1000 and 1100 on side 0: key 1 expired; 5 frames accepted under it.
            sample(0, 1000, Some(2), &[(0, 1, 60), (1, 2, 10)]),
            sample(0, 1100, Some(2), &[(0, 1, 65), (1, 2, 20)]),
            // Side 1 keeps receiving under key 1 until 1000 only: 900 -> 1000 spans the expiry
            // (prev sample before it), not counted.
            sample(1, 900, Some(2), &[(0, 1, 40)]),
            sample(1, 1000, Some(2), &[(0, 1, 45)]),
            sample(1, 1100, Some(2), &[(0, 1, 45)]),
        ];
        let r = expired_key_report(&samples, max_age);
        assert_eq!(r.keys_tracked, 2);
        assert_eq!(r.accepted_under_expired_key, 5);
        assert_eq!(
            r.violations,
            vec![ExpiredAccept {
                side: 0,
                key: key(1),
                at: ms(1100),
                frames: 5
            }]
        );
        assert!(r.expired_tx_windows.is_empty());
    }

    #[test]
    fn clean_rollovers_report_nothing_and_reinstalled_sas_are_not_counted() {
        let max_age = ms(1000);
        let samples = vec![
            sample(0, 0, Some(1), &[(0, 1, 0)]),
            // Key 2 from 900: expires at 1900, after the last sample.
            sample(0, 900, Some(2), &[(0, 1, 10), (1, 2, 0)]),
            sample(0, 1500, Some(2), &[(0, 1, 10), (1, 2, 30)]),
            // Same SA identity, counter went down: re-installed, skipped.
            sample(0, 1600, Some(2), &[(0, 1, 3), (1, 2, 40)]),
            // An RX key never seen as TX is not judged.
            sample(0, 1700, Some(2), &[(0, 9, 100), (1, 2, 50)]),
            sample(0, 1800, Some(2), &[(0, 9, 200), (1, 2, 60)]),
        ];
        let r = expired_key_report(&samples, max_age);
        assert_eq!(r.accepted_under_expired_key, 0, "{r:?}");
        assert_eq!(r.keys_tracked, 2);
    }

    #[test]
    fn an_expired_tx_key_opens_a_window_until_a_fresh_key_or_none() {
        let max_age = ms(1000);
        let samples = vec![
            sample(1, 0, Some(1), &[]),
            sample(1, 900, Some(1), &[]),
            sample(1, 1050, Some(1), &[]),
            sample(1, 1200, Some(1), &[]),
            sample(1, 1300, Some(3), &[]),
            sample(0, 0, Some(4), &[]),
            sample(0, 1100, Some(4), &[]),
        ];
        let r = expired_key_report(&samples, max_age);
        assert_eq!(
            r.expired_tx_windows,
            vec![(ms(1000), None), (ms(1000), Some(ms(1300)))]
        );
    }
}
