//! The per-link orchestrator: joins key exchange ([`Keyx`]), key supply ([`KeySupply`]) and the
//! AKL watchdog ([`Watchdog`]) into one sans-IO state machine that tells the IO layer what to
//! do ([`Command`]) and is told what happened (`handle_*`). No sockets, no clock, no randomness
//! of its own: the IO layer injects all three.
//!
//! Rollover (docs/protocol.md 3.2), per link:
//! ```text
//! master                                         slave
//! supply.next_sak -> PrepareRx(an)  (accepts the slave's new TX)
//! rx prepared -> keyx INSTALL(an) ──────────►  supply.resolve_install -> PrepareRx(an)
//!                                               rx prepared -> ActivateTx(an)
//!                                               tx activated -> ACK(INSTALL); watchdog: active
//! PeerInstalled ◄────────────────────────────
//! ActivateTx(an); tx activated -> watchdog: active
//! both: after a grace period RetireTx/RetireRx/UnwatchSa of the old AN; the old key is retired
//! ```
//! A fresh key installed on both ends is the only thing that lifts a stall (the watchdog's
//! StallOff); nothing here ever re-installs a retired key.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::keyx::machine::{Event as KxEvent, Keyx, KeyxConfig, LostReason};
use crate::keyx::wire::{sci_mac, Active, KeyRole, NackReason};
use crate::keyx::{KeyId, Role};
use crate::profile::{KeySupply, Params, ProfileError, ProfileKind, Sak, SupplyAction};
use crate::secret::SecretBytes;
use crate::watchdog::{Action as WdAction, Alarm, KeyRef, Limits, StallReason, Watchdog};

/// How long an old SA stays installed after the switch, for frames still in flight or queued.
pub const RETIRE_GRACE: Duration = Duration::from_secs(2);

/// Fills a buffer from a cryptographically secure random source (KS-nonces).
pub type NonceSource = Box<dyn FnMut(&mut [u8]) + Send>;

/// Delay before the next rollover attempt after one failed; it doubles with every further
/// failure up to [`ROLLOVER_RETRY_MAX`] and is reset by a rollover that completes. Each attempt
/// costs a key (sak profile) or a KN, so a peer that keeps refusing must not make the master
/// spend them as fast as it can (seen: 20 attempts a second).
pub const ROLLOVER_RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const ROLLOVER_RETRY_MAX: Duration = Duration::from_secs(16);

/// Least time between two rollovers triggered by a peer that reports no active key.
pub const PEER_RESET_HOLDOFF: Duration = Duration::from_secs(10);

/// One link's settings in the logic's own types (the config schema translates into it:
/// `config::Link::core_config`).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// For logs and the status.
    pub label: String,
    /// The exchange's settings; its `initial_seq`, `incarnation` and `local_sci` are taken from
    /// [`Start`].
    pub keyx: KeyxConfig,
    pub profile: Params,
    pub limits: Limits,
}

/// What the IO layer knows at start that the core cannot make up.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// First key-exchange sequence number ([`KeyxConfig::initial_seq`]).
    pub initial_seq: u64,
    /// Random, non-zero, new at every start ([`KeyxConfig::incarnation`]).
    pub incarnation: u64,
    /// The SCI our TX SC has ([`KeyxConfig::local_sci`]).
    pub local_sci: u64,
    /// Key_IDs that an earlier life of this agent put into the kernel (the ledger,
    /// `agent::ledger`): never fetched, announced or installed again, whatever a KME or a
    /// replayed message offers.
    pub used_keys: Vec<KeyId>,
}

/// The next PN every RX SA is installed with ([`Command::PrepareRx`]); the kernel raises it
/// only for frames it validated ([`LinkCore::handle_rx_validated`]).
pub const RX_SA_FIRST_PN: u64 = 1;

/// What a restarted agent found running, vouched for by its record (`agent::record`, checked against
/// the kernel): the key to adopt and how old it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adoption {
    pub key: KeyRef,
    pub an: u8,
    pub peer_mac: [u8; 6],
    /// Age of the key now.
    pub age: Duration,
    /// Next PN of our TX SA, from the kernel.
    pub tx_pn: u64,
}

/// A key the master's KME returned.
#[derive(Debug)]
pub struct FetchedKey {
    pub key_id: KeyId,
    pub key: SecretBytes,
    /// When the KME says the slave can no longer fetch it.
    pub slave_deadline: Option<Instant>,
}

