//! The active-key-lifetime (AKL) watchdog of one link: a sans-IO state machine.
//!
//! Inputs: a fresh SAK installed on both ends ([`Watchdog::handle_activated`]), packet numbers
//! used under the active key ([`Watchdog::handle_pn`]: our TX SA from the TC egress counters,
//! the peer's RX SA as far as the kernel validated it; never XDP's RX counters, which anyone
//! on the wire can forge, see `agent::core::LinkCore::handle_rx_validated`), the kernel's view
//! of each SA ([`Watchdog::handle_sa_state`]), key-fetch outcomes
//! ([`Watchdog::handle_fetch_outcome`]) and time ([`Watchdog::handle_timeout`]).
//!
//! Outputs ([`Watchdog::poll_action`]): a rollover request at `akl.rollover_at` of the
//! lifetime, a warning at `akl.warn_at`, and at exhaustion with no new key StallOn +
//! DeactivateTx + Alarm. A stall is lifted (StallOff) only by a fresh key installed on both
//! ends. The watchdog **never** falls back: a key that was replaced or used up is retired and
//! can never become active again, and it has no action that would let plaintext through
//! while stalled. It starts stalled: until the first key is installed nothing may flow.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::keyx::KeyId;

/// Identity of one SAK: the QKD key it is or was derived from, and its key number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub key_id: KeyId,
    pub kn: u32,
}

/// The lifetime limits of a SAK.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_age: Duration,
    pub max_pn: u64,
    pub rollover_at: f64,
    pub warn_at: f64,
    /// Consecutive failed key fetches tolerated before an alarm.
    pub tolerated_fetch_failures: u32,
}

impl Limits {
    fn pn_at(&self, fraction: f64) -> u64 {
        // f64 has 53 bits of mantissa; rounding down keeps the threshold at or before the exact
        // fraction, which errs on the early side.
        ((self.max_pn as f64) * fraction).floor() as u64
    }
}

/// PN values at which the dataplane should report the active transmit SA (program them into
/// the eBPF map so crossings arrive as events rather than by polling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PnThresholds {
    pub an: u8,
    pub rollover: u64,
    pub warn: u64,
    pub exhausted: u64,
}

/// Why the watchdog raised an alarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    /// The active key's lifetime ran out with no fresh key installed: traffic is stalled.
    AklExhausted { key: KeyRef, by: Exhaustion },
    /// Key fetches keep failing; the buffer or the CAK lifetime is being used up.
    KeySupply { consecutive_failures: u32 },
    /// Something tried to activate a retired key. Refused.
    RetiredKeyOffered { key: KeyRef },
    /// The kernel shows the active transmit SA inactive although the watchdog did not stall.
    TxSaInactive { an: u8 },
    /// The kernel shows a transmit SA active that must not be (retired or while stalled).
    UnexpectedTxSa { an: u8 },
}

/// Which limit ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhaustion {
    Age,
    PacketNumber,
}

/// What the watchdog asks the IO layer to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Roll over to the next key now (the key's lifetime passed `rollover_at`).
    RequestRollover {
        key: KeyRef,
    },
    /// The lifetime passed `warn_at` and the key is still active.
    Warn {
        key: KeyRef,
        used: f64,
    },
    /// Drop all data traffic on the link (eBPF stall flag).
    StallOn,
    /// Mark the kernel transmit SA at `an` inactive.
    DeactivateTx {
        an: u8,
    },
    Alarm(Alarm),
    /// A fresh key is active on both ends: let traffic flow again.
    StallOff {
        key: KeyRef,
    },
    /// The dataplane should report these PN crossings for the new active SA.
    SetPnThresholds(PnThresholds),
}

#[derive(Debug, Clone, Copy)]
struct ActiveKey {
    key: KeyRef,
    an: u8,
    since: Instant,
    pn: u64,
    rollover_requested: bool,
    warned: bool,
}

/// Why the link is stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallReason {
    /// No key has been installed yet.
    NoKey,
    /// The active key ran out.
    Exhausted(Exhaustion),
}

#[derive(Debug)]
enum State {
    Active(ActiveKey),
    Stalled(StallReason),
}

/// The AKL watchdog of one link.
#[derive(Debug)]
pub struct Watchdog {
    limits: Limits,
    state: State,
    /// Every key that was replaced or used up. Grows by one per rollover (a few thousand a
    /// month at most), which is cheap next to the guarantee it buys.
    retired: HashSet<KeyRef>,
    fetch_failures: u32,
    supply_alarmed: bool,
    actions: VecDeque<Action>,
}

