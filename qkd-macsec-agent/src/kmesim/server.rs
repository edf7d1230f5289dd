//! The 014 HTTPS front end of one simulated KME: accept loop, TLS with required client
//! certificates, SAE identity from the certificate, routing, validation and 014 status codes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::link::LinkError;
use super::{lock, Shared, Side};
use crate::certs::tls::sae_identity;
use crate::etsi014::wire::{self, ErrorBody, KeyContainer, KeyEntry, KeyIds, KeyRequest, Status};

/// Largest request body accepted (a dec_keys POST with max_key_per_request IDs is ~10 KiB).
const MAX_REQUEST_BODY: usize = 64 << 10;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(
    side: Side,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "KME accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if shared.faults(side).drop_connections {
            tracing::debug!(%peer, "fault injection: dropping new connection");
            shared
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        let mut dropper = shared.drop_epoch[Shared::idx(side)].subscribe();
        let shared_for_drop = shared.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "KME TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "KME TLS handshake timed out");
                    return;
                }
            };
            shared
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let caller: Option<Arc<str>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(sae_identity)
                .map(Arc::from);
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let caller = caller.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(req, &shared, side, caller).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "KME connection ended"); },
                _ = dropper.changed() => {
                    tracing::debug!(%peer, "fault injection: connection dropped");
                    shared_for_drop.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                _ = shutdown.changed() => {},
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;
/// An early error answer (boxed: a Response is large).
type Reject = Box<Resp>;

fn reject(message: impl Into<String>) -> Reject {
    Box::new(bad(message))
}

fn json<T: Serialize>(code: StatusCode, body: &T) -> Resp {
    // Serialising these plain structs cannot fail; an empty body would still carry the code.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(code: StatusCode, message: impl Into<String>) -> Resp {
    json(
        code,
        &ErrorBody {
            message: message.into(),
            details: None,
        },
    )
}

fn bad(message: impl Into<String>) -> Resp {
    error(StatusCode::BAD_REQUEST, message)
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    side: Side,
    caller: Option<Arc<str>>,
) -> Resp {
    let faults = shared.faults(side);
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let resp = if faults.fail_503 {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "KME {} is unavailable (fault injection); retry later",
                shared.kme_id(side)
            ),
        )
    } else {
        route(req, shared, side, caller.as_deref()).await
    };
    shared.answered.count(resp.status().as_u16());
    resp
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `a=1&b=2` allowing only `allowed` names, each at most once.
fn query<'a>(q: Option<&'a str>, allowed: &[&str]) -> Result<Vec<(&'a str, String)>, Reject> {
    let mut out: Vec<(&str, String)> = Vec::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&k) {
            return Err(reject(format!(
                "unknown query parameter {k:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        if out.iter().any(|(n, _)| *n == k) {
            return Err(reject(format!("query parameter {k:?} given twice")));
        }
        let v = percent_decode(v).ok_or_else(|| {
            reject(format!(
                "query parameter {k:?} is not valid percent-encoding"
            ))
        })?;
        out.push((k, v));
    }
    Ok(out)
}

fn parse_u32(name: &str, v: &str) -> Result<u32, Reject> {
    v.parse::<u32>()
        .map_err(|_| reject(format!("{name} must be a non-negative integer, got {v:?}")))
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reject> {
    let collected = Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| {
            reject(format!(
                "cannot read request body (limit {MAX_REQUEST_BODY} bytes): {e}"
            ))
        })?
        .to_bytes();
    serde_json::from_slice(&collected)
        .map_err(|e| reject(format!("invalid JSON request body: {e}")))
}

async fn route(req: Request<Incoming>, shared: &Shared, side: Side, caller: Option<&str>) -> Resp {
    let Some(caller) = caller else {
        return error(
            StatusCode::UNAUTHORIZED,
            "client certificate names no SAE ID (no CN, DNS or URI SAN)",
        );
    };
    if !shared.saes(side).iter().any(|s| s == caller) {
        return error(
            StatusCode::UNAUTHORIZED,
            format!(
                "SAE {caller:?} is not attached to KME {}",
                shared.kme_id(side)
            ),
        );
    }
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/api/v1/keys/") else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such resource {path:?}; ETSI 014 resources are under /api/v1/keys/"),
        );
    };
    let Some((sae_raw, op)) = rest.split_once('/') else {
        return error(StatusCode::NOT_FOUND, format!("no such resource {path:?}"));
    };
    let Some(sae) = percent_decode(sae_raw) else {
        return bad(format!("SAE ID in {path:?} is not valid percent-encoding"));
    };
    let peer = match side {
        Side::A => Side::B,
        Side::B => Side::A,
    };
    let method = req.method().clone();
    let allowed = match op {
        "status" => method == Method::GET,
        "enc_keys" | "dec_keys" => method == Method::GET || method == Method::POST,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no such resource {path:?}; use status, enc_keys or dec_keys"),
            )
        }
    };
    if !allowed {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {op}"),
        );
    }
    if !shared.saes(peer).contains(&sae) {
        let role = if op == "dec_keys" { "master" } else { "slave" };
        return bad(format!(
            "{role} SAE {sae:?} is not attached to the peer KME {}",
            shared.kme_id(peer)
        ));
    }
    match op {
        "status" => status(shared, side, caller, &sae),
        "enc_keys" => {
            let request = if method == Method::GET {
                match query(req.uri().query(), &["number", "size"]) {
                    Ok(q) => {
                        let mut r = KeyRequest::default();
                        for (k, v) in q {
                            match parse_u32(k, &v) {
                                Ok(n) if k == "number" => r.number = Some(n),
                                Ok(n) => r.size = Some(n),
                                Err(resp) => return *resp,
                            }
                        }
                        r
                    }
                    Err(resp) => return *resp,
                }
            } else {
                if let Err(resp) = query(req.uri().query(), &[]) {
                    return *resp;
                }
                match body_json::<KeyRequest>(req).await {
                    Ok(r) => r,
                    Err(resp) => return *resp,
                }
            };
            enc_keys(shared, side, caller, &sae, &request)
        }
        _ => {
            let ids: Vec<String> = if method == Method::GET {
                match query(req.uri().query(), &["key_ID"]) {
                    Ok(q) => match q.into_iter().next() {
                        Some((_, v)) => vec![v],
                        None => return bad("dec_keys GET needs the key_ID query parameter"),
                    },
                    Err(resp) => return *resp,
                }
            } else {
                if let Err(resp) = query(req.uri().query(), &[]) {
                    return *resp;
                }
                match body_json::<KeyIds>(req).await {
                    Ok(r) => r.key_ids.into_iter().map(|e| e.key_id).collect(),
                    Err(resp) => return *resp,
                }
            };
            dec_keys(shared, side, caller, &sae, &ids)
        }
    }
}

