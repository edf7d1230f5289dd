//! Host tests of the XDP/TC data plane on real veth pairs in fresh network namespaces: frames
//! crafted here and sent with AF_PACKET from the peer namespace (ingress) or from the data-plane
//! namespace itself (egress). Needs root; fails loudly without it.

mod ebpf_support;

use std::time::{Duration, Instant};

use ebpf_support::*;
use qkd_macsec_agent::dataplane::{
    Counter, Dataplane, DataplaneError, DataplaneEvent, Direction, SaCounters, SaKey, Sci,
};
use qkd_macsec_agent::lldp::{LLDP_OUI, LLDP_SUBTYPE};

const SETTLE: Duration = Duration::from_millis(300);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Every event available within `wait` (all of them, so "exactly once" can be asserted).
fn drain_events(
    rt: &tokio::runtime::Runtime,
    events: &mut qkd_macsec_agent::dataplane::EventStream,
    wait: Duration,
) -> Vec<DataplaneEvent> {
    let mut out = Vec::new();
    rt.block_on(async {
        while let Ok(ev) = tokio::time::timeout(wait, events.next()).await {
            out.push(ev.expect("event parses"));
        }
    });
    out
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t zeroed and filled with the CPU_* helpers; affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn c(frames: u64, bytes: u64) -> Counter {
    Counter { frames, bytes }
}

fn len_sum(frames: &[Vec<u8>]) -> u64 {
    frames.iter().map(|f| f.len() as u64).sum()
}

#[test]
fn lldp_project_tlv_reaches_userspace_and_malformed_lldpdus_do_not() {
    let rig = Rig::new("lldp");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let rt = rt();
    let mut events = rt
        .block_on(async { dp.take_events() })
        .expect("event stream");
    let tx = rig.b_sender();
    let cap = rig.a_capture();
    let src = rig.b_mac.0;

    // One valid LLDPDU built by the product's own encoder (sent with the product's sender).
    let payload = b"keyx-msg-0001".to_vec();
    tx.send_lldpdu(&payload, 120, LLDP_OUI, LLDP_SUBTYPE)
        .unwrap();

    let head = lldp_head(src);
    let mut project = LLDP_OUI.to_vec();
    project.push(LLDP_SUBTYPE);
    project.extend_from_slice(b"never-delivered");
    let end = tlv(0, &[]);
    let frames_malformed = [
        // Truncated TLV header: one byte after the project TLV.
        [head.clone(), tlv(127, &project), vec![0x00]].concat(),
        // Length past the frame: project TLV claims 200 bytes.
        {
            let mut t = tlv(127, &project);
            t[0] = 127 << 1;
            t[1] = 200;
            [head.clone(), t].concat()
        },
        // Zero-length mandatory TLV (Port ID).
        [
            tlv(1, &[4, src[0], src[1], src[2], src[3], src[4], src[5]]),
            tlv(2, &[]),
            tlv(3, &[0, 120]),
            tlv(127, &project),
            end.clone(),
        ]
        .concat(),
        // Missing End TLV.
        [head.clone(), tlv(127, &project)].concat(),
    ];
    for pdu in &frames_malformed {
        tx.send_raw(&lldp(src, pdu)).unwrap();
    }
    // Well-formed but not ours: wrong OUI, wrong subtype.
    let mut wrong_oui = vec![0x00, 0x80, 0xC2, LLDP_SUBTYPE];
    wrong_oui.extend_from_slice(b"other-oui");
    let mut wrong_sub = LLDP_OUI.to_vec();
    wrong_sub.push(LLDP_SUBTYPE + 1);
    wrong_sub.extend_from_slice(b"other-sub");
    let ignored = [
        [head.clone(), tlv(127, &wrong_oui), end.clone()].concat(),
        [head.clone(), tlv(127, &wrong_sub), end.clone()].concat(),
    ];
    for pdu in &ignored {
        tx.send_raw(&lldp(src, pdu)).unwrap();
    }
    // A VLAN-tagged LLDP frame is not LLDP on this link (802.1AB LLDP is untagged).
    let tagged_pdu = [head.clone(), tlv(127, &project), end.clone()].concat();
    tx.send_raw(&vlan(
        src,
        [0x01, 0x80, 0xC2, 0, 0, 0x0E],
        0x88CC,
        &tagged_pdu,
    ))
    .unwrap();

    let evs = drain_events(&rt, &mut events, SETTLE);
    assert_eq!(
        evs.len(),
        1,
        "exactly the one valid LLDPDU is delivered: {evs:?}"
    );
    let DataplaneEvent::Lldp(l) = &evs[0] else {
        panic!("expected an LLDP event, got {:?}", evs[0])
    };
    assert_eq!(l.ifindex, dp.ifindex());
    assert_eq!(l.src_mac, src);
    assert_eq!(&l.info[..4], &[0x5A, 0x51, 0x4B, 0x01]);
    assert_eq!(l.payload(), &payload[..]);

    let k = dp.if_counters().unwrap();
    assert_eq!(k.lldp_delivered.frames, 1);
    assert_eq!(k.lldp_malformed.frames, frames_malformed.len() as u64);
    assert_eq!(k.lldp_ignored.frames, ignored.len() as u64);
    assert_eq!(k.events_lost, c(0, 0));
    // Default: delivered frames still pass to the stack, so all 8 frames reach the capture.
    let seen = cap.collect(SETTLE);
    assert_eq!(with_marker(&seen, b"keyx-msg-0001").len(), 1);
    assert_eq!(with_marker(&seen, b"never-delivered").len(), 5);

    // Reconfigure: deliver the other OUI's TLV, and drop what is delivered.
    dp.set_lldp_filter([0x00, 0x80, 0xC2], LLDP_SUBTYPE, true)
        .unwrap();
    tx.send_raw(&lldp(src, &ignored[0])).unwrap();
    tx.send_lldpdu(b"now-ignored", 120, LLDP_OUI, LLDP_SUBTYPE)
        .unwrap();
    let evs = drain_events(&rt, &mut events, SETTLE);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let DataplaneEvent::Lldp(l) = &evs[0] else {
        panic!("expected LLDP")
    };
    assert_eq!(&l.info[4..], b"other-oui");
    let seen = cap.collect(SETTLE);
    assert!(
        with_marker(&seen, b"other-oui").is_empty(),
        "a delivered frame is dropped when so configured"
    );
    assert_eq!(with_marker(&seen, b"now-ignored").len(), 1);
    dp.shutdown(false).unwrap();
}

#[test]
fn lldp_events_beyond_ring_capacity_are_counted_as_lost() {
    let rig = Rig::new("lldpfull");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let rt = rt();
    let mut events = rt
        .block_on(async { dp.take_events() })
        .expect("event stream");
    let tx = rig.b_sender();
    // 256 KiB ring, 536-byte records: ~489 fit. Send more without reading.
    let sent = 700u64;
    for i in 0..sent {
        tx.send_lldpdu(format!("burst-{i}").as_bytes(), 120, LLDP_OUI, LLDP_SUBTYPE)
            .unwrap();
    }
    std::thread::sleep(SETTLE);
    let evs = drain_events(&rt, &mut events, SETTLE);
    let k = dp.if_counters().unwrap();
    assert!(k.events_lost.frames > 0, "the ring overflowed: {k:?}");
    assert_eq!(k.lldp_delivered.frames, evs.len() as u64);
    assert_eq!(
        k.lldp_delivered.frames + k.events_lost.frames,
        sent,
        "every frame is either delivered or counted as lost"
    );
    dp.shutdown(false).unwrap();
}

#[test]
fn macsec_rx_frames_are_counted_per_sa_and_malformed_ones_apart() {
    let rig = Rig::new("mrx");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let tx = rig.b_sender();
    let (src, dst) = (rig.b_mac.0, rig.a_mac.0);
    let sci = Sci::from_mac_port(src, 7);
    let sa = SaKey {
        direction: Direction::Rx,
        sci,
        an: 1,
    };
    dp.register_sa(sa, false, 0).unwrap();
    // ES=1, SC=0: SCI implied as source MAC + port 1.
    let es_sa = SaKey {
        direction: Direction::Rx,
        sci: Sci::from_mac_port(src, 1),
        an: 2,
    };
    dp.register_sa(es_sa, false, 0).unwrap();
    // SC=0, ES=0: the configured implicit (peer) SCI.
    let implicit = Sci::from_mac_port([0x02, 0xAA, 0, 0, 0, 9], 3);
    dp.set_implicit_sci(Some(implicit)).unwrap();
    let imp_sa = SaKey {
        direction: Direction::Rx,
        sci: implicit,
        an: 0,
    };
    dp.register_sa(imp_sa, false, 0).unwrap();

    let good: Vec<Vec<u8>> = [(3u32, 60usize), (4, 100), (9, 48), (7, 200)]
        .iter()
        .map(|&(pn, len)| macsec(src, dst, SecTag::with_sci(sci, 1, pn), len, b"good"))
        .collect();
    // Short-length frame: SL = 20 and exactly 20 bytes of secure data.
    let mut short = SecTag::with_sci(sci, 1, 11);
    short.sl = 20;
    let short_frame = macsec(src, dst, short, 20, b"short");
    let es = SecTag {
        tci: 0x40 | 0x0C,
        an: 2,
        sl: 0,
        pn: 5,
        sci: None,
    };
    let es_frame = macsec(src, dst, es, 64, b"es");
    let imp = SecTag {
        tci: 0x0C,
        an: 0,
        sl: 0,
        pn: 77,
        sci: None,
    };
    let imp_frame = macsec(src, dst, imp, 64, b"imp");
    // A registered SCI on another AN, and an unregistered SCI: the unknown bucket.
    let unknown = [
        macsec(src, dst, SecTag::with_sci(sci, 3, 5), 64, b"unk"),
        macsec(src, dst, SecTag::with_sci(Sci(0x1234), 1, 5), 64, b"unk"),
    ];
    let malformed = {
        let mut v = Vec::new();
        let mut t = SecTag::with_sci(sci, 1, 50);
        t.tci |= 0x80; // version bit
        v.push(macsec(src, dst, t, 64, b"bad"));
        let mut t = SecTag::with_sci(sci, 1, 51);
        t.sl = 0x40 | 10; // reserved short-length bit
        v.push(macsec(src, dst, t, 10, b"bad"));
        let mut t = SecTag::with_sci(sci, 1, 52);
        t.tci |= 0x40; // SC together with ES
        v.push(macsec(src, dst, t, 64, b"bad"));
        let mut t = SecTag::with_sci(sci, 1, 53);
        t.tci |= 0x10; // SC together with SCB
        v.push(macsec(src, dst, t, 64, b"bad"));
        let mut t = SecTag::with_sci(sci, 1, 54);
        t.sl = 30; // short length disagrees with the frame
        v.push(macsec(src, dst, t, 20, b"bad"));
        // Non-short frame with less than 48 bytes of secure data.
        v.push(macsec(src, dst, SecTag::with_sci(sci, 1, 55), 30, b"bad"));
        // PN 0 on a non-XPN SA.
        v.push(macsec(src, dst, SecTag::with_sci(sci, 1, 0), 64, b"bad"));
        // Truncated SecTAG: EtherType then 4 bytes.
        v.push(eth(dst, src, 0x88E5, &[0x2C | 1, 0, 0, 0]));
        // Truncated inside the SCI.
        let mut f = macsec(src, dst, SecTag::with_sci(sci, 1, 56), 64, b"bad");
        f.truncate(14 + 6 + 4);
        v.push(f);
        v
    };
    // VLAN-tagged MACsec is not MACsec on this device: nothing counts it.
    let tagged = vlan(
        src,
        dst,
        0x88E5,
        &macsec(src, dst, SecTag::with_sci(sci, 1, 99), 64, b"vlan")[14..],
    );

    for f in good.iter().chain([&short_frame, &es_frame, &imp_frame]) {
        tx.send_raw(f).unwrap();
    }
    for f in unknown.iter().chain(malformed.iter()) {
        tx.send_raw(f).unwrap();
    }
    tx.send_raw(&tagged).unwrap();
    std::thread::sleep(SETTLE);

    let expect_sa = SaCounters {
        frames: good.len() as u64 + 1,
        bytes: len_sum(&good) + short_frame.len() as u64,
        highest_pn: 11,
    };
    assert_eq!(dp.sa_counters(&sa).unwrap(), expect_sa);
    assert_eq!(
        dp.sa_counters(&es_sa).unwrap(),
        SaCounters {
            frames: 1,
            bytes: es_frame.len() as u64,
            highest_pn: 5
        }
    );
    assert_eq!(
        dp.sa_counters(&imp_sa).unwrap(),
        SaCounters {
            frames: 1,
            bytes: imp_frame.len() as u64,
            highest_pn: 77
        }
    );
    let k = dp.if_counters().unwrap();
    assert_eq!(k.rx_unknown_sa, c(2, len_sum(&unknown)));
    assert_eq!(
        k.rx_malformed,
        c(malformed.len() as u64, len_sum(&malformed))
    );
    assert_eq!(k.tx_unknown_sa, c(0, 0));
    assert_eq!(k.tx_malformed, c(0, 0));

    // Unregistering sends the SA's frames to the unknown bucket.
    dp.unregister_sa(&sa).unwrap();
    tx.send_raw(&good[0]).unwrap();
    std::thread::sleep(SETTLE);
    assert_eq!(
        dp.if_counters().unwrap().rx_unknown_sa,
        c(3, len_sum(&unknown) + good[0].len() as u64)
    );
    assert!(matches!(
        dp.sa_counters(&sa),
        Err(DataplaneError::SaNotRegistered { .. })
    ));
    dp.shutdown(false).unwrap();
}

#[test]
fn xpn_sa_counts_full_pns_across_a_lower_half_wrap() {
    let rig = Rig::new("xpn");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let tx = rig.b_sender();
    let (src, dst) = (rig.b_mac.0, rig.a_mac.0);
    let sci = Sci::from_mac_port(src, 1);
    let sa = SaKey {
        direction: Direction::Rx,
        sci,
        an: 3,
    };
    dp.register_sa(sa, true, 5).unwrap();
    // The wrap inference runs per CPU (against that CPU's highest PN). veth runs XDP in the NAPI
    // context the sender schedules, i.e. on the sending CPU: pin this thread so all three frames
    // meet the same per-CPU state, as one flow on one RX queue does on real hardware.
    pin_to_cpu(0);
    // PN 0 in the lower half is valid with XPN.
    for pn in [0u32, 0xFFFF_FFF0] {
        tx.send_raw(&macsec(src, dst, SecTag::with_sci(sci, 3, pn), 64, b"x"))
            .unwrap();
    }
    std::thread::sleep(SETTLE);
    assert_eq!(
        dp.sa_counters(&sa).unwrap().highest_pn,
        (5 << 32) | 0xFFFF_FFF0
    );
    // The lower half wraps: the program infers the next upper half.
    tx.send_raw(&macsec(src, dst, SecTag::with_sci(sci, 3, 0x10), 64, b"x"))
        .unwrap();
    std::thread::sleep(SETTLE);
    let c = dp.sa_counters(&sa).unwrap();
    assert_eq!(c.frames, 3);
    assert_eq!(c.highest_pn, (6 << 32) | 0x10, "wrap inferred: {c:?}");
    assert_eq!(dp.if_counters().unwrap().rx_malformed.frames, 0);
    assert_eq!(dp.sync_xpn_upper().unwrap(), 1);
    dp.shutdown(false).unwrap();
}

#[test]
fn macsec_tx_frames_are_counted_at_tc_egress() {
    let rig = Rig::new("mtx");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let tx = rig.a_sender();
    let (src, dst) = (rig.a_mac.0, rig.b_mac.0);
    let sci = Sci::from_mac_port(src, 1);
    let sa = SaKey {
        direction: Direction::Tx,
        sci,
        an: 0,
    };
    dp.register_sa(sa, false, 0).unwrap();
    // The same SCI/AN registered for RX does not see TX frames.
    let rx_twin = SaKey {
        direction: Direction::Rx,
        ..sa
    };
    dp.register_sa(rx_twin, false, 0).unwrap();
    let frames: Vec<Vec<u8>> = (1..=5u32)
        .map(|pn| {
            macsec(
                src,
                dst,
                SecTag::with_sci(sci, 0, pn * 10),
                64 + pn as usize,
                b"tx",
            )
        })
        .collect();
    for f in &frames {
        tx.send_raw(f).unwrap();
    }
    let unknown = macsec(src, dst, SecTag::with_sci(sci, 2, 1), 64, b"tx-unk");
    let mut bad = SecTag::with_sci(sci, 0, 99);
    bad.tci |= 0x80;
    let malformed = macsec(src, dst, bad, 64, b"tx-bad");
    tx.send_raw(&unknown).unwrap();
    tx.send_raw(&malformed).unwrap();
    std::thread::sleep(SETTLE);
    assert_eq!(
        dp.sa_counters(&sa).unwrap(),
        SaCounters {
            frames: 5,
            bytes: len_sum(&frames),
            highest_pn: 50
        }
    );
    assert_eq!(dp.sa_counters(&rx_twin).unwrap(), SaCounters::default());
    let k = dp.if_counters().unwrap();
    assert_eq!(k.tx_unknown_sa, c(1, unknown.len() as u64));
    assert_eq!(k.tx_malformed, c(1, malformed.len() as u64));
    assert_eq!(k.rx_unknown_sa, c(0, 0));
    dp.shutdown(false).unwrap();
}

#[test]
fn pn_threshold_events_fire_exactly_once_and_rearm() {
    let rig = Rig::new("pnev");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let rt = rt();
    let mut events = rt
        .block_on(async { dp.take_events() })
        .expect("event stream");
    let tx = rig.b_sender();
    let (src, dst) = (rig.b_mac.0, rig.a_mac.0);
    let sci = Sci::from_mac_port(src, 1);
    let sa = SaKey {
        direction: Direction::Rx,
        sci,
        an: 1,
    };
    let slot = dp.register_sa(sa, false, 0).unwrap();
    dp.set_thresholds(&sa, &[10, 20]).unwrap();
    for pn in [5u32, 10, 11, 12, 13, 19, 25, 26, 30, 31] {
        tx.send_raw(&macsec(src, dst, SecTag::with_sci(sci, 1, pn), 64, b"pn"))
            .unwrap();
    }
    let evs = drain_events(&rt, &mut events, SETTLE);
    let pns: Vec<_> = evs
        .iter()
        .map(|e| match e {
            DataplaneEvent::Pn(p) => {
                assert_eq!(p.sa, sa);
                assert_eq!(p.slot, slot);
                assert_eq!(p.ifindex, dp.ifindex());
                (p.threshold_index, p.threshold, p.pn)
            }
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(
        pns,
        vec![(0, 10, 10), (1, 20, 25)],
        "one event per threshold"
    );

    // Re-arming: the next frame is past both thresholds, so both fire once more.
    dp.set_thresholds(&sa, &[10, 20, 0, 40]).unwrap();
    for pn in [32u32, 33, 41, 42] {
        tx.send_raw(&macsec(src, dst, SecTag::with_sci(sci, 1, pn), 64, b"pn"))
            .unwrap();
    }
    let mut got: Vec<_> = drain_events(&rt, &mut events, SETTLE)
        .into_iter()
        .map(|e| match e {
            DataplaneEvent::Pn(p) => (p.threshold_index, p.pn),
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![(0, 32), (1, 32), (3, 41)]);
    assert!(matches!(
        dp.set_thresholds(&sa, &[1, 2, 3, 4, 5]),
        Err(DataplaneError::TooManyThresholds { given: 5, max: 4 })
    ));
    dp.shutdown(false).unwrap();
}

#[test]
fn stall_drops_data_both_ways_but_passes_lldp_and_eapol() {
    let rig = Rig::new("stall");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let from_b = rig.b_sender();
    let from_a = rig.a_sender();
    let cap_a = rig.a_capture();
    let cap_b = rig.b_capture();
    let sci = Sci::from_mac_port(rig.b_mac.0, 1);

    let set = |src: [u8; 6], dst: [u8; 6], tag: &str| -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let data = vec![
            ipv4(src, dst, format!("{tag}-ipv4").as_bytes()),
            macsec(
                src,
                dst,
                SecTag::with_sci(sci, 0, 1),
                64,
                format!("{tag}-macsec").as_bytes(),
            ),
            vlan(
                src,
                dst,
                0x0800,
                format!("{tag}-vlan-padding-padding-padding-padding").as_bytes(),
            ),
        ];
        let control = vec![
            eapol(src, format!("{tag}-eapol").as_bytes()),
            lldp(
                src,
                &[
                    lldp_head(src),
                    tlv(
                        127,
                        &[
                            &LLDP_OUI[..],
                            &[LLDP_SUBTYPE],
                            format!("{tag}-lldp").as_bytes(),
                        ]
                        .concat(),
                    ),
                    tlv(0, &[]),
                ]
                .concat(),
            ),
        ];
        (data, control)
    };
    let (rx_data, rx_ctl) = set(rig.b_mac.0, rig.a_mac.0, "in");
    let (tx_data, tx_ctl) = set(rig.a_mac.0, rig.b_mac.0, "out");

    dp.set_stall(true).unwrap();
    assert!(dp.stall().unwrap());
    for f in rx_data.iter().chain(&rx_ctl) {
        from_b.send_raw(f).unwrap();
    }
    // A frame shot at TC egress comes back to the sending packet socket as ENOBUFS.
    for f in &tx_data {
        match from_a.send_raw(f) {
            Err(qkd_macsec_agent::lldp::LldpError::Io {
                errno: Some(libc::ENOBUFS),
                ..
            }) => {}
            other => panic!("stalled egress frame: expected ENOBUFS, got {other:?}"),
        }
    }
    for f in &tx_ctl {
        from_a.send_raw(f).unwrap();
    }
    let seen_a = cap_a.collect(SETTLE);
    let seen_b = cap_b.collect(SETTLE);
    for tag in ["in-ipv4", "in-macsec", "in-vlan"] {
        assert!(
            with_marker(&seen_a, tag.as_bytes()).is_empty(),
            "{tag} dropped"
        );
    }
    for tag in ["out-ipv4", "out-macsec", "out-vlan"] {
        assert!(
            with_marker(&seen_b, tag.as_bytes()).is_empty(),
            "{tag} dropped"
        );
    }
    for tag in ["in-eapol", "in-lldp"] {
        assert_eq!(
            with_marker(&seen_a, tag.as_bytes()).len(),
            1,
            "{tag} passes"
        );
    }
    for tag in ["out-eapol", "out-lldp"] {
        assert_eq!(
            with_marker(&seen_b, tag.as_bytes()).len(),
            1,
            "{tag} passes"
        );
    }
    let k = dp.if_counters().unwrap();
    assert_eq!(k.rx_stall_drop, c(rx_data.len() as u64, len_sum(&rx_data)));
    assert_eq!(k.tx_stall_drop, c(tx_data.len() as u64, len_sum(&tx_data)));
    // Stalled MACsec frames are not SA traffic.
    assert_eq!(k.rx_unknown_sa.frames + k.tx_unknown_sa.frames, 0);
    assert_eq!(k.lldp_delivered.frames, 1);

    dp.set_stall(false).unwrap();
    for f in &rx_data[..3] {
        from_b.send_raw(f).unwrap();
    }
    for f in &tx_data[..3] {
        from_a.send_raw(f).unwrap();
    }
    let seen_a = cap_a.collect(SETTLE);
    let seen_b = cap_b.collect(SETTLE);
    for tag in ["in-ipv4", "in-macsec", "in-vlan"] {
        assert_eq!(
            with_marker(&seen_a, tag.as_bytes()).len(),
            1,
            "{tag} passes unstalled"
        );
    }
    for tag in ["out-ipv4", "out-macsec", "out-vlan"] {
        assert_eq!(
            with_marker(&seen_b, tag.as_bytes()).len(),
            1,
            "{tag} passes unstalled"
        );
    }
    let k2 = dp.if_counters().unwrap();
    assert_eq!(k2.rx_stall_drop, k.rx_stall_drop);
    assert_eq!(k2.tx_stall_drop, k.tx_stall_drop);
    dp.shutdown(false).unwrap();
}

/// The key deadline stalls the link by itself once it passes, with no process left to act: the
/// loader is dropped (as a killed agent's is) before the deadline, and traffic stops on time in
/// both directions while LLDP still passes; a restarted loader finds the deadline in the pinned
/// map and clearing it lets data through again.
#[test]
fn key_deadline_stalls_without_the_agent() {
    let rig = Rig::new("deadline");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let from_b = rig.b_sender();
    let from_a = rig.a_sender();
    let cap_a = rig.a_capture();
    let cap_b = rig.b_capture();
    let sci = Sci::from_mac_port(rig.b_mac.0, 1);
    let frame = |src: [u8; 6], dst: [u8; 6], tag: &str| {
        macsec(src, dst, SecTag::with_sci(sci, 0, 1), 64, tag.as_bytes())
    };
    let lldp_frame = |src: [u8; 6], tag: &str| {
        lldp(
            src,
            &[
                lldp_head(src),
                tlv(
                    127,
                    &[&LLDP_OUI[..], &[LLDP_SUBTYPE], tag.as_bytes()].concat(),
                ),
                tlv(0, &[]),
            ]
            .concat(),
        )
    };
    let lifetime = Duration::from_millis(1500);
    let deadline = Instant::now() + lifetime;
    dp.set_key_deadline(Some(deadline)).unwrap();
    assert_ne!(dp.key_deadline_ns().unwrap(), 0);
    from_b
        .send_raw(&frame(rig.b_mac.0, rig.a_mac.0, "in-before"))
        .unwrap();
    from_a
        .send_raw(&frame(rig.a_mac.0, rig.b_mac.0, "out-before"))
        .unwrap();
    // The agent is gone: nothing in this process touches the data plane until the end.
    drop(dp);
    assert!(
        Instant::now() < deadline,
        "the frames before the deadline were sent too late to mean anything"
    );
    std::thread::sleep(
        deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(50),
    );
    from_b
        .send_raw(&frame(rig.b_mac.0, rig.a_mac.0, "in-after"))
        .unwrap();
    match from_a.send_raw(&frame(rig.a_mac.0, rig.b_mac.0, "out-after")) {
        Err(qkd_macsec_agent::lldp::LldpError::Io {
            errno: Some(libc::ENOBUFS),
            ..
        }) => {}
        other => panic!("egress frame after the deadline: expected ENOBUFS, got {other:?}"),
    }
    from_b
        .send_raw(&lldp_frame(rig.b_mac.0, "in-lldp"))
        .unwrap();
    from_a
        .send_raw(&lldp_frame(rig.a_mac.0, "out-lldp"))
        .unwrap();
    let seen_a = cap_a.collect(SETTLE);
    let seen_b = cap_b.collect(SETTLE);
    assert_eq!(
        with_marker(&seen_a, b"in-before").len(),
        1,
        "ingress before the deadline passes"
    );
    assert_eq!(
        with_marker(&seen_b, b"out-before").len(),
        1,
        "egress before the deadline passes"
    );
    assert!(
        with_marker(&seen_a, b"in-after").is_empty(),
        "ingress after the deadline dropped"
    );
    assert!(
        with_marker(&seen_b, b"out-after").is_empty(),
        "egress after the deadline dropped"
    );
    assert_eq!(
        with_marker(&seen_b, b"out-lldp").len(),
        1,
        "LLDP passes the expired key"
    );

    // A restarted agent: the deadline is still there, and the drops were counted as stall drops.
    let mut dp = rig.attach();
    assert_ne!(
        dp.key_deadline_ns().unwrap(),
        0,
        "the deadline outlives the loader"
    );
    let k = dp.if_counters().unwrap();
    assert_eq!(k.rx_stall_drop.frames, 1);
    assert_eq!(k.tx_stall_drop.frames, 1);
    assert_eq!(k.lldp_delivered.frames, 1);
    dp.set_key_deadline(None).unwrap();
    from_b
        .send_raw(&frame(rig.b_mac.0, rig.a_mac.0, "in-cleared"))
        .unwrap();
    from_a
        .send_raw(&frame(rig.a_mac.0, rig.b_mac.0, "out-cleared"))
        .unwrap();
    assert_eq!(with_marker(&cap_a.collect(SETTLE), b"in-cleared").len(), 1);
    assert_eq!(with_marker(&cap_b.collect(SETTLE), b"out-cleared").len(), 1);
    dp.shutdown(false).unwrap();
}

#[test]
fn typed_errors_for_bad_requests() {
    let rig = Rig::new("errs");
    let _in_a = rig.enter_a();
    assert!(matches!(
        Dataplane::attach("nosuchif0", &rig.options()),
        Err(DataplaneError::InterfaceNotFound { .. })
    ));
    let mut not_bpffs = rig.options();
    not_bpffs.bpffs_root = std::env::temp_dir().join("qkd-not-bpffs/x");
    assert!(matches!(
        Dataplane::attach(A_IF, &not_bpffs),
        Err(DataplaneError::BpffsMissing { .. })
    ));
    let mut dp = rig.attach();
    let key = SaKey {
        direction: Direction::Rx,
        sci: Sci(1),
        an: 4,
    };
    assert!(matches!(
        dp.register_sa(key, false, 0),
        Err(DataplaneError::BadAn { an: 4 })
    ));
    let key = SaKey { an: 0, ..key };
    assert!(matches!(
        dp.unregister_sa(&key),
        Err(DataplaneError::SaNotRegistered { .. })
    ));
    // Fill one probe sequence: SCIs that share a bucket.
    let bucket = qkd_macsec_common::sa_bucket(Sci(0x0200_0000_0000_0001).to_map());
    let colliding: Vec<Sci> = (0u64..)
        .map(|i| Sci(0x0200_0000_0000_0001 + (i << 16)))
        .filter(|s| qkd_macsec_common::sa_bucket(s.to_map()) == bucket)
        .take(5)
        .collect();
    for sci in &colliding[..4] {
        dp.register_sa(SaKey { sci: *sci, ..key }, false, 0)
            .unwrap();
    }
    assert!(matches!(
        dp.register_sa(
            SaKey {
                sci: colliding[4],
                ..key
            },
            false,
            0
        ),
        Err(DataplaneError::SaTableFull { .. })
    ));
    assert_eq!(dp.registered_sas().unwrap().len(), 4);
    // The interface vanishes: a stall request must not pretend to work.
    rig.a.exec(&["ip", "link", "del", A_IF]);
    let err = dp.set_stall(true).unwrap_err();
    assert!(
        matches!(err, DataplaneError::InterfaceGone { .. }),
        "got {err}"
    );
    dp.shutdown(false).unwrap();
}

/// Two CPUs run past the same threshold concurrently: one event, and the per-CPU counters sum to
/// every frame sent. veth runs XDP on the sending CPU, so two sender threads pinned to CPUs 0 and
/// 1 drive the program on both CPUs. (Both CPUs see PN >= 100 many times over, so a per-CPU flag
/// would send two events; the race window of a non-atomic shared flag is too small for this test
/// to be proof against that, which is why the program uses an atomic fetch-or.)
#[test]
fn one_event_when_two_cpus_cross_a_threshold_together() {
    let rig = Rig::new("pncpu");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let rt = rt();
    let mut events = rt
        .block_on(async { dp.take_events() })
        .expect("event stream");
    let (src, dst) = (rig.b_mac.0, rig.a_mac.0);
    let sci = Sci::from_mac_port(src, 1);
    let sa = SaKey {
        direction: Direction::Rx,
        sci,
        an: 2,
    };
    dp.register_sa(sa, false, 0).unwrap();
    dp.set_thresholds(&sa, &[100]).unwrap();
    let per_thread = 300u32;
    let senders: Vec<_> = (0..2usize).map(|cpu| (cpu, rig.b_sender())).collect();
    std::thread::scope(|s| {
        for (cpu, tx) in &senders {
            s.spawn(move || {
                pin_to_cpu(*cpu);
                for pn in 1..=per_thread {
                    tx.send_raw(&macsec(src, dst, SecTag::with_sci(sci, 2, pn), 64, b"cpu"))
                        .unwrap();
                }
            });
        }
    });
    let evs = drain_events(&rt, &mut events, SETTLE);
    assert_eq!(evs.len(), 1, "exactly one event for one threshold: {evs:?}");
    let c = dp.sa_counters(&sa).unwrap();
    assert_eq!(c.frames, 2 * u64::from(per_thread));
    assert_eq!(c.highest_pn, u64::from(per_thread));
    dp.shutdown(false).unwrap();
}
