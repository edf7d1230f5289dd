//! The status schema ([`Status`], written by the agent and read by the client), built from the
//! core's typed [`Snapshot`] and the IO layer's part ([`IoStats`]). docs/status.md documents
//! every field.
//!
//! Versioning: [`STATUS_SCHEMA_VERSION`] is bumped when a field is renamed, removed or changes
//! type or meaning; adding a field does not bump it, so clients ignore fields they do not know.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::core::{mac_str, LinkState, Snapshot};
use crate::keyx::Role;
use crate::profile::ProfileKind;
use crate::watchdog::StallReason;

/// Version of the status JSON schema (the `schema_version` field).
pub const STATUS_SCHEMA_VERSION: u32 = 1;

/// Upper bounds (seconds) of the key-fetch latency histogram buckets; `+Inf` is implied.
/// Spans a loopback simulator (~ms) to a KME behind a WAN that retries (seconds).
pub const FETCH_LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Outcome classes of a key request, the `result` label of `qkd_macsec_key_fetch_total`.
pub const FETCH_RESULTS: [&str; 7] = [
    "ok",
    "unauthorized",
    "unavailable",
    "transport",
    "tls",
    "rejected",
    "protocol",
];

/// A latency histogram (non-cumulative bucket counts; the exposition cumulates them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending.
    pub bounds: Vec<f64>,
    /// `counts[i]` observations in (bounds[i-1], bounds[i]]; one more entry for > last bound.
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds: FETCH_LATENCY_BOUNDS.to_vec(),
            counts: vec![0; FETCH_LATENCY_BOUNDS.len() + 1],
            sum_seconds: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum_seconds += v;
        self.count += 1;
    }
}

/// The last key request to the KME.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchRecord {
    /// `enc_keys` (master) or `dec_keys` (slave).
    pub request: String,
    /// One of [`FETCH_RESULTS`].
    pub result: String,
    pub latency_seconds: f64,
    /// Wall-clock time of the answer, seconds since the Unix epoch.
    pub unix_time: f64,
    /// The error text for a failure (never key material: KME errors carry URLs and messages).
    pub error: Option<String>,
}

/// Counters of one SA as the data plane (XDP ingress, TC egress) counted them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaStat {
    /// `tx` or `rx`.
    pub direction: String,
    pub an: u8,
    pub frames: u64,
    pub highest_pn: u64,
}

/// What only the IO layer knows; flattened into the status object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IoStats {
    pub last_fetch: Option<FetchRecord>,
    /// Key requests by result class (see [`FETCH_RESULTS`]).
    pub fetch_outcomes: BTreeMap<String, u64>,
    pub fetch_latency: Histogram,
    /// Frames the data plane dropped because the link was stalled.
    pub stall_drops_rx: u64,
    pub stall_drops_tx: u64,
    /// Project LLDP TLVs the data plane handed to the agent.
    #[serde(default)]
    pub lldp_delivered: u64,
    /// Project LLDP TLVs the data plane dropped over their rate limit (flood resistance).
    #[serde(default)]
    pub lldp_rate_limited: u64,
    /// Data plane events (LLDP or PN) the ring buffer had no room for.
    #[serde(default)]
    pub events_lost: u64,
    pub sas: Vec<SaStat>,
    /// The last error the link met (KME, kernel, rollover), with its Unix time.
    pub last_error: Option<String>,
    pub last_error_unix_time: Option<f64>,
    /// Alarms currently raised (their stable identifiers, docs/alarms.md).
    pub active_alarms: Vec<String>,
}

impl IoStats {
    pub fn record_fetch(
        &mut self,
        request: &str,
        result: &str,
        latency: Duration,
        error: Option<String>,
    ) {
        let now = unix_now();
        *self.fetch_outcomes.entry(result.to_owned()).or_default() += 1;
        self.fetch_latency.observe(latency);
        if let Some(e) = &error {
            self.set_error(e.clone());
        }
        self.last_fetch = Some(FetchRecord {
            request: request.to_owned(),
            result: result.to_owned(),
            latency_seconds: latency.as_secs_f64(),
            unix_time: now,
            error,
        });
    }