fn status(shared: &Shared, side: Side, caller: &str, slave: &str) -> Resp {
    let peer = if side == Side::A { Side::B } else { Side::A };
    let (params, stored) = {
        let mut l = lock(&shared.link);
        let stored = l.stored_key_count(Instant::now());
        (l.params().clone(), stored)
    };
    let mut ext = serde_json::Map::new();
    ext.insert(
        wire::ext::AVAILABILITY_TIMEOUT_MS.into(),
        params
            .availability_timeout
            .map_or(0, |d| d.as_millis() as u64)
            .into(),
    );
    ext.insert(wire::ext::QBER.into(), params.qber.into());
    ext.insert(wire::ext::LINK_UP.into(), params.producing().into());
    json(
        StatusCode::OK,
        &Status {
            source_kme_id: shared.kme_id(side).into(),
            target_kme_id: shared.kme_id(peer).into(),
            master_sae_id: caller.into(),
            slave_sae_id: slave.into(),
            key_size: params.key_size,
            stored_key_count: stored,
            max_key_count: params.max_key_count,
            max_key_per_request: shared.cfg.max_key_per_request,
            max_key_size: shared.cfg.max_key_size,
            min_key_size: shared.cfg.min_key_size,
            max_sae_id_count: 0,
            status_extension: Some(serde_json::Value::Object(ext)),
        },
    )
}

