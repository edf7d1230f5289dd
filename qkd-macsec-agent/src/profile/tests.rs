use super::*;

fn params(kind: ProfileKind, role: Role, cipher: Cipher) -> Params {
    Params {
        kind,
        role,
        cipher,
        master_sae: "SAE_A".into(),
        slave_sae: "SAE_B".into(),
        key_request_interval: Duration::from_secs(300),
        buffer: 3,
        cak_lifetime: Duration::from_secs(3600),
        tolerated_failures: 2,
    }
}

fn kid(n: u8) -> KeyId {
    KeyId([n; 16])
}

fn key(n: u8, len: usize) -> SecretBytes {
    SecretBytes::new(vec![n; len])
}

fn drain(s: &mut KeySupply) -> Vec<SupplyAction> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

const FETCH32: SupplyAction = SupplyAction::FetchKey { size_bytes: 32 };

#[test]
fn sak_from_qkd_checks_length_and_sets_xpn() {
    let e = sak_from_qkd(kid(1), 1, key(1, 16), Cipher::GcmAes256).unwrap_err();
    assert!(
        e.to_string()
            .contains("needs 32 (set the KME key size to 256 bits)"),
        "{e}"
    );
    let s = sak_from_qkd(kid(1), 1, key(1, 32), Cipher::GcmAes256).unwrap();
    assert!(s.xpn.is_none());
    assert_eq!(s.kernel_key_id, [1; 16]);
    let x1 = sak_from_qkd(kid(1), 1, key(1, 16), Cipher::GcmAesXpn128)
        .unwrap()
        .xpn
        .unwrap();
    let x2 = sak_from_qkd(kid(1), 2, key(1, 16), Cipher::GcmAesXpn128)
        .unwrap()
        .xpn
        .unwrap();
    assert_eq!((x1.ssci_master, x1.ssci_slave), (1, 2));
    assert_eq!(x1.ssci_tx_rx(Role::Master), (1, 2));
    assert_eq!(x1.ssci_tx_rx(Role::Slave), (2, 1));
    assert_ne!(x1.salt, x2.salt, "salt differs per SAK");
    let again = sak_from_qkd(kid(1), 1, key(1, 16), Cipher::GcmAesXpn128)
        .unwrap()
        .xpn
        .unwrap();
    assert_eq!(x1, again, "both ends compute the same salt");
}

#[test]
fn cak_derivation_agrees_between_ends_and_never_repeats_a_kn() {
    let now = Instant::now();
    let pm = params(ProfileKind::Cak, Role::Master, Cipher::GcmAesXpn256);
    let ps = params(ProfileKind::Cak, Role::Slave, Cipher::GcmAesXpn256);
    let mut m = Cak::new(kid(7), key(7, 32), &pm, now).unwrap();
    let mut s = Cak::new(kid(7), key(7, 32), &ps, now).unwrap();
    let n = Nonce::new(&[3; 32]).unwrap();
    let a = m.derive(1, &n, Cipher::GcmAesXpn256).unwrap();
    let b = s.derive(1, &n, Cipher::GcmAesXpn256).unwrap();
    assert_eq!(a.key, b.key);
    assert_eq!(a.xpn, b.xpn);
    assert_eq!(a.kernel_key_id, b.kernel_key_id);
    assert_eq!(&a.kernel_key_id[12..], &1u32.to_be_bytes());
    assert_ne!(
        a.key.expose(),
        key(7, 32).expose(),
        "the SAK is not the CAK"
    );
    assert_eq!(
        s.derive(1, &n, Cipher::GcmAesXpn256).unwrap_err(),
        ProfileError::KnReused {
            key_id: kid(7),
            asked: 1,
            last: 1
        }
    );
    let c = m.derive(2, &n, Cipher::GcmAesXpn256).unwrap();
    assert_ne!(a.key, c.key);
    let n16 = Nonce::new(&[3; 16]).unwrap();
    assert!(matches!(
        m.derive(3, &n16, Cipher::GcmAesXpn256),
        Err(ProfileError::NonceLength {
            got: 16,
            want: 32,
            ..
        })
    ));
    let bad = Cak::new(kid(8), key(8, 24), &pm, now).unwrap_err();
    assert!(matches!(bad, ProfileError::KeyLength { got: 24, .. }));
    let shown = format!("{:?}", Cak::new(kid(1), key(0xEE, 32), &pm, now).unwrap());
    assert!(
        shown.contains("redacted") && !shown.to_lowercase().contains("ee"),
        "{shown}"
    );
}

