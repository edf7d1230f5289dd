//! The data plane on the VM's Debian kernel (6.1: no TCX, so TC goes through netlink clsact)
//! under real kernel MACsec: the XDP/TC programs load and attach to the MACsec link's lower veth,
//! and their per-SA counters agree with the kernel's own SA statistics (`ip -s macsec show`).
//! A PN threshold on the TX SA fires exactly once. Runs inside the VM (`cargo xtask test`).
//!
//! Scaffolding only: the MACsec links and keys are set up with iproute2.

mod ebpf_support;

use std::time::Duration;

use ebpf_support::*;
use qkd_macsec_agent::dataplane::{DataplaneEvent, Direction, SaKey, Sci, TcBackend};
use qkd_macsec_tests::{add_ipv4, ip_bin, require_macsec};

const KEY_A: &str = "0a0b0c0d0e0f10111213141516171819";
const KEY_B: &str = "a0b0c0d0e0f000112233445566778899";
const PINGS: u64 = 20;

fn hex(m: Mac) -> String {
    m.0.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `ip macsec` on both ends: `macsec0` over the rig's veth, port 1, encrypting, AN 0 each way.
fn macsec_links(rig: &Rig) {
    for (ns, lower, peer_mac, tx_key, rx_key, addr) in [
        (&rig.a, A_IF, rig.b_mac, KEY_A, KEY_B, "10.205.0.1/24"),
        (&rig.b, B_IF, rig.a_mac, KEY_B, KEY_A, "10.205.0.2/24"),
    ] {
        let ip = |args: &[&str]| {
            let mut v = vec![ip_bin()];
            v.extend_from_slice(args);
            ns.exec(&v);
        };
        ip(&[
            "link", "add", "link", lower, "macsec0", "type", "macsec", "port", "1", "encrypt", "on",
        ]);
        ip(&[
            "macsec", "add", "macsec0", "tx", "sa", "0", "pn", "1", "on", "key", "01", tx_key,
        ]);
        let peer = hex(peer_mac);
        ip(&[
            "macsec", "add", "macsec0", "rx", "port", "1", "address", &peer,
        ]);
        ip(&[
            "macsec", "add", "macsec0", "rx", "port", "1", "address", &peer, "sa", "0", "pn", "1",
            "on", "key", "02", rx_key,
        ]);
        ip(&["link", "set", "macsec0", "up"]);
        add_ipv4(ns, "macsec0", addr);
    }
}

/// From `ip -s macsec show macsec0`: (PN shown for SA 0, its per-SA stats as name -> value) in
/// the TXSC block (`tx`) or the RXSC block.
fn kernel_sa(ns: &NetNs, tx: bool) -> (u64, Vec<(String, u64)>) {
    let out = ns.exec(&[ip_bin(), "-s", "macsec", "show", "macsec0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let block = if tx { "TXSC:" } else { "RXSC:" };
    let start = lines
        .iter()
        .position(|l| l.starts_with(block))
        .unwrap_or_else(|| panic!("no {block} in:\n{text}"));
    let sa = (start..lines.len())
        .find(|&i| lines[i].starts_with("0: PN"))
        .unwrap_or_else(|| panic!("no SA 0 after {block} in:\n{text}"));
    let pn: u64 = lines[sa]
        .trim_start_matches("0: PN")
        .split(',')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PN in {:?}", lines[sa]));
    let header = lines
        .get(sa + 1)
        .and_then(|l| l.strip_prefix("stats:"))
        .unwrap_or_else(|| panic!("no per-SA stats after {:?} in:\n{text}", lines[sa]));
    let values = lines.get(sa + 2).expect("stats values line");
    let stats = header
        .split_whitespace()
        .zip(values.split_whitespace())
        .map(|(k, v)| (k.to_owned(), v.parse().expect("numeric stat")))
        .collect();
    (pn, stats)
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
        .1
}

#[test]
fn per_sa_counters_agree_with_the_kernels_sa_statistics() {
    require_macsec();
    let rig = Rig::new("vme");
    macsec_links(&rig);
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    // The 6.1 kernel has no TCX: the loader must have picked netlink clsact by itself.
    assert_eq!(dp.tc_backend(), TcBackend::Netlink);
    let tx = SaKey {
        direction: Direction::Tx,
        sci: Sci::from_mac_port(rig.a_mac.0, 1),
        an: 0,
    };
    let rx = SaKey {
        direction: Direction::Rx,
        sci: Sci::from_mac_port(rig.b_mac.0, 1),
        an: 0,
    };
    dp.register_sa(tx, false, 0).unwrap();
    dp.register_sa(rx, false, 0).unwrap();
    dp.set_thresholds(&tx, &[10]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = rt.block_on(async { dp.take_events() }).unwrap();

    rig.a.exec(&[
        "ping",
        "-c",
        &PINGS.to_string(),
        "-i",
        "0.05",
        "-W",
        "3",
        "10.205.0.2",
    ]);
    std::thread::sleep(Duration::from_millis(300));

    let (k_tx_pn, k_tx) = kernel_sa(&rig.a, true);
    let (k_rx_pn, k_rx) = kernel_sa(&rig.a, false);
    let ours_tx = dp.sa_counters(&tx).unwrap();
    let ours_rx = dp.sa_counters(&rx).unwrap();
    let k_tx_frames = stat(&k_tx, "OutPktsEncrypted") + stat(&k_tx, "OutPktsProtected");
    let k_rx_ok = stat(&k_rx, "InPktsOK");
    assert!(k_tx_frames >= PINGS, "the kernel sent the pings: {k_tx:?}");
    assert_eq!(ours_tx.frames, k_tx_frames, "TX SA frames: ours vs kernel");
    assert_eq!(
        ours_rx.frames, k_rx_ok,
        "RX SA frames: ours vs kernel InPktsOK"
    );
    // `ip macsec show` prints the next PN: one above the highest used or accepted.
    assert_eq!(ours_tx.highest_pn + 1, k_tx_pn, "TX highest PN");
    assert_eq!(ours_rx.highest_pn + 1, k_rx_pn, "RX highest PN");
    let k = dp.if_counters().unwrap();
    assert_eq!(k.rx_unknown_sa.frames + k.rx_malformed.frames, 0, "{k:?}");
    assert_eq!(k.tx_unknown_sa.frames + k.tx_malformed.frames, 0, "{k:?}");

    let evs: Vec<DataplaneEvent> = rt.block_on(async {
        let mut v = Vec::new();
        while let Ok(ev) = tokio::time::timeout(Duration::from_millis(300), events.next()).await {
            v.push(ev.unwrap());
        }
        v
    });
    assert_eq!(evs.len(), 1, "one threshold event: {evs:?}");
    let DataplaneEvent::Pn(p) = &evs[0] else {
        panic!("expected a PN event: {evs:?}")
    };
    assert_eq!((p.sa, p.threshold, p.pn), (tx, 10, 10));
    dp.shutdown(false).unwrap();
}
