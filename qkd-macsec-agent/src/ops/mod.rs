//! Operating the agent: the status socket and its client ([`status`], [`socket`], [`client`]),
//! Prometheus metrics ([`metrics`]) and alarms with their hook ([`alarm`]). [`LinkOps`] is what
//! the IO loop (agent/run.rs) keeps per link to feed them.

pub mod alarm;
pub mod client;
pub mod metrics;
pub mod socket;
pub mod status;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::agent::core::{Report, Snapshot};
use crate::dataplane::{Dataplane, Direction};
use status::Status;

/// Per-link operator state kept by the IO loop.
#[derive(Debug)]
pub struct LinkOps {
    pub io: status::IoStats,
    alarms: alarm::AlarmTracker,
    sink: alarm::AlarmSink,
    active_key: Option<String>,
}

impl LinkOps {
    pub fn new(label: &str, sink: alarm::AlarmSink) -> Self {
        Self {
            io: status::IoStats::default(),
            alarms: alarm::AlarmTracker::new(label),
            sink,
            active_key: None,
        }
    }

    /// A KME answer: `result` is one of [`status::FETCH_RESULTS`].
    pub fn fetch_done(
        &mut self,
        request: &str,
        result: &str,
        latency: Duration,
        error: Option<String>,
    ) {
        self.io.record_fetch(request, result, latency, error);
    }

    /// A report of the core: raises alarms (logged with their identifiers, hook run).
    pub fn report(&mut self, r: &Report) {
        if let Report::RolloverFailed { detail } = r {
            self.io.set_error(format!("rollover failed: {detail}"));
        }
        for ev in self.alarms.on_report(r, self.active_key.clone()) {
            if ev.action != alarm::AlarmAction::Clear {
                self.io.set_error(ev.message());
            }
            self.sink.emit(ev);
        }
    }

    /// Reads the data plane's counters for the status (cheap map reads, once per poll).
    pub fn read_dataplane(&mut self, dp: &Dataplane) {
        if let Ok(c) = dp.if_counters() {
            self.io.stall_drops_rx = c.rx_stall_drop.frames;
            self.io.stall_drops_tx = c.tx_stall_drop.frames;
            self.io.lldp_delivered = c.lldp_delivered.frames;
            self.io.lldp_rate_limited = c.lldp_rate_limited.frames;
            self.io.events_lost = c.events_lost.frames;
        }
        if let Ok(sas) = dp.registered_sas() {
            self.io.sas = sas
                .iter()
                .filter_map(|(key, _, _)| {
                    let c = dp.sa_counters(key).ok()?;
                    Some(status::SaStat {
                        direction: match key.direction {
                            Direction::Tx => "tx",
                            Direction::Rx => "rx",
                        }
                        .into(),
                        an: key.an,
                        frames: c.frames,
                        highest_pn: c.highest_pn,
                    })
                })
                .collect();
        }
    }

    /// After every turn of the link's loop: clears the alarms that no longer hold. Cheap (no
    /// status object is built).
    pub fn observe(&mut self, snap: &Snapshot) {
        let key = snap.active.map(|(k, _)| k.key_id.to_string());
        self.active_key = key.clone();
        let supply_ok = snap.consecutive_fetch_failures == 0
            && self
                .io
                .last_fetch
                .as_ref()
                .is_some_and(|f| f.result == "ok");
        let stalled = snap.state == crate::agent::core::LinkState::Stalled;
        for ev in self.alarms.on_state(stalled, key, supply_ok) {
            self.sink.emit(ev);
        }
    }

    /// The link's status object, when a client asks for it.
    pub fn status(&self, snap: &Snapshot) -> Status {
        let mut s = Status::new(snap, self.io.clone());
        s.io.active_alarms = self.alarms.active();
        s
    }
}

/// What a link task receives when a client wants its status: where to send it.
pub type StatusRequest = oneshot::Sender<Status>;

/// Status on demand: the status socket and the metrics endpoint ask every link task when a
/// client asks, instead of every link rebuilding its status on every turn of its loop.
#[derive(Debug, Clone)]
pub struct StatusHub {
    links: std::sync::Arc<Vec<mpsc::Sender<StatusRequest>>>,
}

impl StatusHub {
    /// How long a link task has to answer (it answers between two batches of its own work).
    pub const ANSWER_WITHIN: Duration = Duration::from_secs(2);

    /// A hub for `links` link tasks, and the receiver each task polls.
    pub fn new(links: usize) -> (Self, Vec<mpsc::Receiver<StatusRequest>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..links).map(|_| mpsc::channel(4)).unzip();
        (
            Self {
                links: std::sync::Arc::new(tx),
            },
            rx,
        )
    }

    /// Every link's status, in config order; `None` for a link whose task has stopped or did
    /// not answer within [`StatusHub::ANSWER_WITHIN`].
    pub async fn collect(&self) -> Vec<Option<Status>> {
        // Ask all first, then wait: the links answer in parallel.
        let pending: Vec<Option<oneshot::Receiver<Status>>> = self
            .links
            .iter()
            .map(|tx| {
                let (otx, orx) = oneshot::channel();
                tx.try_send(otx).ok().map(|()| orx)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Self::ANSWER_WITHIN;
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Some(rx) => tokio::time::timeout_at(deadline, rx)
                    .await
                    .ok()
                    .and_then(|r| r.ok()),
                None => None,
            });
        }
        out
    }
}

/// `qkd-macsec-agent check-config --config FILE`: loads and validates like `run` does, without
/// touching the system (the systemd unit's ExecStartPre, and for operators before a restart).
pub fn check_config(path: &std::path::Path) -> Result<String, crate::config::ConfigError> {
    let cfg = crate::config::Config::load(path)?;
    let links: Vec<String> = cfg
        .link
        .iter()
        .map(|l| {
            format!(
                "{} ({} on {}, {:?}, profile {:?})",
                l.label(),
                l.macsec_interface,
                l.lower_interface,
                l.role(),
                l.profile
            )
        })
        .collect();
    Ok(format!(
        "{}: OK, {} link(s): {}",
        path.display(),
        links.len(),
        links.join("; ")
    ))
}

/// Writes roff man pages for `cmd` and each visible subcommand into `dir` (section 8:
/// system administration), named `qkd-macsec-agent.8`, `qkd-macsec-agent-run.8`, ...
pub fn write_man_pages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let cmd = cmd.version(env!("CARGO_PKG_VERSION"));
    let root = cmd.get_name().to_owned();
    // The page title is the display name (`qkd-macsec-agent-run`), the synopsis the words an
    // operator types (`qkd-macsec-agent run`).
    let mut write = |name: String, words: String, c: clap::Command| -> std::io::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c.display_name(name.clone()).bin_name(words))
            .section("8")
            .render(&mut buf)?;
        let file = format!("{name}.8");
        std::fs::write(dir.join(&file), buf)?;
        written.push(file);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let n = sub.get_name();
        write(format!("{root}-{n}"), format!("{root} {n}"), sub.clone())?;
    }
    write(root.clone(), root, cmd)?;
    Ok(written)
}