#[test]
fn sak_master_fills_buffer_at_f_qkd_and_consumes_fifo() {
    let t0 = Instant::now();
    let mut s = KeySupply::new(
        params(ProfileKind::Sak, Role::Master, Cipher::GcmAes256),
        t0,
    );
    s.handle_timeout(t0);
    assert_eq!(drain(&mut s), vec![FETCH32], "first key at once");
    assert_eq!(s.handle_fetched(t0).unwrap(), 1);
    s.handle_confirmed(kid(1), KeyRole::Sak, 1, key(1, 32), t0)
        .unwrap();
    assert_eq!(s.held(), 1);
    assert!(drain(&mut s).is_empty(), "then at f_QKD, not at once");
    let t1 = t0 + Duration::from_secs(300);
    assert_eq!(s.poll_timeout(), Some(t1));
    s.handle_timeout(t1);
    assert_eq!(drain(&mut s), vec![FETCH32]);
    assert_eq!(s.handle_fetched(t1).unwrap(), 2);
    s.handle_confirmed(kid(2), KeyRole::Sak, 2, key(2, 32), t1)
        .unwrap();
    let t2 = t1 + Duration::from_secs(300);
    s.handle_timeout(t2);
    assert_eq!(drain(&mut s), vec![FETCH32]);
    s.handle_fetched(t2).unwrap();
    s.handle_confirmed(kid(3), KeyRole::Sak, 3, key(3, 32), t2)
        .unwrap();
    assert_eq!(s.held(), 3);
    // Full (k = 3): no more fetching.
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(t2 + Duration::from_secs(10_000));
    assert!(drain(&mut s).is_empty());
    // Consume oldest first; refill resumes.
    let a = s.next_sak(&[], t2).unwrap().unwrap();
    assert_eq!(
        a.key_ref,
        KeyRef {
            key_id: kid(1),
            kn: 1
        }
    );
    assert_eq!(a.key.expose(), &[1; 32]);
    assert_eq!(s.held(), 2);
    assert!(s.poll_timeout().is_some());
    // A duplicate confirmation does not add the key twice.
    s.handle_confirmed(kid(2), KeyRole::Sak, 2, key(2, 32), t2)
        .unwrap();
    assert_eq!(s.held(), 2);
    // Used keys are gone for good.
    assert!(!s.holds(kid(1)));
}

#[test]
fn empty_master_retries_with_backoff_then_at_f_qkd_when_holding() {
    let t0 = Instant::now();
    let mut s = KeySupply::new(
        params(ProfileKind::Sak, Role::Master, Cipher::GcmAes256),
        t0,
    );
    s.handle_timeout(t0);
    assert_eq!(drain(&mut s), vec![FETCH32]);
    let mut t = t0;
    for expect in [1u64, 2, 4, 5, 5] {
        s.handle_fetch_failed(t);
        assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(expect)));
        t += Duration::from_secs(expect);
        s.handle_timeout(t);
        assert_eq!(drain(&mut s), vec![FETCH32]);
    }
    assert_eq!(s.consecutive_failures(), 5);
    s.handle_fetched(t).unwrap();
    assert_eq!(s.consecutive_failures(), 0);
    s.handle_confirmed(kid(1), KeyRole::Sak, 1, key(1, 32), t)
        .unwrap();
    // Holding a key: a failure waits a full interval.
    s.handle_timeout(t + Duration::from_secs(300));
    assert_eq!(drain(&mut s), vec![FETCH32]);
    let t3 = t + Duration::from_secs(300);
    s.handle_lost(t3);
    assert_eq!(s.poll_timeout(), Some(t3 + Duration::from_secs(300)));
}

