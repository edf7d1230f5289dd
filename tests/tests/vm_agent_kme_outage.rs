//! End to end, in the MACsec VM: a KME outage (every ETSI 014 request answered 503) drains the
//! key buffer; the agents warn, stall exactly when the active key's lifetime (AKL) runs out, put
//! nothing on the wire meanwhile (no plaintext, no frame under the expired key), and recover
//! within 2 s of the KME's return.

use std::time::{Duration, Instant};

use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{
    lost_outside, ChangeKind, FrameKind, LinkSpec, Running, Side, TestbedOptions, SECURE_TIMEOUT,
};

/// Sampling period of the monitor plus scheduling noise in the TCG VM.
const SAMPLE_SLACK: Duration = Duration::from_millis(150);

#[test]
fn kme_outage_warns_stalls_at_akl_expiry_and_recovers_within_2s() {
    require_macsec();
    let mut spec = LinkSpec::fast("sak");
    spec.key_request_interval = "1s".into();
    spec.sak_buffer = 1;
    spec.akl_max_age = "6s".into();
    spec.akl_rollover_at = 0.5;
    spec.akl_warn_at = 0.8;
    let max_age = Duration::from_secs(6);
    let mut run = Running::up("outage", &TestbedOptions::default(), &spec, SECURE_TIMEOUT);
    let [ab, ba] = run.streams(100);
    run.wait_for("a first rollover", Duration::from_secs(30), |s| {
        s.rollovers[0].min(s.rollovers[1]) >= 1
    });
    let log_before = Side::BOTH.map(|s| run.bed.agent_log(s).len());

    run.bed.kme_ctl(&["set", "--fail-503", "true"]);
    let outage_at = Instant::now();
    run.wait_for("the stall", Duration::from_secs(120), |s| {
        !s.stalls(Side::A).is_empty() || !s.stalls(Side::B).is_empty()
    });
    // Let the stall show for a while before the KME comes back.
    std::thread::sleep(Duration::from_secs(3));
    let stalled_views = run.monitor.snapshot(|s| s.latest.clone());
    let back_at = Instant::now();
    run.bed.kme_ctl(&["set", "--fail-503", "false"]);
    let resumed_at = run.wait_for(
        "recovery after the KME returned",
        Duration::from_secs(30),
        |s| {
            Side::BOTH.iter().all(|&side| {
                s.latest[side as usize].secured() && s.stalls(side).iter().all(|(_, e)| e.is_some())
            })
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let (ab, ba) = (ab.finish(Duration::from_secs(1)), ba.finish(Duration::ZERO));
    let st = run
        .monitor
        .snapshot(|s| (s.changes.clone(), s.latest.clone()));
    let (changes, latest) = st;

    // 1. The warning came before the stall, after the outage began.
    for side in Side::BOTH {
        let log = run.bed.agent_log(side);
        let new = &log[log_before[side as usize].min(log.len())..];
        assert!(
            new.lines()
                .any(|l| l.contains("WARN") && l.contains("lifetime")),
            "{}: no active-key-lifetime warning logged during the outage:\n{}",
            side.label(),
            new
        );
    }

    // 2. Each side stalled at its active key's expiry: activation (its last rollover before the
    //    stall) + max_age, not earlier and not noticeably later.
    for side in Side::BOTH {
        let stall = changes
            .iter()
            .find(|c| c.side == side && c.what == ChangeKind::Stalled && c.at > outage_at)
            .unwrap_or_else(|| panic!("{} never stalled: {changes:?}", side.label()));
        let (activated, key) = changes
            .iter()
            .filter(|c| c.side == side && c.at < stall.at)
            .filter_map(|c| match c.what {
                ChangeKind::Rollover { key, .. } => Some((c.at, key)),
                _ => None,
            })
            .next_back()
            .expect("a rollover before the stall");
        // A key's lifetime counts from its first use on either side: the slave switches on the
        // INSTALL, and the master counts from its INSTALL, one rekey latency before its own
        // switch (docs/protocol.md 3.2, "Whose clock"). So the master may stall that much
        // before its own activation + max_age, never before the key's first use + max_age.
        let first_use = changes
            .iter()
            .filter(|c| matches!(c.what, ChangeKind::Rollover { key: k, .. } if k == key))
            .map(|c| c.at)
            .min()
            .unwrap_or(activated);
        let expiry = activated + max_age;
        let earliest = first_use + max_age;
        assert!(
            stall.at + SAMPLE_SLACK >= earliest,
            "{} stalled {:?} before its key expired (first use on either side + max_age)",
            side.label(),
            earliest.saturating_duration_since(stall.at)
        );
        assert!(
            stall.at <= expiry + Duration::from_millis(750),
            "{} stalled {:?} after its key expired",
            side.label(),
            stall.at - expiry
        );
        // 3. Nothing but LLDP left the stalled side until it resumed: no plaintext and no
        //    frame under the expired key (nor any other key).
        let resume = changes
            .iter()
            .find(|c| c.side == side && c.what == ChangeKind::Resumed && c.at > stall.at)
            .map(|c| c.at)
            .expect("resumed");
        let during = run.capture.counts(|f| {
            f.side == side && f.at > stall.at + SAMPLE_SLACK && f.at + SAMPLE_SLACK < resume
        });
        assert_eq!(
            (during.macsec, during.plaintext),
            (0, 0),
            "{}: frames on the wire while stalled: {during:?}",
            side.label()
        );
        assert!(!stalled_views[side as usize].secured(), "{}", side.label());
    }
    let plain = run
        .capture
        .counts(|f| matches!(f.kind, FrameKind::Plain { .. }));
    assert_eq!(
        plain.plaintext, 0,
        "plaintext frames on the wire: {plain:?}"
    );

    // 4. Recovery within 2 s of the KME's return, with a fresh key.
    let took = resumed_at.saturating_duration_since(back_at);
    assert!(
        took <= Duration::from_secs(2) + SAMPLE_SLACK,
        "recovery took {took:?} after the KME returned\n{}",
        run.bed.logs_tail(30)
    );
    for side in Side::BOTH {
        assert_ne!(
            latest[side as usize].tx_key,
            stalled_views[side as usize].tx_key,
            "{} resumed with the expired key",
            side.label()
        );
    }

    // 5. Frames were lost only while stalled.
    let windows = run.stall_windows();
    for (dir, r) in [("gw-a -> gw-b", &ab), ("gw-b -> gw-a", &ba)] {
        let bad = lost_outside(r, &windows, Duration::from_millis(250));
        assert!(
            bad.is_empty(),
            "{dir}: {} frames lost while keys were valid: {r:?}",
            bad.len()
        );
    }
}