    pub fn set_error(&mut self, e: String) {
        self.last_error = Some(e);
        self.last_error_unix_time = Some(unix_now());
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The result class of a failed ETSI 014 request.
pub fn fetch_result_class(e: &crate::etsi014::Etsi014Error) -> &'static str {
    use crate::etsi014::Etsi014Error as E;
    match e {
        E::Unauthorized { .. } => "unauthorized",
        E::Unavailable { .. } => "unavailable",
        E::Transport { .. } => "transport",
        E::Handshake { .. } | E::Tls(_) => "tls",
        E::BadRequest { .. } | E::UnexpectedStatus { .. } => "rejected",
        _ => "protocol",
    }
}

/// One link's status object (docs/status.md), written by the agent and read by the client:
/// the one definition of the schema. Reading is lenient (unknown fields are ignored, so an
/// older client reads a newer agent) but typed: a field with the wrong type is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema_version: u32,
    /// `secured`, `warning` (AKL past `warn_at`), `rekeying` (a rollover in progress) or `stalled`.
    pub state: String,
    pub link: String,
    pub role: String,
    pub profile: String,
    pub stalled: bool,
    pub stall_reason: Option<String>,
    pub active_key_id: Option<String>,
    pub active_kn: Option<u32>,
    pub active_an: Option<u8>,
    pub used: Option<f64>,
    pub keys_held: usize,
    pub anchor: Option<String>,
    pub peer_mac: Option<String>,
    pub alarms: u64,
    pub last_report: Option<String>,
    pub rollover_in_progress: bool,
    /// The key_ID and AN of the rollover in progress.
    pub next_key_id: Option<String>,
    pub next_an: Option<u8>,
    /// What is left of the active key's lifetime (absent while stalled).
    pub akl_remaining_seconds: Option<f64>,
    pub akl_remaining_frames: Option<u64>,
    /// k of the sak profile (absent in the cak profile).
    pub key_buffer_capacity: Option<usize>,
    pub consecutive_fetch_failures: u32,
    pub warnings: u64,
    /// Keys this gateway switched its TX to since the agent started.
    pub rollovers: u64,
    /// Master: from picking the SAK to both ends transmitting with it; slave: from the
    /// INSTALL to its own switch.
    pub last_rekey_ms: Option<f64>,
    /// What only the IO layer knows (KME latency, data plane counters, alarms).
    #[serde(flatten)]
    pub io: IoStats,
}

