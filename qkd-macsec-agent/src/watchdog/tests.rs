use proptest::prelude::*;

use super::*;

fn limits() -> Limits {
    Limits {
        max_age: Duration::from_secs(100),
        max_pn: 1000,
        rollover_at: 0.75,
        warn_at: 0.9,
        tolerated_fetch_failures: 2,
    }
}

fn key(n: u8) -> KeyRef {
    KeyRef {
        key_id: KeyId([n; 16]),
        kn: u32::from(n),
    }
}

fn drain(w: &mut Watchdog) -> Vec<Action> {
    std::iter::from_fn(|| w.poll_action()).collect()
}

fn started(t0: Instant) -> Watchdog {
    let mut w = Watchdog::new(limits());
    assert_eq!(drain(&mut w), vec![Action::StallOn], "starts stalled");
    w.handle_activated(key(1), 0, t0);
    let a = drain(&mut w);
    assert!(a.contains(&Action::StallOff { key: key(1) }), "{a:?}");
    assert!(a.contains(&Action::SetPnThresholds(PnThresholds {
        an: 0,
        rollover: 750,
        warn: 900,
        exhausted: 1000
    })));
    w
}

#[test]
fn starts_stalled_without_timeout() {
    let w = Watchdog::new(limits());
    assert!(w.is_stalled());
    assert_eq!(w.stall_reason(), Some(StallReason::NoKey));
    assert_eq!(w.poll_timeout(), None);
}

#[test]
fn time_thresholds_in_order() {
    let t0 = Instant::now();
    let mut w = started(t0);
    assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(75)));
    w.handle_timeout(t0 + Duration::from_secs(74));
    assert!(drain(&mut w).is_empty());
    w.handle_timeout(t0 + Duration::from_secs(75));
    assert_eq!(drain(&mut w), vec![Action::RequestRollover { key: key(1) }]);
    assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(90)));
    w.handle_timeout(t0 + Duration::from_secs(90));
    let a = drain(&mut w);
    assert!(
        matches!(a.as_slice(), [Action::Warn { key: k, .. }] if *k == key(1)),
        "{a:?}"
    );
    assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(100)));
    w.handle_timeout(t0 + Duration::from_millis(99_999));
    assert!(drain(&mut w).is_empty());
    assert!(!w.is_stalled());
    w.handle_timeout(t0 + Duration::from_secs(100));
    assert_eq!(
        drain(&mut w),
        vec![
            Action::StallOn,
            Action::DeactivateTx { an: 0 },
            Action::Alarm(Alarm::AklExhausted {
                key: key(1),
                by: Exhaustion::Age
            })
        ]
    );
    assert!(w.is_stalled());
    assert!(w.is_retired(&key(1)));
    assert_eq!(w.poll_timeout(), None);
}

#[test]
fn pn_thresholds_and_exhaustion() {
    let t0 = Instant::now();
    let mut w = started(t0);
    w.handle_pn(0, 749, t0);
    assert!(drain(&mut w).is_empty());
    w.handle_pn(0, 750, t0);
    assert_eq!(drain(&mut w), vec![Action::RequestRollover { key: key(1) }]);
    // A PN for another AN is not the active SA's and changes nothing.
    w.handle_pn(1, 999, t0);
    assert!(drain(&mut w).is_empty());
    // A counter that went backwards does not make the key younger.
    w.handle_pn(0, 10, t0);
    w.handle_pn(0, 901, t0);
    assert!(matches!(drain(&mut w).as_slice(), [Action::Warn { .. }]));
    w.handle_pn(0, 1000, t0);
    let a = drain(&mut w);
    assert!(a.contains(&Action::StallOn));
    assert!(a.contains(&Action::Alarm(Alarm::AklExhausted {
        key: key(1),
        by: Exhaustion::PacketNumber
    })));
    assert_eq!(
        w.stall_reason(),
        Some(StallReason::Exhausted(Exhaustion::PacketNumber))
    );
}

#[test]
fn one_jump_past_everything_gives_all_actions_once() {
    let t0 = Instant::now();
    let mut w = started(t0);
    w.handle_timeout(t0 + Duration::from_secs(95));
    let a = drain(&mut w);
    assert_eq!(a.len(), 2, "{a:?}");
    w.handle_timeout(t0 + Duration::from_secs(96));
    assert!(drain(&mut w).is_empty(), "no repeats");
}

