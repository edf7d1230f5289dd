//! The key-ID exchange state machine of one link (sans-IO, clock injected).
//!
//! It turns intentions (master: "deliver this key", "install this key at AN"; slave: "this is
//! what my KME said", "this is what the kernel said") into authenticated, retransmitted
//! payloads, and received payloads into events, per docs/protocol.md section 3. It holds no
//! key material except ICKs and the master's keys between fetch and confirmation.
//!
//! IO contract: feed received TLV payloads to [`Keyx::handle_payload`], send every payload from
//! [`Keyx::poll_transmit`] in the project's LLDP TLV, act on [`Keyx::poll_event`], and call
//! [`Keyx::handle_timeout`] at [`Keyx::poll_timeout`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::auth::Ick;
use super::wire::{AckOf, Active, Body, KeyRole, Message, NackReason, Nonce, Signer};
use super::KeyId;
use crate::config::{Link, Role};
use crate::secret::SecretBytes;

/// Settings of one link's exchange.
#[derive(Debug, Clone)]
pub struct KeyxConfig {
    pub role: Role,
    pub local_sae: String,
    pub peer_sae: String,
    pub retransmit_initial: Duration,
    pub retransmit_max: Duration,
    pub hello_interval: Duration,
    /// How long the master waits for a fetched key to be confirmed (and for an INSTALL to be
    /// acknowledged) before giving up on it.
    pub availability_window: Duration,
    pub max_rx_per_sec: u32,
    /// First sequence number (the IO layer passes the start time in µs since the epoch, so a
    /// restarted agent continues above its old numbers).
    pub initial_seq: u64,
}

impl KeyxConfig {
    pub fn from_link(l: &Link, initial_seq: u64) -> Self {
        Self {
            role: l.role(),
            local_sae: l.local_sae_id.clone(),
            peer_sae: l.peer_sae_id.clone(),
            retransmit_initial: l.keyx.retransmit_initial.get(),
            retransmit_max: l.keyx.retransmit_max.get(),
            hello_interval: l.keyx.hello_interval.get(),
            availability_window: l.kme.availability_window.get(),
            max_rx_per_sec: l.keyx.max_rx_per_sec,
            initial_seq,
        }
    }

    fn master_slave(&self) -> (&str, &str) {
        match self.role {
            Role::Master => (&self.local_sae, &self.peer_sae),
            Role::Slave => (&self.peer_sae, &self.local_sae),
        }
    }
}

/// Why the master gave up on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// Not confirmed within the availability window.
    Timeout,
    /// The slave refused it.
    Refused(NackReason),
}

/// What the exchange tells the IO layer.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// Master: the slave proved it holds the key. The key is handed over for the profile.
    KeyConfirmed {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        key: SecretBytes,
    },
    /// Master: the key will not be shared; it has been dropped. Fetch another.
    KeyLost { key_id: KeyId, reason: LostReason },
    /// Master: the slave installed the SAK at `an` and transmits with it; switch TX now.
    PeerInstalled { key_id: KeyId, kn: u32, an: u8 },
    /// Master: the slave refused or never answered an INSTALL.
    InstallFailed {
        key_id: KeyId,
        kn: u32,
        an: u8,
        reason: LostReason,
    },
    /// Slave: fetch this key from the KME (dec_keys) and report with [`Keyx::fetched`].
    FetchKey {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
    },
    /// Slave: the key was fetched and confirmed to the master; hand it to the profile.
    KeyReceived {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        key: SecretBytes,
    },
    /// Slave: an authenticated INSTALL. Install RX and TX SA at `an`, switch TX, report with
    /// [`Keyx::installed`].
    InstallRequested {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: u8,
        nonce: Option<Nonce>,
    },
    /// The peer's status.
    PeerHello {
        active: Option<Active>,
        held: u8,
        authenticated: bool,
    },
}

/// Counters of what was dropped, for the status socket and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub received: u64,
    pub malformed: u64,
    pub bad_tag: u64,
    pub unknown_auth_key: u64,
    pub replayed: u64,
    pub wrong_sender: u64,
    pub rate_limited: u64,
    pub unexpected: u64,
    pub sent: u64,
}