impl Watchdog {
    /// A watchdog for a link with no key yet: stalled, and it says so (StallOn).
    pub fn new(limits: Limits) -> Self {
        let mut actions = VecDeque::new();
        actions.push_back(Action::StallOn);
        Self {
            limits,
            state: State::Stalled(StallReason::NoKey),
            retired: HashSet::new(),
            fetch_failures: 0,
            supply_alarmed: false,
            actions,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn is_stalled(&self) -> bool {
        matches!(self.state, State::Stalled(_))
    }

    pub fn stall_reason(&self) -> Option<StallReason> {
        match self.state {
            State::Stalled(r) => Some(r),
            State::Active(_) => None,
        }
    }

    /// The key traffic is protected with, if not stalled.
    pub fn active_key(&self) -> Option<(KeyRef, u8)> {
        match &self.state {
            State::Active(a) => Some((a.key, a.an)),
            State::Stalled(_) => None,
        }
    }

    /// When the active key became active (for the restart record).
    pub fn active_since(&self) -> Option<Instant> {
        match &self.state {
            State::Active(a) => Some(a.since),
            State::Stalled(_) => None,
        }
    }

    pub fn is_retired(&self, key: &KeyRef) -> bool {
        self.retired.contains(key)
    }

    /// Fraction of the active key's lifetime used at `now` (time or PN, whichever is further).
    pub fn used(&self, now: Instant) -> Option<f64> {
        match &self.state {
            State::Active(a) => Some(self.used_of(a, now)),
            State::Stalled(_) => None,
        }
    }

    /// What is left of the active key's lifetime at `now`: time until `max_age` and packet
    /// numbers (one per frame) until `max_pn`. `None` while stalled. For the status socket and
    /// metrics; the decisions themselves use [`Watchdog::used`]'s inputs directly.
    pub fn remaining(&self, now: Instant) -> Option<(Duration, u64)> {
        match &self.state {
            State::Active(a) => Some((
                self.limits
                    .max_age
                    .saturating_sub(now.saturating_duration_since(a.since)),
                self.limits.max_pn.saturating_sub(a.pn),
            )),
            State::Stalled(_) => None,
        }
    }

    fn used_of(&self, a: &ActiveKey, now: Instant) -> f64 {
        let age = now.saturating_duration_since(a.since).as_secs_f64();
        let t = age / self.limits.max_age.as_secs_f64();
        let p = a.pn as f64 / self.limits.max_pn as f64;
        t.max(p)
    }

    fn exhausted_by(&self, a: &ActiveKey, now: Instant) -> Option<Exhaustion> {
        if a.pn >= self.limits.max_pn {
            Some(Exhaustion::PacketNumber)
        } else if now.saturating_duration_since(a.since) >= self.limits.max_age {
            Some(Exhaustion::Age)
        } else {
            None
        }
    }

    /// A fresh SAK is installed on both ends and this gateway transmits with it at `an`.
    ///
    /// Refused (alarm, nothing else changes) if the key was retired. Re-announcing the active
    /// key is a no-op. Otherwise the previous key is retired for good.
    pub fn handle_activated(&mut self, key: KeyRef, an: u8, now: Instant) {
        self.handle_activated_since(key, an, now, now);
    }

    /// [`Watchdog::handle_activated`] with the key's lifetime counted from `since` (at most
    /// `now`): the master counts from its INSTALL, since the slave may have started
    /// transmitting with the key any time after it, before the master itself switched.
    pub fn handle_activated_since(&mut self, key: KeyRef, an: u8, since: Instant, now: Instant) {
        let since = since.min(now);
        if self.retired.contains(&key) {
            tracing::error!(key_id = %key.key_id, kn = key.kn, an, "refusing to reactivate a retired key");
            self.actions
                .push_back(Action::Alarm(Alarm::RetiredKeyOffered { key }));
            // Whoever offered it may already have switched the kernel: undo that, unless the
            // AN is the one the active key uses.
            if self.active_key().map(|(_, a)| a) != Some(an) {
                self.actions.push_back(Action::DeactivateTx { an });
            }
            return;
        }
        let was_stalled = match &self.state {
            State::Active(a) if a.key == key => return,
            State::Active(a) => {
                self.retired.insert(a.key);
                false
            }
            State::Stalled(_) => true,
        };
        let a = ActiveKey {
            key,
            an,
            since,
            pn: 0,
            rollover_requested: false,
            warned: false,
        };
        self.state = State::Active(a);
        self.actions.push_back(self.thresholds(an));
        if was_stalled {
            tracing::info!(key_id = %key.key_id, kn = key.kn, an, "fresh key installed on both ends; lifting stall");
            self.actions.push_back(Action::StallOff { key });
        }
        self.evaluate(now);
    }

    /// A restarted agent found `key` transmitting at `an` in the kernel, active since `since`
    /// with our TX SA at packet number `pn` (checked against the agent's own record, see
    /// `agent::record`). Only a watchdog that has never had a key may adopt: it leaves the
    /// stall it started with (traffic never stopped), and the key's lifetime counts from
    /// `since`, so an adopted key is rolled, warned about and stalled exactly when it would
    /// have been without the restart.
    pub fn adopt(&mut self, key: KeyRef, an: u8, since: Instant, pn: u64, now: Instant) {
        if !matches!(self.state, State::Stalled(StallReason::NoKey)) || self.retired.contains(&key)
        {
            tracing::error!(key_id = %key.key_id, kn = key.kn, an, "refusing to adopt a key into a watchdog that already had one");
            return;
        }
        // The StallOn the new watchdog queued has not reached the data plane yet.
        self.actions.retain(|a| !matches!(a, Action::StallOn));
        self.state = State::Active(ActiveKey {
            key,
            an,
            since,
            pn,
            rollover_requested: false,
            warned: false,
        });
        self.actions.push_back(self.thresholds(an));
        self.evaluate(now);
    }

    fn thresholds(&self, an: u8) -> Action {
        Action::SetPnThresholds(PnThresholds {
            an,
            rollover: self.limits.pn_at(self.limits.rollover_at),
            warn: self.limits.pn_at(self.limits.warn_at),
            exhausted: self.limits.max_pn,
        })
    }

    /// The transmit SA at `an` has reached packet number `pn`.
    pub fn handle_pn(&mut self, an: u8, pn: u64, now: Instant) {
        if let State::Active(a) = &mut self.state {
            // PNs of one SA only grow; counters that reset (a re-created map, a rekey) must not
            // make the key look younger.
            if a.an == an && pn > a.pn {
                a.pn = pn;
            }
        }
        self.evaluate(now);
    }

    /// The kernel's view of the transmit SA at `an` (polled).
    pub fn handle_sa_state(&mut self, an: u8, active: bool, pn: u64, now: Instant) {
        match &self.state {
            State::Active(a) if a.an == an => {
                if active {
                    self.handle_pn(an, pn, now);
                } else {
                    // The kernel stopped transmitting with it (e.g. PN exhausted in the kernel):
                    // treat the key as used up. Never re-enable it.
                    tracing::error!(an, "kernel shows the active transmit SA inactive");
                    self.actions
                        .push_back(Action::Alarm(Alarm::TxSaInactive { an }));
                    if let State::Active(a) = &mut self.state {
                        a.pn = a.pn.max(self.limits.max_pn);
                    }
                    self.evaluate(now);
                }
            }
            _ if active => {
                // An active transmit SA that is not the active key's: a retired SA, or anything
                // while stalled. Confidentiality first: switch it off.
                tracing::error!(
                    an,
                    "kernel shows an unexpected active transmit SA; deactivating"
                );
                self.actions
                    .push_back(Action::Alarm(Alarm::UnexpectedTxSa { an }));
                self.actions.push_back(Action::DeactivateTx { an });
            }
            _ => {}
        }
    }

    /// Outcome of one key request to the KME.
    pub fn handle_fetch_outcome(&mut self, ok: bool, now: Instant) {
        if ok {
            self.fetch_failures = 0;
            self.supply_alarmed = false;
        } else {
            self.fetch_failures = self.fetch_failures.saturating_add(1);
            if self.fetch_failures > self.limits.tolerated_fetch_failures && !self.supply_alarmed {
                self.supply_alarmed = true;
                self.actions.push_back(Action::Alarm(Alarm::KeySupply {
                    consecutive_failures: self.fetch_failures,
                }));
            }
        }
        self.evaluate(now);
    }

    /// Time passed; call at or after [`Watchdog::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.evaluate(now);
    }

    /// When the watchdog next needs [`Watchdog::handle_timeout`]: the next time threshold
    /// of the active key. `None` while stalled (only a new key can change anything).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let State::Active(a) = &self.state else {
            return None;
        };
        let at = |f: f64| a.since + self.limits.max_age.mul_f64(f);
        if !a.rollover_requested {
            Some(at(self.limits.rollover_at))
        } else if !a.warned {
            Some(at(self.limits.warn_at))
        } else {
            Some(a.since + self.limits.max_age)
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn evaluate(&mut self, now: Instant) {
        let State::Active(a) = self.state else {
            return;
        };
        if let Some(by) = self.exhausted_by(&a, now) {
            tracing::error!(key_id = %a.key.key_id, kn = a.key.kn, an = a.an, ?by,
                "active key lifetime exhausted with no fresh key: stalling traffic");
            self.retired.insert(a.key);
            self.state = State::Stalled(StallReason::Exhausted(by));
            self.actions.push_back(Action::StallOn);
            self.actions.push_back(Action::DeactivateTx { an: a.an });
            self.actions
                .push_back(Action::Alarm(Alarm::AklExhausted { key: a.key, by }));
            return;
        }
        let used = self.used_of(&a, now);
        let mut next = a;
        if !a.rollover_requested && used >= self.limits.rollover_at {
            next.rollover_requested = true;
            self.actions
                .push_back(Action::RequestRollover { key: a.key });
        }
        if !a.warned && used >= self.limits.warn_at {
            next.warned = true;
            tracing::warn!(key_id = %a.key.key_id, kn = a.key.kn, used, "active key near the end of its lifetime and not rolled over");
            self.actions.push_back(Action::Warn { key: a.key, used });
        }
        self.state = State::Active(next);
    }
}

#[cfg(test)]
mod tests;