#[test]
fn rollover_resets_the_clock_and_retires_the_old_key() {
    let t0 = Instant::now();
    let mut w = started(t0);
    w.handle_timeout(t0 + Duration::from_secs(80));
    drain(&mut w);
    let t1 = t0 + Duration::from_secs(81);
    w.handle_activated(key(2), 1, t1);
    let a = drain(&mut w);
    assert!(
        !a.iter().any(|x| matches!(x, Action::StallOff { .. })),
        "hitless: no stall to lift"
    );
    assert!(w.is_retired(&key(1)));
    assert_eq!(w.active_key(), Some((key(2), 1)));
    assert_eq!(w.poll_timeout(), Some(t1 + Duration::from_secs(75)));
    // Old key's AN reaching its limit is irrelevant now.
    w.handle_pn(0, 5000, t1);
    assert!(drain(&mut w).is_empty());
}

#[test]
fn retired_key_is_refused_forever() {
    let t0 = Instant::now();
    let mut w = started(t0);
    w.handle_activated(key(2), 1, t0);
    drain(&mut w);
    w.handle_activated(key(1), 2, t0);
    assert_eq!(
        drain(&mut w),
        vec![
            Action::Alarm(Alarm::RetiredKeyOffered { key: key(1) }),
            Action::DeactivateTx { an: 2 }
        ]
    );
    assert_eq!(w.active_key(), Some((key(2), 1)));
    // Exhaust key 2; then offering key 1 or key 2 again leaves the link stalled.
    w.handle_timeout(t0 + Duration::from_secs(100));
    drain(&mut w);
    for k in [key(1), key(2)] {
        w.handle_activated(k, 3, t0 + Duration::from_secs(101));
        let a = drain(&mut w);
        assert!(
            !a.iter().any(|x| matches!(x, Action::StallOff { .. })),
            "{a:?}"
        );
        assert!(w.is_stalled());
    }
    // A fresh key recovers.
    w.handle_activated(key(3), 3, t0 + Duration::from_secs(102));
    assert!(drain(&mut w).contains(&Action::StallOff { key: key(3) }));
    assert!(!w.is_stalled());
}

#[test]
fn duplicate_activation_is_a_no_op() {
    let t0 = Instant::now();
    let mut w = started(t0);
    w.handle_activated(key(1), 0, t0 + Duration::from_secs(50));
    assert!(drain(&mut w).is_empty());
    // The clock was not reset by the duplicate.
    assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(75)));
}

#[test]
fn kernel_sa_state_is_enforced() {
    let t0 = Instant::now();
    let mut w = started(t0);
    // Kernel PN feeds the PN rule.
    w.handle_sa_state(0, true, 800, t0);
    assert_eq!(drain(&mut w), vec![Action::RequestRollover { key: key(1) }]);
    // Another active TX SA: switched off.
    w.handle_sa_state(2, true, 0, t0);
    assert_eq!(
        drain(&mut w),
        vec![
            Action::Alarm(Alarm::UnexpectedTxSa { an: 2 }),
            Action::DeactivateTx { an: 2 }
        ]
    );
    // Inactive other SAs are fine.
    w.handle_sa_state(3, false, 0, t0);
    assert!(drain(&mut w).is_empty());
    // The active SA went inactive under us: the key counts as used up.
    w.handle_sa_state(0, false, 800, t0);
    let a = drain(&mut w);
    assert_eq!(a[0], Action::Alarm(Alarm::TxSaInactive { an: 0 }));
    assert!(a.contains(&Action::StallOn));
    assert!(w.is_stalled());
    assert!(w.is_retired(&key(1)));
    // While stalled, any active TX SA is switched off.
    w.handle_sa_state(0, true, 0, t0);
    assert!(drain(&mut w).contains(&Action::DeactivateTx { an: 0 }));
}

#[test]
fn fetch_failures_alarm_once_past_tolerance() {
    let t0 = Instant::now();
    let mut w = started(t0);
    w.handle_fetch_outcome(false, t0);
    w.handle_fetch_outcome(false, t0);
    assert!(drain(&mut w).is_empty(), "n = 2 tolerated");
    w.handle_fetch_outcome(false, t0);
    assert_eq!(
        drain(&mut w),
        vec![Action::Alarm(Alarm::KeySupply {
            consecutive_failures: 3
        })]
    );
    w.handle_fetch_outcome(false, t0);
    assert!(drain(&mut w).is_empty(), "one alarm per outage");
    w.handle_fetch_outcome(true, t0);
    for _ in 0..3 {
        w.handle_fetch_outcome(false, t0);
    }
    assert_eq!(drain(&mut w).len(), 1, "a new outage alarms again");
    // Fetch failures alone never stall a link whose key is still good.
    assert!(!w.is_stalled());
}

// ---- Property: no fallback, ever ----

