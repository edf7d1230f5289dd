use proptest::prelude::*;

use super::*;
use crate::keyx::wire::MsgType;

const MS: Duration = Duration::from_millis(1);

/// The master's and the slave's SCI (lower interface MAC, port 1) and incarnations.
const A_SCI: u64 = 0x0200_0000_000a_0001;
const B_SCI: u64 = 0x0200_0000_000b_0001;
const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
const M_INC: u64 = 0x1111_0000_0000_0001;
const S_INC: u64 = 0x2222_0000_0000_0001;

fn cfg(role: Role) -> KeyxConfig {
    cfg_inc(
        role,
        match role {
            Role::Master => M_INC,
            Role::Slave => S_INC,
        },
    )
}

/// The config of a new life of an agent (a restart draws a new incarnation).
fn cfg_inc(role: Role, incarnation: u64) -> KeyxConfig {
    let (local, peer, sci) = match role {
        Role::Master => ("SAE_A", "SAE_B", A_SCI),
        Role::Slave => ("SAE_B", "SAE_A", B_SCI),
    };
    KeyxConfig {
        role,
        local_sae: local.into(),
        peer_sae: peer.into(),
        retransmit_initial: 250 * MS,
        retransmit_max: 4000 * MS,
        hello_interval: Duration::from_secs(5),
        availability_window: Duration::from_secs(10),
        max_rx_per_sec: 20,
        initial_seq: 1000,
        incarnation,
        local_sci: sci,
    }
}

/// The source address a frame carrying `p` has on an honest wire: its sender's SCI's MAC.
fn src(p: &[u8]) -> [u8; 6] {
    Message::decode(p).map_or([0; 6], |m| super::sci_mac(m.sci))
}

fn kid(n: u8) -> KeyId {
    KeyId([n; 16])
}

fn key(n: u8) -> SecretBytes {
    SecretBytes::new(vec![n; 32])
}

fn out(x: &mut Keyx) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| x.poll_transmit()).collect()
}

fn events(x: &mut Keyx) -> Vec<Event> {
    std::iter::from_fn(|| x.poll_event()).collect()
}

fn types(ps: &[Vec<u8>]) -> Vec<MsgType> {
    ps.iter()
        .map(|p| Message::decode(p).unwrap().body.msg_type())
        .collect()
}

fn deliver(ps: Vec<Vec<u8>>, to: &mut Keyx, now: Instant) {
    for p in ps {
        let _ = to.handle_payload(&p, src(&p), now);
    }
}

fn pair(now: Instant) -> (Keyx, Keyx) {
    let mut m = Keyx::new(cfg(Role::Master), now);
    let mut s = Keyx::new(cfg(Role::Slave), now);
    // Initial HELLOs: exchange and discard.
    m.handle_timeout(now);
    s.handle_timeout(now);
    let (a, b) = (out(&mut m), out(&mut s));
    assert_eq!(types(&a), vec![MsgType::Hello]);
    deliver(a, &mut s, now);
    deliver(b, &mut m, now);
    assert!(matches!(
        events(&mut s).as_slice(),
        [Event::PeerHello {
            authenticated: false,
            held: 0,
            active: None
        }]
    ));
    events(&mut m);
    (m, s)
}

/// Runs the slave's side of a key delivery: FetchKey -> KME answer.
fn slave_fetches(
    s: &mut Keyx,
    kme: impl Fn(KeyId) -> Result<SecretBytes, NackReason>,
) -> Vec<Event> {
    let mut rest = Vec::new();
    for e in events(s) {
        match e {
            Event::FetchKey { key_id, .. } => s.fetched(key_id, kme(key_id)).unwrap(),
            other => rest.push(other),
        }
    }
    rest.extend(events(s));
    rest
}

/// Delivers key `n` from master to slave over a perfect channel.
fn deliver_key(m: &mut Keyx, s: &mut Keyx, n: u8, now: Instant) {
    m.announce(kid(n), KeyRole::Sak, u32::from(n), key(n), now, None, now)
        .unwrap();
    deliver(out(m), s, now);
    let ev = slave_fetches(s, |_| Ok(key(n)));
    assert!(
        matches!(ev.as_slice(), [Event::KeyReceived { key_id, .. }] if *key_id == kid(n)),
        "{ev:?}"
    );
    deliver(out(s), m, now);
    let ev = events(m);
    assert!(
        matches!(ev.as_slice(), [Event::KeyConfirmed { key_id, .. }] if *key_id == kid(n)),
        "{ev:?}"
    );
}

