//! `doctor kme`: connects to a KME the way the agent would and explains each failure in plain
//! words: unreadable files, a key that does not match its certificate, a client certificate that is
//! expired or lacks clientAuth, nothing listening, plain HTTP instead of TLS, a server certificate
//! from another CA, for another name, expired or without serverAuth, a client certificate the KME
//! refuses, an SAE the KME does not know, and a server that does not speak ETSI 014.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

use super::tls::{self, TlsFiles};
use super::CertError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
use crate::etsi014::wire::{ErrorBody, Status};

/// What `doctor kme` found wrong (None in [`Report::problem`]: everything works).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    BadUrl,
    FileUnreadable,
    KeyMismatch,
    ClientCertExpired,
    ClientCertWrongEku,
    NotListening,
    Timeout,
    PlainHttp,
    WrongCa,
    NameMismatch,
    ServerCertExpired,
    ServerCertWrongEku,
    ClientCertRefused,
    SaeRefused,
    NotEtsi014,
    TlsOther,
}

/// One step of the diagnosis.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The whole diagnosis.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub findings: Vec<Finding>,
    /// The first problem, the one to fix first.
    pub problem: Option<Problem>,
    /// What to do about it, in plain words.
    pub advice: Option<String>,
}

impl Report {
    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.findings.push(Finding {
            check,
            ok: true,
            detail: detail.into(),
        });
    }
    fn fail(&mut self, check: &'static str, p: Problem, detail: impl Into<String>) {
        let detail = detail.into();
        self.findings.push(Finding {
            check,
            ok: false,
            detail: detail.clone(),
        });
        if self.problem.is_none() {
            self.problem = Some(p);
            self.advice = Some(detail);
        }
    }

    /// Human-readable text.
    pub fn render(&self) -> String {
        let mut s = format!("doctor kme {}\n", self.url);
        for f in &self.findings {
            s.push_str(&format!(
                "  [{}] {}: {}\n",
                if f.ok { " ok " } else { "FAIL" },
                f.check,
                f.detail
            ));
        }
        match (&self.problem, &self.advice) {
            (Some(p), Some(a)) => s.push_str(&format!("PROBLEM ({p:?}): {a}\n")),
            _ => s.push_str("All checks passed: this SAE can use the KME.\n"),
        }
        s
    }
}

/// Inputs of `doctor kme`.
#[derive(Debug, Clone)]
pub struct DoctorInput {
    pub url: String,
    pub tls: TlsFiles,
    /// SAE ID to ask the status for; without it doctor probes with a dummy ID and accepts any
    /// 014 JSON answer.
    pub slave_sae: Option<String>,
    pub timeout: Duration,
}

/// Records the certificate the server presented, then lets the standard WebPKI verifier decide.
/// Verification is never weakened; the record only lets doctor describe a certificate it rejected.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *lock(&self.seen) = Some(end_entity.clone().into_owned());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A short description of a certificate: subject, names, issuer, validity, EKU.
pub fn describe_cert(der: &[u8]) -> String {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else {
        return "unparseable certificate".into();
    };
    let names: Vec<String> = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string(),
                        16 => {
                            let mut a = [0u8; 16];
                            a.copy_from_slice(ip);
                            std::net::Ipv6Addr::from(a).to_string()
                        }
                        _ => format!("{ip:?}"),
                    },
                    other => format!("{other}"),
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "subject \"{}\", names [{}], issuer \"{}\", valid {} to {}, EKU [{}]",
        c.subject(),
        names.join(", "),
        c.issuer(),
        c.validity().not_before,
        c.validity().not_after,
        eku_names(&c).join(", ")
    )
}

fn eku_names(c: &x509_parser::certificate::X509Certificate<'_>) -> Vec<&'static str> {
    match c.extended_key_usage() {
        Ok(Some(e)) => {
            let e = e.value;
            let mut v = Vec::new();
            if e.any {
                v.push("any");
            }
            if e.server_auth {
                v.push("serverAuth");
            }
            if e.client_auth {
                v.push("clientAuth");
            }
            if v.is_empty() {
                v.push("(none usable for TLS)");
            }
            v
        }
        _ => vec!["(no EKU extension: any)"],
    }
}

fn refused_alert(a: &AlertDescription) -> bool {
    matches!(
        a,
        AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
    )
}

fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    tls::find_rustls_error(e)
}

