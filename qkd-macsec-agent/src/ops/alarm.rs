//! Alarms: stable identifiers for the conditions an operator must act on, their raise/clear
//! tracking per link ([`AlarmTracker`], sans-IO), the log lines (warn/error level, the
//! identifier first in the message) and the optional hook command ([`run_hook`]).
//! docs/alarms.md is the operator's table of these identifiers.

use std::time::Duration;

use crate::agent::core::Report;
use crate::config::AlarmHook;
use crate::watchdog::Alarm;

/// One kind of alarm. The identifier and name never change once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlarmKind {
    /// The active key passed `akl.warn_at` of its lifetime without a rollover.
    AklWarning,
    /// A rollover step failed; the link keeps its key and tries again.
    RolloverFailed,
    /// The link is stalled: the key's lifetime ran out with no fresh key.
    LinkStalled,
    /// Key requests keep failing beyond the tolerated number.
    KeySupply,
    /// The CAK's lifetime is over and no fresh CAK is available (cak profile).
    CakExpired,
    /// Something offered a retired key; refused.
    RetiredKeyOffered,
    /// The kernel shows the active TX SA inactive.
    TxSaInactive,
    /// The kernel shows a TX SA active that must not be; deactivated.
    UnexpectedTxSa,
}

impl AlarmKind {
    pub const ALL: [AlarmKind; 8] = [
        AlarmKind::AklWarning,
        AlarmKind::RolloverFailed,
        AlarmKind::LinkStalled,
        AlarmKind::KeySupply,
        AlarmKind::CakExpired,
        AlarmKind::RetiredKeyOffered,
        AlarmKind::TxSaInactive,
        AlarmKind::UnexpectedTxSa,
    ];

    pub fn id(self) -> &'static str {
        match self {
            AlarmKind::AklWarning => "QKDMACSEC-W001",
            AlarmKind::RolloverFailed => "QKDMACSEC-W002",
            AlarmKind::LinkStalled => "QKDMACSEC-E001",
            AlarmKind::KeySupply => "QKDMACSEC-E002",
            AlarmKind::CakExpired => "QKDMACSEC-E003",
            AlarmKind::RetiredKeyOffered => "QKDMACSEC-E004",
            AlarmKind::TxSaInactive => "QKDMACSEC-E005",
            AlarmKind::UnexpectedTxSa => "QKDMACSEC-E006",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AlarmKind::AklWarning => "akl-warning",
            AlarmKind::RolloverFailed => "rollover-failed",
            AlarmKind::LinkStalled => "link-stalled",
            AlarmKind::KeySupply => "key-supply",
            AlarmKind::CakExpired => "cak-expired",
            AlarmKind::RetiredKeyOffered => "retired-key-offered",
            AlarmKind::TxSaInactive => "tx-sa-inactive",
            AlarmKind::UnexpectedTxSa => "unexpected-tx-sa",
        }
    }

    /// `warning` or `error`.
    pub fn severity(self) -> &'static str {
        if self.id().contains("-W") {
            "warning"
        } else {
            "error"
        }
    }

    /// Stateful alarms are raised and later cleared; the others are single events.
    pub fn stateful(self) -> bool {
        matches!(
            self,
            AlarmKind::AklWarning
                | AlarmKind::LinkStalled
                | AlarmKind::KeySupply
                | AlarmKind::CakExpired
        )
    }
}

/// Raise, clear, or a one-off event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmAction {
    Raise,
    Clear,
    Event,
}

impl AlarmAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmAction::Raise => "raise",
            AlarmAction::Clear => "clear",
            AlarmAction::Event => "event",
        }
    }
}

/// One alarm transition of one link. Holds key_IDs (public identifiers), never keys.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmEvent {
    pub kind: AlarmKind,
    pub action: AlarmAction,
    pub link: String,
    pub key_id: Option<String>,
    pub detail: String,
}