/// What the core asks the IO layer to do. Commands are executed in order; those that end in a
/// kernel or KME result are answered with the matching `handle_*` call.
#[derive(Debug)]
pub enum Command {
    /// Master: `enc_keys` for one key of `size_bytes`; answer with [`LinkCore::handle_enc_key`].
    FetchEncKey { size_bytes: usize },
    /// Slave: `dec_keys` for `key_id`; answer with [`LinkCore::handle_dec_key`].
    FetchDecKey { key_id: KeyId, size_bytes: usize },
    /// Send this payload in the project's LLDP TLV.
    SendTlv(Vec<u8>),
    /// Install and activate the peer's SA on `an` in the RX SC of the peer (SCI = `peer_mac`,
    /// port 1); answer with [`LinkCore::handle_rx_prepared`].
    PrepareRx { peer_mac: [u8; 6], an: u8, sak: Sak },
    /// Install our TX SA on `an` and switch the encoding SA to it; answer with
    /// [`LinkCore::handle_tx_activated`].
    ActivateTx { an: u8, sak: Sak },
    /// Deactivate and delete our old TX SA (never the encoding SA: the kernel refuses).
    RetireTx { an: u8 },
    /// Delete the exhausted key's TX SA of a stalled link, even if it is still the encoding SA.
    RemoveStalledTx { an: u8 },
    /// Deactivate and delete the peer's old RX SA.
    RetireRx { peer_mac: [u8; 6], an: u8 },
    /// Set (true) or clear the data plane's stall switch.
    SetStall(bool),
    /// Mark our TX SA on `an` inactive in the kernel.
    DeactivateTx { an: u8 },
    /// Count our TX SA and the peer's RX SA on `an`; report PN crossings of `tx_thresholds` on
    /// our TX SA (answer with [`LinkCore::handle_tx_pn`]). The peer's RX SA is counted for
    /// statistics only and never armed: XDP sees its frames before the kernel checks their
    /// ICV, and anyone on the wire can send frames with the peer's SCI and any PN.
    WatchSa {
        an: u8,
        peer_mac: [u8; 6],
        tx_thresholds: [u64; 3],
    },
    /// Stop counting the SAs on `an`.
    UnwatchSa { an: u8, peer_mac: [u8; 6] },
    /// A warning or alarm for the operator (log it, show it on the status socket).
    Report(Report),
}

/// Operator-visible conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Warn {
        key: KeyRef,
        used: f64,
    },
    Alarm(Alarm),
    CakExpired {
        key_id: KeyId,
    },
    /// A rollover step failed; the link keeps its current key and tries another.
    RolloverFailed {
        detail: String,
    },
}

#[derive(Debug)]
enum Roll {
    Idle,
    MasterPreparingRx { sak: Sak, an: u8 },
    MasterInstalling { sak: Sak, an: u8 },
    MasterActivatingTx { sak: Sak, an: u8 },
    SlavePreparingRx { sak: Sak, an: u8, role: KeyRole },
    SlaveActivatingTx { sak: Sak, an: u8, role: KeyRole },
}

/// One link's control logic.
pub struct LinkCore {
    label: String,
    role: Role,
    kind: ProfileKind,
    key_len: usize,
    keyx: Keyx,
    supply: KeySupply,
    wd: Watchdog,
    nonce: NonceSource,
    roll: Roll,
    rollover_wanted: bool,
    /// No rollover attempt before this (after a failed one), and the delay after the next
    /// failure ([`ROLLOVER_RETRY_INITIAL`]).
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// Roll over as soon as the next fetched key is confirmed (the peer lost its keys).
    rollover_on_confirm: bool,
    /// The key and AN we transmit with.
    active: Option<(KeyRef, u8)>,
    /// The AN of the last SA we transmitted with (the next rollover uses the one after it, so
    /// an exhausted SA that is still being removed is never reused at once).
    last_an: Option<u8>,
    /// Master: when the INSTALL of the rollover in progress went out (its key's lifetime starts
    /// there, see `activated`).
    install_sent: Option<Instant>,
    peer_mac: Option<[u8; 6]>,
    /// Earliest time a peer that reports no active key may trigger another rollover.
    peer_reset_holdoff: Option<Instant>,
    /// Our old TX SAs (when to remove, AN, peer, when the old key's lifetime ends): the
    /// peer's RX SA on that AN is kept until it switched, but never past the key's lifetime.
    retire_at: Vec<(Instant, u8, [u8; 6], Instant)>,
    /// Old RX SAs (AN, peer, give-up time) whose TX side is retired, kept until the peer is
    /// known to transmit on the new AN: a slave that switched first must keep accepting the
    /// master's old SA until the master has switched too, however late its ACK arrives.
    rx_retire: Vec<(u8, [u8; 6], Instant)>,
    /// The AN the peer transmits on, as far as we know (its ACK, its authenticated HELLO, or
    /// frames the kernel validated on our RX SA).
    peer_on_an: Option<u8>,
    /// The last kernel RX SA figure (AN, next PN) given to [`LinkCore::handle_rx_validated`]:
    /// only frames validated since then on the same AN are fresh evidence of the AN the peer
    /// transmits on. `None`: no baseline (the next figure only sets one).
    rx_validated: Option<(u8, u64)>,
    /// When the rollover in progress began (master: the SAK was picked; slave: INSTALL).
    roll_started: Option<Instant>,
    /// Keys switched to since start, and how long the last switch took end to end.
    rollovers: u64,
    last_rekey: Option<Duration>,
    alarms: u64,
    /// AKL warnings raised, for the status socket and metrics (crate::ops).
    warnings: u64,
    last_report: Option<Report>,
    commands: VecDeque<Command>,
}

impl std::fmt::Debug for LinkCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCore")
            .field("label", &self.label)
            .field("role", &self.role)
            .field("active", &self.active)
            .field("stalled", &self.wd.is_stalled())
            .finish()
    }
}

/// What a link is doing, for the operator (`ops` turns it into the status JSON and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Secured,
    /// The active key is past `warn_at` of its lifetime.
    Warning,
    /// A rollover is in progress.
    Rekeying,
    Stalled,
}

