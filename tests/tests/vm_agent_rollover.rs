//! End to end, in the MACsec VM: 100 rollovers under a UDP sequence stream in both directions
//! with zero lost frames, counted exactly.

use std::time::Duration;

use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{FrameKind, LinkSpec, Running, TestbedOptions, SECURE_TIMEOUT};

fn hundred_rollovers(profile: &'static str) {
    require_macsec();
    let mut spec = LinkSpec::fast(profile);
    // A SAK every 2 s: 100 rollovers in about 200 s. 3 s of the lifetime are left when the
    // rollover starts: the emulated VM on a loaded host took over 1.5 s for some rollovers
    // (normally tens of ms), and this test is about loss, not about the VM's speed.
    spec.akl_max_age = "5s".into();
    spec.akl_rollover_at = 0.4;
    spec.akl_warn_at = 0.8;
    if profile == "sak" {
        spec.key_request_interval = "1s".into();
    }
    let mut run = Running::up(
        &format!("roll{profile}"),
        &TestbedOptions::default(),
        &spec,
        SECURE_TIMEOUT,
    );
    // 100 datagrams/s each way: every frame is encrypted by the emulated CPU, and the agents
    // and senders share CPU 0 (see TestbedOptions::one_cpu).
    let [ab, ba] = run.streams(100);
    let start = run.rollovers();
    run.wait_for(
        "100 rollovers on both gateways",
        Duration::from_secs(600),
        |s| s.rollovers[0].min(s.rollovers[1]) >= start + 100,
    );
    let (ab, ba) = (ab.finish(Duration::from_secs(1)), ba.finish(Duration::ZERO));
    let stalls = run.stall_windows();
    assert!(
        stalls.is_empty(),
        "the link stalled during rollovers: {stalls:?}\n{}",
        run.bed.logs_tail(60)
    );
    for (dir, r) in [("gw-a -> gw-b", &ab), ("gw-b -> gw-a", &ba)] {
        assert!(r.sent > 10_000, "{dir}: {r:?}");
        assert_eq!(
            (r.lost, r.duplicated),
            (0, 0),
            "{dir}: frames lost or duplicated over 100 rollovers: {r:?}\n{}",
            run.bed.logs_tail(40)
        );
    }
    let views = run.monitor.snapshot(|s| s.latest.clone());
    for v in &views {
        assert_eq!(v.in_invalid + v.in_not_valid, 0, "{v:?}");
    }
    let plain = run
        .capture
        .counts(|f| matches!(f.kind, FrameKind::Plain { .. }));
    assert_eq!(plain.plaintext, 0, "plaintext on the wire during rollovers");
}

#[test]
#[ignore = "needs qkd-macsec-agent run to pass it (issue 6); not yet passing in the VM: cargo xtask vm-run -- <test binary> --ignored"]
fn hundred_rollovers_without_loss_cak() {
    hundred_rollovers("cak");
}

#[test]
#[ignore = "needs qkd-macsec-agent run to pass it (issue 6); not yet passing in the VM: cargo xtask vm-run -- <test binary> --ignored"]
fn hundred_rollovers_without_loss_sak() {
    hundred_rollovers("sak");
}
