//! The ETSI GS QKD 014 client (an SAE talking to its KME over mutual TLS).
//!
//! Policy: TLS 1.3/1.2 only, server certificate verified against the configured CA, client
//! certificate always presented, no switch to turn verification off. One pooled HTTP/1.1 client
//! per KME (keep-alive connection reuse). Bounded connect and request timeouts, bounded response
//! bodies. Retries with exponential backoff on 503 and on transport failures (connect, reset,
//! timeout), never on 400/401 or on a malformed answer. Nothing with key material reaches an error
//! message or Debug output.
//!
//! # Where a key's bytes travel, and what wipes them
//!
//! A 200 answer to enc_keys/dec_keys holds the keys in base64 inside JSON. On its way in:
//!
//! 1. **TLS records** (rustls 0.23): the ciphertext is read into the connection's deframer buffer
//!    and decrypted there in place; the plaintext is then copied into a received-plaintext chunk
//!    (one `Vec` per record). The chunk is freed once read; the deframer buffer lives as long as
//!    the connection and keeps the decrypted bytes until later records overwrite them.
//! 2. **hyper's read buffer** (a `BytesMut`, 8 KiB and up, one per connection): tokio-rustls
//!    copies the plaintext there. The body chunks [`reqwest::Response::chunk`] hands us are views
//!    of that same allocation (`split_to(..).freeze()`), so [`wipe_bytes`] almost never holds the
//!    only reference and cannot wipe them; the bytes stay until hyper reuses the buffer for the
//!    next answer or frees it when the pooled connection closes (idle for 60 s, or an error).
//! 3. **The body buffer**: one zeroizing buffer, pre-sized from Content-Length (grown by copying,
//!    with the old copy wiped, only for a chunked answer), wiped when decoding ends.
//! 4. **JSON parsing** (serde_json): the key strings are borrowed from the body buffer, so no copy
//!    is made, unless the KME escaped a character in them (e.g. `\/`); then serde_json unescapes
//!    into its scratch buffer (freed when parsing ends) and we get an owned copy that is wiped on
//!    drop ([`KeyText`]).
//! 5. **base64 decoding** writes straight into the [`SecretBytes`] the key lives in from then on
//!    (wiped on drop, its spare capacity included).
//!
//! Wiped by our code: 3, 4's owned copy, 5, and a body chunk in the rare case we hold its only
//! reference. Wiped when freed, by the agent binary's allocator ([`crate::zalloc`]): 1's chunks
//! at once, serde_json's scratch buffer at the end of parsing, 1's deframer buffer and 2's read
//! buffer when the connection closes or they are reallocated. Not wiped until reused: 1's
//! deframer buffer and 2's read buffer while the pooled connection lives, and whatever the
//! parsers left on the stack or in registers. `run` keeps all of it out of core dumps and swap
//! ([`crate::privs::protect_key_memory`]).
//!
//! Retrying enc_keys after a transport failure may make the KME issue keys that the caller never
//! sees; they simply expire unused at the KME, which is safe. Retrying dec_keys after the KME
//! already delivered (and forgot) the key yields a 400 "unknown key_ID", reported as such.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use super::wire::{self, ErrorBody, KeyIdEntry, KeyIds, KeyRequest, Status};
use crate::certs::tls::{self, TlsFiles};
use crate::certs::CertError;
use crate::secret::SecretBytes;