/// A typed snapshot of one link's control state (no key material, no presentation: `ops`
/// owns the status schema and builds it from this when a client asks).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub state: LinkState,
    pub label: String,
    pub role: Role,
    pub profile: ProfileKind,
    pub stall_reason: Option<StallReason>,
    /// The key and AN this gateway transmits with.
    pub active: Option<(KeyRef, u8)>,
    /// Fraction of the active key's lifetime used.
    pub used: Option<f64>,
    pub keys_held: usize,
    pub anchor: Option<KeyId>,
    pub peer_mac: Option<[u8; 6]>,
    pub alarms: u64,
    pub last_report: Option<Report>,
    /// The key and AN of the rollover in progress.
    pub next: Option<(KeyRef, u8)>,
    /// Time and packet numbers left of the active key's lifetime.
    pub remaining: Option<(Duration, u64)>,
    /// k of the sak profile.
    pub key_buffer_capacity: Option<usize>,
    pub consecutive_fetch_failures: u32,
    pub warnings: u64,
    /// Keys this gateway switched its TX to since the agent started.
    pub rollovers: u64,
    /// Master: from picking the SAK to both ends transmitting with it; slave: from the INSTALL
    /// to its own switch.
    pub last_rekey: Option<Duration>,
}

/// `02:00:00:00:00:0b`, for logs.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn nack_for(e: &ProfileError) -> NackReason {
    match e {
        ProfileError::UnknownKey { .. } => NackReason::UnknownKey,
        ProfileError::KnReused { .. } | ProfileError::CakExpired { .. } => NackReason::Retired,
        _ => NackReason::InstallFailed,
    }
}

impl LinkCore {
    /// `start`: see [`Start`]. `nonce` fills KS-nonces (CAK profile) from a cryptographic
    /// random source.
    pub fn new(cfg: CoreConfig, start: Start, nonce: NonceSource, now: Instant) -> Self {
        let mut core = Self::build(cfg, start, nonce, now);
        core.pump(now);
        core
    }

    /// As [`LinkCore::new`], for a restarted agent that could not adopt the kernel's SAs and
    /// removed them: the first rollover tries `first_an` first (then the ANs after it), so it
    /// does not land on the AN the peer may still transmit on with the old key, which the peer
    /// would refuse (docs/protocol.md 3.3, "Restart").
    pub fn new_with_first_an(
        cfg: CoreConfig,
        start: Start,
        nonce: NonceSource,
        first_an: u8,
        now: Instant,
    ) -> Self {
        let mut core = Self::build(cfg, start, nonce, now);
        // `next_an` starts after `last_an`.
        core.last_an = Some((first_an + 3) % 4);
        core.pump(now);
        core
    }

    /// A core for a restarted agent that found `adoption` (its own record, checked against the
    /// kernel) transmitting: the link stays up with the kernel's SAs, the watchdog enforces the
    /// key's lifetime from when it really became active, and the master re-keys at once,
    /// because the key bytes died with the previous agent (no SAK can be derived from a CAK we
    /// no longer hold, and no rollover can reuse the adopted key).
    pub fn new_adopted(
        cfg: CoreConfig,
        start: Start,
        nonce: NonceSource,
        adoption: Adoption,
        now: Instant,
    ) -> Self {
        let mut core = Self::build(cfg, start, nonce, now);
        match now.checked_sub(adoption.age) {
            Some(since) => {
                let Adoption {
                    key, an, peer_mac, ..
                } = adoption;
                core.wd.adopt(key, an, since, adoption.tx_pn, now);
                if core.wd.active_key() == Some((key, an)) {
                    core.active = Some((key, an));
                    core.last_an = Some(an);
                    core.peer_mac = Some(peer_mac);
                    core.rollover_wanted = core.role == Role::Master;
                    tracing::info!(link = %core.label, key_id = %key.key_id, kn = key.kn, an,
                        age_s = adoption.age.as_secs_f64(), "adopted the kernel's running key; re-keying");
                }
            }
            None => {
                tracing::error!(link = %core.label, "adopted key older than this clock can express; stalling")
            }
        }
        core.pump(now);
        core
    }

