//! Operating the agent: the status socket and its client ([`status`], [`socket`], [`client`]),
//! Prometheus metrics ([`metrics`]) and alarms with their hook ([`alarm`]). [`LinkOps`] is what
//! the IO loop (agent/run.rs) keeps per link to feed them.

pub mod alarm;
pub mod client;
pub mod metrics;
pub mod socket;
pub mod status;

use std::time::Duration;

use crate::agent::core::{Report, Status};
use crate::dataplane::{Dataplane, Direction};

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

    /// Completes the core's snapshot with the IO side and clears alarms that no longer hold.
    pub fn complete(&mut self, mut s: Status) -> Status {
        self.active_key = s.active_key_id.clone();
        s.io = self.io.clone();
        for ev in self.alarms.on_status(&s) {
            self.sink.emit(ev);
        }
        s.io.active_alarms = self.alarms.active();
        s
    }
}
