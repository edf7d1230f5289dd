//! End to end, in the MACsec VM: an eavesdropper on the QKD link (QBER above the abort
//! threshold) stops key production; the KME's pool and then the agents' buffers drain and the
//! link stalls (nothing on the wire but LLDP); once the QBER is normal again, keys flow and the
//! link recovers by itself.

use std::time::Duration;

use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{
    lost_outside, LinkSpec, Running, Side, TestbedOptions, SECURE_TIMEOUT,
};

#[test]
fn eavesdropper_starves_keys_until_the_link_stalls_then_it_recovers() {
    require_macsec();
    let mut spec = LinkSpec::fast("sak");
    spec.key_request_interval = "1s".into();
    spec.sak_buffer = 2;
    spec.akl_max_age = "4s".into();
    let opts = TestbedOptions {
        // A small pool so that starvation shows within seconds.
        kme_args: vec![
            "--max-key-count".into(),
            "8".into(),
            "--key-rate".into(),
            "5".into(),
        ],
        ..Default::default()
    };
    let mut run = Running::up("eve", &opts, &spec, SECURE_TIMEOUT);
    let [ab, ba] = run.streams(100);
    let state = run.bed.kme_ctl(&["set", "--qber", "0.2"]);
    assert_eq!(
        state["link_up"], false,
        "QBER 0.2 above abort 0.11 must stop the link: {state}"
    );
    // The KME pool drains first ...
    let t = std::time::Instant::now();
    loop {
        let s = run.bed.kme_ctl(&["show"]);
        if s["stored_key_count"].as_u64() == Some(0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "KME pool never drained: {s}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // ... then the agents' buffers, then the active key: the link stalls.
    let stalled = run.wait_for("the stall", Duration::from_secs(60), |s| {
        Side::BOTH.iter().any(|&x| !s.stalls(x).is_empty())
    });
    std::thread::sleep(Duration::from_secs(2));
    let during = run.capture.counts(|f| f.at > stalled);
    assert_eq!(
        during.plaintext, 0,
        "plaintext on the wire while starved: {during:?}"
    );
    run.bed.kme_ctl(&["set", "--qber", "0.02"]);
    run.wait_for(
        "recovery once keys flow again",
        Duration::from_secs(30),
        |s| {
            Side::BOTH.iter().all(|&x| {
                s.latest[x as usize].secured() && s.stalls(x).iter().all(|(_, e)| e.is_some())
            })
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let (ab, ba) = (ab.finish(Duration::from_secs(1)), ba.finish(Duration::ZERO));
    let windows = run.stall_windows();
    for side in Side::BOTH {
        for (from, to) in run.monitor.snapshot(|s| s.stalls(side)) {
            let on_wire = run.capture.counts(|f| {
                f.side == side
                    && f.at > from + Duration::from_millis(150)
                    && to.is_none_or(|to| f.at + Duration::from_millis(150) < to)
            });
            assert_eq!(
                (on_wire.macsec, on_wire.plaintext),
                (0, 0),
                "{}: frames on the wire while stalled: {on_wire:?}",
                side.label()
            );
        }
    }
    for (dir, r) in [("gw-a -> gw-b", &ab), ("gw-b -> gw-a", &ba)] {
        let bad = lost_outside(r, &windows, Duration::from_millis(250));
        assert!(
            bad.is_empty(),
            "{dir}: {} frames lost while keys were valid: {r:?}",
            bad.len()
        );
        assert!(r.lost > 0, "{dir}: a stalled link lost nothing? {r:?}");
    }
}
