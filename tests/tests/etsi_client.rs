//! The ETSI 014 client against the in-process KME simulator, over real mTLS on 127.0.0.1:
//! every endpoint and method, the extensions, retries and the errors that must not be retried.

mod etsi_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use etsi_support::*;
use qkd_macsec_agent::certs::files;
use qkd_macsec_agent::etsi014::wire::KeyRequest;
use qkd_macsec_agent::etsi014::{Etsi014Error, KeyAvailability, KmeClient};
use qkd_macsec_agent::kmesim::{ControlUpdate, KmeSel, SimConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_standard_fields_and_availability_extension() {
    let s = start_sim(test_config()).await;
    let st = s.client_a().status(files::SAE_B).await.unwrap();
    assert_eq!(st.status.source_kme_id, "kme-a");
    assert_eq!(st.status.target_kme_id, "kme-b");
    assert_eq!(st.status.master_sae_id, "sae-a");
    assert_eq!(st.status.slave_sae_id, "sae-b");
    assert_eq!(st.status.key_size, 256);
    assert_eq!(st.status.max_key_count, 10_000);
    assert_eq!(st.status.stored_key_count, 10_000);
    assert_eq!(st.status.max_key_per_request, 128);
    assert_eq!(st.status.max_sae_id_count, 0);
    assert_eq!(
        st.availability,
        KeyAvailability::Within(Duration::from_secs(10))
    );

    s.sim
        .control()
        .apply(&ControlUpdate {
            availability_timeout_ms: Some(0),
            ..Default::default()
        })
        .unwrap();
    let st = s.client_b().status(files::SAE_A).await.unwrap();
    assert_eq!(st.availability, KeyAvailability::Unlimited);
    assert_eq!(st.status.source_kme_id, "kme-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enc_get_then_dec_get_returns_same_key_once() {
    let mut cfg = test_config();
    cfg.link.key_rate = 0.0; // so the pool count shows exactly what was taken
    let s = start_sim(cfg).await;
    let (a, b) = (s.client_a(), s.client_b());
    let t = Instant::now();
    let keys = a.enc_keys(files::SAE_B, 1, None).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].material.len(), 32);
    let deadline = keys[0]
        .slave_deadline
        .expect("simulator sends the expiry extension");
    assert!(deadline <= t + Duration::from_secs(10) + Duration::from_millis(50));
    assert!(deadline > t + Duration::from_secs(9));
    let got = b
        .dec_key(files::SAE_A, keys[0].id, Some(256))
        .await
        .unwrap();
    assert_eq!(got.material, keys[0].material);
    assert_eq!(got.slave_deadline, None);
    // Delivered once, then gone.
    let again = b
        .dec_key(files::SAE_A, keys[0].id, Some(256))
        .await
        .unwrap_err();
    match again {
        Etsi014Error::BadRequest { message, .. } => {
            assert!(message.contains("unknown key_ID"), "{message}")
        }
        other => panic!("expected 400, got {other}"),
    }
    assert_eq!(s.sim.control().state().stored_key_count, 9_999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enc_post_and_dec_post_with_many_keys_and_custom_size() {
    let s = start_sim(test_config()).await;
    let (a, b) = (s.client_a(), s.client_b());
    let req = KeyRequest {
        number: Some(5),
        size: Some(512),
        extension_optional: vec![serde_json::from_str(r#"{"ignored_vendor_ext": 1}"#).unwrap()],
        ..Default::default()
    };
    let keys = a.enc_keys_post(files::SAE_B, &req).await.unwrap();
    assert_eq!(keys.len(), 5);
    assert!(keys.iter().all(|k| k.material.len() == 64));
    let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 5);
    let got = b.dec_keys(files::SAE_A, &ids, Some(512)).await.unwrap();
    for (k, g) in keys.iter().zip(&got) {
        let matching = got.iter().find(|x| x.id == k.id).unwrap();
        assert_eq!(matching.material, k.material);
        assert!(ids.contains(&g.id));
    }
    // GET with size too.
    let k = a.enc_keys(files::SAE_B, 3, Some(128)).await.unwrap();
    assert!(k.iter().all(|k| k.material.len() == 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sae_gets_401_and_the_key_stays_for_the_right_one() {
    let mut cfg = test_config();
    cfg.saes_a = vec!["sae-a".into(), "sae-a2".into()];
    cfg.saes_b = vec!["sae-b".into(), "sae-b2".into()];
    let s = start_sim(cfg).await;
    let a = s.client_a();
    let keys = a.enc_keys(files::SAE_B, 1, None).await.unwrap();
    // Another slave SAE at the same KME asks for sae-b's key: 401.
    let b2 = client(&s.url_b(), s.certs.path(), "sae-b2");
    match b2
        .dec_key(files::SAE_A, keys[0].id, None)
        .await
        .unwrap_err()
    {
        Etsi014Error::Unauthorized { message, .. } => {
            assert!(message.contains("sae-b2"), "{message}")
        }
        other => panic!("expected 401, got {other}"),
    }
    // The right slave naming the wrong master: 401 as well.
    let b = s.client_b();
    assert!(matches!(
        b.dec_key("sae-a2", keys[0].id, None).await.unwrap_err(),
        Etsi014Error::Unauthorized { .. }
    ));
    // Neither refusal consumed the key.
    b.dec_key(files::SAE_A, keys[0].id, None).await.unwrap();
    // A second SAE pair works independently.
    let a2 = client(&s.url_a(), s.certs.path(), "sae-a2");
    let k2 = a2.enc_keys("sae-b2", 1, None).await.unwrap();
    b2.dec_key("sae-a2", k2[0].id, None).await.unwrap();
    // An SAE unknown to the KME (valid certificate, unknown CN) gets 401 for everything.
    let stranger = client(&s.url_a(), s.certs.path(), "sae-stranger");
    assert!(matches!(
        stranger.status(files::SAE_B).await.unwrap_err(),
        Etsi014Error::Unauthorized { .. }
    ));
    // An SAE attached to kme-b cannot use kme-a.
    let wrong_kme = client(&s.url_a(), s.certs.path(), files::SAE_B);
    assert!(matches!(
        wrong_kme.enc_keys(files::SAE_A, 1, None).await.unwrap_err(),
        Etsi014Error::Unauthorized { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfetched_key_disappears_after_availability_timeout() {
    let mut cfg = test_config();
    cfg.link.availability_timeout = Some(Duration::from_millis(1000));
    let s = start_sim(cfg).await;
    let keys = s.client_a().enc_keys(files::SAE_B, 2, None).await.unwrap();
    s.client_b()
        .dec_key(files::SAE_A, keys[0].id, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(
        s.client_b()
            .dec_key(files::SAE_A, keys[1].id, None)
            .await
            .unwrap_err(),
        Etsi014Error::BadRequest { .. }
    ));
    let st = s.sim.control().state();
    assert_eq!((st.issued, st.delivered, st.expired), (2, 1, 1));
}

/// A client with 8 attempts (about 0.9 s of backoff), so a fault lifted by another task is
/// reliably seen even on a loaded machine.
fn patient(s: &Sim, sae: &str, kme_a: bool) -> KmeClient {
    let url = if kme_a { s.url_a() } else { s.url_b() };
    let mut cfg = client_config(&url, s.certs.path(), sae);
    cfg.retry.max_attempts = 8;
    KmeClient::new(&cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retries_503_with_backoff_then_succeeds() {
    let s = start_sim(test_config()).await;
    let ctl = s.sim.control();
    ctl.apply(&ControlUpdate {
        kme: Some(KmeSel::A),
        fail_503: Some(true),
        ..Default::default()
    })
    .unwrap();
    // Lift the fault once the first 503 went out, while the client backs off.
    let ctl2 = ctl.clone();
    let lifter = tokio::spawn(async move {
        while ctl2.state().answered_503 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ctl2.apply(&ControlUpdate {
            kme: Some(KmeSel::A),
            fail_503: Some(false),
            ..Default::default()
        })
        .unwrap();
    });
    let keys = patient(&s, files::SAE_A, true)
        .enc_keys(files::SAE_B, 1, None)
        .await
        .unwrap();
    lifter.await.unwrap();
    assert_eq!(keys.len(), 1);
    let st = ctl.state();
    assert!(st.answered_503 >= 1, "{st:?}");
    assert_eq!(st.answered_200, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_503_fails_after_max_attempts_with_kme_message() {
    let s = start_sim(test_config()).await;
    s.sim
        .control()
        .apply(&ControlUpdate {
            fail_503: Some(true),
            ..Default::default()
        })
        .unwrap();
    match s.client_a().status(files::SAE_B).await.unwrap_err() {
        Etsi014Error::Unavailable {
            attempts, message, ..
        } => {
            assert_eq!(attempts, 4);
            assert!(message.contains("fault injection"), "{message}");
        }
        other => panic!("expected 503, got {other}"),
    }
    assert_eq!(s.sim.control().state().answered_503, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_and_unauthorized_are_never_retried() {
    let s = start_sim(test_config()).await;
    let a = s.client_a();
    let err = a
        .enc_keys_post(
            files::SAE_B,
            &KeyRequest {
                number: Some(1),
                size: Some(8192),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Etsi014Error::BadRequest { .. }), "{err}");
    let stranger = client(&s.url_a(), s.certs.path(), "sae-stranger");
    assert!(stranger.status(files::SAE_B).await.is_err());
    let st = s.sim.control().state();
    assert_eq!((st.answered_400, st.answered_401), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pool_gives_503_and_generation_refills_it() {
    let mut cfg = SimConfig::default();
    cfg.link.key_rate = 0.0;
    let s = start_sim(cfg).await;
    let a = s.client_a();
    assert_eq!(
        a.status(files::SAE_B)
            .await
            .unwrap()
            .status
            .stored_key_count,
        0
    );
    assert!(matches!(
        a.enc_keys(files::SAE_B, 1, None).await.unwrap_err(),
        Etsi014Error::Unavailable { .. }
    ));
    s.sim
        .control()
        .apply(&ControlUpdate {
            key_rate: Some(200.0),
            ..Default::default()
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        a.status(files::SAE_B)
            .await
            .unwrap()
            .status
            .stored_key_count
            >= 10
    );
    a.enc_keys(files::SAE_B, 5, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qber_above_threshold_stops_key_production() {
    let mut cfg = SimConfig::default();
    cfg.link.key_rate = 1000.0;
    cfg.link.qber = 0.15;
    let s = start_sim(cfg).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = s.client_a().status(files::SAE_B).await.unwrap().status;
    assert_eq!(st.stored_key_count, 0);
    assert_eq!(st.status_extension.unwrap()["qkd_macsec_link_up"], false);
    s.sim
        .control()
        .apply(&ControlUpdate {
            qber: Some(0.03),
            ..Default::default()
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        s.client_a()
            .status(files::SAE_B)
            .await
            .unwrap()
            .status
            .stored_key_count
            >= 50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_generation_and_pool_is_bounded() {
    let mut cfg = SimConfig::default();
    cfg.link.key_rate = 10_000.0;
    cfg.link.max_key_count = 20;
    let s = start_sim(cfg).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a = s.client_a();
    assert_eq!(
        a.status(files::SAE_B)
            .await
            .unwrap()
            .status
            .stored_key_count,
        20
    );
    s.sim
        .control()
        .apply(&ControlUpdate {
            paused: Some(true),
            ..Default::default()
        })
        .unwrap();
    a.enc_keys(files::SAE_B, 20, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        a.status(files::SAE_B)
            .await
            .unwrap()
            .status
            .stored_key_count,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_and_recover() {
    let s = start_sim(test_config()).await;
    let a = s.client_a();
    a.status(files::SAE_B).await.unwrap(); // a pooled keep-alive connection now exists
    let ctl = s.sim.control();
    ctl.apply(&ControlUpdate {
        drop_connections: Some(true),
        ..Default::default()
    })
    .unwrap();
    let ctl2 = ctl.clone();
    // Lift the fault once the simulator has actually dropped a connection of this client.
    let lifter = tokio::spawn(async move {
        while ctl2.state().connections_dropped < 2 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ctl2.apply(&ControlUpdate {
            drop_connections: Some(false),
            ..Default::default()
        })
        .unwrap();
    });
    patient(&s, files::SAE_A, true)
        .status(files::SAE_B)
        .await
        .unwrap();
    lifter.await.unwrap();
    // With the fault held, the client gives up with a transport error naming the KME.
    ctl.apply(&ControlUpdate {
        drop_connections: Some(true),
        ..Default::default()
    })
    .unwrap();
    match a.status(files::SAE_B).await.unwrap_err() {
        Etsi014Error::Transport { attempts, url, .. } => {
            assert_eq!(attempts, 4);
            assert!(url.contains(&s.sim.addr_a().to_string()));
        }
        other => panic!("expected a transport error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_beyond_request_timeout_is_a_bounded_failure() {
    let s = start_sim(test_config()).await;
    s.sim
        .control()
        .apply(&ControlUpdate {
            latency_ms: Some(400),
            ..Default::default()
        })
        .unwrap();
    let mut cfg = client_config(&s.url_a(), s.certs.path(), files::SAE_A);
    cfg.request_timeout = Duration::from_millis(150);
    cfg.retry.max_attempts = 2;
    let c = KmeClient::new(&cfg).unwrap();
    let t = Instant::now();
    let err = c.status(files::SAE_B).await.unwrap_err();
    assert!(matches!(err, Etsi014Error::Transport { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // Latency under the timeout just slows things down.
    s.sim
        .control()
        .apply(&ControlUpdate {
            latency_ms: Some(50),
            ..Default::default()
        })
        .unwrap();
    let t = Instant::now();
    c.status(files::SAE_B).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_plain_http_urls_and_bad_input_before_sending() {
    let d = certs_dir(&[]);
    let cfg = client_config("http://127.0.0.1:1", d.path(), files::SAE_A);
    assert!(matches!(
        KmeClient::new(&cfg).unwrap_err(),
        Etsi014Error::BadUrl { .. }
    ));
    let c = client("https://127.0.0.1:1", d.path(), files::SAE_A);
    assert!(matches!(
        c.enc_keys(files::SAE_B, 0, None).await.unwrap_err(),
        Etsi014Error::InvalidRequest(_)
    ));
    assert!(matches!(
        c.enc_keys(files::SAE_B, 1, Some(100)).await.unwrap_err(),
        Etsi014Error::InvalidRequest(_)
    ));
    let id = uuid::Uuid::new_v4();
    assert!(matches!(
        c.dec_keys(files::SAE_A, &[id, id], None).await.unwrap_err(),
        Etsi014Error::InvalidRequest(_)
    ));
    // Nothing listens on port 1: a transport error after the retries, not a hang.
    assert!(matches!(
        c.status(files::SAE_B).await.unwrap_err(),
        Etsi014Error::Transport { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_kme_certificate_from_another_ca() {
    let s = start_sim(test_config()).await;
    let other = certs_dir(&[]);
    // Our own cert is valid for the KME, but we trust only the other CA.
    let mut cfg = client_config(&s.url_a(), s.certs.path(), files::SAE_A);
    cfg.tls.ca = other.path().join(files::CA_CERT);
    cfg.retry.max_attempts = 1;
    cfg.retry.max_attempts = 3;
    let err = KmeClient::new(&cfg)
        .unwrap()
        .status(files::SAE_B)
        .await
        .unwrap_err();
    // Both CAs carry the same name, so rustls finds "the" issuer and the signature fails.
    match &err {
        Etsi014Error::Handshake { detail, .. } => {
            assert!(
                detail.contains("BadSignature") || detail.contains("UnknownIssuer"),
                "{err}"
            )
        }
        other => panic!("expected a handshake error, got {other}"),
    }
    assert_eq!(s.sim.control().state().answered_200, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_appear_in_debug_output() {
    let s = start_sim(test_config()).await;
    let keys = s.client_a().enc_keys(files::SAE_B, 1, None).await.unwrap();
    let dbg = format!("{keys:?}");
    let hex: String = keys[0]
        .material
        .expose()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(keys[0].material.expose());
    assert!(!dbg.contains(&hex) && !dbg.contains(&b64), "{dbg}");
    assert!(dbg.contains("redacted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused() {
    let s = start_sim(test_config()).await;
    let (a, b) = (s.client_a(), s.client_b());
    for _ in 0..20 {
        let k = a.enc_keys(files::SAE_B, 1, None).await.unwrap();
        b.dec_key(files::SAE_A, k[0].id, None).await.unwrap();
    }
    let st = s.sim.control().state();
    assert_eq!(st.answered_200, 40);
    // 40 requests; without reuse that would be 40 handshakes. hyper may open one spare
    // connection when a request starts before the previous one went back to the pool.
    assert!(st.connections <= 4, "connections not reused: {st:?}");
}