impl AlarmEvent {
    /// The log message: identifier and name first, so `journalctl -g QKDMACSEC-E001` finds it.
    pub fn message(&self) -> String {
        format!(
            "{} {} {}: link {}{}: {}",
            self.kind.id(),
            self.kind.name(),
            match self.action {
                AlarmAction::Raise => "raised",
                AlarmAction::Clear => "cleared",
                AlarmAction::Event => "occurred",
            },
            self.link,
            self.key_id
                .as_deref()
                .map(|k| format!(" key_ID {k}"))
                .unwrap_or_default(),
            self.detail
        )
    }

    /// Writes the event to the log: errors at ERROR, warnings at WARN, clears at INFO... except
    /// that a clear of an error is logged at WARN so that a journal filtered at warning
    /// shows both ends of an outage.
    pub fn log(&self) {
        let msg = self.message();
        let (id, name, action) = (self.kind.id(), self.kind.name(), self.action.as_str());
        let link = self.link.as_str();
        match (self.kind.severity(), self.action) {
            ("error", AlarmAction::Raise | AlarmAction::Event) => {
                tracing::error!(alarm_id = id, alarm = name, action, link, "{msg}")
            }
            ("error", AlarmAction::Clear) | (_, AlarmAction::Raise | AlarmAction::Event) => {
                tracing::warn!(alarm_id = id, alarm = name, action, link, "{msg}")
            }
            _ => tracing::info!(alarm_id = id, alarm = name, action, link, "{msg}"),
        }
    }

    /// The environment a hook gets (and nothing else but PATH).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("QKD_MACSEC_ALARM_ID", self.kind.id().to_owned()),
            ("QKD_MACSEC_ALARM_NAME", self.kind.name().to_owned()),
            ("QKD_MACSEC_ALARM_ACTION", self.action.as_str().to_owned()),
            ("QKD_MACSEC_ALARM_SEVERITY", self.kind.severity().to_owned()),
            ("QKD_MACSEC_LINK", self.link.clone()),
            ("QKD_MACSEC_KEY_ID", self.key_id.clone().unwrap_or_default()),
            ("QKD_MACSEC_ALARM_DETAIL", self.detail.clone()),
            (
                "QKD_MACSEC_ALARM_TIME",
                format!("{:.3}", super::status::unix_now()),
            ),
        ]
    }
}

/// Per-link raise/clear bookkeeping: reports from the core raise, status snapshots clear.
#[derive(Debug, Default)]
pub struct AlarmTracker {
    link: String,
    raised: Vec<AlarmKind>,
    /// The active key when AklWarning or CakExpired were raised (they clear on a new key).
    key_at_raise: Option<String>,
}

impl AlarmTracker {
    pub fn new(link: &str) -> Self {
        Self {
            link: link.to_owned(),
            ..Self::default()
        }
    }

    /// Identifiers of the alarms currently raised.
    pub fn active(&self) -> Vec<String> {
        self.raised.iter().map(|k| k.id().to_owned()).collect()
    }

    fn ev(
        &self,
        kind: AlarmKind,
        action: AlarmAction,
        key_id: Option<String>,
        detail: String,
    ) -> AlarmEvent {
        AlarmEvent {
            kind,
            action,
            link: self.link.clone(),
            key_id,
            detail,
        }
    }

    fn raise(
        &mut self,
        kind: AlarmKind,
        key_id: Option<String>,
        detail: String,
    ) -> Option<AlarmEvent> {
        if !kind.stateful() {
            return Some(self.ev(kind, AlarmAction::Event, key_id, detail));
        }
        if self.raised.contains(&kind) {
            return None;
        }
        self.raised.push(kind);
        Some(self.ev(kind, AlarmAction::Raise, key_id, detail))
    }

    fn clear(
        &mut self,
        kind: AlarmKind,
        key_id: Option<String>,
        detail: String,
    ) -> Option<AlarmEvent> {
        let i = self.raised.iter().position(|k| *k == kind)?;
        self.raised.remove(i);
        Some(self.ev(kind, AlarmAction::Clear, key_id, detail))
    }

