//! End to end, in the MACsec VM: the slave misses the KME's availability window (the key is gone
//! from kme-b before the slave can fetch it). The master must never switch to a key the slave
//! lacks: no frame fails validation and none is lost while a shared key is valid; once keys can
//! be shared again the link rolls over (and, if it stalled meanwhile, recovers).

use std::time::{Duration, Instant};

use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{
    lost_outside, LinkSpec, Running, Side, TestbedOptions, SECURE_TIMEOUT,
};

#[test]
fn slave_missing_the_availability_window_never_breaks_the_link() {
    require_macsec();
    let mut spec = LinkSpec::fast("sak");
    spec.key_request_interval = "1s".into();
    spec.sak_buffer = 2;
    spec.akl_max_age = "6s".into();
    let mut run = Running::up("window", &TestbedOptions::default(), &spec, SECURE_TIMEOUT);
    let [ab, ba] = run.streams(100);
    run.wait_for("a first rollover", Duration::from_secs(30), |s| {
        s.rollovers[0].min(s.rollovers[1]) >= 1
    });
    // Keys now vanish 1 ms after the master fetched them: no slave fetch can make it.
    run.bed.kme_ctl(&["set", "--availability-timeout-ms", "1"]);
    let missed_from = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let keys_in_window = run.monitor.snapshot(|s| {
        s.changes
            .iter()
            .filter(|c| c.at > missed_from + Duration::from_secs(8))
            .filter_map(|c| match c.what {
                qkd_macsec_tests::testbed::ChangeKind::Rollover { key, .. } => Some((c.side, key)),
                _ => None,
            })
            .collect::<Vec<_>>()
    });
    // Whatever the master installed, the slave installed the same: no key only one side has.
    for (side, key) in &keys_in_window {
        assert!(
            keys_in_window.iter().any(|(s, k)| s != side && k == key),
            "{} switched to key {:?} that {} never used",
            side.label(),
            key,
            side.other().label()
        );
    }
    run.bed
        .kme_ctl(&["set", "--availability-timeout-ms", "10000"]);
    let restored = Instant::now();
    let base = run.rollovers();
    run.wait_for(
        "rollovers after the window was restored",
        Duration::from_secs(40),
        |s| {
            s.rollovers[0].min(s.rollovers[1]) >= base + 2
                && Side::BOTH.iter().all(|&x| s.latest[x as usize].secured())
        },
    );
    let (ab, ba) = (ab.finish(Duration::from_secs(1)), ba.finish(Duration::ZERO));
    let views = run.monitor.snapshot(|s| s.latest.clone());
    for v in &views {
        assert_eq!(
            v.in_invalid + v.in_not_valid,
            0,
            "frames failed validation: a key only one side had was used: {v:?}"
        );
    }
    let windows = run.stall_windows();
    for (dir, r) in [("gw-a -> gw-b", &ab), ("gw-b -> gw-a", &ba)] {
        let bad = lost_outside(r, &windows, Duration::from_millis(250));
        assert!(
            bad.is_empty(),
            "{dir}: {} frames lost while keys were valid: {r:?}",
            bad.len()
        );
    }
    eprintln!(
        "window test: stalls {windows:?}, restored after {:?}",
        restored - missed_from
    );
}