#[test]
fn bootstrap_delivery_and_install() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t)
        .unwrap();
    let a = out(&mut m);
    // The first announce cannot be authenticated: nothing is shared yet.
    assert_eq!(Message::decode(&a[0]).unwrap().auth, None);
    deliver(a, &mut s, t);
    assert_eq!(
        events(&mut s),
        vec![Event::FetchKey {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1
        }]
    );
    s.fetched(kid(1), Ok(key(1))).unwrap();
    assert_eq!(
        events(&mut s),
        vec![Event::KeyReceived {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
            key: key(1)
        }]
    );
    let ack = out(&mut s);
    // The ACK proves possession: it is tagged with the new key's ICK.
    assert_eq!(Message::decode(&ack[0]).unwrap().auth, Some(kid(1)));
    deliver(ack, &mut m, t);
    assert_eq!(
        events(&mut m),
        vec![Event::KeyConfirmed {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
            key: key(1)
        }]
    );
    // The master's anchor moves on the slave's proof of possession; the slave's only on the
    // master's (its first message tagged with the key), never on its own fetch.
    assert_eq!((m.anchor(), s.anchor()), (Some(kid(1)), None));
    // Nothing left to retransmit.
    assert_eq!(
        m.poll_timeout(),
        Some(t + Duration::from_secs(5)),
        "only the HELLO timer"
    );

    // Install at AN 1.
    m.install(kid(1), KeyRole::Sak, 1, 1, None, t).unwrap();
    let i = out(&mut m);
    assert_eq!(Message::decode(&i[0]).unwrap().auth, Some(kid(1)));
    // Bound to the slave incarnation whose ACK confirmed the key.
    assert_eq!(Message::decode(&i[0]).unwrap().echo, S_INC);
    deliver(i, &mut s, t);
    assert_eq!(
        events(&mut s),
        vec![Event::InstallRequested {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
            an: 1,
            nonce: None
        }]
    );
    s.installed(kid(1), KeyRole::Sak, 1, 1, Ok(())).unwrap();
    deliver(out(&mut s), &mut m, t);
    assert_eq!(
        events(&mut m),
        vec![Event::PeerInstalled {
            key_id: kid(1),
            kn: 1,
            an: 1
        }]
    );
    // Later announces are authenticated under the anchor, which the slave then takes up.
    m.announce(kid(2), KeyRole::Sak, 2, key(2), t, None, t)
        .unwrap();
    let a2 = out(&mut m);
    assert_eq!(Message::decode(&a2[0]).unwrap().auth, Some(kid(1)));
    deliver(a2, &mut s, t);
    assert_eq!(s.anchor(), Some(kid(1)));
}

#[test]
fn retransmission_backs_off_and_gives_up_at_the_availability_window() {
    let t0 = Instant::now();
    let (mut m, _s) = pair(t0);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t0, None, t0)
        .unwrap();
    assert_eq!(out(&mut m).len(), 1);
    let mut t = t0;
    let mut gaps = Vec::new();
    loop {
        let next = m.poll_timeout().unwrap();
        m.handle_timeout(next);
        let sent: Vec<_> = out(&mut m)
            .into_iter()
            .filter(|p| Message::decode(p).unwrap().body.msg_type() == MsgType::Announce)
            .collect();
        if !sent.is_empty() {
            gaps.push((next - t).as_millis());
            t = next;
        }
        let ev = events(&mut m);
        if !ev.is_empty() {
            assert_eq!(
                ev,
                vec![Event::KeyLost {
                    key_id: kid(1),
                    reason: LostReason::Timeout
                }]
            );
            assert_eq!(next, t0 + Duration::from_secs(10));
            break;
        }
    }
    assert_eq!(
        gaps,
        vec![250, 500, 1000, 2000, 4000],
        "exponential backoff capped at 4 s"
    );
    // The lost key is never announced again; retransmission stopped.
    assert_eq!(
        m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t),
        Err(KeyxError::Duplicate(kid(1)))
    );
    m.handle_timeout(t0 + Duration::from_secs(20));
    assert!(types(&out(&mut m)).iter().all(|t| *t == MsgType::Hello));
}

#[test]
fn kme_deadline_shortens_the_window() {
    let t0 = Instant::now();
    let (mut m, _s) = pair(t0);
    m.announce(
        kid(1),
        KeyRole::Sak,
        1,
        key(1),
        t0,
        Some(t0 + Duration::from_secs(3)),
        t0,
    )
    .unwrap();
    while let Some(t) = m.poll_timeout() {
        m.handle_timeout(t);
        let ev = events(&mut m);
        if !ev.is_empty() {
            assert_eq!(t, t0 + Duration::from_secs(3));
            assert_eq!(
                ev,
                vec![Event::KeyLost {
                    key_id: kid(1),
                    reason: LostReason::Timeout
                }]
            );
            return;
        }
    }
    panic!("never gave up");
}