    fn build(cfg: CoreConfig, start: Start, nonce: NonceSource, now: Instant) -> Self {
        let CoreConfig {
            label,
            keyx: mut kc,
            profile,
            limits,
        } = cfg;
        kc.initial_seq = start.initial_seq;
        kc.incarnation = start.incarnation;
        kc.local_sci = start.local_sci;
        let role = kc.role;
        let mut keyx = Keyx::new(kc, now);
        for k in start.used_keys {
            keyx.retire(k);
        }
        Self {
            label,
            role,
            kind: profile.kind,
            key_len: profile.qkd_key_len(),
            keyx,
            supply: KeySupply::new(profile, now),
            wd: Watchdog::new(limits),
            nonce,
            roll: Roll::Idle,
            rollover_wanted: false,
            retry_at: None,
            retry_delay: ROLLOVER_RETRY_INITIAL,
            rollover_on_confirm: false,
            active: None,
            last_an: None,
            install_sent: None,
            peer_mac: None,
            peer_reset_holdoff: None,
            retire_at: Vec::new(),
            rx_retire: Vec::new(),
            peer_on_an: None,
            rx_validated: None,
            roll_started: None,
            rollovers: 0,
            last_rekey: None,
            alarms: 0,
            warnings: 0,
            last_report: None,
            commands: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_stalled(&self) -> bool {
        self.wd.is_stalled()
    }

    /// The key and AN this gateway transmits with.
    pub fn active(&self) -> Option<(KeyRef, u8)> {
        self.active
    }

    /// When the key this gateway transmits with became active (the watchdog's clock).
    pub fn active_since(&self) -> Option<Instant> {
        self.active.and(self.wd.active_since())
    }

    /// The peer's MAC address (its SCI), once an authenticated message located it.
    pub fn peer_mac(&self) -> Option<[u8; 6]> {
        self.peer_mac
    }

    /// When the active key's lifetime ends by age (`None` while stalled): the data plane's own
    /// deadline, enforced by the eBPF programs even if this process dies.
    pub fn active_expiry(&self) -> Option<Instant> {
        self.active_since().map(|s| s + self.wd.limits().max_age)
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let next = match &self.roll {
            Roll::Idle => None,
            Roll::MasterPreparingRx { sak, an }
            | Roll::MasterInstalling { sak, an }
            | Roll::MasterActivatingTx { sak, an }
            | Roll::SlavePreparingRx { sak, an, .. }
            | Roll::SlaveActivatingTx { sak, an, .. } => Some((sak.key_ref, *an)),
        };
        let used = self.wd.used(now);
        let state = if self.wd.is_stalled() {
            LinkState::Stalled
        } else if used.is_some_and(|u| u >= self.wd.limits().warn_at) {
            LinkState::Warning
        } else if next.is_some() {
            LinkState::Rekeying
        } else {
            LinkState::Secured
        };
        Snapshot {
            state,
            label: self.label.clone(),
            role: self.role,
            profile: self.kind,
            stall_reason: self.wd.stall_reason(),
            active: self.active,
            used,
            keys_held: self.supply.held(),
            anchor: self.keyx.anchor(),
            peer_mac: self.peer_mac,
            alarms: self.alarms,
            last_report: self.last_report.clone(),
            next,
            remaining: self.wd.remaining(now),
            key_buffer_capacity: (self.kind == ProfileKind::Sak)
                .then_some(self.supply.params().buffer),
            consecutive_fetch_failures: self.supply.consecutive_failures(),
            warnings: self.warnings,
            rollovers: self.rollovers,
            last_rekey: self.last_rekey,
        }
    }

    // ---------------- inputs ----------------

    /// A project TLV payload from the LLDP frame sent by `src_mac`.
    pub fn handle_tlv(&mut self, payload: &[u8], src_mac: [u8; 6], now: Instant) {
        // Only the SCI inside an authenticated message may tell us where the peer is: the
        // frame's source address is not covered by the tag, and a genuine message forwarded
        // under another address would point our RX SC at the wrong SCI (keyx drops such
        // frames, and any that claim our own SCI).
        if self.keyx.handle_payload(payload, src_mac, now) {
            let mac = self.keyx.peer_sci().map(sci_mac);
            if mac.is_some() && self.peer_mac != mac {
                let m = mac.unwrap_or_default();
                tracing::info!(link = %self.label, peer_mac = %mac_str(m), "peer located");
                self.peer_mac = mac;
            }
        }
        self.pump(now);
    }

    /// Master: outcome of [`Command::FetchEncKey`].
    pub fn handle_enc_key(&mut self, result: Result<FetchedKey, String>, now: Instant) {
        match result {
            Ok(k) => match self.supply.handle_fetched(now) {
                Ok(kn) => {
                    self.wd.handle_fetch_outcome(true, now);
                    let role = self.supply.params().key_role();
                    if let Err(e) =
                        self.keyx
                            .announce(k.key_id, role, kn, k.key, now, k.slave_deadline, now)
                    {
                        tracing::error!(link = %self.label, error = %e, "cannot announce fetched key");
                        self.supply.handle_lost(now);
                    }
                }
                Err(e) => {
                    tracing::error!(link = %self.label, error = %e, "key supply refused a fetched key")
                }
            },
            Err(detail) => {
                tracing::warn!(link = %self.label, %detail, "key request to the KME failed");
                self.supply.handle_fetch_failed(now);
                self.wd.handle_fetch_outcome(false, now);
            }
        }
        self.pump(now);
    }

    /// Slave: outcome of [`Command::FetchDecKey`].
    pub fn handle_dec_key(
        &mut self,
        key_id: KeyId,
        result: Result<SecretBytes, NackReason>,
        now: Instant,
    ) {
        let ok = result.is_ok();
        if let Err(e) = self.keyx.fetched(key_id, result) {
            tracing::warn!(link = %self.label, error = %e, "dec_keys result for a key not asked for");
        }
        self.wd.handle_fetch_outcome(ok, now);
        self.pump(now);
    }

    /// Outcome of [`Command::PrepareRx`].
    pub fn handle_rx_prepared(&mut self, an: u8, result: Result<(), String>, now: Instant) {
        let roll = std::mem::replace(&mut self.roll, Roll::Idle);
        self.roll = match (roll, result) {
            (Roll::MasterPreparingRx { sak, an: a }, Ok(())) if a == an => {
                let kr = sak.key_ref;
                match self.keyx.install(
                    kr.key_id,
                    self.supply.params().key_role(),
                    kr.kn,
                    an,
                    sak.nonce.clone(),
                    now,
                ) {
                    Ok(()) => {
                        // From this INSTALL on, the slave may switch to `an` at any moment:
                        // what we knew about the AN it transmits on is stale until its ACK,
                        // an authenticated HELLO or its frames tell us again (old RX SAs are
                        // only retired on fresh evidence).
                        self.peer_on_an = None;
                        self.install_sent = Some(now);
                        Roll::MasterInstalling { sak, an }
                    }
                    Err(e) => {
                        self.rollover_failed(
                            now,
                            format!("INSTALL of {} refused locally: {e}", kr.key_id),
                            an,
                            Some(kr),
                        );
                        Roll::Idle
                    }
                }
            }
            (Roll::MasterPreparingRx { sak, an: a }, Err(e)) if a == an => {
                self.rollover_failed(
                    now,
                    format!("installing RX SA {an}: {e}"),
                    an,
                    Some(sak.key_ref),
                );
                Roll::Idle
            }
            (Roll::SlavePreparingRx { sak, an: a, role }, Ok(())) if a == an => {
                self.commands.push_back(Command::ActivateTx {
                    an,
                    sak: dup_sak(&sak),
                });
                Roll::SlaveActivatingTx { sak, an, role }
            }
            (Roll::SlavePreparingRx { sak, an: a, role }, Err(e)) if a == an => {
                tracing::error!(link = %self.label, an, error = %e, "installing RX SA failed");
                let kr = sak.key_ref;
                let _ =
                    self.keyx
                        .installed(kr.key_id, role, kr.kn, an, Err(NackReason::InstallFailed));
                self.commands.push_back(Command::RetireRx {
                    peer_mac: self.peer_mac.unwrap_or_default(),
                    an,
                });
                Roll::Idle
            }
            (other, _) => {
                tracing::warn!(link = %self.label, an, "RX SA result that no rollover waits for");
                other
            }
        };
        self.pump(now);
    }

    /// Outcome of [`Command::ActivateTx`].
    pub fn handle_tx_activated(&mut self, an: u8, result: Result<(), String>, now: Instant) {
        let roll = std::mem::replace(&mut self.roll, Roll::Idle);
        self.roll = match (roll, result) {
            (Roll::MasterActivatingTx { sak, an: a }, Ok(())) if a == an => {
                self.activated(sak.key_ref, an, now);
                Roll::Idle
            }
            (Roll::MasterActivatingTx { sak, an: a }, Err(e)) if a == an => {
                self.rollover_failed(
                    now,
                    format!("switching TX to SA {an}: {e}"),
                    an,
                    Some(sak.key_ref),
                );
                Roll::Idle
            }
            (Roll::SlaveActivatingTx { sak, an: a, role }, Ok(())) if a == an => {
                let kr = sak.key_ref;
                let _ = self.keyx.installed(kr.key_id, role, kr.kn, an, Ok(()));
                self.activated(kr, an, now);
                Roll::Idle
            }
            (Roll::SlaveActivatingTx { sak, an: a, role }, Err(e)) if a == an => {
                tracing::error!(link = %self.label, an, error = %e, "switching TX failed");
                let kr = sak.key_ref;
                let _ =
                    self.keyx
                        .installed(kr.key_id, role, kr.kn, an, Err(NackReason::InstallFailed));
                // The RX SA prepared for this attempt goes too: the master will not use the
                // key, and a stale SA would block the AN for the next attempt.
                if let Some(peer_mac) = self.peer_mac {
                    self.commands.push_back(Command::RetireRx { peer_mac, an });
                }
                Roll::Idle
            }
            (other, _) => {
                tracing::warn!(link = %self.label, an, "TX SA result that no rollover waits for");
                other
            }
        };
        self.pump(now);
    }

    /// The PN of **our own** TX SA on `an`: from the TC egress counters of the frames this
    /// gateway sent (a threshold event or the poll) or from the kernel's TX SA. Never a figure
    /// of the peer's frames: those count only as the kernel validated them
    /// ([`LinkCore::handle_rx_validated`]).
    pub fn handle_tx_pn(&mut self, an: u8, pn: u64, now: Instant) {
        self.wd.handle_pn(an, pn, now);
        self.pump(now);
    }

    /// The kernel's RX SA of the peer on `an` shows `next_pn`. Kernel MACsec (macsec.c,
    /// `macsec_post_decrypt`) advances an RX SA's next PN only for frames that passed the ICV
    /// and replay checks, so this is the peer's use of the key as far as it is proven: the SAK
    /// is shared, so it uses up the key's lifetime like our own frames do. Frames validated
    /// between two calls for the same `an` tell us the peer transmitted on `an` meanwhile (its
    /// old RX SA may go); the figure itself, which may date from before the peer switched AN,
    /// tells nothing.
    ///
    /// Only ever the kernel's figure: the data plane's RX counters (XDP) count frames before
    /// the kernel checks their ICV, and the SCI, AN and PN they are keyed by travel in the
    /// clear. One forged frame with a high PN would otherwise exhaust the key and stall the
    /// link, or retire an RX SA the peer still transmits on.
    pub fn handle_rx_validated(&mut self, an: u8, next_pn: u64, now: Instant) {
        self.wd.handle_pn(an, next_pn.saturating_sub(1), now);
        let fresh = self
            .rx_validated
            .is_some_and(|(a, pn)| a == an && next_pn > pn);
        self.rx_validated = Some((an, next_pn));
        if fresh {
            self.peer_on_an = Some(an);
            self.retire_rx_when_peer_switched(now);
        }
        self.pump(now);
    }

    /// The kernel's view of our TX SA on `an`.
    pub fn handle_sa_state(&mut self, an: u8, active: bool, next_pn: u64, now: Instant) {
        self.wd.handle_sa_state(an, active, next_pn, now);
        self.pump(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.keyx.handle_timeout(now);
        self.supply.handle_timeout(now);
        self.wd.handle_timeout(now);
        let (due, later): (Vec<_>, Vec<_>) =
            self.retire_at.drain(..).partition(|(t, ..)| *t <= now);
        self.retire_at = later;
        for (_, an, peer_mac, expiry) in due {
            // Never retire the AN we transmit with (a rollover may have come back round to it).
            if self.active.map(|(_, a)| a) == Some(an) {
                continue;
            }
            self.commands.push_back(if self.wd.is_stalled() {
                Command::RemoveStalledTx { an }
            } else {
                Command::RetireTx { an }
            });
            // A stalled link's exhausted key goes at once; an old key is accepted until the
            // peer has switched, but never beyond the key's lifetime counted from its
            // activation (not from the switch away from it).
            let give_up = if self.wd.is_stalled() { now } else { expiry };
            self.rx_retire.push((an, peer_mac, give_up));
        }
        self.retire_rx_when_peer_switched(now);
        self.pump(now);
    }

    fn retire_rx_when_peer_switched(&mut self, now: Instant) {
        let current = self.active.map(|(_, a)| a);
        let peer_switched = current.is_some() && self.peer_on_an == current;
        let (go, keep): (Vec<_>, Vec<_>) =
            self.rx_retire.drain(..).partition(|(an, _, give_up)| {
                Some(*an) != current && (peer_switched || self.wd.is_stalled() || now >= *give_up)
            });
        self.rx_retire = keep;
        for (an, peer_mac, _) in go {
            self.commands.push_back(Command::UnwatchSa { an, peer_mac });
            self.commands.push_back(Command::RetireRx { peer_mac, an });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.keyx.poll_timeout(),
            self.supply.poll_timeout(),
            self.wd.poll_timeout(),
            self.retire_at.iter().map(|(t, ..)| *t).min(),
            self.rx_retire.iter().map(|(.., t)| *t).min(),
            self.retry_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    // ---------------- internals ----------------

    fn activated(&mut self, key: KeyRef, an: u8, now: Instant) {
        // The old key's lifetime ends where the watchdog counted it to end.
        let old_expiry = self.active_expiry().unwrap_or(now);
        let old = self.active.replace((key, an));
        self.last_an = Some(an);
        self.rollovers += 1;
        self.last_rekey = self
            .roll_started
            .take()
            .map(|t| now.saturating_duration_since(t));
        // The slave switches first, on our INSTALL, so its use of the key began between the
        // INSTALL and now: the master counts the lifetime from the INSTALL (both ends' counts
        // then end no later than the earliest use; the cost is one rekey latency of lifetime).
        let since = match self.role {
            Role::Master => self.install_sent.take().unwrap_or(now),
            Role::Slave => now,
        };
        self.wd.handle_activated_since(key, an, since, now);
        self.rollover_wanted = false;
        self.retry_at = None;
        self.retry_delay = ROLLOVER_RETRY_INITIAL;
        if let Some((old_key, old_an)) = old {
            if old_an != an {
                if let Some(peer) = self.peer_mac {
                    self.retire_at
                        .push((now + RETIRE_GRACE, old_an, peer, old_expiry));
                }
            }
            // The QKD key behind the old SAK is used up (SAK profile), or the old CAK once SAKs
            // come from a newer one.
            if old_key.key_id != key.key_id {
                self.keyx.retire(old_key.key_id);
            }
        }
        let rekey_ms = self.last_rekey.map(|d| d.as_secs_f64() * 1e3);
        tracing::info!(link = %self.label, key_id = %key.key_id, kn = key.kn, an, rekey_ms, "transmitting with a fresh key");
    }

    fn rollover_failed(&mut self, now: Instant, detail: String, an: u8, key: Option<KeyRef>) {
        if let Some(peer) = self.peer_mac {
            self.commands
                .push_back(Command::RetireRx { peer_mac: peer, an });
        }
        self.rollover_given_up(detail, key, now);
    }

    /// A rollover whose outcome on the slave is unknown (see the INSTALL timeout): as
    /// [`LinkCore::rollover_failed`], but the RX SA at `an` stays until the peer is seen on our
    /// active AN or `max_age` from now.
    fn rollover_undecided(&mut self, detail: String, an: u8, key: Option<KeyRef>, now: Instant) {
        // The slave may have started using the key as soon as it got the INSTALL.
        let first_use = self.install_sent.take().unwrap_or(now);
        if let Some(peer) = self.peer_mac {
            self.rx_retire
                .push((an, peer, first_use + self.wd.limits().max_age));
        }
        // What we learnt since the INSTALL may predate the slave's switch to `an`: only fresh
        // evidence (frames validated between two polls from now on, an authenticated HELLO)
        // may retire it.
        self.peer_on_an = None;
        self.rx_validated = None;
        self.rollover_given_up(detail, key, now);
    }

    fn rollover_given_up(&mut self, detail: String, key: Option<KeyRef>, now: Instant) {
        tracing::error!(link = %self.label, %detail, "rollover failed");
        self.report(Report::RolloverFailed { detail });
        // The SAK was handed out; whatever the outcome, it is never offered again.
        if let (Some(k), ProfileKind::Sak) = (key, self.kind) {
            self.keyx.retire(k.key_id);
        }
        self.rollover_wanted = true;
        self.retry_at = Some(now + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(ROLLOVER_RETRY_MAX);
    }

    fn report(&mut self, r: Report) {
        if matches!(r, Report::Alarm(_)) {
            self.alarms += 1;
        }
        if matches!(r, Report::Warn { .. }) {
            self.warnings += 1;
        }
        self.last_report = Some(r.clone());
        self.commands.push_back(Command::Report(r));
    }

    /// The AN for the next rollover: after the last one used, skipping the active AN and every
    /// AN whose SAs are still on their way out (an old key the peer may still send with, or an
    /// undecided rollover). `None` when all four are taken; one frees up within `max_age`.
    fn next_an(&self) -> Option<u8> {
        let start = self.last_an.map_or(0, |an| an + 1);
        (0..4).map(|i| (start + i) % 4).find(|an| {
            self.active.map(|(_, a)| a) != Some(*an)
                && !self.rx_retire.iter().any(|(a, ..)| a == an)
                && !self.retire_at.iter().any(|(_, a, ..)| a == an)
        })
    }

    fn try_start_rollover(&mut self, now: Instant) {
        // Cleared here, on every pump, so that `poll_timeout` never returns a past instant.
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
        }
        if self.role != Role::Master || !matches!(self.roll, Roll::Idle) {
            return;
        }
        if !(self.wd.is_stalled() || self.rollover_wanted) {
            return;
        }
        if self.retry_at.is_some() {
            return;
        }
        let Some(peer_mac) = self.peer_mac else {
            return;
        };
        // Before taking a SAK from the supply: a SAK taken is never offered again.
        let Some(an) = self.next_an() else {
            tracing::warn!(link = %self.label, "no free AN for a rollover yet; retrying when an old SA is retired");
            return;
        };
        let mut nonce = vec![0u8; self.key_len];
        if self.kind == ProfileKind::Cak {
            (self.nonce)(&mut nonce);
        }
        match self.supply.next_sak(&nonce, now) {
            Ok(Some(sak)) => {
                tracing::info!(link = %self.label, key_id = %sak.key_ref.key_id, kn = sak.key_ref.kn, an, "starting rollover");
                self.commands.push_back(Command::PrepareRx {
                    peer_mac,
                    an,
                    sak: dup_sak(&sak),
                });
                self.roll = Roll::MasterPreparingRx { sak, an };
                self.roll_started = Some(now);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(link = %self.label, error = %e, "no SAK for the rollover");
            }
        }
    }

    fn on_keyx(&mut self, ev: KxEvent, now: Instant) {
        match ev {
            KxEvent::KeyConfirmed {
                key_id,
                role,
                kn,
                key,
            }
            | KxEvent::KeyReceived {
                key_id,
                role,
                kn,
                key,
            } => {
                if let Err(e) = self.supply.handle_confirmed(key_id, role, kn, key, now) {
                    tracing::error!(link = %self.label, %key_id, error = %e, "confirmed key not usable");
                } else if std::mem::take(&mut self.rollover_on_confirm) && self.active.is_some() {
                    self.rollover_wanted = true;
                }
            }
            KxEvent::KeyLost { key_id, reason } => {
                tracing::warn!(link = %self.label, %key_id, ?reason, "key not shared; fetching another");
                self.supply.handle_lost(now);
                self.wd.handle_fetch_outcome(false, now);
            }
            KxEvent::PeerInstalled { key_id, kn, an } => {
                // The slave ACKs an INSTALL only after switching its TX to `an`.
                self.peer_on_an = Some(an);
                let roll = std::mem::replace(&mut self.roll, Roll::Idle);
                self.roll = match roll {
                    Roll::MasterInstalling { sak, an: a }
                        if a == an && sak.key_ref == (KeyRef { key_id, kn }) =>
                    {
                        self.commands.push_back(Command::ActivateTx {
                            an,
                            sak: dup_sak(&sak),
                        });
                        Roll::MasterActivatingTx { sak, an }
                    }
                    other => other,
                };
            }
            KxEvent::InstallFailed {
                key_id,
                kn,
                an,
                reason,
            } => {
                let roll = std::mem::replace(&mut self.roll, Roll::Idle);
                match roll {
                    Roll::MasterInstalling { sak, an: a }
                        if a == an && sak.key_ref == (KeyRef { key_id, kn }) =>
                    {
                        // The slave does not hold the CAK (it restarted, or it lost it): every
                        // further SAK from it would fail the same way. A new CAK costs one QKD
                        // key; a peer that merely missed the INSTALL costs the same, no more.
                        let peer_lacks_key = matches!(
                            reason,
                            LostReason::Timeout | LostReason::Refused(NackReason::UnknownKey)
                        );
                        if self.kind == ProfileKind::Cak && peer_lacks_key {
                            self.supply.forget(key_id, now);
                        }
                        let detail =
                            format!("peer did not install {key_id} KN {kn} at AN {an}: {reason:?}");
                        if reason == LostReason::Timeout {
                            // No answer is not a no: the slave may have switched its TX to
                            // `an` and only its ACK got lost (LLDP loss). Keep receiving there
                            // like on an old SA: retired once the peer transmits on our active
                            // AN, at the latest when a key started now would have expired.
                            // `next_an` keeps the next attempt off this AN meanwhile.
                            self.rollover_undecided(detail, an, Some(sak.key_ref), now);
                        } else {
                            self.rollover_failed(now, detail, an, Some(sak.key_ref));
                        }
                    }
                    other => self.roll = other,
                }
            }
            KxEvent::FetchKey { key_id, .. } => {
                self.commands.push_back(Command::FetchDecKey {
                    key_id,
                    size_bytes: self.key_len,
                });
            }
            KxEvent::InstallRequested {
                key_id,
                role,
                kn,
                an,
                nonce,
            } => {
                let busy = !matches!(self.roll, Roll::Idle);
                let Some(peer_mac) = self.peer_mac.filter(|_| !busy) else {
                    let _ =
                        self.keyx
                            .installed(key_id, role, kn, an, Err(NackReason::InstallFailed));
                    return;
                };
                match self
                    .supply
                    .resolve_install(key_id, role, kn, nonce.as_ref(), now)
                {
                    Ok(sak) => {
                        self.commands.push_back(Command::PrepareRx {
                            peer_mac,
                            an,
                            sak: dup_sak(&sak),
                        });
                        self.roll = Roll::SlavePreparingRx { sak, an, role };
                        self.roll_started = Some(now);
                    }
                    Err(e) => {
                        tracing::warn!(link = %self.label, %key_id, kn, error = %e, "refusing INSTALL");
                        let _ = self.keyx.installed(key_id, role, kn, an, Err(nack_for(&e)));
                    }
                }
            }
            KxEvent::PeerHello {
                active,
                held,
                authenticated,
            } => {
                tracing::trace!(link = %self.label, ?active, held, authenticated, "peer status");
                if let (true, Some(a)) = (authenticated, active.as_ref()) {
                    self.peer_on_an = Some(a.an);
                    self.retire_rx_when_peer_switched(now);
                }
                // A slave without an active key (it restarted) keeps its side stalled until it
                // gets a fresh one: roll over now rather than at the next AKL threshold. The
                // hold-off bounds what a forged HELLO can cost (one key per period).
                let due = self.peer_reset_holdoff.is_none_or(|t| now >= t);
                if self.role == Role::Master && active.is_none() && self.active.is_some() && due {
                    tracing::info!(link = %self.label, "peer reports no active key; rolling over");
                    self.rollover_wanted = true;
                    self.peer_reset_holdoff = Some(now + PEER_RESET_HOLDOFF);
                }
                // A slave that holds no key while we hold some restarted: it adopted the running
                // SA, but our held keys died with its memory. Fetch a fresh key now and roll
                // over to it as soon as the slave confirms it. Nothing held is dropped, so a
                // forged HELLO costs one QKD key and an early rollover per hold-off, never a
                // stall. The slave always holds at least what we hold otherwise (it fetches
                // before it ACKs, and LLDP keeps the order).
                let due = self.peer_reset_holdoff.is_none_or(|t| now >= t);
                if self.role == Role::Master && held == 0 && self.supply.held() > 0 && due {
                    tracing::info!(link = %self.label, "peer holds no keys (restarted?); re-keying with a fresh one");
                    self.supply.peer_lost_keys(now);
                    self.rollover_on_confirm = true;
                    self.peer_reset_holdoff = Some(now + PEER_RESET_HOLDOFF);
                }
            }
        }
    }

    fn on_watchdog(&mut self, a: WdAction, now: Instant) {
        match a {
            WdAction::RequestRollover { key } => {
                tracing::info!(link = %self.label, key_id = %key.key_id, kn = key.kn, "rollover due");
                self.rollover_wanted = true;
            }
            WdAction::Warn { key, used } => self.report(Report::Warn { key, used }),
            WdAction::StallOn => self.commands.push_back(Command::SetStall(true)),
            WdAction::StallOff { .. } => self.commands.push_back(Command::SetStall(false)),
            WdAction::DeactivateTx { an } => {
                self.commands.push_back(Command::DeactivateTx { an });
                if let (Some((key, a)), true) = (self.active, self.wd.is_stalled()) {
                    if a == an {
                        // The exhausted key is no longer ours to transmit with: remove its SAs
                        // (now, no grace: the link is stalled) and never accept it again.
                        self.active = None;
                        if let Some(peer) = self.peer_mac {
                            self.retire_at.push((now, an, peer, now));
                        }
                        if self.kind == ProfileKind::Sak {
                            self.keyx.retire(key.key_id);
                        }
                    }
                }
            }
            WdAction::Alarm(alarm) => self.report(Report::Alarm(alarm)),
            WdAction::SetPnThresholds(t) => {
                if let Some(peer_mac) = self.peer_mac {
                    self.commands.push_back(Command::WatchSa {
                        an: t.an,
                        peer_mac,
                        tx_thresholds: [t.rollover, t.warn, t.exhausted],
                    });
                }
            }
        }
    }

    /// Moves everything the sub-machines produced into commands until nothing changes.
    fn pump(&mut self, now: Instant) {
        for _ in 0..64 {
            let mut progressed = false;
            while let Some(a) = self.supply.poll_action() {
                progressed = true;
                match a {
                    SupplyAction::FetchKey { size_bytes } => {
                        self.commands.push_back(Command::FetchEncKey { size_bytes })
                    }
                    SupplyAction::CakExpired { key_id } => {
                        self.report(Report::CakExpired { key_id })
                    }
                }
            }
            while let Some(ev) = self.keyx.poll_event() {
                progressed = true;
                self.on_keyx(ev, now);
            }
            while let Some(a) = self.wd.poll_action() {
                progressed = true;
                self.on_watchdog(a, now);
            }
            let before = matches!(self.roll, Roll::Idle);
            self.try_start_rollover(now);
            progressed |= before != matches!(self.roll, Roll::Idle);
            if !progressed {
                break;
            }
        }
        self.keyx.set_status(
            self.active.map(|(k, an)| Active {
                key_id: k.key_id,
                role: self.supply.params().key_role(),
                kn: k.kn,
                an,
            }),
            self.supply.held(),
        );
        while let Some(p) = self.keyx.poll_transmit() {
            self.commands.push_back(Command::SendTlv(p));
        }
    }
}

/// An explicit copy of a SAK for a command (the core keeps its own until the rollover ends).
fn dup_sak(s: &Sak) -> Sak {
    Sak {
        key_ref: s.key_ref,
        key: s.key.duplicate(),
        kernel_key_id: s.kernel_key_id,
        nonce: s.nonce.clone(),
        xpn: s.xpn,
    }
}

#[cfg(test)]
mod tests;