/// Runs the diagnosis. Never fails: every problem is a finding.
pub async fn diagnose(input: &DoctorInput) -> Report {
    let mut r = Report {
        url: input.url.clone(),
        findings: Vec::new(),
        problem: None,
        advice: None,
    };
    let url = match reqwest::Url::parse(&input.url) {
        Ok(u) if u.scheme() == "https" && u.host_str().is_some() => u,
        Ok(u) if u.scheme() == "http" => {
            r.fail(
                "url",
                Problem::PlainHttp,
                format!(
                    "{} uses plain http; ETSI 014 requires TLS: use https://",
                    input.url
                ),
            );
            return r;
        }
        _ => {
            r.fail(
                "url",
                Problem::BadUrl,
                format!("{:?} is not an https://host[:port] URL", input.url),
            );
            return r;
        }
    };
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = url.port().unwrap_or(443);
    r.ok("url", format!("host {host}, port {port}"));

    // Local files first: most certificate trouble is visible without the network.
    let roots = match tls::root_store(&input.tls.ca) {
        Ok(roots) => {
            r.ok(
                "ca file",
                format!(
                    "{} certificate(s) from {}",
                    roots.len(),
                    input.tls.ca.display()
                ),
            );
            roots
        }
        Err(e) => {
            r.fail("ca file", Problem::FileUnreadable, e.to_string());
            return r;
        }
    };
    let chain = match tls::load_certs("client certificate", &input.tls.cert) {
        Ok(c) => c,
        Err(e) => {
            r.fail("client certificate", Problem::FileUnreadable, e.to_string());
            return r;
        }
    };
    let key = match tls::load_key("client private key", &input.tls.key) {
        Ok(k) => k,
        Err(e) => {
            r.fail("client key", Problem::FileUnreadable, e.to_string());
            return r;
        }
    };
    let client_desc = describe_cert(chain[0].as_ref());
    let mut local_problem = false;
    if let Ok((_, c)) = x509_parser::parse_x509_certificate(chain[0].as_ref()) {
        if !c.validity().is_valid() {
            local_problem = true;
            r.fail(
                "client certificate validity",
                Problem::ClientCertExpired,
                format!(
                    "your client certificate {} is expired or not yet valid ({client_desc}); the KME will refuse it: issue a new one",
                    input.tls.cert.display()
                ),
            );
        }
        let ekus = eku_names(&c);
        if !ekus
            .iter()
            .any(|e| matches!(*e, "clientAuth" | "any" | "(no EKU extension: any)"))
        {
            local_problem = true;
            r.fail(
                "client certificate EKU",
                Problem::ClientCertWrongEku,
                format!(
                    "your client certificate {} lacks extended key usage clientAuth (it has [{}]); a KME verifying client certificates refuses it: reissue it with EKU clientAuth",
                    input.tls.cert.display(),
                    ekus.join(", ")
                ),
            );
        }
        if !local_problem {
            r.ok("client certificate", client_desc.clone());
        }
    }
    let verifier =
        match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), tls::provider()).build()
        {
            Ok(v) => v,
            Err(e) => {
                r.fail(
                    "ca file",
                    Problem::FileUnreadable,
                    format!("CA file {} unusable: {e}", input.tls.ca.display()),
                );
                return r;
            }
        };
    let recording = Arc::new(Recording {
        inner: verifier,
        seen: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::VERSIONS)
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(recording.clone())
                .with_client_auth_cert(chain.clone(), key)
        });
    let config = match config {
        Ok(Ok(c)) => c,
        Ok(Err(rustls::Error::InconsistentKeys(_))) => {
            r.fail(
                "client key matches certificate",
                Problem::KeyMismatch,
                format!(
                    "the private key {} does not belong to the certificate {}: give the key that was generated with this certificate",
                    input.tls.key.display(),
                    input.tls.cert.display()
                ),
            );
            return r;
        }
        Ok(Err(e)) | Err(e) => {
            r.fail(
                "client key",
                Problem::FileUnreadable,
                CertError::Tls {
                    what: "client certificate and key",
                    path: input.tls.cert.clone(),
                    source: e,
                }
                .to_string(),
            );
            return r;
        }
    };
    r.ok(
        "client key matches certificate",
        input.tls.key.display().to_string(),
    );

    // TCP.
    let addr = format!(
        "{}:{port}",
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        }
    );
    let tcp = match tokio::time::timeout(input.timeout, tokio::net::TcpStream::connect(&addr)).await
    {
        Ok(Ok(s)) => {
            r.ok("tcp connect", addr.clone());
            s
        }
        Ok(Err(e)) => {
            r.fail("tcp connect", Problem::NotListening, format!("nothing accepts connections at {addr} ({e}): is the KME running, and is the port right?"));
            return r;
        }
        Err(_) => {
            r.fail(
                "tcp connect",
                Problem::Timeout,
                format!(
                    "no answer from {addr} within {:?}: host down or a firewall drops the packets",
                    input.timeout
                ),
            );
            return r;
        }
    };

    // TLS.
    let server_name = match ServerName::try_from(host.clone()) {
        Ok(n) => n,
        Err(_) => {
            r.fail(
                "url",
                Problem::BadUrl,
                format!("{host:?} is not a valid TLS server name"),
            );
            return r;
        }
    };
    let seen_desc = |rec: &Recording| {
        lock(&rec.seen)
            .as_ref()
            .map(|c| describe_cert(c.as_ref()))
            .unwrap_or_else(|| "(none received)".into())
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = match tokio::time::timeout(input.timeout, connector.connect(server_name, tcp)).await {
        Err(_) => {
            r.fail("tls handshake", Problem::Timeout, format!("TLS handshake with {addr} did not finish within {:?}: the server may not speak TLS on this port", input.timeout));
            return r;
        }
        Ok(Ok(t)) => {
            let version = t
                .get_ref()
                .1
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            r.ok(
                "tls handshake",
                format!(
                    "{version}, server certificate verified: {}",
                    seen_desc(&recording)
                ),
            );
            t
        }
        Ok(Err(e)) => {
            let server = seen_desc(&recording);
            let ca = input.tls.ca.display();
            let (p, msg) = match rustls_error(&e) {
                Some(rustls::Error::InvalidCertificate(ce)) => match ce {
                    CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                        Problem::WrongCa,
                        format!("the KME's certificate was not issued by the CA in {ca}: get the CA certificate that signed the KME's certificate. KME certificate: {server}"),
                    ),
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                        Problem::NameMismatch,
                        format!("the KME's certificate is not valid for the name {host:?} in the URL: connect with a name the certificate lists, or reissue it with that name. KME certificate: {server}"),
                    ),
                    CertificateError::Expired | CertificateError::ExpiredContext { .. } | CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                        Problem::ServerCertExpired,
                        format!("the KME's certificate is expired or not yet valid (check also this host's clock): renew the KME certificate. KME certificate: {server}"),
                    ),
                    CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => (
                        Problem::ServerCertWrongEku,
                        format!("the KME's certificate is not allowed for TLS servers (extended key usage lacks serverAuth): reissue it with EKU serverAuth. KME certificate: {server}"),
                    ),
                    other => (Problem::TlsOther, format!("the KME's certificate was rejected: {other:?}. KME certificate: {server}")),
                },
                Some(rustls::Error::InvalidMessage(_)) | Some(rustls::Error::InappropriateMessage { .. }) => (
                    Problem::PlainHttp,
                    format!("{addr} did not answer with TLS (its first bytes are not a TLS record): it is probably a plain-HTTP server; ETSI 014 needs HTTPS with client certificates"),
                ),
                Some(rustls::Error::AlertReceived(a)) if refused_alert(a) => (
                    Problem::ClientCertRefused,
                    format!("the KME refused our client certificate (TLS alert {a:?}): it must be issued by a CA the KME trusts, be valid and have EKU clientAuth. Our certificate: {client_desc}"),
                ),
                Some(other) => (Problem::TlsOther, format!("TLS handshake failed: {other}")),
                None if e.kind() == std::io::ErrorKind::UnexpectedEof || e.kind() == std::io::ErrorKind::ConnectionReset => (
                    Problem::ClientCertRefused,
                    format!("the KME closed the connection during the TLS handshake ({e}): it most likely refused our client certificate ({client_desc}) or does not accept TLS here"),
                ),
                None => (Problem::TlsOther, format!("TLS handshake failed: {e}")),
            };
            r.fail("tls handshake", p, msg);
            return r;
        }
    };

    // HTTP: in TLS 1.3 the KME judges our certificate after the handshake, so a refusal shows up
    // here, as an alert on the first read.
    let slave = input
        .slave_sae
        .clone()
        .unwrap_or_else(|| "doctor-probe".into());
    let probe = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("/api/v1/keys/{slave}/status"))
            .header("host", host.as_str())
            .header("accept", "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| DoctorHttpError::Other(e.to_string()))?;
        let resp = sender.send_request(req).await?;
        let code = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map_err(|e| DoctorHttpError::Other(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok::<_, DoctorHttpError>((code, ct, body))
    };
    let (code, ct, body) = match tokio::time::timeout(input.timeout, probe).await {
        Err(_) => {
            r.fail(
                "014 status request",
                Problem::Timeout,
                format!("no HTTP answer within {:?}", input.timeout),
            );
            return r;
        }
        Ok(Err(e)) => {
            let rustls_err = match &e {
                DoctorHttpError::Hyper(h) => tls::find_rustls_error(h),
                DoctorHttpError::Other(_) => None,
            };
            match rustls_err {
                Some(rustls::Error::AlertReceived(a)) if refused_alert(a) => {
                    if !local_problem {
                        r.fail(
                            "client certificate accepted",
                            Problem::ClientCertRefused,
                            format!("the KME refused our client certificate (TLS alert {a:?}): it must be issued by a CA the KME trusts, be valid and have EKU clientAuth. Our certificate: {client_desc}"),
                        );
                    }
                }
                _ => {
                    let text = match &e {
                        DoctorHttpError::Hyper(h) => error_chain(h),
                        DoctorHttpError::Other(s) => s.clone(),
                    };
                    if !local_problem {
                        r.fail(
                            "014 status request",
                            Problem::ClientCertRefused,
                            format!("the connection broke before any HTTP answer ({text}); a KME usually does this when it refuses the client certificate ({client_desc})"),
                        );
                    }
                }
            }
            return r;
        }
        Ok(Ok(x)) => x,
    };
    let is_json = ct
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        r.fail(
            "speaks ETSI 014",
            Problem::NotEtsi014,
            format!("GET /api/v1/keys/{slave}/status answered HTTP {code} with content type {ct:?}, not ETSI 014 JSON: is the URL the KME's 014 interface?"),
        );
        return r;
    }
    if code == hyper::StatusCode::OK {
        match serde_json::from_slice::<Status>(&body) {
            Ok(s) => r.ok(
                "speaks ETSI 014",
                format!("status: source_KME_ID {}, target_KME_ID {}, master_SAE_ID {}, {} keys stored, key size {} bits", s.source_kme_id, s.target_kme_id, s.master_sae_id, s.stored_key_count, s.key_size),
            ),
            Err(e) => r.fail(
                "speaks ETSI 014",
                Problem::NotEtsi014,
                format!("the status answer is JSON but not an ETSI 014 Status object ({e})"),
            ),
        }
        return r;
    }
    let message = serde_json::from_slice::<ErrorBody>(&body)
        .ok()
        .map(|e| e.message);
    match (code.as_u16(), message) {
        (401, Some(m)) => r.fail(
            "SAE accepted",
            Problem::SaeRefused,
            format!("TLS works, but the KME refuses this SAE (401: {m}); the SAE ID comes from the client certificate's CN/SAN ({client_desc}): register it at the KME or use the right certificate"),
        ),
        (_, Some(m)) if input.slave_sae.is_none() => r.ok(
            "speaks ETSI 014",
            format!("answered the probe with HTTP {code} and a 014 error ({m}); pass --slave-sae to check a real status"),
        ),
        (_, Some(m)) => r.fail(
            "status",
            Problem::NotEtsi014,
            format!("the KME speaks 014 but refused the status request for slave SAE {slave}: HTTP {code}: {m}"),
        ),
        (_, None) => r.fail(
            "speaks ETSI 014",
            Problem::NotEtsi014,
            format!("answered HTTP {code} with JSON that is not an ETSI 014 error object"),
        ),
    }
    r
}