#[test]
fn lost_first_announce_is_recovered_by_retransmission_with_a_new_sequence_number() {
    let t0 = Instant::now();
    let (mut m, mut s) = pair(t0);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t0, None, t0)
        .unwrap();
    let first = out(&mut m);
    let t1 = t0 + 250 * MS;
    m.handle_timeout(t1);
    let second = out(&mut m);
    assert_ne!(
        Message::decode(&first[0]).unwrap().seq,
        Message::decode(&second[0]).unwrap().seq
    );
    deliver(second, &mut s, t1);
    slave_fetches(&mut s, |_| Ok(key(1)));
    // The first copy arrives late: a duplicate, answered from memory, no second KME request.
    deliver(first, &mut s, t1);
    assert!(events(&mut s).is_empty());
    let acks = out(&mut s);
    assert_eq!(types(&acks), vec![MsgType::Ack, MsgType::Ack]);
    deliver(acks, &mut m, t1);
    let ev = events(&mut m);
    assert_eq!(ev.len(), 1, "confirmed once: {ev:?}");
}

#[test]
fn key_gone_makes_the_master_drop_the_key() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.announce(kid(2), KeyRole::Sak, 2, key(2), t, None, t)
        .unwrap();
    deliver(out(&mut m), &mut s, t);
    slave_fetches(&mut s, |_| Err(NackReason::KeyGone));
    let nack = out(&mut s);
    // Authenticated under the anchor the master's ANNOUNCE proved.
    assert_eq!(Message::decode(&nack[0]).unwrap().auth, Some(kid(1)));
    deliver(nack, &mut m, t);
    assert_eq!(
        events(&mut m),
        vec![Event::KeyLost {
            key_id: kid(2),
            reason: LostReason::Refused(NackReason::KeyGone)
        }]
    );
    // The master re-issues with a new key, which works.
    deliver_key(&mut m, &mut s, 3, t);
}

/// Issue 17 item 5: before anything is shared the slave's refusals are unauthenticated, and
/// anyone can send one. Acting on it let an attacker who raced a NACK ahead of every ACK stop
/// the link from ever keying; now the refusal changes nothing and the genuine ACK wins.
#[test]
fn a_forged_nack_raced_ahead_of_the_ack_does_not_stop_bootstrap() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t)
        .unwrap();
    deliver(out(&mut m), &mut s, t);
    let forged = Message {
        seq: 1,
        sender: "SAE_B".into(),
        sci: B_SCI,
        incarnation: S_INC,
        echo: M_INC,
        auth: None,
        body: Body::Nack {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
            reason: NackReason::KeyGone,
        },
    };
    let _ = m.handle_payload(&forged.encode(None).unwrap(), B_MAC, t);
    assert!(events(&mut m).is_empty(), "no KeyLost on a forged word");
    assert_eq!(m.stats().unauthenticated_ignored, 1);
    slave_fetches(&mut s, |_| Ok(key(1)));
    deliver(out(&mut s), &mut m, t);
    assert!(matches!(
        events(&mut m).as_slice(),
        [Event::KeyConfirmed { .. }]
    ));
    // A genuine "key gone" before anything is shared is unauthenticated too: the master keeps
    // announcing until the availability window closes, then fetches another key.
    let (mut m, mut s) = pair(t);
    m.announce(kid(2), KeyRole::Sak, 2, key(2), t, None, t)
        .unwrap();
    deliver(out(&mut m), &mut s, t);
    slave_fetches(&mut s, |_| Err(NackReason::KeyGone));
    deliver(out(&mut s), &mut m, t);
    assert!(events(&mut m).is_empty());
    m.handle_timeout(t + Duration::from_secs(10));
    assert!(events(&mut m).contains(&Event::KeyLost {
        key_id: kid(2),
        reason: LostReason::Timeout
    }));
}

#[test]
fn kme_unavailable_keeps_the_key_and_retries() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t)
        .unwrap();
    deliver(out(&mut m), &mut s, t);
    slave_fetches(&mut s, |_| Err(NackReason::KmeUnavailable));
    deliver(out(&mut s), &mut m, t);
    assert!(events(&mut m).is_empty(), "retryable");
    let t1 = t + 250 * MS;
    m.handle_timeout(t1);
    deliver(out(&mut m), &mut s, t1);
    slave_fetches(&mut s, |_| Ok(key(1)));
    deliver(out(&mut s), &mut m, t1);
    assert!(matches!(
        events(&mut m).as_slice(),
        [Event::KeyConfirmed { .. }]
    ));
}