/// What a 014 call can fail with. No variant ever carries key material.
#[derive(Debug, thiserror::Error)]
pub enum Etsi014Error {
    #[error("KME client TLS setup: {0}")]
    Tls(#[from] CertError),
    #[error("invalid KME URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("KME {url} rejected the request as invalid (400): {message}{details}")]
    BadRequest {
        url: String,
        message: String,
        details: String,
    },
    #[error("KME {url} refused this SAE (401: not an SAE the keys were issued to, or unknown SAE): {message}{details}")]
    Unauthorized {
        url: String,
        message: String,
        details: String,
    },
    #[error("KME {url} unavailable (503) after {attempts} attempt(s): {message}{details}")]
    Unavailable {
        url: String,
        attempts: u32,
        message: String,
        details: String,
    },
    #[error("KME {url} answered HTTP {status}: {message}")]
    UnexpectedStatus {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot talk to KME {url} after {attempts} attempt(s): {detail}")]
    Transport {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("TLS with KME {url} failed: {detail}; check the CA file, the KME's certificate and this SAE's certificate (`qkd-macsec-agent doctor kme` explains)")]
    Handshake { url: String, detail: String },
    #[error(
        "KME {url} answered with content type {content_type:?}; ETSI 014 requires application/json"
    )]
    ContentType { url: String, content_type: String },
    #[error("KME {url} answer is larger than the {limit}-byte limit; refusing it")]
    BodyTooLarge { url: String, limit: usize },
    #[error("KME {url} answer is not valid ETSI 014 JSON ({what}): {detail}")]
    Malformed {
        url: String,
        what: &'static str,
        detail: String,
    },
    #[error("KME {url} returned {got} key(s) but {expected} were requested")]
    WrongKeyCount {
        url: String,
        expected: usize,
        got: usize,
    },
    #[error("KME {url} returned key_ID {key_id} more than once")]
    DuplicateKeyId { url: String, key_id: String },
    #[error("KME {url} did not return the requested key_ID {key_id}")]
    MissingKeyId { url: String, key_id: String },
    #[error("KME {url} returned key_ID {key_id}, which was not requested")]
    UnexpectedKeyId { url: String, key_id: String },
    #[error("KME {url} returned key_ID {key_id:?}, which is not a UUID as ETSI 014 requires")]
    BadKeyId { url: String, key_id: String },
    #[error(
        "KME {url} returned the key for key_ID {key_id} in invalid base64 (RFC 4648 required)"
    )]
    BadBase64 { url: String, key_id: String },
    #[error("KME {url} returned {got_bits} bits for key_ID {key_id}, but {expected_bits} bits were requested")]
    WrongKeySize {
        url: String,
        key_id: String,
        expected_bits: u32,
        got_bits: usize,
    },
}

impl Etsi014Error {
    /// True for failures a later attempt may not have (503, transport).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Transport { .. })
    }
}

/// Retry policy for 503 and transport failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = no retry).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Client configuration. Defaults: connect timeout 3 s, request timeout 10 s, body limit 1 MiB,
/// [`RetryPolicy::default`].
#[derive(Debug, Clone)]
pub struct KmeClientConfig {
    /// `https://host:port` (the `/api/v1/keys` prefix is added when absent).
    pub url: String,
    pub tls: TlsFiles,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub retry: RetryPolicy,
}

impl KmeClientConfig {
    pub fn new(url: impl Into<String>, tls: TlsFiles) -> Self {
        Self {
            url: url.into(),
            tls,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 1 << 20,
            retry: RetryPolicy::default(),
        }
    }
}

/// How long the slave side can still fetch a key after the master fetched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAvailability {
    /// The KME does not say (ETSI 014 has no field for it); assume it is short.
    Unknown,
    /// The KME keeps keys until the slave fetches them.
    Unlimited,
    /// The KME drops a key this long after the master fetched it.
    Within(Duration),
}

/// A KME's status, with this project's extensions decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct KmeStatus {
    pub status: Status,
    pub availability: KeyAvailability,
}

/// A key from the KME. Debug shows only the ID and the length.
#[derive(Debug)]
pub struct Key {
    pub id: Uuid,
    pub material: SecretBytes,
    /// From the `qkd_macsec_expires_in_ms` key extension (enc_keys only): the instant after which
    /// the slave can no longer fetch this key. None when the KME does not say.
    pub slave_deadline: Option<Instant>,
}

/// An ETSI 014 client bound to one KME. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct KmeClient {
    http: reqwest::Client,
    base: String,
    max_body: usize,
    retry: RetryPolicy,
}

impl std::fmt::Debug for KmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmeClient")
            .field("base", &self.base)
            .finish()
    }
}

