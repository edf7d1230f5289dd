//! `kme status|enc-keys|dec-keys`: the operator's view of a KME, JSON on stdout. Key material is
//! printed only with an explicit `--show-keys`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::client::{Key, KeyAvailability, KmeClient, KmeClientConfig};
use super::wire::KeyRequest;
use crate::certs::tls::TlsFiles;

/// How to reach and authenticate to the KME.
#[derive(Debug, clap::Args)]
pub struct KmeConn {
    /// KME base URL, e.g. https://127.0.0.1:8443 (/api/v1/keys is appended).
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
    /// Request timeout, seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
}

#[derive(Debug, clap::Subcommand)]
pub enum KmeCmd {
    /// GET {slave_SAE_ID}/status.
    Status {
        #[command(flatten)]
        conn: KmeConn,
        #[arg(long)]
        slave_sae: String,
    },
    /// Get keys as master: {slave_SAE_ID}/enc_keys (GET; POST with --post).
    EncKeys {
        #[command(flatten)]
        conn: KmeConn,
        #[arg(long)]
        slave_sae: String,
        /// Number of keys.
        #[arg(long, default_value_t = 1)]
        number: u32,
        /// Key size, bits (default: the KME's).
        #[arg(long)]
        size: Option<u32>,
        /// Use POST with a JSON key request instead of GET.
        #[arg(long)]
        post: bool,
        /// Print the key material (base64). Without it keys are never printed.
        #[arg(long)]
        show_keys: bool,
    },
    /// Get keys as slave by key_ID: {master_SAE_ID}/dec_keys (GET for one, POST for several).
    DecKeys {
        #[command(flatten)]
        conn: KmeConn,
        #[arg(long)]
        master_sae: String,
        /// key_ID (repeatable).
        #[arg(long = "key-id", required = true)]
        key_ids: Vec<Uuid>,
        /// Expected key size, bits (checked when given).
        #[arg(long)]
        size: Option<u32>,
        /// Print the key material (base64).
        #[arg(long)]
        show_keys: bool,
    },
}

fn client(c: &KmeConn) -> anyhow::Result<KmeClient> {
    let mut cfg = KmeClientConfig::new(
        c.url.clone(),
        TlsFiles {
            ca: c.ca.clone(),
            cert: c.cert.clone(),
            key: c.key.clone(),
        },
    );
    cfg.request_timeout = Duration::from_secs(c.timeout_s.max(1));
    Ok(KmeClient::new(&cfg)?)
}

fn keys_json(keys: &[Key], show: bool) -> serde_json::Value {
    let now = std::time::Instant::now();
    serde_json::Value::Array(
        keys.iter()
            .map(|k| {
                let mut o = serde_json::Map::new();
                o.insert("key_ID".into(), k.id.to_string().into());
                o.insert("size_bits".into(), (k.material.len() * 8).into());
                if let Some(d) = k.slave_deadline {
                    o.insert(
                        "slave_fetch_within_ms".into(),
                        (d.saturating_duration_since(now).as_millis() as u64).into(),
                    );
                }
                if show {
                    let b64 = Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(k.material.expose()),
                    );
                    o.insert("key".into(), b64.as_str().into());
                }
                serde_json::Value::Object(o)
            })
            .collect(),
    )
}

/// Runs a `kme` subcommand.
pub fn run(cmd: KmeCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async move {
        Ok::<_, anyhow::Error>(match cmd {
            KmeCmd::Status { conn, slave_sae } => {
                let s = client(&conn)?.status(&slave_sae).await?;
                let mut v = serde_json::to_value(&s.status)?;
                let avail = match s.availability {
                    KeyAvailability::Unknown => serde_json::Value::Null,
                    KeyAvailability::Unlimited => "unlimited".into(),
                    KeyAvailability::Within(d) => (d.as_millis() as u64).into(),
                };
                v["key_availability_ms"] = avail;
                v
            }
            KmeCmd::EncKeys {
                conn,
                slave_sae,
                number,
                size,
                post,
                show_keys,
            } => {
                let c = client(&conn)?;
                let keys = if post {
                    let req = KeyRequest {
                        number: Some(number),
                        size,
                        ..Default::default()
                    };
                    c.enc_keys_post(&slave_sae, &req).await?
                } else {
                    c.enc_keys(&slave_sae, number, size).await?
                };
                serde_json::json!({ "keys": keys_json(&keys, show_keys) })
            }
            KmeCmd::DecKeys {
                conn,
                master_sae,
                key_ids,
                size,
                show_keys,
            } => {
                let c = client(&conn)?;
                let keys = if key_ids.len() == 1 {
                    vec![c.dec_key(&master_sae, key_ids[0], size).await?]
                } else {
                    c.dec_keys(&master_sae, &key_ids, size).await?
                };
                serde_json::json!({ "keys": keys_json(&keys, show_keys) })
            }
        })
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