#[test]
fn backoff_is_capped_by_the_interval() {
    let t0 = Instant::now();
    let mut p = params(ProfileKind::Sak, Role::Master, Cipher::GcmAes256);
    p.key_request_interval = Duration::from_secs(5);
    let mut s = KeySupply::new(p, t0);
    s.handle_timeout(t0);
    drain(&mut s);
    let mut t = t0;
    for _ in 0..10 {
        s.handle_fetch_failed(t);
        let next = s.poll_timeout().unwrap();
        assert!(next - t <= Duration::from_secs(5));
        t = next;
        s.handle_timeout(t);
        drain(&mut s);
    }
}

#[test]
fn slave_store_resolves_each_install_once() {
    let t0 = Instant::now();
    let mut s = KeySupply::new(params(ProfileKind::Sak, Role::Slave, Cipher::GcmAes256), t0);
    s.handle_timeout(t0);
    assert!(drain(&mut s).is_empty(), "a slave never fetches on its own");
    assert_eq!(s.poll_timeout(), None);
    s.handle_confirmed(kid(1), KeyRole::Sak, 5, key(1, 32), t0)
        .unwrap();
    assert!(s.holds(kid(1)));
    assert_eq!(
        s.resolve_install(kid(2), KeyRole::Sak, 5, None, t0)
            .unwrap_err(),
        ProfileError::UnknownKey { key_id: kid(2) }
    );
    assert_eq!(
        s.resolve_install(kid(1), KeyRole::Sak, 6, None, t0)
            .unwrap_err(),
        ProfileError::KnMismatch {
            key_id: kid(1),
            held: 5,
            asked: 6
        }
    );
    assert_eq!(
        s.resolve_install(kid(1), KeyRole::Cak, 5, None, t0)
            .unwrap_err(),
        ProfileError::WrongRole {
            got: KeyRole::Cak,
            want: KeyRole::Sak
        }
    );
    let sak = s
        .resolve_install(kid(1), KeyRole::Sak, 5, None, t0)
        .unwrap();
    assert_eq!(
        sak.key_ref,
        KeyRef {
            key_id: kid(1),
            kn: 5
        }
    );
    assert_eq!(
        s.resolve_install(kid(1), KeyRole::Sak, 5, None, t0)
            .unwrap_err(),
        ProfileError::UnknownKey { key_id: kid(1) },
        "a key is handed out once"
    );
    // Wrong-length key is refused with the KME size to set.
    let e = s
        .handle_confirmed(kid(9), KeyRole::Sak, 1, key(9, 16), t0)
        .unwrap_err();
    assert!(matches!(
        e,
        ProfileError::KeyLength {
            got: 16,
            want: 32,
            ..
        }
    ));
}

#[test]
fn slave_store_is_bounded() {
    let t0 = Instant::now();
    let mut s = KeySupply::new(params(ProfileKind::Sak, Role::Slave, Cipher::GcmAes128), t0);
    for i in 1..=20u8 {
        s.handle_confirmed(kid(i), KeyRole::Sak, u32::from(i), key(i, 16), t0)
            .unwrap();
    }
    assert_eq!(s.held(), 3 + EXTRA_HELD);
    assert!(!s.holds(kid(1)), "oldest dropped");
    assert!(s.holds(kid(20)));
}

