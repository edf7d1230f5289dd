//! The shared testbed (tests/src/testbed.rs) on the host, without MACsec: topology, certificates,
//! the KME simulator and its isolation, generated configs. The agent itself is exercised by the
//! vm_agent_* tests; this checks that what they build on is right.

use qkd_macsec_tests::testbed::{render_config, LinkSpec, Side, Testbed, TestbedOptions, Wire};
use qkd_macsec_tests::{agent_bin, require_root};

fn kme_status(bed: &Testbed, from: Side, kme_ip: &str) -> std::process::Output {
    let (local, peer) = match from {
        Side::A => ("sae-a", "sae-b"),
        Side::B => ("sae-b", "sae-a"),
    };
    let bin = agent_bin().to_string_lossy().into_owned();
    let c = |f: &str| bed.certs.join(f).to_string_lossy().into_owned();
    bed.ns(from).try_exec(&[
        &bin,
        "kme",
        "status",
        "--url",
        &format!("https://{kme_ip}:8443"),
        "--ca",
        &c("ca.pem"),
        "--cert",
        &c(&format!("{local}.pem")),
        "--key",
        &c(&format!("{local}.key")),
        "--slave-sae",
        peer,
        "--timeout-s",
        "2",
    ])
}

#[test]
fn each_gateway_reaches_only_its_own_kme() {
    require_root("network namespaces");
    let bed = Testbed::new("tbkme", &TestbedOptions::default());
    let ok_a = kme_status(&bed, Side::A, "10.201.1.1");
    assert!(
        ok_a.status.success(),
        "gw-a cannot query kme-a: {}",
        String::from_utf8_lossy(&ok_a.stderr)
    );
    let ok_b = kme_status(&bed, Side::B, "10.201.2.1");
    assert!(
        ok_b.status.success(),
        "gw-b cannot query kme-b: {}",
        String::from_utf8_lossy(&ok_b.stderr)
    );
    let cross = kme_status(&bed, Side::A, "10.201.2.1");
    assert!(
        !cross.status.success(),
        "gw-a reached kme-b, which must be reachable only from gw-b: {}",
        String::from_utf8_lossy(&cross.stdout)
    );
    let cross = kme_status(&bed, Side::B, "10.201.1.1");
    assert!(!cross.status.success(), "gw-b reached kme-a");
    // The control endpoint lives on the KME namespace's loopback and answers there.
    let state = bed.kme_ctl(&["show"]);
    assert!(
        state["stored_key_count"].as_u64().unwrap_or(0) > 0,
        "{state}"
    );
}

#[test]
fn generated_configs_load_with_the_agents_loader_in_both_profiles() {
    require_root("network namespaces");
    let bed = Testbed::new("tbcfg", &TestbedOptions::default());
    for profile in ["cak", "sak"] {
        let spec = LinkSpec::fast(profile);
        bed.write_configs(&spec);
        for (i, side) in Side::BOTH.into_iter().enumerate() {
            let cfg = qkd_macsec_agent::config::Config::load(&bed.files[i].config)
                .unwrap_or_else(|e| panic!("{profile} {}: {e}", side.label()));
            let l = &cfg.link[0];
            assert_eq!(
                l.profile,
                if profile == "cak" {
                    qkd_macsec_agent::config::ProfileKind::Cak
                } else {
                    qkd_macsec_agent::config::ProfileKind::Sak
                }
            );
            let want = if side == Side::A {
                qkd_macsec_agent::config::Role::Master
            } else {
                qkd_macsec_agent::config::Role::Slave
            };
            assert_eq!(l.role(), want, "{}", side.label());
        }
    }
    // A spec the schema forbids is caught before any agent sees it.
    let mut bad = LinkSpec::fast("sak");
    bad.key_request_interval = "10s".into();
    let text = render_config(Side::A, &bad, &bed.certs, &bed.files[0]);
    let err = qkd_macsec_agent::config::Config::parse(&text, "x").unwrap_err();
    assert_eq!(err.field(), "link[0].key_request_interval");
}

#[test]
fn bridged_wire_carries_lldp_to_the_eavesdropper() {
    require_root("network namespaces");
    let bed = Testbed::new(
        "tbwire",
        &TestbedOptions {
            wire: Wire::Bridged,
            ..Default::default()
        },
    );
    let eve = bed.eve.clone().expect("bridged testbed has eve");
    // An LLDP-addressed frame from gw-a must reach eve through the bridge, as on a real wire.
    let mut frame = vec![
        0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e, 0x02, 0, 0, 0, 0x42, 0x01, 0x88, 0xcc,
    ];
    frame.extend_from_slice(&[0u8; 46]);
    let f2 = frame.clone();
    let ns_a = bed.ns(Side::A).clone();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        qkd_macsec_tests::testbed::inject_frames(&ns_a, "wan0", &[f2]);
    });
    let got =
        qkd_macsec_tests::testbed::capture_lldp(&eve, "wan0", std::time::Duration::from_secs(2));
    sender.join().unwrap();
    assert!(
        got.iter().any(|g| g[6..12] == frame[6..12]),
        "eve saw {} LLDP frames, none from gw-a",
        got.len()
    );
}
