//! Shared helpers of the etsi_* tests: certificate directories, an in-process simulator, clients,
//! a raw HTTPS requester for malformed requests, and a hostile KME.
#![allow(dead_code, reason = "each etsi_* test binary uses a different subset")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qkd_macsec_agent::certs::tls::{self, TlsFiles};
use qkd_macsec_agent::certs::{self, files, InitOptions};
use qkd_macsec_agent::etsi014::{KmeClient, KmeClientConfig, RetryPolicy};
use qkd_macsec_agent::kmesim::{KmeSim, SimConfig, SimTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "qkd-etsi-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `certs init` into a fresh directory, with extra SAEs.
pub fn certs_dir(saes: &[&str]) -> TempDir {
    let d = TempDir::new("certs");
    certs::init(&InitOptions {
        out: d.0.clone(),
        hosts: vec![],
        saes: saes.iter().map(|s| s.to_string()).collect(),
        days: 2,
        force: false,
    })
    .unwrap();
    d
}

pub fn tls_files(dir: &Path, sae: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join(files::CA_CERT),
        cert: dir.join(files::cert(sae)),
        key: dir.join(files::key(sae)),
    }
}

pub struct Sim {
    pub sim: KmeSim,
    pub certs: TempDir,
}

impl Sim {
    pub fn url_a(&self) -> String {
        format!("https://{}", self.sim.addr_a())
    }
    pub fn url_b(&self) -> String {
        format!("https://{}", self.sim.addr_b())
    }
    pub fn client_a(&self) -> KmeClient {
        client(&self.url_a(), self.certs.path(), files::SAE_A)
    }
    pub fn client_b(&self) -> KmeClient {
        client(&self.url_b(), self.certs.path(), files::SAE_B)
    }
}

/// Default config with a full pool (tests do not wait for key generation unless they say so).
pub fn test_config() -> SimConfig {
    SimConfig {
        prefill: true,
        ..SimConfig::default()
    }
}

pub async fn start_sim(cfg: SimConfig) -> Sim {
    let mut saes: Vec<&str> = Vec::new();
    for s in cfg.saes_a.iter().chain(cfg.saes_b.iter()) {
        saes.push(s.as_str());
    }
    // Also a certificate for an SAE no KME knows.
    saes.push("sae-stranger");
    let certs = certs_dir(&saes);
    let tls = SimTls::from_dir(certs.path()).unwrap();
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = KmeSim::start(cfg, tls, la, lb, Some(lc)).await.unwrap();
    Sim { sim, certs }
}

/// A client with quick retries so retry tests stay short.
pub fn client(url: &str, dir: &Path, sae: &str) -> KmeClient {
    KmeClient::new(&client_config(url, dir, sae)).unwrap()
}

pub fn client_config(url: &str, dir: &Path, sae: &str) -> KmeClientConfig {
    let mut cfg = KmeClientConfig::new(url, tls_files(dir, sae));
    cfg.retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    };
    cfg.request_timeout = Duration::from_secs(5);
    cfg
}

/// A raw HTTPS answer.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Raw {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
    /// The 014 error `message` of this answer (panics if there is none).
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {:?}", self.body))
            .to_string()
    }
}

/// Sends one raw HTTP/1.1 request over mTLS (as `sae`) and reads the whole answer.
pub async fn raw(
    addr: SocketAddr,
    dir: &Path,
    sae: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Raw {
    let cfg = tls::client_config(&tls_files(dir, sae)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Raw {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// A hostile "KME": real mTLS, but every request gets the canned raw HTTP answer chosen by
/// `answer(request_index)`. Returns its URL and a counter of requests seen.
pub async fn hostile_kme(
    dir: &Path,
    answer: impl Fn(u32) -> Vec<u8> + Send + Sync + 'static,
) -> (String, Arc<AtomicU32>) {
    let cfg = tls::server_config(&TlsFiles {
        ca: dir.join(files::CA_CERT),
        cert: dir.join(files::cert(files::KME_A)),
        key: dir.join(files::key(files::KME_A)),
    })
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU32::new(0));
    let answer = Arc::new(answer);
    let c2 = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let answer = answer.clone();
            let count = c2.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                // One request per connection: read the head (and a body, if announced).
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut tmp).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                let i = count.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(&answer(i)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("https://localhost:{}", addr.port()), count)
}

/// A raw HTTP/1.1 answer with a body.
pub fn http(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The built `qkd-macsec-agent` binary next to this test binary (fails loudly if absent).
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
        dir = dir.parent().unwrap().to_path_buf();
    }
    let bin = dir.join("qkd-macsec-agent");
    assert!(
        bin.is_file(),
        "agent binary {} not built; run `cargo build -p qkd-macsec-agent` first (cargo xtask test does)",
        bin.display()
    );
    bin
}