fn enc_keys(shared: &Shared, side: Side, caller: &str, slave: &str, r: &KeyRequest) -> Resp {
    let cfg = &shared.cfg;
    let number = r.number.unwrap_or(1);
    if number == 0 || number > cfg.max_key_per_request {
        return bad(format!(
            "number {number} out of range: 1..={} (max_key_per_request)",
            cfg.max_key_per_request
        ));
    }
    let default_size = lock(&shared.link).params().key_size;
    let size = r.size.unwrap_or(default_size);
    if !size.is_multiple_of(8) || size < cfg.min_key_size || size > cfg.max_key_size {
        return bad(format!(
            "size {size} bits invalid: must be a multiple of 8 within {}..={}",
            cfg.min_key_size, cfg.max_key_size
        ));
    }
    if !r.additional_slave_sae_ids.is_empty() {
        return bad("additional_slave_SAE_IDs not supported: this KME's max_SAE_ID_count is 0");
    }
    if let Some(name) = r.extension_mandatory.iter().flat_map(|m| m.keys()).next() {
        return bad(format!(
            "mandatory extension {name:?} is not supported by this KME"
        ));
    }
    let reissue = shared.faults(side).reissue_keys;
    let issued = {
        let mut l = lock(&shared.link);
        l.take(Instant::now(), caller, slave, number, size, reissue)
    };
    match issued {
        Ok(keys) => {
            let keys = keys
                .into_iter()
                .map(|k| KeyEntry {
                    key_id: k.id.hyphenated().to_string(),
                    key_id_extension: None,
                    key: Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(k.key.expose()),
                    ),
                    key_extension: k.expires_in.map(
                        |d| serde_json::json!({ wire::ext::EXPIRES_IN_MS: d.as_millis() as u64 }),
                    ),
                })
                .collect();
            json(
                StatusCode::OK,
                &KeyContainer {
                    keys,
                    key_container_extension: None,
                },
            )
        }
        Err(e @ LinkError::Exhausted { .. }) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e) => bad(e.to_string()),
    }
}

fn dec_keys(shared: &Shared, side: Side, caller: &str, master: &str, raw_ids: &[String]) -> Resp {
    if raw_ids.is_empty() {
        return bad("key_IDs is empty: give at least one key_ID");
    }
    if raw_ids.len() > shared.cfg.max_key_per_request as usize {
        return bad(format!(
            "{} key_IDs exceed max_key_per_request {}",
            raw_ids.len(),
            shared.cfg.max_key_per_request
        ));
    }
    let mut ids = Vec::with_capacity(raw_ids.len());
    for r in raw_ids {
        match Uuid::parse_str(r) {
            Ok(u) => ids.push(u),
            Err(_) => {
                return bad(format!(
                    "key_ID {:?} is not a UUID",
                    r.chars().take(64).collect::<String>()
                ))
            }
        }
    }
    let reserve = shared.faults(side).reserve_keys;
    let delivered = {
        let mut l = lock(&shared.link);
        l.deliver(Instant::now(), caller, master, &ids, reserve)
    };
    match delivered {
        Ok(keys) => {
            let keys = keys
                .into_iter()
                .map(|(id, k)| KeyEntry {
                    key_id: id.hyphenated().to_string(),
                    key_id_extension: None,
                    key: Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(k.expose()),
                    ),
                    key_extension: None,
                })
                .collect();
            json(
                StatusCode::OK,
                &KeyContainer {
                    keys,
                    key_container_extension: None,
                },
            )
        }
        Err(e @ LinkError::NotYours { .. }) => error(StatusCode::UNAUTHORIZED, e.to_string()),
        Err(e) => bad(e.to_string()),
    }
}
