//! Loading PEM files into rustls configurations for the ETSI 014 interface, shared by the client,
//! the KME simulator and `doctor`. One place decides the TLS policy: ring provider, TLS 1.3 and 1.2
//! only (rustls offers 1.3 first, so 1.3 wins whenever the peer has it), certificates always
//! verified, client certificates always required by the server side.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::CertError;

/// The crypto provider for every TLS endpoint of this crate (ring; no aws-lc-rs, no OpenSSL).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The only protocol versions offered or accepted: ETSI GS QKD 014 asks for TLS 1.2 or newer.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// All certificates in a PEM file (a chain or a CA bundle).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = zeroize::Zeroizing::new(read(what, path)?);
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "PRIVATE KEY",
        },
        other => CertError::BadPem {
            what,
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    })
}

/// A trust store holding every certificate of the CA file.
pub fn root_store(ca_path: &Path) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("CA certificate", ca_path)? {
        roots.add(cert).map_err(|source| CertError::Tls {
            what: "CA certificate",
            path: ca_path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// The files one side of the 014 interface needs.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA bundle that issued the peer's certificate.
    pub ca: std::path::PathBuf,
    /// Own certificate (chain), PEM.
    pub cert: std::path::PathBuf,
    /// Own private key, PEM.
    pub key: std::path::PathBuf,
}

/// The SAE side: verifies the KME against `files.ca`, presents `files.cert`.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, CertError> {
    let roots = root_store(&files.ca)?;
    let chain = load_certs("client certificate", &files.cert)?;
    let key = load_key("client private key", &files.key)?;
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| CertError::Tls {
            what: "TLS versions",
            path: files.cert.clone(),
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| CertError::Tls {
            what: "client certificate and key",
            path: files.cert.clone(),
            source,
        })
}

/// The KME side: presents `files.cert`, REQUIRES a client certificate issued by `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, CertError> {
    let roots = Arc::new(root_store(&files.ca)?);
    let chain = load_certs("server certificate", &files.cert)?;
    let key = load_key("server private key", &files.key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| CertError::Verifier {
            path: files.ca.clone(),
            detail: e.to_string(),
        })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| CertError::Tls {
            what: "TLS versions",
            path: files.cert.clone(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| CertError::Tls {
            what: "server certificate and key",
            path: files.cert.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The SAE ID a client certificate stands for: the subject CN, else the first DNS or URI SAN.
pub fn sae_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        if !cn.is_empty() {
            return Some(cn.to_string());
        }
    }
    let san = parsed.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(s)
        | x509_parser::extensions::GeneralName::URI(s) => Some((*s).to_string()),
        _ => None,
    })
}