#[test]
fn cak_master_rolls_saks_and_expires() {
    let t0 = Instant::now();
    let p = params(ProfileKind::Cak, Role::Master, Cipher::GcmAes256);
    let mut s = KeySupply::new(p, t0);
    assert_eq!(
        s.next_sak(&[1; 32], t0).unwrap().map(|x| x.key_ref),
        None,
        "no CAK yet"
    );
    s.handle_timeout(t0);
    assert_eq!(drain(&mut s), vec![FETCH32]);
    let kn = s.handle_fetched(t0).unwrap();
    s.handle_confirmed(kid(1), KeyRole::Cak, kn, key(1, 32), t0)
        .unwrap();
    let a = s.next_sak(&[1; 32], t0).unwrap().unwrap();
    let b = s.next_sak(&[1; 32], t0).unwrap().unwrap();
    assert_eq!(a.key_ref.kn, 1);
    assert_eq!(b.key_ref.kn, 2);
    assert_ne!(a.key, b.key, "same nonce, new KN: new SAK");
    assert_eq!(a.nonce.as_ref().unwrap().as_bytes(), &[1; 32]);
    assert!(matches!(
        s.next_sak(&[1; 16], t0),
        Err(ProfileError::NonceLength { .. })
    ));
    // A new CAK every interval.
    let t1 = t0 + Duration::from_secs(300);
    assert_eq!(s.poll_timeout(), Some(t1));
    s.handle_timeout(t1);
    assert_eq!(drain(&mut s), vec![FETCH32]);
    // All requests fail until the CAK lifetime (1 h) is over.
    let mut t = t1;
    while t < t0 + Duration::from_secs(3600) {
        s.handle_fetch_failed(t);
        t = s.poll_timeout().unwrap();
        s.handle_timeout(t);
        for a in drain(&mut s) {
            if let SupplyAction::CakExpired { key_id } = a {
                assert_eq!(key_id, kid(1));
                assert!(t >= t0 + Duration::from_secs(3600));
            }
        }
    }
    assert!(matches!(
        s.next_sak(&[1; 32], t),
        Err(ProfileError::CakExpired { .. })
    ));
    // A new CAK recovers; KNs restart under it.
    let kn = s.handle_fetched(t).unwrap();
    s.handle_confirmed(kid(2), KeyRole::Cak, kn, key(2, 32), t)
        .unwrap();
    let c = s.next_sak(&[2; 32], t).unwrap().unwrap();
    assert_eq!(
        c.key_ref,
        KeyRef {
            key_id: kid(2),
            kn: 1
        }
    );
}

#[test]
fn cak_expiry_is_reported_once() {
    let t0 = Instant::now();
    let mut s = KeySupply::new(params(ProfileKind::Cak, Role::Slave, Cipher::GcmAes128), t0);
    s.handle_confirmed(kid(1), KeyRole::Cak, 1, key(1, 16), t0)
        .unwrap();
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(3600)));
    s.handle_timeout(t0 + Duration::from_secs(3600));
    assert_eq!(
        drain(&mut s),
        vec![SupplyAction::CakExpired { key_id: kid(1) }]
    );
    s.handle_timeout(t0 + Duration::from_secs(7200));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), None);
    let n = Nonce::new(&[0; 16]).unwrap();
    assert_eq!(
        s.resolve_install(
            kid(1),
            KeyRole::Cak,
            1,
            Some(&n),
            t0 + Duration::from_secs(3600)
        )
        .unwrap_err(),
        ProfileError::CakExpired { key_id: kid(1) }
    );
}

#[test]
fn cak_slave_matches_master_and_refuses_replayed_kn() {
    let t0 = Instant::now();
    let mut m = KeySupply::new(
        params(ProfileKind::Cak, Role::Master, Cipher::GcmAes128),
        t0,
    );
    let mut s = KeySupply::new(params(ProfileKind::Cak, Role::Slave, Cipher::GcmAes128), t0);
    m.handle_timeout(t0);
    drain(&mut m);
    let kn = m.handle_fetched(t0).unwrap();
    m.handle_confirmed(kid(4), KeyRole::Cak, kn, key(4, 16), t0)
        .unwrap();
    s.handle_confirmed(kid(4), KeyRole::Cak, kn, key(4, 16), t0)
        .unwrap();
    let a = m.next_sak(&[9; 16], t0).unwrap().unwrap();
    let b = s
        .resolve_install(kid(4), KeyRole::Cak, a.key_ref.kn, a.nonce.as_ref(), t0)
        .unwrap();
    assert_eq!(a.key, b.key);
    assert_eq!(a.kernel_key_id, b.kernel_key_id);
    assert!(matches!(
        s.resolve_install(kid(4), KeyRole::Cak, a.key_ref.kn, a.nonce.as_ref(), t0),
        Err(ProfileError::KnReused { .. })
    ));
    assert!(matches!(
        s.resolve_install(kid(4), KeyRole::Cak, 2, None, t0),
        Err(ProfileError::NonceLength { got: 0, .. })
    ));
}
