//! `doctor kme` against real broken setups: each test builds the broken certificates (or server)
//! it needs and checks that doctor names the right problem in plain words.

mod etsi_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etsi_support::*;
use qkd_macsec_agent::certs::doctor::{diagnose, DoctorInput, Problem, Report};
use qkd_macsec_agent::certs::tls::{self, TlsFiles};
use qkd_macsec_agent::certs::{Ca, Eku, Issued, LeafSpec};
use qkd_macsec_agent::kmesim::{KmeSim, SimTls};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    dir: TempDir,
    ca: Ca,
}

impl Setup {
    fn new() -> Self {
        let dir = TempDir::new("doctor");
        let ca = Ca::new("Doctor Test CA", 2).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        Self { dir, ca }
    }
    fn put(&self, name: &str, leaf: &Issued) -> (PathBuf, PathBuf) {
        let c = self.dir.path().join(format!("{name}.pem"));
        let k = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&c, &leaf.cert_pem).unwrap();
        std::fs::write(&k, leaf.key_pem.as_bytes()).unwrap();
        (c, k)
    }
    fn issue(&self, name: &str, spec: LeafSpec) -> (PathBuf, PathBuf) {
        self.put(name, &self.ca.issue(&spec).unwrap())
    }
    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    /// Starts the simulator with kme-a using the given server certificate (kme-b a good one).
    async fn sim(&self, server: LeafSpec) -> KmeSim {
        let (c, k) = self.issue("kme-a", server);
        let (cb, kb) = self.issue("kme-b", good_server());
        let cfg = |cert: PathBuf, key: PathBuf| {
            Arc::new(
                tls::server_config(&TlsFiles {
                    ca: self.ca_path(),
                    cert,
                    key,
                })
                .unwrap(),
            )
        };
        let tls = SimTls {
            kme_a: cfg(c, k),
            kme_b: cfg(cb, kb),
        };
        let l = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
        KmeSim::start(test_config(), tls, l().await, l().await, None)
            .await
            .unwrap()
    }
    fn input(&self, url: String, cert: &Path, key: &Path) -> DoctorInput {
        DoctorInput {
            url,
            tls: TlsFiles {
                ca: self.ca_path(),
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
            slave_sae: Some("sae-b".into()),
            timeout: Duration::from_secs(3),
        }
    }
}

fn good_server() -> LeafSpec {
    LeafSpec::server("kme-a", &["localhost".into(), "127.0.0.1".into()], 2)
}

fn url(sim: &KmeSim) -> String {
    format!("https://127.0.0.1:{}", sim.addr_a().port())
}