    /// A report of the core (`Command::Report`).
    pub fn on_report(&mut self, r: &Report, active_key: Option<String>) -> Vec<AlarmEvent> {
        let out = match r {
            Report::Warn { key, used } => {
                self.key_at_raise = Some(key.key_id.to_string());
                self.raise(
                    AlarmKind::AklWarning,
                    Some(key.key_id.to_string()),
                    format!(
                        "active key KN {} has used {:.1}% of its lifetime and no rollover completed",
                        key.kn,
                        used * 100.0
                    ),
                )
            }
            Report::RolloverFailed { detail } => {
                self.raise(AlarmKind::RolloverFailed, active_key, detail.clone())
            }
            Report::CakExpired { key_id } => {
                self.key_at_raise = active_key;
                self.raise(
                    AlarmKind::CakExpired,
                    Some(key_id.to_string()),
                    "CAK lifetime over; no SAK can be derived until a fresh CAK arrives".into(),
                )
            }
            Report::Alarm(a) => match a {
                Alarm::AklExhausted { key, by } => self.raise(
                    AlarmKind::LinkStalled,
                    Some(key.key_id.to_string()),
                    format!("active key lifetime exhausted ({by:?}) with no fresh key; traffic stalled"),
                ),
                Alarm::KeySupply {
                    consecutive_failures,
                } => self.raise(
                    AlarmKind::KeySupply,
                    active_key,
                    format!("{consecutive_failures} consecutive key requests failed"),
                ),
                Alarm::RetiredKeyOffered { key } => self.raise(
                    AlarmKind::RetiredKeyOffered,
                    Some(key.key_id.to_string()),
                    format!("a retired key (KN {}) was offered again and refused", key.kn),
                ),
                Alarm::TxSaInactive { an } => self.raise(
                    AlarmKind::TxSaInactive,
                    active_key,
                    format!("kernel shows the active TX SA on AN {an} inactive; treating the key as used up"),
                ),
                Alarm::UnexpectedTxSa { an } => self.raise(
                    AlarmKind::UnexpectedTxSa,
                    active_key,
                    format!("kernel shows TX SA on AN {an} active although it must not be; deactivated"),
                ),
            },
        };
        out.into_iter().collect()
    }