#[derive(Debug)]
enum DoctorHttpError {
    Hyper(hyper::Error),
    Other(String),
}

impl From<hyper::Error> for DoctorHttpError {
    fn from(e: hyper::Error) -> Self {
        Self::Hyper(e)
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// CLI arguments of `doctor kme`.
#[derive(Debug, clap::Args)]
pub struct DoctorKmeArgs {
    /// KME base URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "QKD_KME_URL")]
    pub url: String,
    /// CA certificate (PEM) that issued the KME's certificate.
    #[arg(long, env = "QKD_KME_CA")]
    pub ca: PathBuf,
    /// This SAE's client certificate (PEM).
    #[arg(long, env = "QKD_KME_CERT")]
    pub cert: PathBuf,
    /// This SAE's private key (PEM).
    #[arg(long, env = "QKD_KME_KEY")]
    pub key: PathBuf,
    /// Slave SAE ID for the status request (default: a probe ID; any 014 answer counts).
    #[arg(long)]
    pub slave_sae: Option<String>,
    /// Timeout for each step, seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout_s: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `doctor kme`: prints the report; Ok(false) when a problem was found.
pub fn run(args: DoctorKmeArgs) -> anyhow::Result<bool> {
    let input = DoctorInput {
        url: args.url,
        tls: TlsFiles {
            ca: args.ca,
            cert: args.cert,
            key: args.key,
        },
        slave_sae: args.slave_sae,
        timeout: Duration::from_secs(args.timeout_s.max(1)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(diagnose(&input));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.problem.is_none())
}