#[test]
fn forged_and_tampered_installs_do_nothing() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.install(kid(1), KeyRole::Sak, 1, 2, None, t).unwrap();
    let genuine = out(&mut m).remove(0);

    // Any single-bit change: dropped (bad tag or malformed), nothing requested.
    for i in 0..genuine.len() {
        let mut p = genuine.clone();
        p[i] ^= 0x80;
        let _ = s.handle_payload(&p, A_MAC, t);
    }
    assert!(events(&mut s).is_empty());
    assert!(s.stats().bad_tag + s.stats().malformed > 0);

    // An unauthenticated INSTALL for a held key (an attacker saw the key_ID): ignored.
    let forged = Message {
        seq: 5,
        sender: "SAE_A".into(),
        sci: A_SCI,
        incarnation: M_INC,
        echo: S_INC,
        auth: None,
        body: Body::Install {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
            an: 3,
            nonce: None,
        },
    };
    let _ = s.handle_payload(&forged.encode(None).unwrap(), A_MAC, t);
    // One tagged under a key the attacker invented: not known, treated as unauthenticated.
    let fake = Ick::derive(&key(66), kid(66), "SAE_A", "SAE_B").unwrap();
    let forged2 = Message {
        auth: Some(kid(66)),
        ..forged.clone()
    };
    let _ = s.handle_payload(&forged2.encode(Some(&fake)).unwrap(), A_MAC, t);
    // One tagged under a different *known* key (the slave holds key 2 too): not proof of key 1.
    deliver_key(&mut m, &mut s, 2, t);
    let other = Message {
        auth: Some(kid(2)),
        ..forged
    };
    let ick2 = Ick::derive(&key(2), kid(2), "SAE_A", "SAE_B").unwrap();
    let _ = s.handle_payload(&other.encode(Some(&ick2)).unwrap(), A_MAC, t);
    assert!(events(&mut s).is_empty());

    // The genuine one still works.
    let _ = s.handle_payload(&genuine, A_MAC, t);
    assert!(matches!(
        events(&mut s).as_slice(),
        [Event::InstallRequested { an: 2, .. }]
    ));
}

#[test]
fn replayed_install_is_dropped_and_retired_keys_are_refused() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.install(kid(1), KeyRole::Sak, 1, 1, None, t).unwrap();
    let inst = out(&mut m);
    deliver(inst.clone(), &mut s, t);
    assert_eq!(events(&mut s).len(), 1);
    s.installed(kid(1), KeyRole::Sak, 1, 1, Ok(())).unwrap();
    deliver(out(&mut s), &mut m, t);
    events(&mut m);

    // Exact replay: the sequence window drops it.
    deliver(inst.clone(), &mut s, t);
    assert!(events(&mut s).is_empty());
    assert_eq!(s.stats().replayed, 1);
    assert!(out(&mut s).is_empty());

    // After retirement, even a fresh-looking INSTALL for the key is refused.
    s.retire(kid(1));
    m.retire(kid(1));
    assert_eq!(
        m.install(kid(1), KeyRole::Sak, 1, 2, None, t),
        Err(KeyxError::Retired(kid(1)))
    );
    let ick1 = Ick::derive(&key(1), kid(1), "SAE_A", "SAE_B").unwrap();
    let again = Message {
        seq: u64::MAX / 2,
        sender: "SAE_A".into(),
        sci: A_SCI,
        incarnation: M_INC,
        echo: S_INC,
        auth: Some(kid(1)),
        body: Body::Install {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
            an: 2,
            nonce: None,
        },
    };
    let _ = s.handle_payload(&again.encode(Some(&ick1)).unwrap(), A_MAC, t);
    assert!(events(&mut s).is_empty());
    let nack = out(&mut s);
    assert!(matches!(
        Message::decode(&nack[0]).unwrap().body,
        Body::Nack {
            reason: NackReason::Retired,
            ..
        }
    ));
    // And an ANNOUNCE for it is refused as well, without a KME request.
    let ann = Message {
        seq: 1,
        sender: "SAE_A".into(),
        sci: A_SCI,
        incarnation: M_INC,
        echo: 0,
        auth: None,
        body: Body::Announce {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
        },
    };
    let _ = s.handle_payload(
        &ann.encode(None).unwrap(),
        A_MAC,
        t + Duration::from_secs(1),
    );
    assert!(events(&mut s).is_empty());
}

#[test]
fn duplicate_install_is_re_acked_without_reinstalling() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.install(kid(1), KeyRole::Sak, 1, 1, None, t).unwrap();
    deliver(out(&mut m), &mut s, t);
    events(&mut s);
    // While the kernel install is in progress, a retransmission is ignored.
    m.handle_timeout(t + 250 * MS);
    deliver(out(&mut m), &mut s, t + 250 * MS);
    assert!(events(&mut s).is_empty());
    assert!(out(&mut s).is_empty());
    s.installed(kid(1), KeyRole::Sak, 1, 1, Ok(())).unwrap();
    let ack = out(&mut s);
    // The ACK got lost; the master retransmits; the slave re-ACKs without a new request.
    m.handle_timeout(t + 750 * MS);
    deliver(out(&mut m), &mut s, t + 750 * MS);
    assert!(events(&mut s).is_empty());
    let ack2 = out(&mut s);
    assert_eq!(types(&ack2), vec![MsgType::Ack]);
    deliver(ack2, &mut m, t + 750 * MS);
    deliver(ack, &mut m, t + 750 * MS);
    assert_eq!(
        events(&mut m),
        vec![Event::PeerInstalled {
            key_id: kid(1),
            kn: 1,
            an: 1
        }]
    );
}