/// Percent-encodes an SAE ID for a path segment (RFC 3986 unreserved characters pass).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The parts of a key container (clause 6.3) the client reads, borrowed from the body (the
/// simulator serialises [`wire::KeyContainer`]). Unknown fields are ignored, as there.
#[derive(serde::Deserialize)]
struct KeyContainerIn<'a> {
    #[serde(borrow)]
    keys: Vec<KeyEntryIn<'a>>,
}

#[derive(serde::Deserialize)]
struct KeyEntryIn<'a> {
    #[serde(rename = "key_ID", borrow)]
    key_id: Cow<'a, str>,
    #[serde(borrow)]
    key: KeyText<'a>,
    #[serde(default)]
    key_extension: Option<serde_json::Value>,
}

/// A key's base64 text: a view of the body buffer when the JSON string has no escape sequence
/// (nothing copied), else serde_json's unescaped copy, which is wiped on drop.
#[derive(serde::Deserialize)]
#[serde(transparent)]
struct KeyText<'a>(#[serde(borrow)] Cow<'a, str>);

impl Drop for KeyText<'_> {
    fn drop(&mut self) {
        if let Cow::Owned(s) = &mut self.0 {
            s.zeroize();
        }
    }
}

/// A growable buffer that never leaves a stale copy of its contents behind when it grows.
struct WipingBuf(Zeroizing<Vec<u8>>);

impl WipingBuf {
    fn with_capacity(n: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(n)))
    }
    fn extend(&mut self, data: &[u8]) {
        let need = self.0.len() + data.len();
        if need > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(self.0.capacity() * 2)));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger; // the old allocation is zeroized on drop
        }
        self.0.extend_from_slice(data);
    }
}

