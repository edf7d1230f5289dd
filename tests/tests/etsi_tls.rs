//! The KME client speaks only TLS 1.2+ to a KME whose certificate chains to the configured CA.
//! Real servers on 127.0.0.1 (OpenSSL's `s_server`, a different TLS stack from ours): one limited
//! to TLS 1.1 with a certificate the client trusts, one with a self-signed certificate for the
//! right name, and a control with the trusted certificate and default versions, which must get
//! past the handshake (so the two refusals are about version and trust, not about the harness).

mod etsi_support;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etsi_support::*;
use qkd_macsec_agent::certs::files;
use qkd_macsec_agent::etsi014::{Etsi014Error, KmeClient};

/// An `openssl s_server` child, killed on drop.
struct SServer {
    child: Child,
    port: u16,
}

impl SServer {
    fn start(cert: &Path, key: &Path, extra: &[&str]) -> SServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("openssl (Debian package openssl) must be installed for this test");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("openssl s_server {extra:?} exited before listening: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "openssl s_server not listening after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        SServer { child, port }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn one_try_client(url: &str, certs: &Path) -> KmeClient {
    let mut cfg = client_config(url, certs, files::SAE_A);
    cfg.retry.max_attempts = 1;
    KmeClient::new(&cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_kme_with_default_versions_gets_past_the_handshake() {
    let certs = certs_dir(&[]);
    let srv = SServer::start(
        &certs.path().join(files::cert(files::KME_A)),
        &certs.path().join(files::key(files::KME_A)),
        &[],
    );
    let err = one_try_client(&srv.url(), certs.path())
        .status(files::SAE_B)
        .await
        .unwrap_err();
    // s_server -www answers HTML: the handshake worked and the answer was judged.
    assert!(
        matches!(err, Etsi014Error::ContentType { .. }),
        "control: expected the HTML answer to be refused after a good handshake, got {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_only_kme_is_refused() {
    let certs = certs_dir(&[]);
    // SECLEVEL=0: OpenSSL 3 refuses TLS 1.1 itself otherwise.
    let srv = SServer::start(
        &certs.path().join(files::cert(files::KME_A)),
        &certs.path().join(files::key(files::KME_A)),
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
    );
    let err = one_try_client(&srv.url(), certs.path())
        .status(files::SAE_B)
        .await
        .unwrap_err();
    match &err {
        Etsi014Error::Handshake { detail, .. } => eprintln!("refused as it should be: {detail}"),
        other => panic!("TLS 1.1 server: expected a handshake refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_kme_certificate_is_refused() {
    let certs = certs_dir(&[]);
    let d = TempDir::new("selfsigned");
    let (cert, key) = (d.path().join("self.pem"), d.path().join("self.key"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            // An end-entity certificate (openssl's default would be a CA, refused for that).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian package openssl) must be installed for this test");
    assert!(st.success(), "openssl req failed: {st}");
    let srv = SServer::start(&cert, &key, &[]);
    let err = one_try_client(&srv.url(), certs.path())
        .status(files::SAE_B)
        .await
        .unwrap_err();
    match &err {
        Etsi014Error::Handshake { detail, .. } => {
            assert!(detail.contains("UnknownIssuer"), "{err}")
        }
        other => panic!("self-signed KME: expected a handshake refusal, got {other}"),
    }
}