#[test]
fn install_refused_or_unanswered_is_reported() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.install(kid(1), KeyRole::Sak, 1, 0, None, t).unwrap();
    deliver(out(&mut m), &mut s, t);
    events(&mut s);
    s.installed(kid(1), KeyRole::Sak, 1, 0, Err(NackReason::InstallFailed))
        .unwrap();
    deliver(out(&mut s), &mut m, t);
    assert_eq!(
        events(&mut m),
        vec![Event::InstallFailed {
            key_id: kid(1),
            kn: 1,
            an: 0,
            reason: LostReason::Refused(NackReason::InstallFailed)
        }]
    );
    deliver_key(&mut m, &mut s, 2, t);
    m.install(kid(2), KeyRole::Sak, 2, 1, None, t).unwrap();
    out(&mut m);
    m.handle_timeout(t + Duration::from_secs(10));
    assert!(events(&mut m).contains(&Event::InstallFailed {
        key_id: kid(2),
        kn: 2,
        an: 1,
        reason: LostReason::Timeout
    }));
}

#[test]
fn install_of_unknown_key_is_nacked() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    // The slave restarts and loses everything.
    let mut s2 = Keyx::new(cfg_inc(Role::Slave, S_INC + 1), t);
    m.install(kid(1), KeyRole::Sak, 1, 1, None, t).unwrap();
    deliver(out(&mut m), &mut s2, t);
    assert!(events(&mut s2).is_empty());
    let nack = out(&mut s2);
    deliver(nack, &mut m, t);
    // Unauthenticated (the new slave has no anchor) and the master has one: ignored, the
    // master keeps trying until its deadline rather than act on an unauthenticated word.
    assert!(events(&mut m).is_empty());
    // The restarted slave still processes the master's anchor-tagged ANNOUNCE (unknown key
    // to it, so treated as unauthenticated), and the link re-bootstraps.
    deliver_key(&mut m, &mut s2, 3, t);
    m.handle_timeout(t + Duration::from_secs(5));
    deliver(out(&mut m), &mut s2, t + Duration::from_secs(5));
    assert_eq!(s2.anchor(), Some(kid(3)), "the master's HELLO under key 3");
    let _ = s;
}

#[test]
fn unauthenticated_nack_is_ignored_once_a_secret_is_shared() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.announce(kid(2), KeyRole::Sak, 2, key(2), t, None, t)
        .unwrap();
    out(&mut m);
    let forged = Message {
        seq: 1,
        sender: "SAE_B".into(),
        sci: B_SCI,
        incarnation: S_INC,
        echo: M_INC,
        auth: None,
        body: Body::Nack {
            key_id: kid(2),
            role: KeyRole::Sak,
            kn: 2,
            reason: NackReason::KeyGone,
        },
    };
    let _ = m.handle_payload(&forged.encode(None).unwrap(), B_MAC, t);
    assert!(
        events(&mut m).is_empty(),
        "the pending key survives a forged refusal"
    );
}

#[test]
fn wrong_sender_and_role_confusion_are_dropped() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    let ann = Message {
        seq: 1,
        sender: "SAE_X".into(),
        sci: A_SCI,
        incarnation: M_INC,
        echo: 0,
        auth: None,
        body: Body::Announce {
            key_id: kid(1),
            role: KeyRole::Sak,
            kn: 1,
        },
    };
    let _ = s.handle_payload(&ann.encode(None).unwrap(), A_MAC, t);
    assert_eq!(s.stats().wrong_sender, 1);
    // The master does not act on ANNOUNCE (reflection of its own message with the peer's name).
    let refl = Message {
        sender: "SAE_B".into(),
        sci: B_SCI,
        ..ann
    };
    let _ = m.handle_payload(&refl.encode(None).unwrap(), B_MAC, t);
    assert_eq!(m.stats().unexpected, 1);
    assert!(events(&mut m).is_empty() && events(&mut s).is_empty());
    assert_eq!(
        s.fetched(kid(1), Ok(key(1))),
        Err(KeyxError::NotRequested(kid(1)))
    );
    assert_eq!(
        m.fetched(kid(1), Ok(key(1))),
        Err(KeyxError::WrongRole(Role::Master))
    );
    assert_eq!(
        s.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t),
        Err(KeyxError::WrongRole(Role::Slave))
    );
    assert_eq!(
        m.install(kid(9), KeyRole::Sak, 1, 0, None, t),
        Err(KeyxError::NotConfirmed(kid(9)))
    );
    assert!(matches!(
        m.announce(
            kid(5),
            KeyRole::Sak,
            1,
            SecretBytes::new(vec![1; 20]),
            t,
            None,
            t
        ),
        Err(KeyxError::KeyLength { len: 20, .. })
    ));
}

