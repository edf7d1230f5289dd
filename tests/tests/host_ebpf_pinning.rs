//! The stall outlives the process that set it: pinned programs, links and maps in bpffs keep
//! dropping after `kill -9`, and a restarted loader re-opens the same maps and replaces the
//! programs in place (no second attachment). Needs root and the built agent binary.

mod ebpf_support;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::Duration;

use ebpf_support::*;
use qkd_macsec_agent::dataplane::{Dataplane, Direction, SaCounters, SaKey, Sci};
use qkd_macsec_agent::lldp::{LldpError, LLDP_OUI, LLDP_SUBTYPE};

const SETTLE: Duration = Duration::from_millis(300);

fn egress_dropped(r: Result<(), LldpError>) -> bool {
    match r {
        Err(LldpError::Io {
            errno: Some(libc::ENOBUFS),
            ..
        }) => true,
        Ok(()) => false,
        Err(e) => panic!("unexpected send error: {e}"),
    }
}

#[test]
fn stall_survives_a_killed_loader_and_restart_reuses_the_pins() {
    let rig = Rig::new("kill");
    let bin = agent_bin();
    let root = rig.bpffs_root.to_str().unwrap().to_owned();
    let mut child = rig.a.spawn_with(
        &[
            bin.to_str().unwrap(),
            "dataplane-hold",
            "--iface",
            A_IF,
            "--bpffs-root",
            &root,
            "--stall",
        ],
        |cmd| {
            cmd.stdout(Stdio::piped());
        },
    );
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("ready "),
        "the hold helper did not get ready: {line:?} (exit {:?})",
        child.try_wait()
    );
    // kill -9: no destructor, no orderly detach.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "helper was killed: {status:?}");

    let from_b = rig.b_sender();
    let from_a = rig.a_sender();
    let cap_a = rig.a_capture();
    let cap_b = rig.b_capture();
    from_b
        .send_raw(&ipv4(rig.b_mac.0, rig.a_mac.0, b"after-kill-in"))
        .unwrap();
    from_b
        .send_lldpdu(b"after-kill-lldp", 120, LLDP_OUI, LLDP_SUBTYPE)
        .unwrap();
    assert!(
        egress_dropped(from_a.send_raw(&ipv4(rig.a_mac.0, rig.b_mac.0, b"after-kill-out"))),
        "egress still stalled after the loader died"
    );
    from_a
        .send_raw(&eapol(rig.a_mac.0, b"after-kill-eapol"))
        .unwrap();
    let seen_a = cap_a.collect(SETTLE);
    let seen_b = cap_b.collect(SETTLE);
    assert!(
        with_marker(&seen_a, b"after-kill-in").is_empty(),
        "ingress still stalled after the loader died"
    );
    assert_eq!(with_marker(&seen_a, b"after-kill-lldp").len(), 1);
    assert_eq!(with_marker(&seen_b, b"after-kill-eapol").len(), 1);

    // Restart: the same maps come back, stall and counters included.
    let _in_a = rig.enter_a();
    let mut dp = Dataplane::attach(A_IF, &rig.options()).unwrap();
    assert!(dp.reopened(), "maps re-opened from the pins");
    assert!(dp.stall().unwrap(), "the stall flag carried over");
    let k = dp.if_counters().unwrap();
    assert_eq!(k.rx_stall_drop.frames, 1);
    assert_eq!(k.tx_stall_drop.frames, 1);

    // Exactly one program per hook after the restart: a TX frame is counted once, not twice.
    dp.set_stall(false).unwrap();
    let sci = Sci::from_mac_port(rig.a_mac.0, 1);
    let sa = SaKey {
        direction: Direction::Tx,
        sci,
        an: 0,
    };
    dp.register_sa(sa, false, 0).unwrap();
    let rx_sa = SaKey {
        direction: Direction::Rx,
        sci: Sci::from_mac_port(rig.b_mac.0, 1),
        an: 0,
    };
    dp.register_sa(rx_sa, false, 0).unwrap();
    let f = macsec(
        rig.a_mac.0,
        rig.b_mac.0,
        SecTag::with_sci(sci, 0, 7),
        64,
        b"once",
    );
    from_a.send_raw(&f).unwrap();
    let g = macsec(
        rig.b_mac.0,
        rig.a_mac.0,
        SecTag::with_sci(rx_sa.sci, 0, 9),
        64,
        b"once-rx",
    );
    from_b.send_raw(&g).unwrap();
    from_b
        .send_raw(&ipv4(rig.b_mac.0, rig.a_mac.0, b"unstalled-in"))
        .unwrap();
    let seen_a = cap_a.collect(SETTLE);
    assert_eq!(
        dp.sa_counters(&sa).unwrap(),
        SaCounters {
            frames: 1,
            bytes: f.len() as u64,
            highest_pn: 7
        }
    );
    assert_eq!(dp.sa_counters(&rx_sa).unwrap().frames, 1);
    assert_eq!(with_marker(&seen_a, b"unstalled-in").len(), 1);

    // Orderly shutdown removes pins and attachments.
    let pin_dir = dp.pin_dir().to_path_buf();
    dp.shutdown(false).unwrap();
    assert!(!pin_dir.exists(), "pins removed: {}", pin_dir.display());
    let link = std::process::Command::new("ip")
        .args(["-d", "link", "show", A_IF])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&link.stdout);
    assert!(!text.contains("xdp"), "XDP detached: {text}");
}

