//! The KME simulator's protocol surface over real mTLS on 127.0.0.1: malformed requests get 014
//! status codes with a JSON `message`, certificates are required and verified, the control
//! endpoint validates its input, and the process mode with `kme-sim-ctl` and the `kme` CLI works.

mod etsi_support;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use etsi_support::*;
use qkd_macsec_agent::certs::{files, tls};
use qkd_macsec_agent::kmesim::control::{self, ControlUpdate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENC: &str = "/api/v1/keys/sae-b/enc_keys";
const DEC: &str = "/api/v1/keys/sae-a/dec_keys";

#[expect(
    clippy::too_many_arguments,
    reason = "a test table row: request and expected answer"
)]
async fn expect_error(
    s: &Sim,
    sae: &str,
    kme_b: bool,
    method: &str,
    path: &str,
    body: Option<&str>,
    code: u16,
    needle: &str,
) {
    let addr = if kme_b {
        s.sim.addr_b()
    } else {
        s.sim.addr_a()
    };
    let r = raw(addr, s.certs.path(), sae, method, path, body).await;
    assert_eq!(r.status, code, "{method} {path} {body:?}: {r:?}");
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    let m = r.message();
    assert!(
        m.contains(needle),
        "{method} {path}: message {m:?} lacks {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_enc_keys_requests_get_400_with_message() {
    let s = start_sim(test_config()).await;
    let a = files::SAE_A;
    for (body, needle) in [
        ("{not json", "invalid JSON"),
        (r#"{"number":1,"colour":"blue"}"#, "unknown field"),
        (r#"{"number":"one"}"#, "invalid JSON"),
        (r#"{"size":100}"#, "multiple of 8"),
        (r#"{"size":32}"#, "64..=4096"),
        (r#"{"size":8192}"#, "64..=4096"),
        (r#"{"number":0}"#, "out of range"),
        (r#"{"number":129}"#, "max_key_per_request"),
        (
            r#"{"additional_slave_SAE_IDs":["sae-x"]}"#,
            "max_SAE_ID_count is 0",
        ),
        (r#"{"extension_mandatory":[{"vendor_x":true}]}"#, "vendor_x"),
    ] {
        expect_error(&s, a, false, "POST", ENC, Some(body), 400, needle).await;
    }
    for (q, needle) in [
        ("?number=abc", "non-negative integer"),
        ("?number=-1", "non-negative integer"),
        ("?count=1", "unknown query parameter"),
        ("?number=1&number=2", "twice"),
        ("?size=12", "multiple of 8"),
    ] {
        expect_error(&s, a, false, "GET", &format!("{ENC}{q}"), None, 400, needle).await;
    }
    let big = format!(r#"{{"number":1,"pad":"{}"}}"#, "x".repeat(70_000));
    expect_error(&s, a, false, "POST", ENC, Some(&big), 400, "limit").await;
    // Optional extensions are ignored, as the standard allows.
    let r = raw(
        s.sim.addr_a(),
        s.certs.path(),
        a,
        "POST",
        ENC,
        Some(r#"{"number":2,"extension_optional":[{"vendor_y":1}]}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["keys"].as_array().unwrap().len(), 2);
    // Nothing above consumed key material except the last request.
    assert_eq!(s.sim.control().state().issued, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dec_keys_requests_get_400_with_message() {
    let s = start_sim(test_config()).await;
    let b = files::SAE_B;
    let unknown = uuid::Uuid::new_v4();
    expect_error(&s, b, true, "GET", DEC, None, 400, "needs the key_ID").await;
    expect_error(
        &s,
        b,
        true,
        "GET",
        &format!("{DEC}?key_ID=nope"),
        None,
        400,
        "not a UUID",
    )
    .await;
    expect_error(
        &s,
        b,
        true,
        "GET",
        &format!("{DEC}?key_ID={unknown}"),
        None,
        400,
        "unknown key_ID",
    )
    .await;
    expect_error(
        &s,
        b,
        true,
        "POST",
        DEC,
        Some(r#"{"key_IDs":[]}"#),
        400,
        "empty",
    )
    .await;
    expect_error(
        &s,
        b,
        true,
        "POST",
        DEC,
        Some(r#"{"key_ID":"x"}"#),
        400,
        "invalid JSON",
    )
    .await;
    expect_error(&s, b, true, "POST", DEC, Some("[]"), 400, "invalid JSON").await;
    let k = s.client_a().enc_keys(files::SAE_B, 1, None).await.unwrap();
    let dup = format!(
        r#"{{"key_IDs":[{{"key_ID":"{0}"}},{{"key_ID":"{0}"}}]}}"#,
        k[0].id
    );
    expect_error(&s, b, true, "POST", DEC, Some(&dup), 400, "twice").await;
    let mixed = format!(
        r#"{{"key_IDs":[{{"key_ID":"{}"}},{{"key_ID":"{unknown}"}}]}}"#,
        k[0].id
    );
    expect_error(
        &s,
        b,
        true,
        "POST",
        DEC,
        Some(&mixed),
        400,
        "unknown key_ID",
    )
    .await;
    // All-or-nothing: the failed requests left the real key in place.
    let one = format!(r#"{{"key_IDs":[{{"key_ID":"{}"}}]}}"#, k[0].id);
    let r = raw(s.sim.addr_b(), s.certs.path(), b, "POST", DEC, Some(&one)).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_methods_and_sae_ids_are_checked() {
    let s = start_sim(test_config()).await;
    let a = files::SAE_A;
    expect_error(
        &s,
        a,
        false,
        "GET",
        "/api/v1/keys/sae-nobody/status",
        None,
        400,
        "not attached",
    )
    .await;
    expect_error(
        &s,
        a,
        false,
        "GET",
        "/api/v1/keys/sae-a/status",
        None,
        400,
        "not attached",
    )
    .await;
    expect_error(
        &s,
        a,
        false,
        "POST",
        "/api/v1/keys/sae-b/status",
        Some("{}"),
        405,
        "not allowed",
    )
    .await;
    expect_error(&s, a, false, "DELETE", ENC, None, 405, "not allowed").await;
    expect_error(
        &s,
        a,
        false,
        "GET",
        "/api/v1/keys/sae-b/other",
        None,
        404,
        "no such resource",
    )
    .await;
    expect_error(
        &s,
        a,
        false,
        "GET",
        "/index.html",
        None,
        404,
        "/api/v1/keys/",
    )
    .await;
    expect_error(
        &s,
        "sae-stranger",
        false,
        "GET",
        "/api/v1/keys/sae-b/status",
        None,
        401,
        "not attached to KME kme-a",
    )
    .await;
    let r = raw(
        s.sim.addr_a(),
        s.certs.path(),
        a,
        "GET",
        "/api/v1/keys/sae-b/status",
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["master_SAE_ID"], "sae-a");
}

/// Sends a request with a given client TLS config and returns whatever bytes come back.
async fn try_with(
    addr: std::net::SocketAddr,
    cfg: rustls::ClientConfig,
) -> Result<Vec<u8>, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(
        b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_is_required_and_verified() {
    let s = start_sim(test_config()).await;
    let roots = tls::root_store(&s.certs.path().join(files::CA_CERT)).unwrap();
    let no_cert = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let r = try_with(s.sim.addr_a(), no_cert).await;
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "no client cert got {r:?}"
    );
    if let Err(e) = &r {
        assert!(
            e.contains("CertificateRequired") || e.contains("alert"),
            "{e}"
        );
    }
    // A certificate from another CA, even with the right CN.
    let other = certs_dir(&[]);
    let mut files_other = tls_files(other.path(), files::SAE_A);
    files_other.ca = s.certs.path().join(files::CA_CERT);
    let r = try_with(s.sim.addr_a(), tls::client_config(&files_other).unwrap()).await;
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "foreign cert got {r:?}"
    );
    let st = s.sim.control().state();
    assert_eq!(st.answered_200 + st.answered_400 + st.answered_401, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_accepted_and_tls_1_3_preferred() {
    let s = start_sim(test_config()).await;
    let f = tls_files(s.certs.path(), files::SAE_A);
    let roots = tls::root_store(&f.ca).unwrap();
    let chain = tls::load_certs("c", &f.cert).unwrap();
    let key = tls::load_key("k", &f.key).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let got = String::from_utf8(try_with(s.sim.addr_a(), tls12).await.unwrap()).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // The default client negotiates 1.3.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls::client_config(&f).unwrap()));
    let tcp = tokio::net::TcpStream::connect(s.sim.addr_a())
        .await
        .unwrap();
    let c = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(
        c.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoint_validates_and_reports() {
    let s = start_sim(test_config()).await;
    let addr = s.sim.control_addr().unwrap();
    let st = control::request(addr, None).await.unwrap();
    assert_eq!(st.stored_key_count, 10_000);
    assert_eq!(st.availability_timeout_ms, 10_000);
    for bad in [
        ControlUpdate {
            qber: Some(1.5),
            ..Default::default()
        },
        ControlUpdate {
            key_rate: Some(-1.0),
            ..Default::default()
        },
        ControlUpdate {
            max_key_count: Some(0),
            ..Default::default()
        },
    ] {
        let e = control::request(addr, Some(&bad)).await.unwrap_err();
        assert!(matches!(e, control::ControlError::Refused { .. }), "{e}");
    }
    // Refused updates changed nothing.
    let after = control::request(addr, None).await.unwrap();
    assert_eq!(
        (after.qber, after.key_rate, after.max_key_count),
        (0.02, 1000.0, 10_000)
    );
    let st = control::request(
        addr,
        Some(&ControlUpdate {
            kme: Some(control::KmeSel::B),
            latency_ms: Some(7),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!((st.faults_a.latency_ms, st.faults_b.latency_ms), (0, 7));
    // Unknown fields are refused too (raw request).
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"qbr":0.5}"#;
    tcp.write_all(format!("POST /update HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 400") && out.contains("unknown field"),
        "{out}"
    );
}

/// Runs the agent binary and returns (success, stdout, stderr).
fn agent(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(agent_bin())
        .args(args)
        .env("QKD_MACSEC_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn process_mode_with_ctl_and_operator_cli() {
    let d = TempDir::new("proc");
    let dir = d.path().to_str().unwrap().to_string();
    let (ok, out, err) = agent(&["certs", "init", "--out", &dir, "--host", "kme.example"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 10);
    // A second init refuses to overwrite.
    let (ok, _, err) = agent(&["certs", "init", "--out", &dir]);
    assert!(!ok && err.contains("--force"), "{err}");

    let mut child = Command::new(agent_bin())
        .args([
            "kme-sim",
            "--certs",
            &dir,
            "--listen-a",
            "127.0.0.1:0",
            "--listen-b",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--prefill",
        ])
        .env("QKD_MACSEC_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Proc(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let url_a = format!("https://{}", info["kme_a"].as_str().unwrap());
    let url_b = format!("https://{}", info["kme_b"].as_str().unwrap());
    let ctl = info["control"].as_str().unwrap().to_string();
    let p = |f: &str| format!("{dir}/{f}");
    let conn = |url: &str, sae: &str| -> Vec<String> {
        vec![
            "--url".into(),
            url.into(),
            "--ca".into(),
            p("ca.pem"),
            "--cert".into(),
            p(&format!("{sae}.pem")),
            "--key".into(),
            p(&format!("{sae}.key")),
        ]
    };
    let run = |sub: &[&str], extra: Vec<String>| {
        let mut v: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
        v.extend(extra);
        let refs: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        agent(&refs)
    };

    let (ok, out, err) = run(
        &["kme", "status", "--slave-sae", "sae-b"],
        conn(&url_a, "sae-a"),
    );
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["key_availability_ms"], 10_000);

    let (ok, out, err) = run(
        &["kme", "enc-keys", "--slave-sae", "sae-b", "--number", "2"],
        conn(&url_a, "sae-a"),
    );
    assert!(ok, "{err}");
    let enc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let keys = enc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|k| k.get("key").is_none()),
        "keys printed without --show-keys: {out}"
    );
    let id = keys[0]["key_ID"].as_str().unwrap().to_string();

    let (ok, out, err) = run(
        &[
            "kme",
            "enc-keys",
            "--slave-sae",
            "sae-b",
            "--post",
            "--size",
            "128",
            "--show-keys",
        ],
        conn(&url_a, "sae-a"),
    );
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shown_key = shown["keys"][0]["key"].as_str().unwrap().to_string();
    let shown_id = shown["keys"][0]["key_ID"].as_str().unwrap().to_string();
    assert_eq!(shown["keys"][0]["size_bits"], 128);

    let (ok, out, err) = run(
        &[
            "kme",
            "dec-keys",
            "--master-sae",
            "sae-a",
            "--key-id",
            &shown_id,
            "--size",
            "128",
            "--show-keys",
        ],
        conn(&url_b, "sae-b"),
    );
    assert!(ok, "{err}");
    let dec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dec["keys"][0]["key"].as_str().unwrap(), shown_key);

    // Faults through kme-sim-ctl reach the running process.
    let (ok, out, err) = agent(&[
        "kme-sim-ctl",
        "--control",
        &ctl,
        "set",
        "--kme",
        "b",
        "--fail-503",
        "true",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"fail_503\": true"));
    let (ok, _, err) = run(
        &["kme", "dec-keys", "--master-sae", "sae-a", "--key-id", &id],
        conn(&url_b, "sae-b"),
    );
    assert!(
        !ok && err.contains("503") && err.contains("fault injection"),
        "{err}"
    );
    let (ok, _, err) = agent(&["kme-sim-ctl", "--control", &ctl, "set", "--qber", "2"]);
    assert!(!ok && err.contains("qber"), "{err}");
    let (ok, out, _) = agent(&["kme-sim-ctl", "--control", &ctl, "show"]);
    assert!(ok && out.contains("\"answered_503\""));

    // The doctor agrees that the setup works.
    let (ok, out, err) = run(
        &["doctor", "kme", "--slave-sae", "sae-b"],
        conn(&url_a, "sae-a"),
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("All checks passed"), "{out}");
}
