//! Run-time control of the simulator: a plain-HTTP JSON endpoint meant for loopback
//! (`GET /state`, `POST /update`), the same operations in-process through [`super::SimControl`],
//! and the client used by `kme-sim-ctl`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{lock, Faults, LinkCounters, Shared, Side};

/// Which KME a fault applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KmeSel {
    A,
    B,
    #[default]
    Both,
}

/// A partial update: absent fields stay as they are. Link fields apply to the shared link, fault
/// fields to the KME(s) chosen by `kme` (default both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qber: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qber_abort: Option<f64>,
    /// 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_key_count: Option<u64>,
    /// Fill the pool to capacity now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<bool>,
    /// Delivered and expired keys kept for `reserve_keys` and `reissue_keys` (0 = none;
    /// lowering it drops the oldest at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_history: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kme: Option<KmeSel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_503: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_connections: Option<bool>,
    /// dec_keys serves delivered and expired keys again (see [`super::Faults::reserve_keys`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_keys: Option<bool>,
    /// enc_keys hands out retained keys again (see [`super::Faults::reissue_keys`]); switching
    /// it on rewinds: every key retained by then is handed out once more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reissue_keys: Option<bool>,
}

/// Everything the control endpoint reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimState {
    pub key_rate: f64,
    pub key_size: u32,
    pub max_key_count: u64,
    /// 0 = unlimited.
    pub availability_timeout_ms: u64,
    pub qber: f64,
    pub qber_abort: f64,
    pub paused: bool,
    pub link_up: bool,
    pub stored_key_count: u64,
    /// Keys issued to a master and not yet fetched by the slave.
    pub pending_keys: u64,
    pub issued: u64,
    pub delivered: u64,
    pub expired: u64,
    /// Delivered and expired keys kept at most for the re-serve and re-issue faults (0 = none).
    #[serde(default)]
    pub key_history: u64,
    /// Keys kept now.
    #[serde(default)]
    pub retained_keys: u64,
    /// dec_keys deliveries of keys already delivered or expired (re-serve fault).
    #[serde(default)]
    pub reserved: u64,
    /// Retained keys handed out again by enc_keys (re-issue fault).
    #[serde(default)]
    pub reissued: u64,
    pub faults_a: Faults,
    pub faults_b: Faults,
    /// 014 answers by status code since start.
    pub answered_200: u64,
    pub answered_400: u64,
    pub answered_401: u64,
    pub answered_503: u64,
    pub answered_other: u64,
    /// TLS connections accepted since start (both KMEs); shows keep-alive reuse.
    pub connections: u64,
    /// Connections closed by the drop_connections fault.
    pub connections_dropped: u64,
}

pub(crate) fn state(shared: &Shared) -> SimState {
    let (p, stored, pending, retained, c): (_, _, _, _, LinkCounters) = {
        let mut l = lock(&shared.link);
        let stored = l.stored_key_count(Instant::now());
        (
            l.params().clone(),
            stored,
            l.pending(),
            l.retained(),
            l.counters(),
        )
    };
    let a = &shared.answered;
    SimState {
        key_rate: p.key_rate,
        key_size: p.key_size,
        max_key_count: p.max_key_count,
        availability_timeout_ms: p.availability_timeout.map_or(0, |d| d.as_millis() as u64),
        qber: p.qber,
        qber_abort: p.qber_abort,
        paused: p.paused,
        link_up: p.producing(),
        stored_key_count: stored,
        pending_keys: pending as u64,
        issued: c.issued,
        delivered: c.delivered,
        expired: c.expired,
        key_history: p.key_history as u64,
        retained_keys: retained as u64,
        reserved: c.reserved,
        reissued: c.reissued,
        faults_a: shared.faults(Side::A),
        faults_b: shared.faults(Side::B),
        answered_200: a.ok.load(Ordering::Relaxed),
        answered_400: a.bad_request.load(Ordering::Relaxed),
        answered_401: a.unauthorized.load(Ordering::Relaxed),
        answered_503: a.unavailable.load(Ordering::Relaxed),
        answered_other: a.other.load(Ordering::Relaxed),
        connections: shared.connections.load(Ordering::Relaxed),
        connections_dropped: shared.dropped.load(Ordering::Relaxed),
    }
}