#[test]
fn flood_is_rate_limited_but_genuine_messages_get_through() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    // 1000 unauthenticated announces of bogus keys within one second.
    for i in 0..1000u32 {
        let mut id = [0xF0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let p = Message {
            seq: u64::from(i),
            sender: "SAE_A".into(),
            sci: A_SCI,
            incarnation: M_INC,
            echo: 0,
            auth: None,
            body: Body::Announce {
                key_id: KeyId(id),
                role: KeyRole::Sak,
                kn: i,
            },
        };
        let _ = s.handle_payload(&p.encode(None).unwrap(), A_MAC, t + MS * i);
    }
    let fetches = events(&mut s)
        .into_iter()
        .filter(|e| matches!(e, Event::FetchKey { .. }))
        .count();
    assert!(fetches <= MAX_FETCHES_IN_FLIGHT, "{fetches} KME requests");
    assert!(s.stats().rate_limited > 900, "{:?}", s.stats());
    // During the flood, the genuine authenticated INSTALL is processed.
    m.install(kid(1), KeyRole::Sak, 1, 1, None, t).unwrap();
    deliver(out(&mut m), &mut s, t + MS * 1000);
    assert!(matches!(
        events(&mut s).as_slice(),
        [Event::InstallRequested { .. }]
    ));
}

#[test]
fn reordered_authenticated_messages_are_accepted_once_each() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.set_status(None, 3);
    m.handle_timeout(t + Duration::from_secs(5));
    m.handle_timeout(t + Duration::from_secs(10));
    let mut hellos = out(&mut m);
    assert_eq!(hellos.len(), 2);
    hellos.reverse();
    deliver(hellos.clone(), &mut s, t);
    let ev = events(&mut s);
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| matches!(
        e,
        Event::PeerHello {
            authenticated: true,
            held: 3,
            ..
        }
    )));
    deliver(hellos, &mut s, t);
    assert!(events(&mut s).is_empty());
    assert_eq!(s.stats().replayed, 2);
}

#[test]
fn replay_window_rules() {
    let mut w = ReplayWindow::default();
    assert!(w.accept(100));
    assert!(!w.accept(100));
    assert!(w.accept(99));
    assert!(w.accept(37), "63 back is inside the window");
    assert!(!w.accept(36), "64 back is outside");
    assert!(w.accept(1000));
    assert!(!w.accept(100));
    assert!(w.accept(999));
    assert!(w.accept(u64::MAX));
    assert!(!w.accept(1000));
}

#[test]
fn hello_carries_status_and_is_periodic() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    let active = Active {
        key_id: kid(1),
        role: KeyRole::Sak,
        kn: 1,
        an: 2,
    };
    // The slave tags its HELLO with the anchor the master's own HELLO proved.
    m.handle_timeout(t + Duration::from_secs(5));
    deliver(out(&mut m), &mut s, t);
    events(&mut s);
    s.set_status(Some(active.clone()), 300);
    assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(5)));
    s.handle_timeout(t + Duration::from_secs(5));
    deliver(out(&mut s), &mut m, t);
    assert_eq!(
        events(&mut m),
        vec![Event::PeerHello {
            active: Some(active),
            held: 255,
            authenticated: true
        }]
    );
}

// ---- Property: a lossy, duplicating, reordering channel delays but never breaks delivery ----

#[derive(Debug, Clone, Copy)]
enum Fate {
    Deliver,
    Drop,
    Duplicate,
    Delay,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        4 => Just(Fate::Deliver),
        2 => Just(Fate::Drop),
        1 => Just(Fate::Duplicate),
        1 => Just(Fate::Delay),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn unreliable_channel_never_breaks_the_exchange(fates in proptest::collection::vec(fate(), 0..80)) {
        let t0 = Instant::now();
        let (mut m, mut s) = pair(t0);
        let mut now = t0;
        let mut fates = fates.into_iter();
        let mut delayed: Vec<(bool, Vec<u8>)> = Vec::new();
        let mut confirmed = None;
        let mut received = None;
        let mut installs = 0;
        let mut peer_installed = false;
        m.announce(kid(1), KeyRole::Sak, 1, key(1), t0, None, t0).unwrap();
        for _step in 0..400 {
            // Move both directions through the channel.
            let mut batch: Vec<(bool, Vec<u8>)> = out(&mut m).into_iter().map(|p| (true, p)).collect();
            batch.extend(out(&mut s).into_iter().map(|p| (false, p)));
            batch.append(&mut delayed);
            for (to_slave, p) in batch {
                // The channel misbehaves for the first 3 s, then recovers; everything must
                // complete inside the 10 s availability window.
                let f = if now < t0 + Duration::from_secs(3) {
                    fates.next().unwrap_or(Fate::Deliver)
                } else {
                    Fate::Deliver
                };
                let copies = match f {
                    Fate::Deliver => 1,
                    Fate::Drop => 0,
                    Fate::Duplicate => 2,
                    Fate::Delay => { delayed.push((to_slave, p)); continue; }
                };
                for _ in 0..copies {
                    if to_slave { let _ = s.handle_payload(&p, src(&p), now); } else { let _ = m.handle_payload(&p, src(&p), now); }
                }
            }
            for e in events(&mut s) {
                match e {
                    Event::FetchKey { key_id, .. } => s.fetched(key_id, Ok(key(1))).unwrap(),
                    Event::KeyReceived { key, .. } => { prop_assert!(received.is_none()); received = Some(key); }
                    Event::InstallRequested { key_id, role, kn, an, .. } => {
                        installs += 1;
                        s.installed(key_id, role, kn, an, Ok(())).unwrap();
                    }
                    _ => {}
                }
            }
            for e in events(&mut m) {
                match e {
                    Event::KeyConfirmed { key, .. } => {
                        prop_assert!(confirmed.is_none(), "confirmed twice");
                        confirmed = Some(key);
                        m.install(kid(1), KeyRole::Sak, 1, 1, None, now).unwrap();
                    }
                    Event::PeerInstalled { .. } => { prop_assert!(!peer_installed); peer_installed = true; }
                    Event::KeyLost { .. } | Event::InstallFailed { .. } => {
                        prop_assert!(false, "gave up although the channel recovers: {e:?}");
                    }
                    _ => {}
                }
            }
            if peer_installed { break; }
            now += 50 * MS;
            m.handle_timeout(now);
            s.handle_timeout(now);
        }
        prop_assert!(peer_installed, "exchange did not complete");
        prop_assert_eq!(installs, 1, "the slave installed exactly once");
        prop_assert_eq!(confirmed.unwrap(), received.unwrap());
    }
}