    /// A fresh status snapshot: clears what no longer holds.
    /// The link's state after a turn of its loop: whether it is stalled, the key it transmits
    /// with, and whether key requests succeed again (no failure since the last success).
    pub fn on_state(
        &mut self,
        stalled: bool,
        key: Option<String>,
        supply_ok: bool,
    ) -> Vec<AlarmEvent> {
        let mut out = Vec::new();
        if !stalled {
            out.extend(self.clear(
                AlarmKind::LinkStalled,
                key.clone(),
                "a fresh key is installed on both ends; traffic flows".into(),
            ));
        }
        let new_key = key.is_some() && key != self.key_at_raise;
        if new_key {
            out.extend(self.clear(
                AlarmKind::AklWarning,
                key.clone(),
                "rolled over to a fresh key".into(),
            ));
            out.extend(self.clear(
                AlarmKind::CakExpired,
                key.clone(),
                "transmitting with a key from a fresh CAK".into(),
            ));
        }
        if supply_ok {
            out.extend(self.clear(
                AlarmKind::KeySupply,
                key,
                "key requests succeed again".into(),
            ));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("alarm hook {program}: cannot start: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("alarm hook {program}: killed after the {timeout:?} timeout")]
    Timeout { program: String, timeout: Duration },
    #[error("alarm hook {program}: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("alarm hook {program} exited with {status}: {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs the hook once for `ev`: argv as configured (no shell), a clean environment with PATH
/// and the alarm variables, stdin from /dev/null, killed at the timeout.
pub async fn run_hook(hook: &AlarmHook, ev: &AlarmEvent) -> Result<(), HookError> {
    let program = hook.command.first().cloned().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&hook.command[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(ev.env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    let timeout = hook.timeout.get();
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => return Err(HookError::Timeout { program, timeout }),
        Ok(r) => r.map_err(|source| HookError::Wait {
            program: program.clone(),
            source,
        })?,
    };
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        stderr.truncate(500);
        return Err(HookError::Failed {
            program,
            status: out.status,
            stderr,
        });
    }
    Ok(())
}

/// Queue size of the hook runner; alarms beyond it are logged but not hooked.
const HOOK_QUEUE: usize = 64;

/// A handle that logs alarm events and hands them to the hook runner (one hook at a time, in
/// order, so a slow pager never reorders raise and clear).
#[derive(Debug, Clone)]
pub struct AlarmSink {
    tx: Option<tokio::sync::mpsc::Sender<AlarmEvent>>,
}

impl AlarmSink {
    /// Starts the runner task when a hook is configured. Call inside a tokio runtime.
    pub fn start(hook: Option<AlarmHook>) -> Self {
        let Some(hook) = hook else {
            return Self { tx: None };
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<AlarmEvent>(HOOK_QUEUE);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match run_hook(&hook, &ev).await {
                    Ok(()) => tracing::debug!(alarm_id = ev.kind.id(), "alarm hook ran"),
                    Err(e) => {
                        tracing::warn!(alarm_id = ev.kind.id(), error = %e, "alarm hook failed")
                    }
                }
            }
        });
        Self { tx: Some(tx) }
    }

    pub fn emit(&self, ev: AlarmEvent) {
        ev.log();
        if let Some(tx) = &self.tx {
            if tx.try_send(ev).is_err() {
                tracing::warn!(
                    "alarm hook queue full or closed; this alarm was logged but not hooked"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;
    use crate::keyx::KeyId;
    use crate::watchdog::{Exhaustion, KeyRef};

    fn key(n: u8) -> KeyRef {
        KeyRef {
            key_id: KeyId([n; 16]),
            kn: u32::from(n),
        }
    }

    #[test]
    fn identifiers_are_unique_and_well_formed() {
        let mut ids: Vec<_> = AlarmKind::ALL.iter().map(|k| k.id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), AlarmKind::ALL.len());
        for k in AlarmKind::ALL {
            assert!(k.id().starts_with("QKDMACSEC-W") || k.id().starts_with("QKDMACSEC-E"));
            let doc = include_str!("../../../docs/alarms.md");
            assert!(doc.contains(k.id()), "docs/alarms.md lacks {}", k.id());
            assert!(doc.contains(k.name()), "docs/alarms.md lacks {}", k.name());
        }
    }

    #[test]
    fn stall_raises_once_and_clears_on_a_fresh_key() {
        let mut t = AlarmTracker::new("l1");
        let r = Report::Alarm(Alarm::AklExhausted {
            key: key(1),
            by: Exhaustion::Age,
        });
        let ev = t.on_report(&r, None);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, AlarmKind::LinkStalled);
        assert_eq!(ev[0].action, AlarmAction::Raise);
        assert!(ev[0]
            .message()
            .starts_with("QKDMACSEC-E001 link-stalled raised: link l1"));
        assert!(t.on_report(&r, None).is_empty(), "raised once");
        assert_eq!(t.active(), ["QKDMACSEC-E001"]);
        let key = Some(KeyId([1; 16]).to_string());
        assert!(t.on_state(true, key.clone(), false).is_empty());
        let ev = t.on_state(false, key, false);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].action, AlarmAction::Clear);
        assert!(t.active().is_empty());
    }

    #[test]
    fn warning_clears_on_rollover_and_events_do_not_latch() {
        let mut t = AlarmTracker::new("l1");
        let ev = t.on_report(
            &Report::Warn {
                key: key(1),
                used: 0.9,
            },
            None,
        );
        assert_eq!(ev[0].kind, AlarmKind::AklWarning);
        assert_eq!(
            ev[0].key_id.as_deref(),
            Some(KeyId([1; 16]).to_string().as_str())
        );
        assert!(t
            .on_state(false, Some(KeyId([1; 16]).to_string()), false)
            .iter()
            .all(|e| e.kind != AlarmKind::AklWarning));
        let ev = t.on_state(false, Some(KeyId([2; 16]).to_string()), false);
        assert!(ev
            .iter()
            .any(|e| e.kind == AlarmKind::AklWarning && e.action == AlarmAction::Clear));
        let f = Report::RolloverFailed { detail: "x".into() };
        assert_eq!(t.on_report(&f, None)[0].action, AlarmAction::Event);
        assert_eq!(t.on_report(&f, None).len(), 1, "events repeat");
        assert!(t.active().is_empty());
    }

    #[test]
    fn event_environment_has_no_key_material() {
        let ev = AlarmEvent {
            kind: AlarmKind::KeySupply,
            action: AlarmAction::Raise,
            link: "l".into(),
            key_id: Some("kid".into()),
            detail: "d".into(),
        };
        let env = ev.env();
        let names: Vec<_> = env.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"QKD_MACSEC_KEY_ID"));
        assert!(names.iter().all(|n| n.starts_with("QKD_MACSEC_")));
        assert!(!names
            .iter()
            .any(|n| n.contains("KEY_") && !n.ends_with("KEY_ID")));
    }

