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
use super::wire::{sci_mac, AckOf, Active, Body, KeyRole, Message, NackReason, Nonce, Signer};
use super::{KeyId, Role};
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
    /// Random per start of this agent, never zero (the IO layer draws it from the kernel's
    /// random source). Every INSTALL and every answer is bound to the incarnation of the peer it
    /// addresses, so nothing recorded from an earlier life of either agent is accepted by the
    /// current one (docs/protocol.md 4.3).
    pub incarnation: u64,
    /// The SCI this gateway transmits with. Every message carries it under the tag; a message
    /// that claims it is refused (a reflection, or a peer with our MAC address).
    pub local_sci: u64,
}

impl KeyxConfig {
    /// How long the slave waits without an authenticated message from the master before it
    /// acts on unauthenticated ANNOUNCEs again: three HELLOs missed (MKA's peer life is three
    /// hello times too). A restarted master, which has no key in common with the slave, is heard
    /// again after that; an attacker who only injects frames is not heard while the master
    /// lives.
    pub fn peer_life(&self) -> Duration {
        self.hello_interval * 3
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
    /// Retired while still being announced (the KME handed out a key_ID that was already in
    /// use here, and that use ended).
    Retired,
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
    /// The message claims our own SCI, or the frame's source address is not the MAC of the
    /// SCI the message carries (rewritten on the way, or forged).
    pub wrong_sci: u64,
    /// Bound to an incarnation that is not this agent's current one: recorded from an earlier
    /// life of either agent and replayed, or answering a request from before a restart.
    pub stale: u64,
    /// Unauthenticated requests not acted on because a key is shared with a live peer.
    pub unauthenticated_ignored: u64,
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
    echo: u64,
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
    /// The peer's SCI and incarnation, from its last authenticated message.
    peer_sci: Option<u64>,
    peer_incarnation: Option<u64>,
    // master
    pending_keys: HashMap<KeyId, (KeyRole, u32, SecretBytes)>,
    outstanding: HashMap<Req, Outstanding>,
    /// The slave incarnation whose ACK confirmed each key: INSTALLs of the key are bound to it.
    confirmed_by: HashMap<KeyId, u64>,
    // slave (the u64s: the master incarnation the answer is bound to)
    fetching: HashMap<KeyId, (KeyRole, u32, u64)>,
    received: HashMap<KeyId, (KeyRole, u32)>,
    installing: HashMap<(KeyId, u32, u8), u64>,
    installed: HashSet<(KeyId, u32, u8)>,
    /// When the master last authenticated a message to us (see [`KeyxConfig::peer_life`]).
    master_heard: Option<Instant>,
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
            peer_sci: None,
            peer_incarnation: None,
            pending_keys: HashMap::new(),
            outstanding: HashMap::new(),
            confirmed_by: HashMap::new(),
            fetching: HashMap::new(),
            received: HashMap::new(),
            installing: HashMap::new(),
            installed: HashSet::new(),
            master_heard: None,
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

    /// The peer's SCI as its last authenticated message stated it (the frame's source address
    /// is never trusted for this: it is not covered by the tag).
    pub fn peer_sci(&self) -> Option<u64> {
        self.peer_sci
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
        // A key_ID we already know (retired, being announced, or confirmed and held or in
        // use) that the KME hands out again is never announced a second time: the two would
        // share one key and one retirement.
        if self.retired.contains(&key_id)
            || self.pending_keys.contains_key(&key_id)
            || self.icks.contains_key(&key_id)
            || self.confirmed_by.contains_key(&key_id)
        {
            return Err(KeyxError::Duplicate(key_id));
        }
        let ick = self.derive_ick(&key, key_id)?;
        self.add_ick(ick);
        self.pending_keys.insert(key_id, (role, kn, key));
        let body = Body::Announce { key_id, role, kn };
        let window_end = fetched_at + self.cfg.availability_window;
        let deadline = slave_deadline.map_or(window_end, |d| d.min(window_end));
        self.start(Req::Announce(key_id), body, 0, deadline, now);
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
        let Some(&echo) = self.confirmed_by.get(&key_id) else {
            return Err(KeyxError::NotConfirmed(key_id));
        };
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
            echo,
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
        let Some((role, kn, echo)) = self.fetching.remove(&key_id) else {
            return Err(KeyxError::NotRequested(key_id));
        };
        match result {
            Ok(key) => {
                let ick = self.derive_ick(&key, key_id)?;
                self.add_ick(ick);
                self.received.insert(key_id, (role, kn));
                // Proof of possession: the ACK is tagged with the new key's ICK. The anchor
                // does not move here: only the master's use of a key proves that it holds it
                // (see `handle_payload`), and a replayed ANNOUNCE must not move it.
                self.send(
                    Some(key_id),
                    Body::Ack {
                        of: AckOf::Announce,
                        key_id,
                        role,
                        kn,
                        an: None,
                    },
                    echo,
                );
                self.events.push_back(Event::KeyReceived {
                    key_id,
                    role,
                    kn,
                    key,
                });
            }
            Err(reason) => {
                self.send_nack(self.anchor, key_id, role, kn, reason, echo);
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
        let Some(echo) = self.installing.remove(&(key_id, kn, an)) else {
            return Err(KeyxError::NotRequested(key_id));
        };
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
                    echo,
                );
            }
            Err(reason) => {
                self.send_nack(self.auth_for_nack(key_id), key_id, role, kn, reason, echo)
            }
        }
        Ok(())
    }