// ---- Issue 17: restarts, replays and where the peer is ----

/// Item 2: an attacker records the link. The slave restarts (new incarnation, nothing in
/// memory), the attacker replays the recorded ANNOUNCE, the slave's KME serves the key again
/// (independent KMEs do), and then the attacker replays the recorded INSTALL, which verifies
/// under the re-fetched key and is fresh to the new replay window. Before the fix the slave
/// installed the key a second time, from PN 1: AES-GCM nonce reuse. The INSTALL is bound to the
/// slave incarnation that confirmed the key, so the new life refuses it.
#[test]
fn a_restarted_slave_never_installs_an_install_replayed_from_its_earlier_life() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t)
        .unwrap();
    let recorded_announce = out(&mut m);
    deliver(recorded_announce.clone(), &mut s, t);
    slave_fetches(&mut s, |_| Ok(key(1)));
    deliver(out(&mut s), &mut m, t);
    events(&mut m);
    m.install(kid(1), KeyRole::Sak, 1, 1, None, t).unwrap();
    let recorded_install = out(&mut m);
    deliver(recorded_install.clone(), &mut s, t);
    assert!(matches!(
        events(&mut s).as_slice(),
        [Event::InstallRequested { .. }]
    ));

    // The slave restarts.
    let t2 = t + Duration::from_secs(30);
    let mut s2 = Keyx::new(cfg_inc(Role::Slave, S_INC + 7), t2);
    deliver(recorded_announce, &mut s2, t2);
    let ev = slave_fetches(&mut s2, |_| Ok(key(1)));
    assert!(
        matches!(ev.as_slice(), [Event::KeyReceived { .. }]),
        "the KME served the key again: {ev:?}"
    );
    out(&mut s2);
    deliver(recorded_install, &mut s2, t2);
    let ev = events(&mut s2);
    assert!(ev.is_empty(), "a replayed INSTALL was acted on: {ev:?}");
    assert_eq!(s2.stats().stale, 1);
    // The answer is a refusal (bound to the recorded master incarnation, so the live master
    // ignores it unless it really sent that INSTALL).
    let nack = out(&mut s2);
    assert!(matches!(
        Message::decode(&nack[0]).unwrap().body,
        Body::Nack {
            reason: NackReason::UnknownKey,
            ..
        }
    ));
}

/// Item 2, the master's side: a restarted master whose KME hands out a key_ID again must not
/// take replayed ACKs of its earlier life as the slave's confirmation or installation.
#[test]
fn a_restarted_master_ignores_answers_replayed_from_its_earlier_life() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t)
        .unwrap();
    deliver(out(&mut m), &mut s, t);
    slave_fetches(&mut s, |_| Ok(key(1)));
    let recorded_ack = out(&mut s);
    deliver(recorded_ack.clone(), &mut m, t);
    events(&mut m);
    m.install(kid(1), KeyRole::Sak, 1, 2, None, t).unwrap();
    deliver(out(&mut m), &mut s, t);
    events(&mut s);
    s.installed(kid(1), KeyRole::Sak, 1, 2, Ok(())).unwrap();
    let recorded_install_ack = out(&mut s);

    let t2 = t + Duration::from_secs(30);
    let mut m2 = Keyx::new(cfg_inc(Role::Master, M_INC + 7), t2);
    m2.announce(kid(1), KeyRole::Sak, 1, key(1), t2, None, t2)
        .unwrap();
    out(&mut m2);
    deliver(recorded_ack, &mut m2, t2);
    deliver(recorded_install_ack, &mut m2, t2);
    assert!(events(&mut m2).is_empty(), "a replayed ACK confirmed a key");
    assert_eq!(m2.stats().stale, 2);
    assert_eq!(
        m2.install(kid(1), KeyRole::Sak, 1, 2, None, t2),
        Err(KeyxError::NotConfirmed(kid(1)))
    );
}

