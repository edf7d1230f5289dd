//! Certificates for the ETSI GS QKD 014 interface: creation (`certs init`), loading into rustls
//! ([`tls`]) and the `doctor kme` diagnostics ([`doctor`]). File names are documented in
//! docs/certificates.md and fixed in [`files`].

pub mod doctor;
pub mod tls;

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// What can go wrong loading or creating certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {what} file {path}: {source}; check the path and its permissions")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} holds no PEM {expected} block; give a PEM file (-----BEGIN {expected}-----)")]
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} file {path} is not valid PEM: {detail}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} from {path} rejected by TLS: {source}")]
    Tls {
        what: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot build a client-certificate verifier from CA file {path}: {detail}")]
    Verifier { path: PathBuf, detail: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to overwrite or choose another --out directory")]
    Exists { path: PathBuf },
    #[error("cannot create certificate {name}: {source}")]
    Generate { name: String, source: rcgen::Error },
}

/// File names written by `certs init` inside `--out` (see docs/certificates.md).
pub mod files {
    /// The CA certificate: give it to every KME and every SAE as `--ca`.
    pub const CA_CERT: &str = "ca.pem";
    /// The CA private key (0600); only needed to issue more certificates.
    pub const CA_KEY: &str = "ca.key";
    /// `<name>.pem` / `<name>.key` for each KME and SAE.
    pub fn cert(name: &str) -> String {
        format!("{name}.pem")
    }
    pub fn key(name: &str) -> String {
        format!("{name}.key")
    }
    /// The two simulated KMEs.
    pub const KME_A: &str = "kme-a";
    pub const KME_B: &str = "kme-b";
    /// The default SAEs (one attached to each KME).
    pub const SAE_A: &str = "sae-a";
    pub const SAE_B: &str = "sae-b";
}

/// Extended key usage of a leaf certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eku {
    ServerAuth,
    ClientAuth,
}

/// A certificate authority held in memory (certificate + key) that can issue leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: zeroize::Zeroizing<String>,
}

/// What a leaf certificate should say. Tests use the knobs to make deliberately broken ones.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject CN (for an SAE: its SAE ID).
    pub common_name: String,
    /// DNS names and IP addresses (IPs are recognised by parsing).
    pub sans: Vec<String>,
    pub ekus: Vec<Eku>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A server certificate valid from now for `days` days.
    pub fn server(name: &str, sans: &[String], days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: name.to_string(),
            sans: sans.to_vec(),
            ekus: vec![Eku::ServerAuth],
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days),
        }
    }

    /// A client (SAE) certificate valid from now for `days` days; the SAE ID is the CN and a
    /// DNS SAN.
    pub fn client(sae_id: &str, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: sae_id.to_string(),
            sans: vec![sae_id.to_string()],
            ekus: vec![Eku::ClientAuth],
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days),
        }
    }
}

/// A certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

fn gen_err(name: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate {
        name: name.to_string(),
        source,
    }
}

impl Ca {
    /// A new self-signed CA valid for `days` days.
    pub fn new(name: &str, days: i64) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(gen_err(name))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        let cert = params.self_signed(&key).map_err(gen_err(name))?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, CertError> {
        let name = spec.common_name.as_str();
        let key = KeyPair::generate().map_err(gen_err(name))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = spec
            .sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(gen_err(name))?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = spec
            .ekus
            .iter()
            .map(|e| match e {
                Eku::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
                Eku::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
            })
            .collect();
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(name))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// Options of `certs init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub out: PathBuf,
    /// Extra DNS names / IPs for both KME server certificates (besides localhost, 127.0.0.1, ::1).
    pub hosts: Vec<String>,
    /// SAE IDs to issue client certificates for; default sae-a and sae-b.
    pub saes: Vec<String>,
    /// Validity of every certificate, days.
    pub days: i64,
    /// Overwrite existing files.
    pub force: bool,
}