    // ---------------- both ----------------

    /// A key is used up: its ICK is forgotten (unless it is the anchor, which only
    /// authenticates messages) and any INSTALL naming it is refused from now on.
    pub fn retire(&mut self, key_id: KeyId) {
        self.retired.insert(key_id);
        if self.pending_keys.remove(&key_id).is_some() {
            // Whoever asked for it to be announced waits for an outcome: this is one.
            self.events.push_back(Event::KeyLost {
                key_id,
                reason: LostReason::Retired,
            });
        }
        self.confirmed_by.remove(&key_id);
        self.received.remove(&key_id);
        self.outstanding.retain(|r, _| match r {
            Req::Announce(k) | Req::Install(k, _) => *k != key_id,
        });
        if self.anchor != Some(key_id) {
            self.drop_ick(key_id);
        }
    }

    /// A payload from the peer's TLV, in a frame whose Ethernet source address is `src_mac`.
    /// Returns true when it was authenticated by a key both ends hold, was fresh and came from
    /// the peer; [`Keyx::peer_sci`] then says where the peer is.
    pub fn handle_payload(&mut self, payload: &[u8], src_mac: [u8; 6], now: Instant) -> bool {
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
        // Two ends with one SCI would share SAK and SCI in both directions (the same nonces
        // twice without XPN); a message with our SCI is a reflection or a clone of this gateway.
        if msg.sci == self.cfg.local_sci {
            self.stats.wrong_sci += 1;
            tracing::warn!(sci = format_args!("{:016x}", msg.sci), "dropping key-exchange message that claims this gateway's own SCI (reflected, or the peer has our MAC address)");
            return false;
        }
        // The tag covers the SCI, not the frame's source address: a genuine message forwarded
        // under another address says nothing about where that address is.
        if sci_mac(msg.sci) != src_mac {
            self.stats.wrong_sci += 1;
            tracing::debug!(
                sci = format_args!("{:016x}", msg.sci),
                "dropping key-exchange message whose frame source is not its SCI's address"
            );
            return false;
        }
        if let (true, Some(k)) = (authenticated, msg.auth) {
            if !self.windows.entry(k).or_default().accept(msg.seq) {
                self.stats.replayed += 1;
                return false;
            }
        }
        if authenticated {
            self.peer_sci = Some(msg.sci);
            self.peer_incarnation = Some(msg.incarnation);
            if self.cfg.role == Role::Slave {
                self.master_heard = Some(now);
                // The master tags ANNOUNCE, NACK and HELLO with its anchor: the newest key it
                // knows we hold. Its use proves the master holds it too, so it becomes ours.
                if let (Some(k), Body::Announce { .. } | Body::Nack { .. } | Body::Hello { .. }) =
                    (msg.auth, &msg.body)
                {
                    if self.anchor != Some(k) {
                        self.set_anchor(k);
                    }
                }
            }
        }
        let (inc, echo) = (msg.incarnation, msg.echo);
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
                self.on_ack(of, key_id, role, kn, an, msg.auth, inc, echo);
            }
            (
                Role::Master,
                Body::Nack {
                    key_id, kn, reason, ..
                },
            ) => {
                self.on_nack(key_id, kn, reason, authenticated, echo);
            }
            (Role::Slave, Body::Announce { key_id, role, kn }) => {
                self.on_announce(key_id, role, kn, authenticated, inc, now);
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
                self.on_install(key_id, role, kn, an, nonce, msg.auth, inc, echo);
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
            let echo = self.peer_incarnation.unwrap_or(0);
            self.send(self.anchor, Body::Hello { active, held }, echo);
            self.next_hello = now + self.cfg.hello_interval;
        }
        let mut expired = Vec::new();
        let mut resend = Vec::new();
        for (req, o) in &mut self.outstanding {
            if now >= o.deadline {
                expired.push(*req);
            } else if now >= o.next_at {
                resend.push((o.body.clone(), o.echo));
                o.delay = (o.delay * 2).min(self.cfg.retransmit_max);
                o.next_at = now + o.delay;
            }
        }
        for (body, echo) in resend {
            let auth = self.auth_for(&body);
            self.send(auth, body, echo);
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

    /// A NACK of `key_id` for `reason`, bound to the peer incarnation `echo`.
    fn send_nack(
        &mut self,
        auth: Option<KeyId>,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        reason: NackReason,
        echo: u64,
    ) {
        let body = Body::Nack {
            key_id,
            role,
            kn,
            reason,
        };
        self.send(auth, body, echo);
    }

    /// `echo`: the peer incarnation the message answers or is bound to (0 = none).
    fn send(&mut self, auth: Option<KeyId>, body: Body, echo: u64) {
        let msg = Message {
            seq: self.seq,
            sender: self.cfg.local_sae.clone(),
            sci: self.cfg.local_sci,
            incarnation: self.cfg.incarnation,
            echo,
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

    fn start(&mut self, req: Req, body: Body, echo: u64, deadline: Instant, now: Instant) {
        let auth = self.auth_for(&body);
        self.send(auth, body.clone(), echo);
        self.outstanding.insert(
            req,
            Outstanding {
                body,
                echo,
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

    #[expect(
        clippy::too_many_arguments,
        reason = "the decoded fields of one ACK; a one-use struct adds nothing"
    )]
    fn on_ack(
        &mut self,
        of: AckOf,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: Option<u8>,
        auth: Option<KeyId>,
        slave_incarnation: u64,
        echo: u64,
    ) {
        // Only an ACK tagged with the key it acknowledges proves possession.
        if auth != Some(key_id) {
            self.stats.unexpected += 1;
            return;
        }
        // An answer to a request of an earlier life of this agent (recorded and replayed).
        if echo != self.cfg.incarnation {
            self.stats.stale += 1;
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
                    self.confirmed_by.insert(key_id, slave_incarnation);
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

    fn on_nack(
        &mut self,
        key_id: KeyId,
        kn: u32,
        reason: NackReason,
        authenticated: bool,
        echo: u64,
    ) {
        // An unauthenticated refusal is not acted on, not even during bootstrap: anyone can
        // send one, and one raced ahead of each ACK would stop the link from ever keying. The
        // request then runs to its deadline (the availability window), and a genuine ACK that
        // follows still confirms the key.
        if !authenticated {
            self.stats.unauthenticated_ignored += 1;
            return;
        }
        if echo != self.cfg.incarnation {
            self.stats.stale += 1;
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
    fn nack_if_retired(&mut self, key_id: KeyId, role: KeyRole, kn: u32, echo: u64) -> bool {
        if !self.retired.contains(&key_id) {
            return false;
        }
        self.send_nack(self.anchor, key_id, role, kn, NackReason::Retired, echo);
        true
    }

    /// Slave: whether unauthenticated ANNOUNCEs may be acted on. Only while no key is shared
    /// with a live master: at first start, after our restart (no anchor), or once the master
    /// has been silent for [`KeyxConfig::peer_life`] (it restarted and lost every key).
    fn bootstrapping(&self, now: Instant) -> bool {
        self.anchor.is_none()
            || self
                .master_heard
                .is_none_or(|t| now >= t + self.cfg.peer_life())
    }

    fn on_announce(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        authenticated: bool,
        master_incarnation: u64,
        now: Instant,
    ) {
        if !authenticated && !self.bootstrapping(now) {
            self.stats.unauthenticated_ignored += 1;
            return;
        }
        if self.nack_if_retired(key_id, role, kn, master_incarnation) {
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
                master_incarnation,
            );
            return;
        }
        if let Some(f) = self.fetching.get_mut(&key_id) {
            // The ACK that follows the fetch answers the newest ANNOUNCE.
            f.2 = master_incarnation;
            return;
        }
        if self.fetching.len() >= MAX_FETCHES_IN_FLIGHT {
            self.stats.rate_limited += 1;
            return;
        }
        self.fetching.insert(key_id, (role, kn, master_incarnation));
        self.events.push_back(Event::FetchKey { key_id, role, kn });
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the decoded fields of one INSTALL; a one-use struct adds nothing"
    )]
    fn on_install(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: u8,
        nonce: Option<Nonce>,
        auth: Option<KeyId>,
        master_incarnation: u64,
        echo: u64,
    ) {
        if self.nack_if_retired(key_id, role, kn, master_incarnation) {
            return;
        }
        if !self.icks.contains_key(&key_id) {
            self.send_nack(
                self.anchor,
                key_id,
                role,
                kn,
                NackReason::UnknownKey,
                master_incarnation,
            );
            return;
        }
        // Only the holder of the key itself may ask for it to be installed.
        if auth != Some(key_id) {
            self.stats.unexpected += 1;
            return;
        }
        // Bound to another life of this agent: recorded before we restarted and replayed (if
        // our KME served the key again, the same SAK would be installed at PN 1 a second time),
        // or sent by a master that does not know we restarted. Either way we do not hold the
        // key as the master means it; the master drops it on this NACK.
        if echo != self.cfg.incarnation {
            self.stats.stale += 1;
            self.send_nack(
                self.auth_for_nack(key_id),
                key_id,
                role,
                kn,
                NackReason::UnknownKey,
                master_incarnation,
            );
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
                master_incarnation,
            );
            return;
        }
        if self.installing.contains_key(&(key_id, kn, an)) {
            return;
        }
        self.installing.insert((key_id, kn, an), master_incarnation);
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