    fn hook(cmd: &[&str], timeout_ms: u64) -> AlarmHook {
        AlarmHook {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: HumanDuration::from_millis(timeout_ms),
        }
    }

    fn event() -> AlarmEvent {
        AlarmEvent {
            kind: AlarmKind::LinkStalled,
            action: AlarmAction::Raise,
            link: "site-a".into(),
            key_id: Some("4a1e6c1e-0000-4000-8000-000000000001".into()),
            detail: "exhausted; $(touch /tmp/never)".into(),
        }
    }

    /// A real process: /usr/bin/env writes its environment to a file (argv, no shell).
    #[tokio::test]
    async fn hook_runs_a_real_process_with_the_alarm_environment() {
        let dir = std::env::temp_dir().join(format!("qkd-ops-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("env.txt");
        let h = hook(
            &[
                "/bin/sh",
                "-c",
                "env > \"$1\"",
                "hook",
                out.to_str().unwrap(),
            ],
            5000,
        );
        run_hook(&h, &event()).await.unwrap();
        let env = std::fs::read_to_string(&out).unwrap();
        assert!(env.contains("QKD_MACSEC_ALARM_ID=QKDMACSEC-E001"), "{env}");
        assert!(env.contains("QKD_MACSEC_ALARM_ACTION=raise"), "{env}");
        assert!(env.contains("QKD_MACSEC_LINK=site-a"), "{env}");
        assert!(env.contains("QKD_MACSEC_KEY_ID=4a1e6c1e-0000-4000-8000-000000000001"));
        // The detail arrives verbatim; nothing expanded it.
        assert!(env.contains("QKD_MACSEC_ALARM_DETAIL=exhausted; $(touch /tmp/never)"));
        // A clean environment: nothing of ours leaks (e.g. HOME, CARGO_*).
        assert!(!env.contains("CARGO_"), "{env}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn hook_failures_are_reported() {
        let e = run_hook(&hook(&["/nonexistent/pager"], 1000), &event())
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/pager"), "{e}");

        let e = run_hook(
            &hook(&["/bin/sh", "-c", "echo nope >&2; exit 3"], 5000),
            &event(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");

        let t0 = std::time::Instant::now();
        let e = run_hook(&hook(&["/bin/sleep", "30"], 200), &event())
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the hook was not killed"
        );
    }
}
