//! Prometheus text exposition (format 0.0.4) of the link statuses, served over HTTP/1.1 on
//! `global.metrics_address` (`GET /metrics`). Written here rather than with a client crate:
//! every value already lives in [`Status`], so rendering is one pass over the snapshots.
//! docs/metrics.md documents every metric.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::status::Status;
use super::StatusHub;

/// The states of `qkd_macsec_link_state`.
pub const STATES: [&str; 4] = ["secured", "warning", "rekeying", "stalled"];

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

struct Out {
    text: String,
}

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", esc(val));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", num(v));
    }
}

/// Renders every metric for these links (a link not yet started is skipped).
pub fn render(statuses: &[Option<Status>]) -> String {
    let links: Vec<&Status> = statuses.iter().flatten().collect();
    let mut o = Out {
        text: String::new(),
    };
    o.head(
        "qkd_macsec_agent_info",
        "gauge",
        "Constant 1; the agent's version and status schema version as labels.",
    );
    o.sample(
        "qkd_macsec_agent_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            (
                "schema_version",
                &super::status::STATUS_SCHEMA_VERSION.to_string(),
            ),
        ],
        1.0,
    );

    o.head(
        "qkd_macsec_link_state",
        "gauge",
        "1 for the link's current state (secured, warning, rekeying, stalled), 0 for the others.",
    );
    for s in &links {
        for st in STATES {
            o.sample(
                "qkd_macsec_link_state",
                &[("link", &s.link), ("state", st)],
                f64::from(u8::from(s.state == st)),
            );
        }
    }

    type Getter = fn(&Status) -> Option<f64>;
    let gauges: [(&str, &str, Getter); 7] = [
        (
            "qkd_macsec_last_rekey_seconds",
            "Duration of the last rollover (master: SAK picked to both ends transmitting).",
            |s| s.last_rekey_ms.map(|ms| ms / 1e3),
        ),
        (
            "qkd_macsec_akl_remaining_seconds",
            "Seconds until the active key's age limit (akl.max_age); absent while stalled.",
            |s| s.akl_remaining_seconds,
        ),
        (
            "qkd_macsec_akl_remaining_frames",
            "Packet numbers (frames) left before the active key's PN limit; absent while stalled.",
            |s| s.akl_remaining_frames.map(|v| v as f64),
        ),
        (
            "qkd_macsec_akl_used_ratio",
            "Fraction of the active key's lifetime used (time or PN, whichever is further).",
            |s| s.used,
        ),
        (
            "qkd_macsec_key_buffer_keys",
            "Keys held ready: buffered SAKs (sak profile) or usable CAKs (cak profile).",
            |s| Some(s.keys_held as f64),
        ),
        (
            "qkd_macsec_key_buffer_capacity_keys",
            "k, the SAK buffer size (sak profile only).",
            |s| s.key_buffer_capacity.map(|v| v as f64),
        ),
        (
            "qkd_macsec_active_an",
            "Association number of the SA this gateway transmits with; absent while stalled.",
            |s| s.active_an.map(f64::from),
        ),
    ];
    for (name, help, get) in gauges {
        o.head(name, "gauge", help);
        for s in &links {
            if let Some(v) = get(s) {
                o.sample(name, &[("link", &s.link)], v);
            }
        }
    }

    let counters: [(&str, &str, Getter); 3] = [
        (
            "qkd_macsec_rollovers_total",
            "Keys this gateway switched its TX to since the agent started (the first counts).",
            |s| Some(s.rollovers as f64),
        ),
        (
            "qkd_macsec_warnings_total",
            "AKL warnings (QKDMACSEC-W001) raised.",
            |s| Some(s.warnings as f64),
        ),
        (
            "qkd_macsec_alarms_total",
            "Watchdog alarms (stall, key supply, SA state) raised.",
            |s| Some(s.alarms as f64),
        ),
    ];
    for (name, help, get) in counters {
        o.head(name, "counter", help);
        for s in &links {
            if let Some(v) = get(s) {
                o.sample(name, &[("link", &s.link)], v);
            }
        }
    }

    o.head(
        "qkd_macsec_key_fetch_total",
        "counter",
        "Key requests to the KME (enc_keys or dec_keys) by result.",
    );
    for s in &links {
        for r in super::status::FETCH_RESULTS {
            let v = s.io.fetch_outcomes.get(r).copied().unwrap_or(0);
            o.sample(
                "qkd_macsec_key_fetch_total",
                &[("link", &s.link), ("result", r)],
                v as f64,
            );
        }
    }

    o.head(
        "qkd_macsec_key_fetch_duration_seconds",
        "histogram",
        "Latency of key requests to the KME, including the client's retries.",
    );
    for s in &links {
        let h = &s.io.fetch_latency;
        let mut cum = 0u64;
        for (i, c) in h.counts.iter().enumerate() {
            cum += c;
            let le = h.bounds.get(i).map_or("+Inf".to_owned(), |b| num(*b));
            o.sample(
                "qkd_macsec_key_fetch_duration_seconds_bucket",
                &[("link", &s.link), ("le", &le)],
                cum as f64,
            );
        }
        o.sample(
            "qkd_macsec_key_fetch_duration_seconds_sum",
            &[("link", &s.link)],
            h.sum_seconds,
        );
        o.sample(
            "qkd_macsec_key_fetch_duration_seconds_count",
            &[("link", &s.link)],
            h.count as f64,
        );
    }

    o.head(
        "qkd_macsec_sa_frames_total",
        "counter",
        "Frames the data plane counted per SA (XDP ingress = rx, TC egress = tx); resets when an SA is re-created.",
    );
    for s in &links {
        for sa in &s.io.sas {
            o.sample(
                "qkd_macsec_sa_frames_total",
                &[
                    ("link", &s.link),
                    ("direction", &sa.direction),
                    ("an", &sa.an.to_string()),
                ],
                sa.frames as f64,
            );
        }
    }
    o.head(
        "qkd_macsec_sa_highest_pn",
        "gauge",
        "Highest packet number seen per SA.",
    );
    for s in &links {
        for sa in &s.io.sas {
            o.sample(
                "qkd_macsec_sa_highest_pn",
                &[
                    ("link", &s.link),
                    ("direction", &sa.direction),
                    ("an", &sa.an.to_string()),
                ],
                sa.highest_pn as f64,
            );
        }
    }
    o.head(
        "qkd_macsec_stall_dropped_frames_total",
        "counter",
        "Frames the data plane dropped because the link was stalled.",
    );
    for s in &links {
        for (dir, v) in [("rx", s.io.stall_drops_rx), ("tx", s.io.stall_drops_tx)] {
            o.sample(
                "qkd_macsec_stall_dropped_frames_total",
                &[("link", &s.link), ("direction", dir)],
                v as f64,
            );
        }
    }
    o.head(
        "qkd_macsec_lldp_tlv_frames_total",
        "counter",
        "Key-exchange LLDP TLVs at XDP: delivered to the agent or dropped over the rate limit.",
    );
    for s in &links {
        for (result, v) in [
            ("delivered", s.io.lldp_delivered),
            ("rate_limited", s.io.lldp_rate_limited),
        ] {
            o.sample(
                "qkd_macsec_lldp_tlv_frames_total",
                &[("link", &s.link), ("result", result)],
                v as f64,
            );
        }
    }
    o.head(
        "qkd_macsec_dataplane_events_lost_total",
        "counter",
        "Data plane events (LLDP TLVs, PN crossings) the ring buffer had no room for.",
    );
    for s in &links {
        o.sample(
            "qkd_macsec_dataplane_events_lost_total",
            &[("link", &s.link)],
            s.io.events_lost as f64,
        );
    }
    o.head(
        "qkd_macsec_alarm_active",
        "gauge",
        "1 for each alarm currently raised on the link (id = QKDMACSEC-...; docs/alarms.md).",
    );
    for s in &links {
        for id in &s.io.active_alarms {
            o.sample(
                "qkd_macsec_alarm_active",
                &[("link", &s.link), ("id", id)],
                1.0,
            );
        }
    }
    o.text
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}; change global.metrics_address or free the port")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` and serves `GET /metrics`, asking every link for its status per request, until
/// the task is aborted.
/// Returns the bound address (useful with port 0) and the task.
pub async fn serve(
    addr: SocketAddr,
    hub: StatusHub,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(%local, "serving metrics on http://{local}/metrics");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let hub = hub.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let hub = hub.clone();
                    async move {
                        let statuses = hub.collect().await;
                        Ok::<_, std::convert::Infallible>(respond(&req, &statuses))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
                // A slow or idle client cannot hold a connection for ever.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok((local, task))
}

fn respond<B>(
    req: &hyper::Request<B>,
    statuses: &[Option<Status>],
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (code, ctype, body) = if req.method() != hyper::Method::GET {
        (405, "text/plain", "only GET\n".to_owned())
    } else if req.uri().path() != "/metrics" {
        (
            404,
            "text/plain",
            "not found; metrics are at /metrics\n".to_owned(),
        )
    } else {
        (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            render(statuses),
        )
    };
    hyper::Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::status::tests::sample_status;

    /// Checks the exposition's grammar line by line (the subset we emit): HELP/TYPE before
    /// the samples of each family, names and labels well-formed, values parse.
    /// (metric name, labels, value).
    type Sample = (String, Vec<(String, String)>, f64);

    pub(crate) fn check_exposition(text: &str) -> Vec<Sample> {
        let mut typed = std::collections::HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (n, t) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter", "histogram"].contains(&t), "{line}");
                assert!(
                    typed.insert(n.to_owned(), t.to_owned()).is_none(),
                    "dup {n}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match name_labels.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').unwrap()),
                None => (name_labels, ""),
            };
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            assert!(name.starts_with("qkd_macsec_"), "{name}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(name);
            let t = typed
                .get(family)
                .unwrap_or_else(|| panic!("{name} has no TYPE"));
            if t == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            let mut ls = Vec::new();
            if !labels.is_empty() {
                for kv in labels.split("\",") {
                    let (k, v) = kv.split_once("=\"").unwrap();
                    ls.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
                }
            }
            samples.push((name.to_owned(), ls, v));
        }
        samples
    }

    fn find(s: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        s.iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }

    #[test]
    fn exposition_has_every_documented_metric_with_values() {
        let mut stalled = sample_status();
        stalled.link = "b \"quoted\"".into();
        stalled.state = "stalled".into();
        stalled.akl_remaining_seconds = None;
        stalled.stalled = true;
        let text = render(&[Some(sample_status()), None, Some(stalled)]);
        let s = check_exposition(&text);
        let l = [("link", "site-a")];
        assert_eq!(
            find(
                &s,
                "qkd_macsec_link_state",
                &[("link", "site-a"), ("state", "warning")]
            ),
            Some(1.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_link_state",
                &[("link", "site-a"), ("state", "secured")]
            ),
            Some(0.0)
        );
        assert_eq!(find(&s, "qkd_macsec_akl_remaining_seconds", &l), Some(54.0));
        assert_eq!(find(&s, "qkd_macsec_akl_remaining_frames", &l), Some(4e9));
        assert_eq!(find(&s, "qkd_macsec_key_buffer_keys", &l), Some(3.0));
        assert_eq!(find(&s, "qkd_macsec_rollovers_total", &l), Some(12.0));
        assert_eq!(find(&s, "qkd_macsec_last_rekey_seconds", &l), Some(0.2505));
        assert_eq!(
            find(
                &s,
                "qkd_macsec_key_fetch_total",
                &[("link", "site-a"), ("result", "unavailable")]
            ),
            Some(1.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_key_fetch_total",
                &[("link", "site-a"), ("result", "tls")]
            ),
            Some(0.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_key_fetch_duration_seconds_bucket",
                &[("link", "site-a"), ("le", "0.025")]
            ),
            Some(1.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_key_fetch_duration_seconds_bucket",
                &[("link", "site-a"), ("le", "+Inf")]
            ),
            Some(2.0)
        );
        assert_eq!(
            find(&s, "qkd_macsec_key_fetch_duration_seconds_count", &l),
            Some(2.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_sa_frames_total",
                &[("link", "site-a"), ("direction", "tx"), ("an", "1")]
            ),
            Some(1000.0)
        );
        assert_eq!(
            find(&s, "qkd_macsec_sa_highest_pn", &[("direction", "tx")]),
            Some(1001.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_stall_dropped_frames_total",
                &[("link", "site-a"), ("direction", "rx")]
            ),
            Some(7.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_lldp_tlv_frames_total",
                &[("link", "site-a"), ("result", "rate_limited")]
            ),
            Some(19_960.0)
        );
        assert_eq!(
            find(
                &s,
                "qkd_macsec_lldp_tlv_frames_total",
                &[("link", "site-a"), ("result", "delivered")]
            ),
            Some(40.0)
        );
        assert_eq!(
            find(&s, "qkd_macsec_dataplane_events_lost_total", &l),
            Some(2.0)
        );
        assert_eq!(
            find(&s, "qkd_macsec_alarm_active", &[("id", "QKDMACSEC-W001")]),
            Some(1.0)
        );
        // Escaped label; no remaining-seconds sample while stalled.
        assert!(text.contains("link=\"b \\\"quoted\\\"\""), "{text}");
        assert_eq!(
            s.iter()
                .filter(|(n, ..)| n == "qkd_macsec_akl_remaining_seconds")
                .count(),
            1,
            "only the active link has AKL left"
        );
        let stalled_ones: Vec<_> = s
            .iter()
            .filter(|(n, l, v)| {
                n == "qkd_macsec_link_state"
                    && *v == 1.0
                    && l.iter().any(|(k, v)| k == "state" && v == "stalled")
            })
            .collect();
        assert_eq!(stalled_ones.len(), 1);
        assert!(
            stalled_ones[0].1[0].1.starts_with("b \\\"quoted"),
            "{:?}",
            stalled_ones[0]
        );
        // Every metric family is documented.
        let doc = include_str!("../../../docs/metrics.md");
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = line.split(' ').next().unwrap();
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/metrics.md lacks {name}"
            );
        }
    }

    #[tokio::test]
    async fn serves_metrics_over_a_real_socket() {
        // One link task that answers every status request with the sample.
        let (hub, mut requests) = StatusHub::new(1);
        let mut rx = requests.remove(0);
        let link = tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(sample_status());
            }
        });
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), hub).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let r = get("/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("content-type: text/plain; version=0.0.4"), "{r}");
        assert!(
            r.contains("qkd_macsec_rollovers_total{link=\"site-a\"} 12"),
            "{r}"
        );
        let r = get("/other").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        task.abort();
        link.abort();
    }
}