pub(crate) fn apply(shared: &Shared, u: &ControlUpdate) -> Result<SimState, String> {
    let now = Instant::now();
    let sides: &[Side] = match u.kme.unwrap_or_default() {
        KmeSel::A => &[Side::A],
        KmeSel::B => &[Side::B],
        KmeSel::Both => &[Side::A, Side::B],
    };
    {
        let mut l = lock(&shared.link);
        let mut p = l.params().clone();
        if let Some(v) = u.paused {
            p.paused = v;
        }
        if let Some(v) = u.key_rate {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("key_rate {v} must be a finite number >= 0"));
            }
            p.key_rate = v;
        }
        if let Some(v) = u.qber {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("qber {v} must be a fraction in 0..=1"));
            }
            p.qber = v;
        }
        if let Some(v) = u.qber_abort {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("qber_abort {v} must be a fraction in 0..=1"));
            }
            p.qber_abort = v;
        }
        if let Some(v) = u.availability_timeout_ms {
            p.availability_timeout = (v > 0).then(|| Duration::from_millis(v));
        }
        if let Some(v) = u.max_key_count {
            if v == 0 {
                return Err("max_key_count must be at least 1".into());
            }
            p.max_key_count = v;
        }
        if let Some(v) = u.key_history {
            if v > super::link::MAX_KEY_HISTORY as u64 {
                return Err(format!(
                    "key_history {v} is above the limit {}",
                    super::link::MAX_KEY_HISTORY
                ));
            }
            p.key_history = v as usize;
        }
        if (u.reserve_keys == Some(true) || u.reissue_keys == Some(true)) && p.key_history == 0 {
            return Err(
                "reserve_keys and reissue_keys need key_history > 0: the simulator keeps no delivered key to serve again (set key_history, or start kme-sim with --key-history)"
                    .into(),
            );
        }
        l.set_params(p, now);
        if u.fill == Some(true) {
            l.fill(now);
        }
        // Switching the re-issue fault on rewinds: enc_keys may hand out every key retained so
        // far once more.
        let switched_on = u.reissue_keys == Some(true)
            && sides
                .iter()
                .any(|&s| !lock(&shared.faults[Shared::idx(s)]).reissue_keys);
        if switched_on {
            l.rewind();
        }
    }
    for &side in sides {
        let i = Shared::idx(side);
        let mut f = lock(&shared.faults[i]);
        if let Some(v) = u.fail_503 {
            f.fail_503 = v;
        }
        if let Some(v) = u.latency_ms {
            f.latency_ms = v;
        }
        if let Some(v) = u.reserve_keys {
            f.reserve_keys = v;
        }
        if let Some(v) = u.reissue_keys {
            f.reissue_keys = v;
        }
        if let Some(v) = u.drop_connections {
            f.drop_connections = v;
            if v {
                // Live connections end now; new ones are refused while the flag is set.
                shared.drop_epoch[i].send_modify(|e| *e += 1);
            }
        }
    }
    tracing::info!(update = ?u, "KME simulator control update");
    Ok(state(shared))
}

fn reply<T: Serialize>(code: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn err(code: StatusCode, m: String) -> Response<Full<Bytes>> {
    reply(code, &serde_json::json!({ "message": m }))
}

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let resp = match (req.method().clone(), req.uri().path()) {
                        (Method::GET, "/state") => reply(StatusCode::OK, &state(&shared)),
                        (Method::POST, "/update") => {
                            match Limited::new(req.into_body(), 16 << 10).collect().await {
                                Err(e) => {
                                    err(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
                                }
                                Ok(b) => {
                                    match serde_json::from_slice::<ControlUpdate>(&b.to_bytes()) {
                                        Err(e) => err(
                                            StatusCode::BAD_REQUEST,
                                            format!("invalid update JSON: {e}"),
                                        ),
                                        Ok(u) => match apply(&shared, &u) {
                                            Ok(s) => reply(StatusCode::OK, &s),
                                            Err(m) => err(StatusCode::BAD_REQUEST, m),
                                        },
                                    }
                                }
                            }
                        }
                        (m, p) => err(
                            StatusCode::NOT_FOUND,
                            format!("no {m} {p}; use GET /state or POST /update"),
                        ),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the simulator control endpoint {addr}: {source}; is kme-sim running with --control {addr}?")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control endpoint {addr}: {detail}")]
    Http { addr: SocketAddr, detail: String },
    #[error("control endpoint {addr} refused the update: {message}")]
    Refused { addr: SocketAddr, message: String },
}

/// One request to the control endpoint; `update` None = `GET /state`.
pub async fn request(
    addr: SocketAddr,
    update: Option<&ControlUpdate>,
) -> Result<SimState, ControlError> {
    let http = |detail: String| ControlError::Http { addr, detail };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ControlError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    tokio::spawn(conn);
    let req = match update {
        None => Request::get("/state").body(Full::new(Bytes::new())),
        Some(u) => Request::post("/update")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(u).map_err(|e| http(e.to_string()))?,
            ))),
    }
    .map_err(|e| http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http(e.to_string()))?;
    let code = resp.status();
    let body = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    if code != StatusCode::OK {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or_else(|| format!("HTTP {code}"));
        return Err(ControlError::Refused { addr, message });
    }
    serde_json::from_slice(&body).map_err(|e| http(format!("invalid state JSON: {e}")))
}
