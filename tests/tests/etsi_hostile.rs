//! The ETSI 014 client against a hostile KME: a real mTLS server on 127.0.0.1 that answers with
//! broken bodies. Every case must end in a clear error, return no key, and leak no key material.

mod etsi_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use etsi_support::*;
use qkd_macsec_agent::certs::files;
use qkd_macsec_agent::etsi014::{Etsi014Error, KeyAvailability, KmeClient};
use uuid::Uuid;

const ID1: &str = "6f1c7a52-1e43-4a39-9d6c-0b7f8f3f2a11";
const ID2: &str = "0d9a4a8e-5b7e-4a8c-8f7c-2f0e3b7d9c22";
const ID3: &str = "a3f0c1d2-7e6b-4c5a-9b8e-1d2c3b4a5f33";

fn b64(n: usize, fill: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode(vec![fill; n])
}

fn keys_json(entries: &[(&str, String)]) -> String {
    let keys: Vec<String> = entries
        .iter()
        .map(|(id, k)| format!(r#"{{"key_ID":"{id}","key":"{k}"}}"#))
        .collect();
    format!(r#"{{"keys":[{}]}}"#, keys.join(","))
}

async fn hostile(
    answer: impl Fn(u32) -> Vec<u8> + Send + Sync + 'static,
) -> (
    KmeClient,
    std::sync::Arc<std::sync::atomic::AtomicU32>,
    TempDir,
) {
    let d = certs_dir(&[]);
    let (url, count) = hostile_kme(d.path(), answer).await;
    let mut cfg = client_config(&url, d.path(), files::SAE_A);
    cfg.max_body_bytes = 4096;
    (KmeClient::new(&cfg).unwrap(), count, d)
}

fn ok_json(body: String) -> impl Fn(u32) -> Vec<u8> + Send + Sync + 'static {
    move |_| http(200, "application/json", &body)
}

/// The error text must not contain the given secret strings.
fn assert_no_leak(e: &Etsi014Error, secrets: &[&str]) {
    let text = format!("{e} {e:?}");
    for s in secrets {
        assert!(!text.contains(s), "error leaks {s:?}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_formed_answer_is_accepted() {
    let body = keys_json(&[(ID1, b64(32, 7))]);
    let (c, _, _d) = hostile(ok_json(body)).await;
    let k = c.enc_keys(files::SAE_B, 1, Some(256)).await.unwrap();
    assert_eq!(k[0].id, Uuid::parse_str(ID1).unwrap());
    assert_eq!(k[0].material.expose(), &[7u8; 32]);
    assert_eq!(k[0].slave_deadline, None, "no extension, no deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_base64_is_refused_without_echoing_it() {
    let garbage = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo*MTIzNDU2Nzg5MA==";
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, garbage.into())]))).await;
    let e = c.enc_keys(files::SAE_B, 1, None).await.unwrap_err();
    assert!(matches!(e, Etsi014Error::BadBase64 { .. }), "{e}");
    assert_no_leak(&e, &[garbage, "QUJDREVG"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_length_is_refused() {
    let key = b64(16, 9);
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, key.clone())]))).await;
    let e = c.enc_keys(files::SAE_B, 1, Some(256)).await.unwrap_err();
    match &e {
        Etsi014Error::WrongKeySize {
            expected_bits,
            got_bits,
            ..
        } => assert_eq!((*expected_bits, *got_bits), (256, 128)),
        other => panic!("{other}"),
    }
    assert_no_leak(&e, &[&key]);
    // An empty key is wrong even when no size was requested.
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, String::new())]))).await;
    assert!(matches!(
        c.enc_keys(files::SAE_B, 1, None).await.unwrap_err(),
        Etsi014Error::WrongKeySize { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_key_ids_are_refused() {
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, b64(32, 1)), (ID1, b64(32, 2))]))).await;
    let e = c.enc_keys(files::SAE_B, 2, None).await.unwrap_err();
    assert!(matches!(e, Etsi014Error::DuplicateKeyId { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_number_of_keys_is_refused() {
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, b64(32, 1))]))).await;
    match c.enc_keys(files::SAE_B, 2, None).await.unwrap_err() {
        Etsi014Error::WrongKeyCount { expected, got, .. } => assert_eq!((expected, got), (2, 1)),
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dec_keys_answer_must_hold_exactly_the_requested_ids() {
    let ids = [Uuid::parse_str(ID1).unwrap(), Uuid::parse_str(ID2).unwrap()];
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, b64(32, 1))]))).await;
    match c.dec_keys(files::SAE_A, &ids, None).await.unwrap_err() {
        Etsi014Error::MissingKeyId { key_id, .. } => assert_eq!(key_id, ID2),
        other => panic!("{other}"),
    }
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID1, b64(32, 1)), (ID3, b64(32, 3))]))).await;
    match c.dec_keys(files::SAE_A, &ids, None).await.unwrap_err() {
        Etsi014Error::UnexpectedKeyId { key_id, .. } => assert_eq!(key_id, ID3),
        other => panic!("{other}"),
    }
    let (c, _, _d) = hostile(ok_json(keys_json(&[(ID2, b64(32, 1))]))).await;
    assert!(matches!(
        c.dec_key(files::SAE_A, ids[0], None).await.unwrap_err(),
        Etsi014Error::UnexpectedKeyId { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_uuid_key_id_is_refused() {
    let (c, _, _d) = hostile(ok_json(keys_json(&[("key-1", b64(32, 1))]))).await;
    let e = c.enc_keys(files::SAE_B, 1, None).await.unwrap_err();
    assert!(matches!(e, Etsi014Error::BadKeyId { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_type_is_refused() {
    let body = keys_json(&[(ID1, b64(32, 1))]);
    let (c, _, _d) = hostile(move |_| http(200, "text/html", &body)).await;
    match c.enc_keys(files::SAE_B, 1, None).await.unwrap_err() {
        Etsi014Error::ContentType { content_type, .. } => assert_eq!(content_type, "text/html"),
        other => panic!("{other}"),
    }
    // Parameters on the media type are fine.
    let body = keys_json(&[(ID1, b64(32, 1))]);
    let (c, _, _d) = hostile(move |_| http(200, "application/json; charset=utf-8", &body)).await;
    c.enc_keys(files::SAE_B, 1, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_declared_or_streamed() {
    let big = keys_json(&[(ID1, b64(6000, 1))]);
    let (c, _, _d) = hostile(ok_json(big.clone())).await;
    assert!(matches!(
        c.enc_keys(files::SAE_B, 1, None).await.unwrap_err(),
        Etsi014Error::BodyTooLarge { limit: 4096, .. }
    ));
    // Chunked, no Content-Length: the limit applies while reading.
    let (c, _, _d) = hostile(move |_| {
        let mut v = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for chunk in big.as_bytes().chunks(1000) {
            v.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            v.extend_from_slice(chunk);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    })
    .await;
    assert!(matches!(
        c.enc_keys(files::SAE_B, 1, None).await.unwrap_err(),
        Etsi014Error::BodyTooLarge { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_errors_show_positions_not_values() {
    let secret = "U0VDUkVUS0VZTUFURVJJQUwxMjM0NTY3ODkwYWJjZGVm";
    let (c, _, _d) = hostile(ok_json(format!(r#"{{"keys":"{secret}"}}"#))).await;
    let e = c.enc_keys(files::SAE_B, 1, None).await.unwrap_err();
    assert!(matches!(e, Etsi014Error::Malformed { .. }), "{e}");
    assert_no_leak(&e, &[secret]);
    let (c, _, _d) = hostile(ok_json(format!(
        r#"{{"keys":[{{"key_ID":"{ID1}","key":12345678901234567}}]}}"#
    )))
    .await;
    let e = c.enc_keys(files::SAE_B, 1, None).await.unwrap_err();
    assert_no_leak(&e, &["12345678901234567"]);
    let (c, _, _d) = hostile(ok_json(r#"{"keys":[{"key_ID":"#.into())).await;
    assert!(matches!(
        c.enc_keys(files::SAE_B, 1, None).await.unwrap_err(),
        Etsi014Error::Malformed { .. }
    ));
    let (c, _, _d) = hostile(ok_json(r#"{"source_KME_ID":"x"}"#.into())).await;
    assert!(matches!(
        c.status(files::SAE_B).await.unwrap_err(),
        Etsi014Error::Malformed { what: "status", .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kme_error_message_and_details_are_carried_and_400_401_not_retried() {
    let (c, count, _d) = hostile(|_| {
        http(
            400,
            "application/json",
            r#"{"message":"size not supported","details":[{"max_key_size":512}]}"#,
        )
    })
    .await;
    let e = c.enc_keys(files::SAE_B, 1, Some(1024)).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("size not supported") && text.contains("max_key_size"),
        "{text}"
    );
    assert!(matches!(e, Etsi014Error::BadRequest { .. }));
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let (c, count, _d) =
        hostile(|_| http(401, "application/json", r#"{"message":"not your key"}"#)).await;
    let e = c
        .dec_key(files::SAE_A, Uuid::new_v4(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Etsi014Error::Unauthorized { message, .. } if message == "not your key"),
        "{e}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let (c, _, _d) = hostile(|_| http(500, "text/plain", "boom")).await;
    match c.status(files::SAE_B).await.unwrap_err() {
        Etsi014Error::UnexpectedStatus {
            status, message, ..
        } => {
            assert_eq!(status, 500);
            assert!(message.contains("no ETSI 014 JSON"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_then_success_is_retried_to_success() {
    let body = keys_json(&[(ID1, b64(32, 5))]);
    let (c, count, _d) = hostile(move |i| {
        if i < 2 {
            http(503, "application/json", r#"{"message":"busy"}"#)
        } else {
            http(200, "application/json", &body)
        }
    })
    .await;
    let k = c.enc_keys(files::SAE_B, 1, None).await.unwrap();
    assert_eq!(k[0].material.expose(), &[5u8; 32]);
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_or_truncated_answers_are_transport_errors_after_retries() {
    let (c, count, _d) = hostile(|_| Vec::new()).await;
    let e = c.status(files::SAE_B).await.unwrap_err();
    assert!(
        matches!(e, Etsi014Error::Transport { attempts: 4, .. }),
        "{e}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 4);

    let body = keys_json(&[(ID1, b64(32, 1))]);
    let (c, _, _d) = hostile(move |_| {
        let mut v = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len() + 50
        )
        .into_bytes();
        v.extend_from_slice(body.as_bytes());
        v
    })
    .await;
    let e = c.enc_keys(files::SAE_B, 1, None).await.unwrap_err();
    assert!(matches!(e, Etsi014Error::Transport { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_are_honoured_when_present_and_optional_when_absent() {
    let body = format!(
        r#"{{"keys":[{{"key_ID":"{ID1}","key":"{}","key_extension":{{"qkd_macsec_expires_in_ms":1500}}}}],"key_container_extension":{{"x":1}}}}"#,
        b64(32, 1)
    );
    let (c, _, _d) = hostile(ok_json(body)).await;
    let t = Instant::now();
    let k = c.enc_keys(files::SAE_B, 1, None).await.unwrap();
    let d = k[0].slave_deadline.unwrap();
    assert!(
        d >= t + Duration::from_millis(1500) && d <= Instant::now() + Duration::from_millis(1500)
    );

    let plain_status = r#"{"source_KME_ID":"A","target_KME_ID":"B","master_SAE_ID":"sae-a","slave_SAE_ID":"sae-b","key_size":256,"stored_key_count":5,"max_key_count":10,"max_key_per_request":1,"max_key_size":256,"min_key_size":256,"max_SAE_ID_count":0}"#;
    let (c, _, _d) = hostile(ok_json(plain_status.into())).await;
    let s = c.status(files::SAE_B).await.unwrap();
    assert_eq!(s.availability, KeyAvailability::Unknown);
    assert_eq!(s.status.stored_key_count, 5);
}