#[derive(Debug, Clone)]
enum Op {
    Activate { key: u8, an: u8 },
    Pn { an: u8, pn: u64 },
    Advance { ms: u64 },
    Sa { an: u8, active: bool, pn: u64 },
    Fetch { ok: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u8..4).prop_map(|(key, an)| Op::Activate { key, an }),
        (0u8..4, 0u64..1200).prop_map(|(an, pn)| Op::Pn { an, pn }),
        (0u64..40_000).prop_map(|ms| Op::Advance { ms }),
        (0u8..4, any::<bool>(), 0u64..1200).prop_map(|(an, active, pn)| Op::Sa { an, active, pn }),
        any::<bool>().prop_map(|ok| Op::Fetch { ok }),
    ]
}

/// An independent model of the rules: which key is active, since when, highest PN, and which
/// keys are retired (replaced, used up, or found inactive in the kernel).
#[derive(Default)]
struct Model {
    active: Option<(KeyRef, u8, Instant, u64)>,
    retired: HashSet<KeyRef>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn never_falls_back(ops in proptest::collection::vec(op(), 1..60)) {
        let l = limits();
        let t0 = Instant::now();
        let mut now = t0;
        let mut w = Watchdog::new(l);
        let mut m = Model::default();
        let mut stall_on = true; // the initial StallOn
        let _ = w.poll_action();
        for op in ops {
            match op {
                Op::Activate { key: k, an } => {
                    let k = key(k);
                    w.handle_activated(k, an, now);
                    let fresh = !m.retired.contains(&k);
                    match m.active {
                        Some((cur, ..)) if cur == k => {}
                        Some((cur, ..)) if fresh => {
                            m.retired.insert(cur);
                            m.active = Some((k, an, now, 0));
                        }
                        None if fresh => m.active = Some((k, an, now, 0)),
                        _ => {}
                    }
                }
                Op::Pn { an, pn } => {
                    w.handle_pn(an, pn, now);
                    if let Some((_, a, _, p)) = &mut m.active {
                        if *a == an { *p = (*p).max(pn); }
                    }
                }
                Op::Advance { ms } => {
                    now += Duration::from_millis(ms);
                    // The IO loop wakes at every deadline on the way, as it would in real time.
                    while let Some(t) = w.poll_timeout() {
                        if t > now { break; }
                        w.handle_timeout(t);
                        // Model: exhaustion at a deadline.
                        if let Some((k, _, since, p)) = m.active {
                            if t.duration_since(since) >= l.max_age || p >= l.max_pn {
                                m.retired.insert(k);
                                m.active = None;
                            }
                        }
                    }
                    w.handle_timeout(now);
                }
                Op::Sa { an, active, pn } => {
                    w.handle_sa_state(an, active, pn, now);
                    if let Some((k, a, _, p)) = &mut m.active {
                        if *a == an {
                            if active { *p = (*p).max(pn); } else {
                                m.retired.insert(*k);
                                m.active = None;
                            }
                        }
                    }
                }
                Op::Fetch { ok } => w.handle_fetch_outcome(ok, now),
            }
            // Model: exhaustion by PN or age at `now`.
            if let Some((k, _, since, p)) = m.active {
                if now.duration_since(since) >= l.max_age || p >= l.max_pn {
                    m.retired.insert(k);
                    m.active = None;
                }
            }

            while let Some(a) = w.poll_action() {
                match a {
                    Action::StallOff { key } => {
                        prop_assert!(!m.retired.contains(&key), "StallOff for retired {key:?}");
                        prop_assert_eq!(m.active.map(|x| x.0), Some(key));
                        stall_on = false;
                    }
                    Action::StallOn => stall_on = true,
                    Action::SetPnThresholds(t) => {
                        prop_assert_eq!(m.active.map(|x| x.1), Some(t.an));
                    }
                    _ => {}
                }
            }
            // The watchdog's active key is the model's, and never a retired key.
            prop_assert_eq!(w.active_key(), m.active.map(|x| (x.0, x.1)));
            if let Some((k, _)) = w.active_key() {
                prop_assert!(!m.retired.contains(&k));
                prop_assert!(!w.is_retired(&k));
                // It wakes up no later than the key runs out.
                let (_, _, since, _) = m.active.unwrap();
                prop_assert!(w.poll_timeout().unwrap() <= since + l.max_age);
            }
            // Whenever no unexhausted key is active, the link is stalled, and the stall flag the
            // IO layer last received says so too.
            if m.active.is_none() {
                prop_assert!(w.is_stalled());
                prop_assert!(stall_on, "stalled without StallOn having been emitted");
            } else {
                prop_assert!(!stall_on);
            }
            // The model and the watchdog agree on what is retired.
            for k in &m.retired {
                prop_assert!(w.is_retired(k), "{k:?} retired in the model only");
            }
        }
    }
}
