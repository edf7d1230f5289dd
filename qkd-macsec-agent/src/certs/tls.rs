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

/// The rustls error somewhere in an error chain. io::Error needs unwrapping by hand: its
/// `source()` skips the error it wraps (and tokio-rustls nests io::Errors).
pub fn find_rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(r) = find_rustls_error(inner) {
                return Some(r);
            }
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Ca, LeafSpec};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn sae_identity_prefers_cn_then_san() {
        let ca = Ca::new("t", 1).unwrap();
        let with_cn = ca.issue(&LeafSpec::client("sae-7", 1)).unwrap();
        assert_eq!(
            sae_identity(&der(&with_cn.cert_pem)).as_deref(),
            Some("sae-7")
        );
        let mut spec = LeafSpec::client("", 1);
        spec.sans = vec!["sae-from-san".into()];
        let san_only = ca.issue(&spec).unwrap();
        assert_eq!(
            sae_identity(&der(&san_only.cert_pem)).as_deref(),
            Some("sae-from-san")
        );
        assert_eq!(sae_identity(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("qkd-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope.pem");
        let e = load_certs("CA certificate", &missing)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nope.pem") && e.contains("CA certificate"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        assert!(matches!(
            load_certs("c", &empty),
            Err(CertError::NoPem { .. })
        ));
        assert!(matches!(
            load_key("k", &empty),
            Err(CertError::NoPem { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