/// Item 3: the tag covers the payload, not the Ethernet header. A genuine message forwarded
/// under another source address (an on-path attacker, or our own address) must not say where
/// the peer is; the SCI it carries does, and must match the frame.
#[test]
fn a_genuine_message_under_another_source_address_locates_nothing() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.handle_timeout(t + Duration::from_secs(5));
    let hello = out(&mut m);
    let eve = [2, 0, 0, 0, 0, 0xee];
    assert!(!s.handle_payload(&hello[0], eve, t));
    assert!(
        !s.handle_payload(&hello[0], B_MAC, t),
        "the slave's own address"
    );
    assert_eq!(s.stats().wrong_sci, 2);
    assert_eq!(s.peer_sci(), None);
    assert!(events(&mut s).is_empty());
    // The same bytes from the master's address: accepted, and the peer is its SCI.
    assert!(s.handle_payload(&hello[0], A_MAC, t));
    assert_eq!(s.peer_sci(), Some(A_SCI));
}

/// Item 3: two ends with one SCI would share SAK and SCI in both directions. A peer that
/// claims our SCI (a reflection, or a cloned VM with our MAC) is refused, authenticated or not.
#[test]
fn a_peer_with_our_own_sci_is_refused() {
    let t = Instant::now();
    let mut m = Keyx::new(cfg(Role::Master), t);
    let mut clone_cfg = cfg(Role::Slave);
    clone_cfg.local_sci = A_SCI;
    let mut s = Keyx::new(clone_cfg, t);
    m.announce(kid(1), KeyRole::Sak, 1, key(1), t, None, t)
        .unwrap();
    for p in out(&mut m) {
        assert!(!s.handle_payload(&p, A_MAC, t));
    }
    assert!(events(&mut s).is_empty(), "no fetch for a clone");
    s.handle_timeout(t);
    for p in out(&mut s) {
        assert!(!m.handle_payload(&p, A_MAC, t));
    }
    assert!(s.stats().wrong_sci >= 1 && m.stats().wrong_sci >= 1);
}

/// Item 5: once the slave shares a key with a live master, an unauthenticated ANNOUNCE is not
/// acted on (no KME request, no anchor move); a fetched key becomes the anchor only when the
/// master uses it. After the master has been silent for three HELLO intervals (it restarted
/// and lost every key), unauthenticated ANNOUNCEs re-bootstrap the link.
#[test]
fn unauthenticated_announces_move_nothing_while_the_master_is_live() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    m.handle_timeout(t + Duration::from_secs(5));
    let t1 = t + Duration::from_secs(5);
    deliver(out(&mut m), &mut s, t1);
    events(&mut s);
    assert_eq!(s.anchor(), Some(kid(1)));
    let forged = |n: u8, seq: u64| {
        Message {
            seq,
            sender: "SAE_A".into(),
            sci: A_SCI,
            incarnation: M_INC + 99,
            echo: 0,
            auth: None,
            body: Body::Announce {
                key_id: kid(n),
                role: KeyRole::Sak,
                kn: 9,
            },
        }
        .encode(None)
        .unwrap()
    };
    let _ = s.handle_payload(&forged(9, 1), A_MAC, t1 + MS);
    assert!(events(&mut s).is_empty(), "no KME request for it");
    assert_eq!(s.stats().unauthenticated_ignored, 1);
    // Three HELLO intervals (15 s here) without an authenticated word from the master.
    let t2 = t1 + Duration::from_secs(15);
    let _ = s.handle_payload(&forged(9, 2), A_MAC, t2);
    let ev = slave_fetches(&mut s, |_| Ok(key(9)));
    assert!(
        matches!(ev.as_slice(), [Event::KeyReceived { .. }]),
        "{ev:?}"
    );
    assert_eq!(s.anchor(), Some(kid(1)), "fetching a key moves no anchor");
}

/// A KME that hands out a key_ID again while the master holds it: never announced twice, and a
/// pending announcement that its key's retirement ends is reported, so that nobody waits for it.
#[test]
fn a_key_id_known_here_is_never_announced_twice() {
    let t = Instant::now();
    let (mut m, mut s) = pair(t);
    deliver_key(&mut m, &mut s, 1, t);
    assert_eq!(
        m.announce(kid(1), KeyRole::Sak, 7, key(1), t, None, t),
        Err(KeyxError::Duplicate(kid(1)))
    );
    m.announce(kid(2), KeyRole::Sak, 2, key(2), t, None, t)
        .unwrap();
    out(&mut m);
    m.retire(kid(2));
    assert_eq!(
        events(&mut m),
        vec![Event::KeyLost {
            key_id: kid(2),
            reason: LostReason::Retired
        }]
    );
}