impl Status {
    /// The status object of the core's `snap` and the IO layer's `io`.
    pub fn new(snap: &Snapshot, io: IoStats) -> Self {
        Self {
            schema_version: STATUS_SCHEMA_VERSION,
            state: match snap.state {
                LinkState::Secured => "secured",
                LinkState::Warning => "warning",
                LinkState::Rekeying => "rekeying",
                LinkState::Stalled => "stalled",
            }
            .into(),
            link: snap.label.clone(),
            role: match snap.role {
                Role::Master => "master",
                Role::Slave => "slave",
            }
            .into(),
            profile: match snap.profile {
                ProfileKind::Cak => "cak",
                ProfileKind::Sak => "sak",
            }
            .into(),
            stalled: snap.state == LinkState::Stalled,
            stall_reason: snap.stall_reason.map(|r| match r {
                StallReason::NoKey => "no key installed yet".to_owned(),
                StallReason::Exhausted(by) => format!("active key lifetime exhausted ({by:?})"),
            }),
            active_key_id: snap.active.map(|(k, _)| k.key_id.to_string()),
            active_kn: snap.active.map(|(k, _)| k.kn),
            active_an: snap.active.map(|(_, an)| an),
            used: snap.used,
            keys_held: snap.keys_held,
            anchor: snap.anchor.map(|k| k.to_string()),
            peer_mac: snap.peer_mac.map(mac_str),
            alarms: snap.alarms,
            last_report: snap.last_report.as_ref().map(|r| format!("{r:?}")),
            rollover_in_progress: snap.next.is_some(),
            next_key_id: snap.next.map(|(k, _)| k.key_id.to_string()),
            next_an: snap.next.map(|(_, an)| an),
            akl_remaining_seconds: snap.remaining.map(|(t, _)| t.as_secs_f64()),
            akl_remaining_frames: snap.remaining.map(|(_, f)| f),
            key_buffer_capacity: snap.key_buffer_capacity,
            consecutive_fetch_failures: snap.consecutive_fetch_failures,
            warnings: snap.warnings,
            rollovers: snap.rollovers,
            last_rekey_ms: snap.last_rekey.map(|d| d.as_secs_f64() * 1e3),
            io,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_status() -> Status {
        let mut io = IoStats::default();
        io.record_fetch("enc_keys", "ok", Duration::from_millis(12), None);
        io.record_fetch(
            "enc_keys",
            "unavailable",
            Duration::from_millis(3000),
            Some("KME https://kme unavailable (503)".into()),
        );
        io.sas.push(SaStat {
            direction: "tx".into(),
            an: 1,
            frames: 1000,
            highest_pn: 1001,
        });
        // Exact binary fractions: the JSON round trip compares equal.
        io.last_fetch.as_mut().unwrap().unix_time = 1_700_000_000.25;
        io.last_error_unix_time = Some(1_700_000_000.5);
        io.stall_drops_rx = 7;
        io.lldp_delivered = 40;
        io.lldp_rate_limited = 19_960;
        io.events_lost = 2;
        io.active_alarms.push("QKDMACSEC-W001".into());
        Status {
            schema_version: STATUS_SCHEMA_VERSION,
            state: "warning".into(),
            link: "site-a".into(),
            role: "master".into(),
            profile: "sak".into(),
            stalled: false,
            stall_reason: None,
            active_key_id: Some("4a1e6c1e-0000-4000-8000-000000000001".into()),
            active_kn: Some(1),
            active_an: Some(1),
            used: Some(0.91),
            keys_held: 3,
            anchor: Some("4a1e6c1e-0000-4000-8000-000000000001".into()),
            peer_mac: Some("02:00:00:00:00:02".into()),
            alarms: 0,
            last_report: None,
            rollover_in_progress: true,
            next_key_id: Some("4a1e6c1e-0000-4000-8000-000000000002".into()),
            next_an: Some(2),
            akl_remaining_seconds: Some(54.0),
            akl_remaining_frames: Some(4_000_000_000),
            key_buffer_capacity: Some(4),
            consecutive_fetch_failures: 1,
            rollovers: 12,
            last_rekey_ms: Some(250.5),
            warnings: 1,
            io,
        }
    }

    /// Every documented field, with its JSON type. A change here is a schema change: update
    /// docs/status.md, and bump STATUS_SCHEMA_VERSION unless the change only adds fields.
    const SCHEMA: &[(&str, &str)] = &[
        ("schema_version", "number"),
        ("link", "string"),
        ("state", "string"),
        ("role", "string"),
        ("profile", "string"),
        ("stalled", "bool"),
        ("stall_reason", "string|null"),
        ("active_key_id", "string|null"),
        ("active_kn", "number|null"),
        ("active_an", "number|null"),
        ("used", "number|null"),
        ("keys_held", "number"),
        ("anchor", "string|null"),
        ("peer_mac", "string|null"),
        ("alarms", "number"),
        ("last_report", "string|null"),
        ("rollover_in_progress", "bool"),
        ("next_key_id", "string|null"),
        ("next_an", "number|null"),
        ("akl_remaining_seconds", "number|null"),
        ("akl_remaining_frames", "number|null"),
        ("key_buffer_capacity", "number|null"),
        ("consecutive_fetch_failures", "number"),
        ("rollovers", "number"),
        ("last_rekey_ms", "number|null"),
        ("warnings", "number"),
        ("last_fetch", "object|null"),
        ("fetch_outcomes", "object"),
        ("fetch_latency", "object"),
        ("stall_drops_rx", "number"),
        ("stall_drops_tx", "number"),
        ("lldp_delivered", "number"),
        ("lldp_rate_limited", "number"),
        ("events_lost", "number"),
        ("sas", "array"),
        ("last_error", "string|null"),
        ("last_error_unix_time", "number|null"),
        ("active_alarms", "array"),
    ];

    fn type_of(v: &serde_json::Value) -> &'static str {
        match v {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "bool",
            serde_json::Value::Number(_) => "number",
            serde_json::Value::String(_) => "string",
            serde_json::Value::Array(_) => "array",
            serde_json::Value::Object(_) => "object",
        }
    }

    #[test]
    fn status_json_matches_the_documented_schema() {
        let v = serde_json::to_value(sample_status()).unwrap();
        let obj = v.as_object().unwrap();
        let mut names: Vec<&str> = obj.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut documented: Vec<&str> = SCHEMA.iter().map(|(n, _)| *n).collect();
        documented.sort_unstable();
        assert_eq!(names, documented, "status fields differ from the schema");
        for (name, ty) in SCHEMA {
            let got = type_of(&obj[*name]);
            assert!(
                ty.split('|').any(|t| t == got),
                "{name}: JSON type {got}, schema says {ty}"
            );
        }
        // Nested objects.
        let lf = obj["last_fetch"].as_object().unwrap();
        for k in ["request", "result", "latency_seconds", "unix_time", "error"] {
            assert!(lf.contains_key(k), "last_fetch.{k}");
        }
        let h = obj["fetch_latency"].as_object().unwrap();
        assert_eq!(h["count"], 2);
        assert_eq!(
            h["counts"].as_array().unwrap().len(),
            h["bounds"].as_array().unwrap().len() + 1
        );
        assert_eq!(obj["fetch_outcomes"]["unavailable"], 1);
        assert_eq!(obj["sas"][0]["direction"], "tx");
        assert_eq!(obj["schema_version"], STATUS_SCHEMA_VERSION);
    }

    #[test]
    fn the_client_reads_what_the_agent_writes() {
        let s = sample_status();
        let json = serde_json::to_string(&vec![Some(s.clone()), None]).unwrap();
        let back: Vec<Option<Status>> = serde_json::from_str(&json).unwrap();
        let v = back[0].as_ref().unwrap();
        assert_eq!(v.link, s.link);
        assert_eq!(v.state, s.state);
        assert_eq!(v.next_key_id, s.next_key_id);
        assert_eq!(v.io, s.io);
        assert!(back[1].is_none());
        // Wrong types are errors, not silently defaulted.
        let bad = json.replacen("\"keys_held\":3", "\"keys_held\":\"3\"", 1);
        assert!(serde_json::from_str::<Vec<Option<Status>>>(&bad).is_err());
        // Unknown (newer) fields are ignored.
        let newer = json.replacen("{", "{\"future_field\":1,", 1);
        assert!(serde_json::from_str::<Vec<Option<Status>>>(&newer).is_ok());
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(1)); // == first bound: first bucket
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(60)); // beyond the last bound: +Inf
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(*h.counts.last().unwrap(), 1);
        assert_eq!(h.count, 3);
        assert!((h.sum_seconds - 60.003).abs() < 1e-9);
    }
}