/// Size of the replay window (as IPsec ESP's default).
const WINDOW: u64 = 64;
/// Slave: KME requests in flight at most.
pub const MAX_FETCHES_IN_FLIGHT: usize = 4;
/// ICKs remembered at most (pending + confirmed + anchor); the oldest non-anchor goes first.
const MAX_ICKS: usize = 128;

#[derive(Debug, Default)]
struct ReplayWindow {
    top: u64,
    bits: u64,
    any: bool,
}

impl ReplayWindow {
    /// Accepts each sequence number once, tolerating reordering within the window.
    fn accept(&mut self, seq: u64) -> bool {
        if !self.any {
            self.any = true;
            self.top = seq;
            self.bits = 1;
            return true;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = seq;
            true
        } else {
            let back = self.top - seq;
            if back >= WINDOW || self.bits & (1 << back) != 0 {
                false
            } else {
                self.bits |= 1 << back;
                true
            }
        }
    }
}

#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A request the master retransmits until answered.
#[derive(Debug)]
struct Outstanding {
    body: Body,
    next_at: Instant,
    delay: Duration,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Req {
    Announce(KeyId),
    Install(KeyId, u32),
}

/// The exchange of one link.
pub struct Keyx {
    cfg: KeyxConfig,
    seq: u64,
    icks: HashMap<KeyId, Ick>,
    /// Insertion order of `icks`, for the bound.
    ick_order: VecDeque<KeyId>,
    anchor: Option<KeyId>,
    retired: HashSet<KeyId>,
    windows: HashMap<KeyId, ReplayWindow>,
    bucket: TokenBucket,
    // master
    pending_keys: HashMap<KeyId, (KeyRole, u32, SecretBytes)>,
    outstanding: HashMap<Req, Outstanding>,
    // slave
    fetching: HashMap<KeyId, (KeyRole, u32)>,
    received: HashMap<KeyId, (KeyRole, u32)>,
    installing: HashSet<(KeyId, u32, u8)>,
    installed: HashSet<(KeyId, u32, u8)>,
    // both
    status: (Option<Active>, u8),
    next_hello: Instant,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl std::fmt::Debug for Keyx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyx")
            .field("role", &self.cfg.role)
            .field("anchor", &self.anchor)
            .field("icks", &self.icks.len())
            .field("outstanding", &self.outstanding.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Keyx {
    /// A fresh exchange; it sends its first HELLO at `now`.
    pub fn new(cfg: KeyxConfig, now: Instant) -> Self {
        let rate = f64::from(cfg.max_rx_per_sec.max(1));
        Self {
            seq: cfg.initial_seq,
            cfg,
            icks: HashMap::new(),
            ick_order: VecDeque::new(),
            anchor: None,
            retired: HashSet::new(),
            windows: HashMap::new(),
            bucket: TokenBucket {
                tokens: rate,
                rate,
                last: None,
            },
            pending_keys: HashMap::new(),
            outstanding: HashMap::new(),
            fetching: HashMap::new(),
            received: HashMap::new(),
            installing: HashSet::new(),
            installed: HashSet::new(),
            status: (None, 0),
            next_hello: now,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The key whose ICK authenticates ANNOUNCE, NACK and HELLO, once one is confirmed.
    pub fn anchor(&self) -> Option<KeyId> {
        self.anchor
    }

    /// What the next HELLO reports.
    pub fn set_status(&mut self, active: Option<Active>, held: usize) {
        self.status = (active, u8::try_from(held).unwrap_or(u8::MAX));
    }

    // ---------------- master ----------------

    /// Master: deliver a key just fetched with `enc_keys` (at `fetched_at`). The master gives
    /// up on it at `fetched_at + availability_window`, or earlier at `slave_deadline` when the
    /// KME said when it drops the key.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is a distinct fact about the fetched key; a one-use struct adds nothing"
    )]
    pub fn announce(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        key: SecretBytes,
        fetched_at: Instant,
        slave_deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), KeyxError> {
        self.require(Role::Master)?;
        if self.retired.contains(&key_id) || self.pending_keys.contains_key(&key_id) {
            return Err(KeyxError::Duplicate(key_id));
        }
        let ick = self.derive_ick(&key, key_id)?;
        self.add_ick(ick);
        self.pending_keys.insert(key_id, (role, kn, key));
        let body = Body::Announce { key_id, role, kn };
        let window_end = fetched_at + self.cfg.availability_window;
        let deadline = slave_deadline.map_or(window_end, |d| d.min(window_end));
        self.start(Req::Announce(key_id), body, deadline, now);
        Ok(())
    }

    /// Master: ask the slave to install a confirmed key's SAK at `an` (after installing the
    /// RX SA locally). `nonce` for the CAK role.
    pub fn install(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: u8,
        nonce: Option<Nonce>,
        now: Instant,
    ) -> Result<(), KeyxError> {
        self.require(Role::Master)?;
        if self.retired.contains(&key_id) {
            return Err(KeyxError::Retired(key_id));
        }
        if !self.icks.contains_key(&key_id) || self.pending_keys.contains_key(&key_id) {
            return Err(KeyxError::NotConfirmed(key_id));
        }
        // A newer INSTALL supersedes any older one still retransmitting.
        self.outstanding
            .retain(|r, _| !matches!(r, Req::Install(..)));
        let body = Body::Install {
            key_id,
            role,
            kn,
            an,
            nonce,
        };
        self.start(
            Req::Install(key_id, kn),
            body,
            now + self.cfg.availability_window,
            now,
        );
        Ok(())
    }

    // ---------------- slave ----------------

    /// Slave: the outcome of `dec_keys` for a key an ANNOUNCE named.
    pub fn fetched(
        &mut self,
        key_id: KeyId,
        result: Result<SecretBytes, NackReason>,
    ) -> Result<(), KeyxError> {
        self.require(Role::Slave)?;
        let Some((role, kn)) = self.fetching.remove(&key_id) else {
            return Err(KeyxError::NotRequested(key_id));
        };
        match result {
            Ok(key) => {
                let ick = self.derive_ick(&key, key_id)?;
                self.add_ick(ick);
                self.received.insert(key_id, (role, kn));
                // Proof of possession: the ACK is tagged with the new key's ICK.
                self.send(
                    Some(key_id),
                    Body::Ack {
                        of: AckOf::Announce,
                        key_id,
                        role,
                        kn,
                        an: None,
                    },
                );
                self.set_anchor(key_id);
                self.events.push_back(Event::KeyReceived {
                    key_id,
                    role,
                    kn,
                    key,
                });
            }
            Err(reason) => {
                self.send(
                    self.anchor,
                    Body::Nack {
                        key_id,
                        role,
                        kn,
                        reason,
                    },
                );
            }
        }
        Ok(())
    }

    /// Slave: the outcome of installing what an INSTALL asked for.
    pub fn installed(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: u8,
        result: Result<(), NackReason>,
    ) -> Result<(), KeyxError> {
        self.require(Role::Slave)?;
        if !self.installing.remove(&(key_id, kn, an)) {
            return Err(KeyxError::NotRequested(key_id));
        }
        match result {
            Ok(()) => {
                self.installed.insert((key_id, kn, an));
                self.send(
                    Some(key_id),
                    Body::Ack {
                        of: AckOf::Install,
                        key_id,
                        role,
                        kn,
                        an: Some(an),
                    },
                );
            }
            Err(reason) => self.send(
                self.auth_for_nack(key_id),
                Body::Nack {
                    key_id,
                    role,
                    kn,
                    reason,
                },
            ),
        }
        Ok(())
    }

    // ---------------- both ----------------

    /// A key is used up: its ICK is forgotten (unless it is the anchor, which only
    /// authenticates messages) and any INSTALL naming it is refused from now on.
    pub fn retire(&mut self, key_id: KeyId) {
        self.retired.insert(key_id);
        self.pending_keys.remove(&key_id);
        self.received.remove(&key_id);
        self.outstanding.retain(|r, _| match r {
            Req::Announce(k) | Req::Install(k, _) => *k != key_id,
        });
        if self.anchor != Some(key_id) {
            self.drop_ick(key_id);
        }
    }

    /// A payload from the peer's TLV. Returns true when it was authenticated by a key both
    /// ends hold, was fresh and came from the peer (the caller may then trust the frame's
    /// source address, e.g. to learn the peer's SCI).
    pub fn handle_payload(&mut self, payload: &[u8], now: Instant) -> bool {
        self.stats.received += 1;
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(error = %e, "dropping malformed key-exchange payload");
                return false;
            }
        };
        // Authentication first: it decides whether the rate limit applies.
        let authenticated = match msg.auth {
            Some(k) => match self.icks.get(&k) {
                Some(ick) if ick.verify(payload) => true,
                Some(_) => {
                    self.stats.bad_tag += 1;
                    self.limited(now);
                    tracing::debug!(auth = %k, "dropping key-exchange message with a bad tag");
                    return false;
                }
                // A key we do not know: the peer restarted with a different anchor, or we
                // did. Not proof of anything, so it is treated as unauthenticated (which still
                // lets a lone ANNOUNCE or HELLO re-bootstrap the link).
                None => {
                    self.stats.unknown_auth_key += 1;
                    false
                }
            },
            None => false,
        };
        if !authenticated && !self.limited(now) {
            return false;
        }
        if msg.sender != self.cfg.peer_sae {
            self.stats.wrong_sender += 1;
            tracing::debug!(sender = %msg.sender, "dropping key-exchange message from an unexpected SAE");
            return false;
        }
        if let (true, Some(k)) = (authenticated, msg.auth) {
            if !self.windows.entry(k).or_default().accept(msg.seq) {
                self.stats.replayed += 1;
                return false;
            }
        }
        match (self.cfg.role, msg.body) {
            (_, Body::Hello { active, held }) => self.events.push_back(Event::PeerHello {
                active,
                held,
                authenticated,
            }),
            (
                Role::Master,
                Body::Ack {
                    of,
                    key_id,
                    role,
                    kn,
                    an,
                },
            ) => {
                self.on_ack(of, key_id, role, kn, an, msg.auth);
            }
            (
                Role::Master,
                Body::Nack {
                    key_id, kn, reason, ..
                },
            ) => {
                self.on_nack(key_id, kn, reason, authenticated);
            }
            (Role::Slave, Body::Announce { key_id, role, kn }) => {
                self.on_announce(key_id, role, kn);
            }
            (
                Role::Slave,
                Body::Install {
                    key_id,
                    role,
                    kn,
                    an,
                    nonce,
                },
            ) => {
                self.on_install(key_id, role, kn, an, nonce, msg.auth);
            }
            _ => {
                self.stats.unexpected += 1;
                return false;
            }
        }
        authenticated
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_hello {
            let (active, held) = self.status.clone();
            self.send(self.anchor, Body::Hello { active, held });
            self.next_hello = now + self.cfg.hello_interval;
        }
        let mut expired = Vec::new();
        let mut resend = Vec::new();
        for (req, o) in &mut self.outstanding {
            if now >= o.deadline {
                expired.push(*req);
            } else if now >= o.next_at {
                resend.push(o.body.clone());
                o.delay = (o.delay * 2).min(self.cfg.retransmit_max);
                o.next_at = now + o.delay;
            }
        }
        for body in resend {
            let auth = self.auth_for(&body);
            self.send(auth, body);
        }
        for req in expired {
            let Some(o) = self.outstanding.remove(&req) else {
                continue;
            };
            self.give_up(o.body, LostReason::Timeout);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.outstanding
            .values()
            .map(|o| o.next_at.min(o.deadline))
            .chain(std::iter::once(self.next_hello))
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---------------- internals ----------------

    fn require(&self, role: Role) -> Result<(), KeyxError> {
        if self.cfg.role == role {
            Ok(())
        } else {
            Err(KeyxError::WrongRole(self.cfg.role))
        }
    }

    fn derive_ick(&self, key: &SecretBytes, key_id: KeyId) -> Result<Ick, KeyxError> {
        let (m, s) = self.cfg.master_slave();
        Ick::derive(key, key_id, m, s).map_err(|_| KeyxError::KeyLength {
            key_id,
            len: key.len(),
        })
    }

    fn add_ick(&mut self, ick: Ick) {
        let id = ick.key_id();
        if self.icks.insert(id, ick).is_none() {
            self.ick_order.push_back(id);
        }
        while self.icks.len() > MAX_ICKS {
            let Some(pos) = self.ick_order.iter().position(|k| Some(*k) != self.anchor) else {
                break;
            };
            if let Some(old) = self.ick_order.remove(pos) {
                self.icks.remove(&old);
                self.windows.remove(&old);
            }
        }
    }

    fn drop_ick(&mut self, key_id: KeyId) {
        self.icks.remove(&key_id);
        self.windows.remove(&key_id);
        self.ick_order.retain(|k| *k != key_id);
    }

    fn set_anchor(&mut self, key_id: KeyId) {
        if let Some(old) = self.anchor.replace(key_id) {
            if old != key_id && self.retired.contains(&old) {
                self.drop_ick(old);
            }
        }
    }

    /// Rate limit for unauthenticated and failed messages; true = may be processed.
    fn limited(&mut self, now: Instant) -> bool {
        if self.bucket.take(now) {
            true
        } else {
            self.stats.rate_limited += 1;
            false
        }
    }

    fn auth_for(&self, body: &Body) -> Option<KeyId> {
        match body {
            // Proof of possession of the key being installed.
            Body::Install { key_id, .. } => Some(*key_id),
            _ => self.anchor,
        }
    }

    fn auth_for_nack(&self, key_id: KeyId) -> Option<KeyId> {
        if self.icks.contains_key(&key_id) {
            Some(key_id)
        } else {
            self.anchor
        }
    }

    fn send(&mut self, auth: Option<KeyId>, body: Body) {
        let msg = Message {
            seq: self.seq,
            sender: self.cfg.local_sae.clone(),
            auth,
            body,
        };
        self.seq = self.seq.wrapping_add(1);
        let signer = auth
            .and_then(|k| self.icks.get(&k))
            .map(|i| i as &dyn Signer);
        match msg.encode(signer) {
            Ok(p) => {
                self.stats.sent += 1;
                self.transmit.push_back(p);
            }
            // Only reachable by a bug (an auth key without ICK, a bad SAE-ID that config
            // validation should have caught); log it, never panic the agent.
            Err(e) => tracing::error!(error = %e, "cannot encode key-exchange message"),
        }
    }

    fn start(&mut self, req: Req, body: Body, deadline: Instant, now: Instant) {
        let auth = self.auth_for(&body);
        self.send(auth, body.clone());
        self.outstanding.insert(
            req,
            Outstanding {
                body,
                next_at: now + self.cfg.retransmit_initial,
                delay: self.cfg.retransmit_initial,
                deadline,
            },
        );
    }

    fn give_up(&mut self, body: Body, reason: LostReason) {
        match body {
            Body::Announce { key_id, .. } => {
                // The key is dropped (zeroized) and never announced again.
                self.pending_keys.remove(&key_id);
                self.retired.insert(key_id);
                if self.anchor != Some(key_id) {
                    self.drop_ick(key_id);
                }
                self.events.push_back(Event::KeyLost { key_id, reason });
            }
            Body::Install { key_id, kn, an, .. } => {
                self.events.push_back(Event::InstallFailed {
                    key_id,
                    kn,
                    an,
                    reason,
                });
            }
            _ => {}
        }
    }

    fn on_ack(
        &mut self,
        of: AckOf,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: Option<u8>,
        auth: Option<KeyId>,
    ) {
        // Only an ACK tagged with the key it acknowledges proves possession.
        if auth != Some(key_id) {
            self.stats.unexpected += 1;
            return;
        }
        match of {
            AckOf::Announce => {
                let matches = matches!(self.pending_keys.get(&key_id), Some((r, n, _)) if *r == role && *n == kn);
                if !matches {
                    // A duplicate ACK of a key already confirmed, or one we gave up on.
                    self.stats.unexpected += 1;
                    return;
                }
                self.outstanding.remove(&Req::Announce(key_id));
                if let Some((role, kn, key)) = self.pending_keys.remove(&key_id) {
                    self.set_anchor(key_id);
                    self.events.push_back(Event::KeyConfirmed {
                        key_id,
                        role,
                        kn,
                        key,
                    });
                }
            }
            AckOf::Install => {
                let ok = matches!(
                    self.outstanding.get(&Req::Install(key_id, kn)),
                    Some(Outstanding { body: Body::Install { an: want, role: r, .. }, .. })
                        if Some(*want) == an && *r == role
                );
                if !ok {
                    self.stats.unexpected += 1;
                    return;
                }
                self.outstanding.remove(&Req::Install(key_id, kn));
                self.events.push_back(Event::PeerInstalled {
                    key_id,
                    kn,
                    an: an.unwrap_or_default(),
                });
            }
        }
    }

    fn on_nack(&mut self, key_id: KeyId, kn: u32, reason: NackReason, authenticated: bool) {
        // Unauthenticated refusals count only while no secret is shared yet (bootstrap).
        if !authenticated && self.anchor.is_some() {
            self.stats.unexpected += 1;
            return;
        }
        if let Some(o) = self.outstanding.get(&Req::Install(key_id, kn)) {
            if reason == NackReason::KmeUnavailable {
                return;
            }
            let body = o.body.clone();
            self.outstanding.remove(&Req::Install(key_id, kn));
            self.give_up(body, LostReason::Refused(reason));
            return;
        }
        if self.outstanding.contains_key(&Req::Announce(key_id)) {
            match reason {
                // Retryable: keep retransmitting until the availability window closes.
                NackReason::KmeUnavailable => {}
                _ => {
                    if let Some(o) = self.outstanding.remove(&Req::Announce(key_id)) {
                        self.give_up(o.body, LostReason::Refused(reason));
                    }
                }
            }
            return;
        }
        self.stats.unexpected += 1;
    }

    /// A retired key is never taken back into use: an announce or install of one gets a
    /// `Retired` NACK and changes nothing. Returns whether the key was retired.
    fn nack_if_retired(&mut self, key_id: KeyId, role: KeyRole, kn: u32) -> bool {
        if !self.retired.contains(&key_id) {
            return false;
        }
        self.send(
            self.anchor,
            Body::Nack {
                key_id,
                role,
                kn,
                reason: NackReason::Retired,
            },
        );
        true
    }

    fn on_announce(&mut self, key_id: KeyId, role: KeyRole, kn: u32) {
        if self.nack_if_retired(key_id, role, kn) {
            return;
        }
        if let Some(&(r, n)) = self.received.get(&key_id) {
            // Duplicate or retransmission: answer again, no second KME request.
            self.send(
                Some(key_id),
                Body::Ack {
                    of: AckOf::Announce,
                    key_id,
                    role: r,
                    kn: n,
                    an: None,
                },
            );
            return;
        }
        if self.fetching.contains_key(&key_id) {
            return;
        }
        if self.fetching.len() >= MAX_FETCHES_IN_FLIGHT {
            self.stats.rate_limited += 1;
            return;
        }
        self.fetching.insert(key_id, (role, kn));
        self.events.push_back(Event::FetchKey { key_id, role, kn });
    }

    fn on_install(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: u8,
        nonce: Option<Nonce>,
        auth: Option<KeyId>,
    ) {
        if self.nack_if_retired(key_id, role, kn) {
            return;
        }
        if !self.icks.contains_key(&key_id) {
            self.send(
                self.anchor,
                Body::Nack {
                    key_id,
                    role,
                    kn,
                    reason: NackReason::UnknownKey,
                },
            );
            return;
        }
        // Only the holder of the key itself may ask for it to be installed.
        if auth != Some(key_id) {
            self.stats.unexpected += 1;
            return;
        }
        if self.installed.contains(&(key_id, kn, an)) {
            self.send(
                Some(key_id),
                Body::Ack {
                    of: AckOf::Install,
                    key_id,
                    role,
                    kn,
                    an: Some(an),
                },
            );
            return;
        }
        if !self.installing.insert((key_id, kn, an)) {
            return;
        }
        self.events.push_back(Event::InstallRequested {
            key_id,
            role,
            kn,
            an,
            nonce,
        });
    }
}

/// Misuse of the state machine by the caller (reported, not panicked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyxError {
    #[error("this gateway is the {0:?} on this link; that operation belongs to the other role")]
    WrongRole(Role),
    #[error("key {0} was already announced or used")]
    Duplicate(KeyId),
    #[error("key {0} is retired and is never used again")]
    Retired(KeyId),
    #[error("key {0} has not been confirmed by the peer")]
    NotConfirmed(KeyId),
    #[error("no request is outstanding for key {0}")]
    NotRequested(KeyId),
    #[error("key {key_id} is {len} bytes; QKD keys must be 16 or 32 bytes")]
    KeyLength { key_id: KeyId, len: usize },
}

#[cfg(test)]
mod tests;