/// Writes a file; private keys get mode 0600 from the moment they exist.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    private: bool,
    force: bool,
) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let werr = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    if !force && path.exists() {
        return Err(CertError::Exists {
            path: path.to_path_buf(),
        });
    }
    let mode = if private { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    // An existing file keeps its old mode through open(); force the intended one.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(werr)?;
    f.write_all(contents).map_err(werr)?;
    f.sync_all().map_err(werr)
}

/// `certs init`: a CA, server certificates for kme-a and kme-b, client certificates for the SAEs.
/// Returns the paths written.
pub fn init(opts: &InitOptions) -> Result<Vec<PathBuf>, CertError> {
    std::fs::create_dir_all(&opts.out).map_err(|source| CertError::Write {
        path: opts.out.clone(),
        source,
    })?;
    let ca = Ca::new("qkd-macsec KME CA", opts.days)?;
    let mut written = Vec::new();
    let mut put = |name: String, data: &str, private: bool| -> Result<(), CertError> {
        let p = opts.out.join(name);
        write_file(&p, data.as_bytes(), private, opts.force)?;
        written.push(p);
        Ok(())
    };
    put(files::CA_CERT.into(), ca.cert_pem(), false)?;
    put(files::CA_KEY.into(), ca.key_pem(), true)?;
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in &opts.hosts {
        if !sans.contains(h) {
            sans.push(h.clone());
        }
    }
    for kme in [files::KME_A, files::KME_B] {
        let mut kme_sans = sans.clone();
        kme_sans.push(kme.to_string());
        let leaf = ca.issue(&LeafSpec::server(kme, &kme_sans, opts.days))?;
        put(files::cert(kme), &leaf.cert_pem, false)?;
        put(files::key(kme), &leaf.key_pem, true)?;
    }
    let default_saes = [files::SAE_A.to_string(), files::SAE_B.to_string()];
    let saes = if opts.saes.is_empty() {
        &default_saes[..]
    } else {
        &opts.saes[..]
    };
    for sae in saes {
        let leaf = ca.issue(&LeafSpec::client(sae, opts.days))?;
        put(files::cert(sae), &leaf.cert_pem, false)?;
        put(files::key(sae), &leaf.key_pem, true)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_documented_files_with_private_modes() {
        let dir = std::env::temp_dir().join(format!("qkd-certs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = InitOptions {
            out: dir.clone(),
            hosts: vec!["gw1.example".into()],
            saes: vec![],
            days: 30,
            force: false,
        };
        let written = init(&opts).unwrap();
        assert_eq!(written.len(), 10);
        for name in ["ca.key", "kme-a.key", "kme-b.key", "sae-a.key", "sae-b.key"] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let sae = tls::load_certs("c", &dir.join("sae-b.pem")).unwrap();
        assert_eq!(tls::sae_identity(&sae[0]).as_deref(), Some("sae-b"));
        let kme = tls::load_certs("c", &dir.join("kme-a.pem")).unwrap();
        let desc = doctor::describe_cert(kme[0].as_ref());
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "kme-a",
            "gw1.example",
            "serverAuth",
        ] {
            assert!(desc.contains(name), "{name} missing: {desc}");
        }
        assert!(doctor::describe_cert(sae[0].as_ref()).contains("clientAuth"));
        // A second run without --force must refuse rather than replace the CA under running KMEs.
        assert!(matches!(init(&opts), Err(CertError::Exists { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCmd {
    /// Create a CA, server certificates for kme-a and kme-b and client certificates for the SAEs.
    Init {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS name or IP for both KME certificates, besides localhost, 127.0.0.1 and ::1
        /// (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// SAE ID to issue a client certificate for (repeatable; default sae-a and sae-b).
        #[arg(long = "sae")]
        saes: Vec<String>,
        /// Validity of every certificate, days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a `certs` subcommand; prints the files written.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init {
            out,
            hosts,
            saes,
            days,
            force,
        } => {
            let written = init(&InitOptions {
                out,
                hosts,
                saes,
                days,
                force,
            })?;
            for p in written {
                println!("{}", p.display());
            }
            Ok(())
        }
    }
}
