//! End to end, in the MACsec VM: two real `qkd-macsec-agent run` processes in their own
//! namespaces, keyed by the KME simulator, bring the link up in both profiles. Observed from
//! outside the agents (kernel MACsec state, a capture of the wire, UDP sequence streams).

use std::time::Duration;

use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{
    FrameKind, LinkSpec, Running, Side, TestbedOptions, SECURE_TIMEOUT,
};

fn link_comes_up(profile: &'static str) {
    require_macsec();
    let spec = LinkSpec::fast(profile);
    let mut run = Running::up(
        &format!("up{profile}"),
        &TestbedOptions::default(),
        &spec,
        SECURE_TIMEOUT,
    );
    eprintln!(
        "{profile}: secured {:.1} s after the agents started",
        run.start_to_secure.as_secs_f64()
    );
    let [ab, ba] = run.streams(100);
    std::thread::sleep(Duration::from_secs(5));
    run.bed.check_agents_alive();
    let (ab, ba) = (ab.finish(Duration::from_secs(1)), ba.finish(Duration::ZERO));
    let views = run.monitor.snapshot(|s| s.latest.clone());
    for (dir, r) in [("gw-a -> gw-b", &ab), ("gw-b -> gw-a", &ba)] {
        assert!(r.sent > 300, "{dir}: only {} datagrams sent in 5 s", r.sent);
        assert_eq!(
            r.lost,
            0,
            "{dir}: {r:?}\nkernel views (gw-a, gw-b): {views:?}\n{}",
            run.bed.logs_tail(30)
        );
        assert_eq!(r.duplicated, 0, "{dir}: {r:?}");
    }
    for (i, v) in views.iter().enumerate() {
        let side = Side::BOTH[i];
        assert!(v.secured(), "{}: {v:?}", side.label());
        assert!(
            v.encrypt,
            "{}: MACsec without encryption: {v:?}",
            side.label()
        );
        assert!(
            v.out_encrypted >= ab.received.min(ba.received),
            "{}: the kernel encrypted {} frames, fewer than the stream delivered: {v:?}",
            side.label(),
            v.out_encrypted
        );
        assert_eq!(v.in_invalid + v.in_not_valid, 0, "{}: {v:?}", side.label());
    }
    // Each side sends with the key the other side receives with.
    assert_eq!(
        views[0].tx_key, views[1].rx_key,
        "gw-a TX key id vs gw-b RX"
    );
    assert_eq!(
        views[1].tx_key, views[0].rx_key,
        "gw-b TX key id vs gw-a RX"
    );
    // Nothing but MACsec and the LLDP exchange ever left either gateway on the wire.
    let frames = run.capture.frames();
    let plain: Vec<_> = frames
        .iter()
        .filter(|f| matches!(f.kind, FrameKind::Plain { .. }))
        .collect();
    assert!(plain.is_empty(), "plaintext frames on the wire: {plain:?}");
    let c = run.capture.counts(|_| true);
    assert!(c.macsec > 0 && c.lldp > 0, "wire counts {c:?}");
}

#[test]
fn link_comes_up_in_cak_profile() {
    link_comes_up("cak");
}

#[test]
fn link_comes_up_in_sak_profile() {
    link_comes_up("sak");
}