/// A serde_json error reduced to its position: serde_json puts offending values into its
/// messages, and a 200 answer's values can be keys.
fn sanitized(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong field type or missing field",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

fn details_text(d: &Option<Vec<serde_json::Value>>) -> String {
    match d {
        Some(v) if !v.is_empty() => {
            let mut s = serde_json::to_string(v).unwrap_or_default();
            if s.len() > 512 {
                let mut cut = 512;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str("...");
            }
            format!(" (details: {s})")
        }
        _ => String::new(),
    }
}

enum Attempt {
    Done(Zeroizing<Vec<u8>>),
    Retry(Etsi014Error),
}

impl KmeClient {
    /// Builds the client; fails if the certificate files are unusable or the URL is not https.
    pub fn new(cfg: &KmeClientConfig) -> Result<Self, Etsi014Error> {
        let parsed = reqwest::Url::parse(&cfg.url).map_err(|e| Etsi014Error::BadUrl {
            url: cfg.url.clone(),
            reason: e.to_string(),
        })?;
        if parsed.scheme() != "https" {
            return Err(Etsi014Error::BadUrl {
                url: cfg.url.clone(),
                reason: "ETSI 014 runs over TLS: use an https:// URL".into(),
            });
        }
        let mut base = cfg.url.trim_end_matches('/').to_string();
        if !base.ends_with("/api/v1/keys") {
            base.push_str("/api/v1/keys");
        }
        let tls = tls::client_config(&cfg.tls)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .no_proxy()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Etsi014Error::Client(e.to_string()))?;
        Ok(Self {
            http,
            base,
            max_body: cfg.max_body_bytes,
            retry: cfg.retry.clone(),
        })
    }

    /// The `.../api/v1/keys` base this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, sae: &str, op: &str) -> String {
        format!("{}/{}/{}", self.base, encode_segment(sae), op)
    }

    /// `GET {slave_SAE_ID}/status`.
    pub async fn status(&self, slave_sae_id: &str) -> Result<KmeStatus, Etsi014Error> {
        let url = self.url(slave_sae_id, "status");
        let body = self.call(Method::GET, &url, None).await?;
        decode_status(&url, &body)
    }

    /// `GET {slave_SAE_ID}/enc_keys?number=&size=`. `size` in bits; None = the KME's default.
    pub async fn enc_keys(
        &self,
        slave_sae_id: &str,
        number: u32,
        size_bits: Option<u32>,
    ) -> Result<Vec<Key>, Etsi014Error> {
        check_request(number, size_bits)?;
        let mut url = format!("{}?number={number}", self.url(slave_sae_id, "enc_keys"));
        if let Some(s) = size_bits {
            url.push_str(&format!("&size={s}"));
        }
        let sent = Instant::now();
        let body = self.call(Method::GET, &url, None).await?;
        decode_key_container(&url, body, sent, Expect::Count(number as usize), size_bits)
    }

    /// `POST {slave_SAE_ID}/enc_keys` with a full key request.
    pub async fn enc_keys_post(
        &self,
        slave_sae_id: &str,
        request: &KeyRequest,
    ) -> Result<Vec<Key>, Etsi014Error> {
        let number = request.number.unwrap_or(1);
        check_request(number, request.size)?;
        let url = self.url(slave_sae_id, "enc_keys");
        let json = serde_json::to_vec(request)
            .map_err(|e| Etsi014Error::InvalidRequest(format!("cannot encode request: {e}")))?;
        let sent = Instant::now();
        let body = self.call(Method::POST, &url, Some(json)).await?;
        decode_key_container(
            &url,
            body,
            sent,
            Expect::Count(number as usize),
            request.size,
        )
    }

    /// `GET {master_SAE_ID}/dec_keys?key_ID=`. `size_bits`: the size the master requested, if
    /// known, to check the answer.
    pub async fn dec_key(
        &self,
        master_sae_id: &str,
        key_id: Uuid,
        size_bits: Option<u32>,
    ) -> Result<Key, Etsi014Error> {
        let url = format!(
            "{}?key_ID={}",
            self.url(master_sae_id, "dec_keys"),
            key_id.hyphenated()
        );
        let sent = Instant::now();
        let body = self.call(Method::GET, &url, None).await?;
        let mut keys = decode_key_container(&url, body, sent, Expect::Ids(&[key_id]), size_bits)?;
        Ok(keys.remove(0))
    }

    /// `POST {master_SAE_ID}/dec_keys` with several key IDs; the answer must hold exactly them.
    pub async fn dec_keys(
        &self,
        master_sae_id: &str,
        key_ids: &[Uuid],
        size_bits: Option<u32>,
    ) -> Result<Vec<Key>, Etsi014Error> {
        if key_ids.is_empty() {
            return Err(Etsi014Error::InvalidRequest(
                "dec_keys needs at least one key_ID".into(),
            ));
        }
        let mut seen = HashSet::new();
        for id in key_ids {
            if !seen.insert(id) {
                return Err(Etsi014Error::InvalidRequest(format!(
                    "key_ID {id} given twice"
                )));
            }
        }
        let req = KeyIds {
            key_ids: key_ids
                .iter()
                .map(|id| KeyIdEntry {
                    key_id: id.hyphenated().to_string(),
                    key_id_extension: None,
                })
                .collect(),
            key_ids_extension: None,
        };
        let url = self.url(master_sae_id, "dec_keys");
        let json = serde_json::to_vec(&req)
            .map_err(|e| Etsi014Error::InvalidRequest(format!("cannot encode request: {e}")))?;
        let sent = Instant::now();
        let body = self.call(Method::POST, &url, Some(json)).await?;
        decode_key_container(&url, body, sent, Expect::Ids(key_ids), size_bits)
    }

    /// Runs one 014 call with retries; returns the 200 body.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, Etsi014Error> {
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 1;
        loop {
            match self
                .attempt(method.clone(), url, body.clone(), attempt)
                .await?
            {
                Attempt::Done(b) => return Ok(b),
                Attempt::Retry(e) if attempt >= self.retry.max_attempts.max(1) => return Err(e),
                Attempt::Retry(e) => {
                    tracing::debug!(url, attempt, error = %e, ?backoff, "KME call failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        attempt: u32,
    ) -> Result<Attempt, Etsi014Error> {
        let transport = |detail: String| Etsi014Error::Transport {
            url: url.to_string(),
            attempts: attempt,
            detail,
        };
        let mut req = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            // A certificate problem will not go away by retrying.
            Err(e) if is_tls_config_error(&e) => {
                return Err(Etsi014Error::Handshake {
                    url: url.to_string(),
                    detail: describe_reqwest(&e),
                })
            }
            Err(e) => return Ok(Attempt::Retry(transport(describe_reqwest(&e)))),
        };
        let status = resp.status();
        let limit = if status == StatusCode::OK {
            self.max_body
        } else {
            self.max_body.min(64 << 10)
        };
        if let Some(len) = resp.content_length() {
            if len > limit as u64 {
                return Err(Etsi014Error::BodyTooLarge {
                    url: url.to_string(),
                    limit,
                });
            }
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let is_json = content_type
            .split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if status == StatusCode::OK && !is_json {
            return Err(Etsi014Error::ContentType {
                url: url.to_string(),
                content_type,
            });
        }
        let mut buf = WipingBuf::with_capacity(
            resp.content_length()
                .map_or(8 << 10, |l| l as usize)
                .min(limit),
        );
        loop {
            match resp.chunk().await {
                Ok(Some(mut chunk)) => {
                    if buf.0.len() + chunk.len() > limit {
                        wipe_bytes(&mut chunk);
                        return Err(Etsi014Error::BodyTooLarge {
                            url: url.to_string(),
                            limit,
                        });
                    }
                    buf.extend(&chunk);
                    wipe_bytes(&mut chunk);
                }
                Ok(None) => break,
                Err(e) => return Ok(Attempt::Retry(transport(describe_reqwest(&e)))),
            }
        }
        if status == StatusCode::OK {
            return Ok(Attempt::Done(buf.0));
        }
        let (message, details) = decode_error_body(&buf.0, is_json);
        let url = url.to_string();
        Ok(match status {
            StatusCode::BAD_REQUEST => {
                return Err(Etsi014Error::BadRequest {
                    url,
                    message,
                    details,
                })
            }
            StatusCode::UNAUTHORIZED => {
                return Err(Etsi014Error::Unauthorized {
                    url,
                    message,
                    details,
                })
            }
            StatusCode::SERVICE_UNAVAILABLE => Attempt::Retry(Etsi014Error::Unavailable {
                url,
                attempts: attempt,
                message,
                details,
            }),
            other => {
                return Err(Etsi014Error::UnexpectedStatus {
                    url,
                    status: other.as_u16(),
                    message,
                })
            }
        })
    }
}

/// Decodes a 200 answer to `status` (clause 6.1) from `url`. Public for the fuzz targets.
pub fn decode_status(url: &str, body: &[u8]) -> Result<KmeStatus, Etsi014Error> {
    let status: Status = serde_json::from_slice(body).map_err(|e| Etsi014Error::Malformed {
        url: url.to_string(),
        what: "status",
        detail: sanitized(&e),
    })?;
    let availability = status
        .status_extension
        .as_ref()
        .and_then(|e| e.get(wire::ext::AVAILABILITY_TIMEOUT_MS))
        .and_then(|v| v.as_u64())
        .map_or(KeyAvailability::Unknown, |ms| {
            if ms == 0 {
                KeyAvailability::Unlimited
            } else {
                KeyAvailability::Within(Duration::from_millis(ms))
            }
        });
    Ok(KmeStatus {
        status,
        availability,
    })
}

/// Decodes and checks a key container (clause 6.3), the 200 answer to enc_keys/dec_keys from
/// `url`: the count or the exact key_IDs `expect`s, UUID key_IDs, RFC 4648 base64 keys of
/// `size_bits`. Errors never carry key material. Public for the fuzz targets.
pub fn decode_key_container(
    url: &str,
    body: Zeroizing<Vec<u8>>,
    sent: Instant,
    expect: Expect<'_>,
    size_bits: Option<u32>,
) -> Result<Vec<Key>, Etsi014Error> {
    // The keys' text is borrowed from `body`, which is wiped when this function returns.
    let container: KeyContainerIn<'_> =
        serde_json::from_slice(&body).map_err(|e| Etsi014Error::Malformed {
            url: url.to_string(),
            what: "key container",
            detail: sanitized(&e),
        })?;
    let url_s = || url.to_string();
    match expect {
        Expect::Count(n) if container.keys.len() != n => {
            return Err(Etsi014Error::WrongKeyCount {
                url: url_s(),
                expected: n,
                got: container.keys.len(),
            })
        }
        _ => {}
    }
    let mut out = Vec::with_capacity(container.keys.len());
    let mut seen = HashSet::new();
    for entry in &container.keys {
        let id = Uuid::parse_str(&entry.key_id).map_err(|_| Etsi014Error::BadKeyId {
            url: url_s(),
            key_id: entry.key_id.chars().take(64).collect(),
        })?;
        if !seen.insert(id) {
            return Err(Etsi014Error::DuplicateKeyId {
                url: url_s(),
                key_id: id.to_string(),
            });
        }
        if let Expect::Ids(ids) = expect {
            if !ids.contains(&id) {
                return Err(Etsi014Error::UnexpectedKeyId {
                    url: url_s(),
                    key_id: id.to_string(),
                });
            }
        }
        let material = decode_key(&entry.key.0).ok_or_else(|| Etsi014Error::BadBase64 {
            url: url_s(),
            key_id: id.to_string(),
        })?;
        let ok_size = match size_bits {
            Some(bits) => material.len() * 8 == bits as usize,
            None => !material.is_empty(),
        };
        if !ok_size {
            return Err(Etsi014Error::WrongKeySize {
                url: url_s(),
                key_id: id.to_string(),
                expected_bits: size_bits.unwrap_or(0),
                got_bits: material.len() * 8,
            });
        }
        let slave_deadline = entry
            .key_extension
            .as_ref()
            .and_then(|e| e.get(wire::ext::EXPIRES_IN_MS))
            .and_then(|v| v.as_u64())
            // Measured from when the request was sent: errs on the early side.
            .map(|ms| sent + Duration::from_millis(ms));
        out.push(Key {
            id,
            material,
            slave_deadline,
        });
    }
    if let Expect::Ids(ids) = expect {
        if let Some(missing) = ids.iter().find(|id| !seen.contains(id)) {
            return Err(Etsi014Error::MissingKeyId {
                url: url_s(),
                key_id: missing.to_string(),
            });
        }
    }
    Ok(out)
}

/// `(message, details)` of an error answer (clause 6.5) for the error text; a body that is not
/// ETSI 014 JSON gets a placeholder. Public for the fuzz targets.
pub fn decode_error_body(body: &[u8], is_json: bool) -> (String, String) {
    let err: Option<ErrorBody> = if is_json {
        serde_json::from_slice(body).ok()
    } else {
        None
    };
    match &err {
        Some(e) => (e.message.clone(), details_text(&e.details)),
        None => ("(no ETSI 014 JSON error body)".to_string(), String::new()),
    }
}

/// What a key container must hold.
pub enum Expect<'a> {
    Count(usize),
    Ids(&'a [Uuid]),
}

fn check_request(number: u32, size_bits: Option<u32>) -> Result<(), Etsi014Error> {
    if number == 0 {
        return Err(Etsi014Error::InvalidRequest(
            "number of keys must be at least 1".into(),
        ));
    }
    if let Some(s) = size_bits {
        if s == 0 || s % 8 != 0 {
            return Err(Etsi014Error::InvalidRequest(format!(
                "key size {s} bits is not a positive multiple of 8"
            )));
        }
    }
    Ok(())
}

/// `bytes::Bytes` is shared and immutable; when we hold the only reference, take it back and
/// wipe it, otherwise there is nothing we may write to. A body chunk from hyper is a view of its
/// connection read buffer, which still holds a reference, so this rarely wipes anything (see the
/// module docs); the read buffer is wiped when freed.
fn wipe_bytes(chunk: &mut bytes::Bytes) {
    let taken = std::mem::take(chunk);
    if let Ok(mut owned) = taken.try_into_mut() {
        owned.as_mut().zeroize();
    }
}

/// Decodes RFC 4648 base64 (with or without padding) into a fresh zeroizing buffer.
fn decode_key(b64: &str) -> Option<SecretBytes> {
    let engine = &base64::engine::general_purpose::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let mut out = vec![0u8; base64::decoded_len_estimate(b64.len())];
    match engine.decode_slice(b64.as_bytes(), &mut out) {
        Ok(n) => {
            out.truncate(n); // the tail stays in capacity but SecretBytes wipes all of it
            Some(SecretBytes::new(out))
        }
        Err(_) => {
            out.zeroize();
            None
        }
    }
}

/// True when the failure is a certificate or TLS-configuration error (ours or the KME's), as
/// opposed to a network failure. A TLS alert from the KME that refuses our certificate counts too.
fn is_tls_config_error(e: &reqwest::Error) -> bool {
    matches!(
        crate::certs::tls::find_rustls_error(e),
        Some(
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::AlertReceived(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::PeerIncompatible(_)
                | rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
        )
    )
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    // The chain names the cause (refused, reset, certificate problem); no key material can be
    // in it because no key-bearing body was ever decoded into an error.
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decoding_accepts_padding_either_way_and_rejects_garbage() {
        assert_eq!(decode_key("AAECAw==").unwrap().expose(), &[0, 1, 2, 3]);
        assert_eq!(decode_key("AAECAw").unwrap().expose(), &[0, 1, 2, 3]);
        assert!(decode_key("AA*CAw==").is_none());
        assert!(decode_key("AAEC A==").is_none());
        // URL-safe alphabet is not RFC 4648 section 4 base64.
        assert!(decode_key("__8=").is_none());
    }

    #[test]
    fn serde_errors_are_reduced_to_positions() {
        let e =
            serde_json::from_str::<wire::KeyContainer>(r#"{"keys":"TOPSECRETKEY"}"#).unwrap_err();
        let s = sanitized(&e);
        assert!(!s.contains("TOPSECRET"), "{s}");
        assert!(
            e.to_string().contains("TOPSECRET"),
            "serde_json shows values: why sanitizing exists"
        );
    }

    #[test]
    fn key_text_is_borrowed_from_the_body_unless_escaped() {
        let id = "0123abcd-4567-89ef-0123-456789abcdef";
        let body = |key: &str| {
            Zeroizing::new(
                format!(r#"{{"keys":[{{"key_ID":"{id}","key":"{key}","key_ID_extension":7}}],"key_container_extension":{{}}}}"#)
                    .into_bytes(),
            )
        };
        let plain = body("AA/CAw==");
        {
            let c: KeyContainerIn<'_> = serde_json::from_slice(&plain).unwrap();
            assert!(matches!(c.keys[0].key.0, Cow::Borrowed("AA/CAw==")));
        }
        // JSON may escape '/', which base64 uses: serde_json then has to unescape into a copy.
        let escaped = body(r"AA\/CAw==");
        {
            let c: KeyContainerIn<'_> = serde_json::from_slice(&escaped).unwrap();
            assert!(matches!(&c.keys[0].key.0, Cow::Owned(s) if s == "AA/CAw=="));
        }
        let want = decode_key("AA/CAw==").unwrap();
        for b in [plain, escaped] {
            let keys =
                decode_key_container("https://kme", b, Instant::now(), Expect::Count(1), Some(32))
                    .unwrap();
            assert_eq!(keys[0].material, want);
            assert_eq!(keys[0].id.to_string(), id);
        }
    }

    #[test]
    fn sae_ids_are_percent_encoded() {
        assert_eq!(encode_segment("sae-a_1.x~"), "sae-a_1.x~");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn wiping_buf_grows_without_losing_data() {
        let mut b = WipingBuf::with_capacity(2);
        b.extend(b"abc");
        b.extend(b"defgh");
        assert_eq!(&b.0[..], b"abcdefgh");
    }
}