fn expect(r: &Report, p: Problem, words: &[&str]) {
    assert_eq!(r.problem, Some(p), "{}", r.render());
    let advice = r.advice.as_deref().unwrap();
    for w in words {
        assert!(advice.contains(w), "advice lacks {w:?}: {advice}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_setup_passes() {
    let s = Setup::new();
    let sim = s.sim(good_server()).await;
    let (c, k) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    let r = diagnose(&s.input(url(&sim), &c, &k)).await;
    assert_eq!(r.problem, None, "{}", r.render());
    assert!(r.render().contains("All checks passed"));
    assert!(r
        .findings
        .iter()
        .any(|f| f.check == "speaks ETSI 014" && f.detail.contains("kme-a")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_named() {
    let s = Setup::new();
    let sim = s.sim(good_server()).await;
    let (c, k) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    let other = Ca::new("Some Other CA", 2).unwrap();
    let other_path = s.dir.path().join("other-ca.pem");
    std::fs::write(&other_path, other.cert_pem()).unwrap();
    let mut input = s.input(url(&sim), &c, &k);
    input.tls.ca = other_path;
    expect(
        &diagnose(&input).await,
        Problem::WrongCa,
        &["not issued by the CA", "Doctor Test CA"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_mismatch_is_named() {
    let s = Setup::new();
    let sim = s
        .sim(LeafSpec::server(
            "kme-a",
            &["kme-far-away.example".into()],
            2,
        ))
        .await;
    let (c, k) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    expect(
        &diagnose(&s.input(url(&sim), &c, &k)).await,
        Problem::NameMismatch,
        &[
            "not valid for the name \"127.0.0.1\"",
            "kme-far-away.example",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_server_certificate_is_named() {
    let s = Setup::new();
    let mut spec = good_server();
    spec.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
    spec.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    let sim = s.sim(spec).await;
    let (c, k) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    expect(
        &diagnose(&s.input(url(&sim), &c, &k)).await,
        Problem::ServerCertExpired,
        &["expired"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_without_server_auth_is_named() {
    let s = Setup::new();
    let mut spec = good_server();
    spec.ekus = vec![Eku::ClientAuth];
    let sim = s.sim(spec).await;
    let (c, k) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    expect(
        &diagnose(&s.input(url(&sim), &c, &k)).await,
        Problem::ServerCertWrongEku,
        &["serverAuth"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_refused_by_the_kme_is_named() {
    let s = Setup::new();
    let sim = s.sim(good_server()).await;
    // Valid, right CN, but issued by a CA the KME does not trust.
    let rogue = Ca::new("Rogue CA", 2).unwrap();
    let (c, k) = s.put(
        "sae-a-rogue",
        &rogue.issue(&LeafSpec::client("sae-a", 2)).unwrap(),
    );
    expect(
        &diagnose(&s.input(url(&sim), &c, &k)).await,
        Problem::ClientCertRefused,
        &["refused our client certificate", "Rogue CA"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_without_client_auth_is_named() {
    let s = Setup::new();
    let sim = s.sim(good_server()).await;
    let mut spec = LeafSpec::client("sae-a", 2);
    spec.ekus = vec![Eku::ServerAuth];
    let (c, k) = s.issue("sae-a", spec);
    let r = diagnose(&s.input(url(&sim), &c, &k)).await;
    expect(
        &r,
        Problem::ClientCertWrongEku,
        &["clientAuth", "serverAuth"],
    );
    // And the KME indeed refused it (the connection step failed too, or gave no answer).
    assert!(
        !r.findings
            .iter()
            .any(|f| f.check == "speaks ETSI 014" && f.ok),
        "{}",
        r.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_named() {
    let s = Setup::new();
    let sim = s.sim(good_server()).await;
    let mut spec = LeafSpec::client("sae-a", 2);
    spec.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
    spec.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    let (c, k) = s.issue("sae-a", spec);
    expect(
        &diagnose(&s.input(url(&sim), &c, &k)).await,
        Problem::ClientCertExpired,
        &["expired"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_not_matching_certificate_is_named() {
    let s = Setup::new();
    let (c, _) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    let (_, k_other) = s.issue("sae-b", LeafSpec::client("sae-b", 2));
    // No server needed: this is found before connecting.
    expect(
        &diagnose(&s.input("https://127.0.0.1:9".into(), &c, &k_other)).await,
        Problem::KeyMismatch,
        &["does not belong to the certificate"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_server_is_named() {
    let s = Setup::new();
    let (c, k) = s.issue("sae-a", LeafSpec::client("sae-a", 2));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut t, _)) = l.accept().await {
            let mut b = [0u8; 1024];
            let _ = t.read(&mut b).await;
            let _ = t
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
    });
    expect(
        &diagnose(&s.input(format!("https://127.0.0.1:{port}"), &c, &k)).await,
        Problem::PlainHttp,
        &["plain-HTTP"],
    );
    expect(
        &diagnose(&s.input(format!("http://127.0.0.1:{port}"), &c, &k)).await,
        Problem::PlainHttp,
        &["https://"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_server_not_speaking_014_is_named() {
    let d = certs_dir(&[]);
    let (u, _) = hostile_kme(d.path(), |_| http(200, "text/html", "<html>hello</html>")).await;
    let input = DoctorInput {
        url: u.replace("localhost", "127.0.0.1"),
        tls: tls_files(d.path(), "sae-a"),
        slave_sae: None,
        timeout: Duration::from_secs(3),
    };
    expect(
        &diagnose(&input).await,
        Problem::NotEtsi014,
        &["not ETSI 014 JSON", "text/html"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sae_nothing_listening_and_missing_files_are_named() {
    let s = Setup::new();
    let sim = s.sim(good_server()).await;
    let (c, k) = s.issue("sae-x", LeafSpec::client("sae-x", 2));
    expect(
        &diagnose(&s.input(url(&sim), &c, &k)).await,
        Problem::SaeRefused,
        &["refuses this SAE", "sae-x"],
    );

    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    expect(
        &diagnose(&s.input(format!("https://127.0.0.1:{port}"), &c, &k)).await,
        Problem::NotListening,
        &["nothing accepts connections"],
    );

    let mut input = s.input(url(&sim), &c, &k);
    input.tls.ca = s.dir.path().join("missing-ca.pem");
    expect(
        &diagnose(&input).await,
        Problem::FileUnreadable,
        &["missing-ca.pem"],
    );
}