#[test]
fn orderly_shutdown_keeping_the_stall_leaves_it_in_force() {
    let rig = Rig::new("keep");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    dp.set_stall(true).unwrap();
    dp.shutdown(true).unwrap();
    let from_b = rig.b_sender();
    let cap_a = rig.a_capture();
    from_b
        .send_raw(&ipv4(rig.b_mac.0, rig.a_mac.0, b"kept-stall"))
        .unwrap();
    assert!(with_marker(&cap_a.collect(SETTLE), b"kept-stall").is_empty());

    let mut dp = rig.attach();
    assert!(dp.reopened() && dp.stall().unwrap());
    assert_eq!(dp.if_counters().unwrap().rx_stall_drop.frames, 1);
    // Without a stall, keep_stall does not keep anything.
    dp.set_stall(false).unwrap();
    let pin_dir = dp.pin_dir().to_path_buf();
    dp.shutdown(true).unwrap();
    assert!(!pin_dir.exists());
    from_b
        .send_raw(&ipv4(rig.b_mac.0, rig.a_mac.0, b"no-stall"))
        .unwrap();
    assert_eq!(with_marker(&cap_a.collect(SETTLE), b"no-stall").len(), 1);
}

/// The 6.1 kernel's configuration: TC through a netlink clsact filter (no TCX) and generic XDP.
/// A netlink filter outlives its process like a pinned link does; a restart must replace it, not
/// add a second one.
#[test]
fn netlink_tc_and_generic_xdp_restart_without_double_attachment() {
    use qkd_macsec_agent::dataplane::{TcBackend, XdpAttachMode};
    let rig = Rig::new("nl");
    let _in_a = rig.enter_a();
    let mut opts = rig.options();
    opts.tc_backend = TcBackend::Netlink;
    opts.xdp_mode = XdpAttachMode::Generic;
    let sci = Sci::from_mac_port(rig.a_mac.0, 1);
    let sa = SaKey {
        direction: Direction::Tx,
        sci,
        an: 1,
    };
    let rx_sa = SaKey {
        direction: Direction::Rx,
        sci: Sci::from_mac_port(rig.b_mac.0, 1),
        an: 1,
    };
    let from_a = rig.a_sender();
    let from_b = rig.b_sender();
    let tx_frame = macsec(
        rig.a_mac.0,
        rig.b_mac.0,
        SecTag::with_sci(sci, 1, 3),
        64,
        b"nl",
    );
    let rx_frame = macsec(
        rig.b_mac.0,
        rig.a_mac.0,
        SecTag::with_sci(rx_sa.sci, 1, 4),
        64,
        b"nl-rx",
    );
    {
        let mut dp = Dataplane::attach(A_IF, &opts).unwrap();
        assert_eq!(dp.tc_backend(), TcBackend::Netlink);
        assert_eq!(dp.xdp_mode(), aya::programs::XdpMode::Skb);
        dp.register_sa(sa, false, 0).unwrap();
        dp.register_sa(rx_sa, false, 0).unwrap();
        from_a.send_raw(&tx_frame).unwrap();
        from_b.send_raw(&rx_frame).unwrap();
        std::thread::sleep(SETTLE);
        assert_eq!(dp.sa_counters(&sa).unwrap().frames, 1);
        assert_eq!(dp.sa_counters(&rx_sa).unwrap().frames, 1);
        // Dropped without shutdown, as when the agent dies: everything stays attached.
    }
    let filters = std::process::Command::new("tc")
        .args(["filter", "show", "dev", A_IF, "egress"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&filters.stdout).contains("qkd_tc"),
        "netlink filter kept"
    );
    let dp = Dataplane::attach(A_IF, &opts).unwrap();
    assert!(dp.reopened());
    from_a.send_raw(&tx_frame).unwrap();
    from_b.send_raw(&rx_frame).unwrap();
    std::thread::sleep(SETTLE);
    assert_eq!(
        dp.sa_counters(&sa).unwrap().frames,
        2,
        "one filter, not two"
    );
    assert_eq!(dp.sa_counters(&rx_sa).unwrap().frames, 2);
    dp.shutdown(false).unwrap();
    let filters = std::process::Command::new("tc")
        .args(["filter", "show", "dev", A_IF, "egress"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&filters.stdout);
    assert!(!text.contains("qkd_tc"), "filter removed: {text}");
}

/// The agent dies, the interface is deleted and created again under the same name: the pinned
/// links point at a device that is gone. The restarted loader replaces those stale pins, keeps the
/// pinned maps (the stall carries over to the new interface) and enforces it there.
#[test]
fn restart_after_the_interface_was_recreated_keeps_the_stall() {
    let rig = Rig::new("recr");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    dp.set_stall(true).unwrap();
    drop(dp); // as if killed: pins stay
    rig.a.exec(&["ip", "link", "del", A_IF]);
    let pair = veth_pair(&rig.a, A_IF, &rig.b, B_IF);
    let dp = rig.attach();
    assert!(dp.reopened() && dp.stall().unwrap());
    let before = dp.if_counters().unwrap().rx_stall_drop.frames;
    let from_b = rig.b_sender();
    let cap_a = rig.a_capture();
    from_b
        .send_raw(&ipv4(pair.b_mac.0, pair.a_mac.0, b"recreated"))
        .unwrap();
    assert!(with_marker(&cap_a.collect(SETTLE), b"recreated").is_empty());
    assert_eq!(dp.if_counters().unwrap().rx_stall_drop.frames, before + 1);
    dp.shutdown(false).unwrap();
}
