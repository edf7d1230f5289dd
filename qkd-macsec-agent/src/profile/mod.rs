//! Key profiles: what a QKD key becomes, and the key supply that keeps keys coming.
//!
//! - `sak` (mode 2, f_QKD ~ f_AKL): each QKD key is a SAK. The master keeps a buffer of k
//!   confirmed keys and refills it at f_QKD; every rollover consumes one.
//! - `cak` (mode 1, f_QKD << f_AKL): each QKD key is a CAK. SAKs are derived from it with the
//!   IEEE 802.1X-2010 KDF over a fresh KS-nonce and key number per rollover; a new CAK is
//!   requested every 1/f_QKD and n failed requests are tolerated while the CAK lifetime lasts.
//!
//! [`KeySupply`] is a sans-IO state machine (clock injected): it says when to fetch a key
//! ([`SupplyAction::FetchKey`]), keeps the confirmed keys, hands out the next SAK for a rollover
//! (master) and resolves a peer's INSTALL into a SAK (slave). It never hands out a key twice and
//! never derives a SAK for a key number it already used.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::cipher::Cipher;
use crate::keyx::wire::{KeyRole, Nonce};
use crate::keyx::KeyId;
use crate::keyx::Role;
use crate::secret::SecretBytes;
use crate::watchdog::KeyRef;

use crate::kdf::{self, KdfError, MI_LEN};

/// How QKD keys are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileKind {
    /// Mode 1: each QKD key is a CAK; SAKs are derived from it (IEEE 802.1X-2010 KDF).
    Cak,
    /// Mode 2: each QKD key is a SAK, with a buffer of pre-fetched keys.
    Sak,
}

/// Profile errors the agent acts on. Never contain key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("QKD key {key_id} is {got} bytes; the {what} needs {want} (set the KME key size to {} bits)", want * 8)]
    KeyLength {
        key_id: KeyId,
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("KS-nonce of {got} bytes; {cipher} needs {want}")]
    NonceLength {
        got: usize,
        want: usize,
        cipher: &'static str,
    },
    #[error("key {key_id} is not held (never received, already used, or dropped)")]
    UnknownKey { key_id: KeyId },
    #[error("key {key_id} was announced with KN {held} but INSTALL says KN {asked}")]
    KnMismatch {
        key_id: KeyId,
        held: u32,
        asked: u32,
    },
    #[error("KN {asked} under CAK {key_id} is not above the last used KN {last}; a SAK is never derived twice")]
    KnReused {
        key_id: KeyId,
        asked: u32,
        last: u32,
    },
    #[error("CAK {key_id} passed its lifetime; no SAK is derived from it any more")]
    CakExpired { key_id: KeyId },
    #[error("key role {got:?} does not match the configured profile ({want:?})")]
    WrongRole { got: KeyRole, want: KeyRole },
    #[error("key number space exhausted")]
    KnExhausted,
    #[error("key derivation failed: {0}")]
    Kdf(#[from] KdfError),
}

/// XPN parameters of a SAK (IEEE 802.1AE-2018 10.7): per-SC SSCI and the per-SAK salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xpn {
    /// SSCI of the master's transmit SC.
    pub ssci_master: u32,
    /// SSCI of the slave's transmit SC.
    pub ssci_slave: u32,
    pub salt: [u8; 12],
}

impl Xpn {
    /// SSCI this gateway transmits with, and the one it receives with.
    pub fn ssci_tx_rx(&self, role: Role) -> (u32, u32) {
        match role {
            Role::Master => (self.ssci_master, self.ssci_slave),
            Role::Slave => (self.ssci_slave, self.ssci_master),
        }
    }
}

/// A SAK ready to be written to the kernel.
#[derive(Debug)]
pub struct Sak {
    pub key_ref: KeyRef,
    pub key: SecretBytes,
    /// The kernel's 16-byte `MACSEC_SA_ATTR_KEYID`.
    pub kernel_key_id: [u8; 16],
    /// KS-nonce it was derived with (CAK profile), to send in INSTALL.
    pub nonce: Option<Nonce>,
    pub xpn: Option<Xpn>,
}

/// Static parameters of a link's key derivations.
#[derive(Debug, Clone)]
pub struct Params {
    pub kind: ProfileKind,
    pub role: Role,
    pub cipher: Cipher,
    pub master_sae: String,
    pub slave_sae: String,
    pub key_request_interval: Duration,
    /// k (sak profile).
    pub buffer: usize,
    /// CAK lifetime (cak profile).
    pub cak_lifetime: Duration,
    /// n (cak profile).
    pub tolerated_failures: u32,
}

impl Params {
    /// The role QKD keys play in this profile.
    pub fn key_role(&self) -> KeyRole {
        match self.kind {
            ProfileKind::Cak => KeyRole::Cak,
            ProfileKind::Sak => KeyRole::Sak,
        }
    }

    /// Size of the QKD keys to request from the KME, in bytes: the SAK length in the SAK
    /// profile; in the CAK profile the CAK length, which we match to the SAK length so a
    /// 256-bit cipher is keyed from a 256-bit secret.
    pub fn qkd_key_len(&self) -> usize {
        self.cipher.key_len()
    }
}

/// The XPN salt of a SAK: `KDF(SAK, "QKD-MACsec XPN salt", key_ID | KN, 96)`; see
/// docs/protocol.md section 5 for why this replaces MKA's MI-based salt.
pub fn xpn_for(sak: &SecretBytes, key_ref: KeyRef) -> Result<Xpn, KdfError> {
    let mut ctx = [0u8; 20];
    ctx[..16].copy_from_slice(key_ref.key_id.as_bytes());
    ctx[16..].copy_from_slice(&key_ref.kn.to_be_bytes());
    let s = kdf::kdf(sak.expose(), "QKD-MACsec XPN salt", &ctx, 96)?;
    let mut salt = [0u8; 12];
    salt.copy_from_slice(s.expose());
    Ok(Xpn {
        ssci_master: 1,
        ssci_slave: 2,
        salt,
    })
}

/// SAK profile: the QKD key is the SAK.
pub fn sak_from_qkd(
    key_id: KeyId,
    kn: u32,
    key: SecretBytes,
    cipher: Cipher,
) -> Result<Sak, ProfileError> {
    if key.len() != cipher.key_len() {
        return Err(ProfileError::KeyLength {
            key_id,
            what: "SAK",
            got: key.len(),
            want: cipher.key_len(),
        });
    }
    let key_ref = KeyRef { key_id, kn };
    let xpn = cipher
        .is_xpn()
        .then(|| xpn_for(&key, key_ref))
        .transpose()?;
    Ok(Sak {
        key_ref,
        key,
        kernel_key_id: *key_id.as_bytes(),
        nonce: None,
        xpn,
    })
}

/// A CAK and what is derived from it once.
pub struct Cak {
    pub key_id: KeyId,
    key: SecretBytes,
    mi_master: [u8; MI_LEN],
    mi_slave: [u8; MI_LEN],
    /// When this gateway obtained it (its lifetime counts from here).
    pub obtained: Instant,
    /// Highest KN a SAK was derived for.
    last_kn: u32,
}

impl std::fmt::Debug for Cak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cak({}, last KN {}, redacted)",
            self.key_id, self.last_kn
        )
    }
}

impl Cak {
    pub fn new(
        key_id: KeyId,
        key: SecretBytes,
        p: &Params,
        now: Instant,
    ) -> Result<Self, ProfileError> {
        if !matches!(key.len(), 16 | 32) {
            return Err(ProfileError::KeyLength {
                key_id,
                what: "CAK",
                got: key.len(),
                want: p.qkd_key_len(),
            });
        }
        let mi = |sae: &str| -> Result<[u8; MI_LEN], KdfError> {
            let m = kdf::kdf(key.expose(), "QKD-MACsec MI", sae.as_bytes(), MI_LEN * 8)?;
            let mut out = [0u8; MI_LEN];
            out.copy_from_slice(m.expose());
            Ok(out)
        };
        Ok(Self {
            key_id,
            mi_master: mi(&p.master_sae)?,
            mi_slave: mi(&p.slave_sae)?,
            key,
            obtained: now,
            last_kn: 0,
        })
    }

    pub fn expired(&self, lifetime: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.obtained) >= lifetime
    }

    /// `SAK = KDF(CAK, "IEEE8021 SAK", KS-nonce | MI(master) | MI(slave) | KN, len)`; KN must
    /// exceed every KN used before with this CAK.
    pub fn derive(&mut self, kn: u32, nonce: &Nonce, cipher: Cipher) -> Result<Sak, ProfileError> {
        if nonce.as_bytes().len() != cipher.key_len() {
            return Err(ProfileError::NonceLength {
                got: nonce.as_bytes().len(),
                want: cipher.key_len(),
                cipher: cipher.ip_name(),
            });
        }
        if kn <= self.last_kn {
            return Err(ProfileError::KnReused {
                key_id: self.key_id,
                asked: kn,
                last: self.last_kn,
            });
        }
        let key = kdf::derive_sak(
            &self.key,
            nonce.as_bytes(),
            &[self.mi_master, self.mi_slave],
            kn,
            cipher.key_len(),
        )?;
        self.last_kn = kn;
        let key_ref = KeyRef {
            key_id: self.key_id,
            kn,
        };
        // MKA's Key Identifier is the key server's MI followed by the KN (802.1X-2010 9.8).
        let mut kernel_key_id = [0u8; 16];
        kernel_key_id[..MI_LEN].copy_from_slice(&self.mi_master);
        kernel_key_id[MI_LEN..].copy_from_slice(&kn.to_be_bytes());
        let xpn = cipher
            .is_xpn()
            .then(|| xpn_for(&key, key_ref))
            .transpose()?;
        Ok(Sak {
            key_ref,
            key,
            kernel_key_id,
            nonce: Some(nonce.clone()),
            xpn,
        })
    }
}

/// What the key supply asks the IO layer to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupplyAction {
    /// Master: request one key of `size_bytes` from the KME (`enc_keys`), then report with
    /// [`KeySupply::handle_fetched`] or [`KeySupply::handle_fetch_failed`].
    FetchKey { size_bytes: usize },
    /// The CAK in use passed its lifetime with no successor: no new SAK can be derived.
    CakExpired { key_id: KeyId },
}

/// What [`KeySupply::forget`] drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    Key(KeyId),
    All,
}

/// A key both ends hold (SAK profile buffer entry).
struct Held {
    key_id: KeyId,
    kn: u32,
    key: SecretBytes,
    /// The peer said it holds no key after this one was confirmed (it may have restarted and
    /// lost it): used only when no fresh key is available, and not counted toward k.
    suspect: bool,
}

/// Key supply of one link.
pub struct KeySupply {
    p: Params,
    /// SAK profile: confirmed keys, oldest first.
    buffer: VecDeque<Held>,
    /// CAK profile: confirmed CAKs, newest last (the newest is used for new SAKs).
    caks: VecDeque<Cak>,
    /// Fetches requested and not yet reported, plus keys fetched and not yet confirmed/lost.
    outstanding: usize,
    next_fetch: Option<Instant>,
    consecutive_failures: u32,
    /// Serial numbers: announced keys (both profiles) and SAKs of the SAK profile.
    next_kn: u32,
    cak_expiry_reported: Option<KeyId>,
    actions: VecDeque<SupplyAction>,
}

/// Longest wait between key requests while no key is held.
pub const URGENT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Slave-side bound on held keys beyond k: replayed ANNOUNCEs cannot grow memory without bound.
pub const EXTRA_HELD: usize = 4;

impl std::fmt::Debug for KeySupply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySupply")
            .field("kind", &self.p.kind)
            .field("role", &self.p.role)
            .field("buffered", &self.buffer.len())
            .field("caks", &self.caks)
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl KeySupply {
    /// A supply with nothing held; the master fetches its first key at once.
    pub fn new(p: Params, now: Instant) -> Self {
        let next_fetch = (p.role == Role::Master).then_some(now);
        Self {
            p,
            buffer: VecDeque::new(),
            caks: VecDeque::new(),
            outstanding: 0,
            next_fetch,
            consecutive_failures: 0,
            next_kn: 1,
            cak_expiry_reported: None,
            actions: VecDeque::new(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    /// Keys held ready for use (SAK buffer depth, or usable CAKs).
    pub fn held(&self) -> usize {
        match self.p.kind {
            ProfileKind::Sak => self.buffer.len(),
            ProfileKind::Cak => self.caks.len(),
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Delay before retrying, with nothing held, after consecutive failures: doubling from
    /// 1 s up to [`URGENT_RETRY_MAX`] (with no key the link may be stalled, and every second of
    /// waiting is outage once the KME is back), and never beyond the request interval.
    fn retry_delay(&self) -> Duration {
        let exp = self.consecutive_failures.saturating_sub(1).min(16);
        Duration::from_secs(1u64 << exp)
            .min(URGENT_RETRY_MAX)
            .min(self.p.key_request_interval)
    }

    fn wants_more(&self) -> bool {
        match self.p.kind {
            ProfileKind::Sak => {
                self.buffer.iter().filter(|h| !h.suspect).count() + self.outstanding < self.p.buffer
            }
            // One CAK request at a time; a new CAK every interval regardless of how many are
            // held (each replaces the previous for new SAKs).
            ProfileKind::Cak => self.outstanding == 0,
        }
    }

    fn urgent(&self) -> bool {
        self.held() == 0
    }

    /// Master: the KME returned a key. Returns the KN to announce it with.
    pub fn handle_fetched(&mut self, now: Instant) -> Result<u32, ProfileError> {
        self.consecutive_failures = 0;
        let kn = self.next_kn;
        self.next_kn = self
            .next_kn
            .checked_add(1)
            .ok_or(ProfileError::KnExhausted)?;
        // The fetch stays outstanding until the key is confirmed or lost.
        self.evaluate(now);
        Ok(kn)
    }

    /// Master: the KME request failed (or the key was lost before the slave confirmed it).
    pub fn handle_fetch_failed(&mut self, now: Instant) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        // With nothing held, retry soon (backing off); otherwise keep to f_QKD, so that
        // "n failed requests" means n request intervals, as the CAK lifetime check assumes.
        let delay = if self.urgent() {
            self.retry_delay()
        } else {
            self.p.key_request_interval
        };
        self.next_fetch = Some(now + delay);
        self.evaluate(now);
    }

    /// Master: the slave did not confirm a fetched key in time, or said it is gone: the key is
    /// dropped and a replacement fetched (it counts as a failed request).
    pub fn handle_lost(&mut self, now: Instant) {
        self.handle_fetch_failed(now);
    }

    /// Both ends hold this key (master: ACK verified; slave: fetched by key_ID).
    pub fn handle_confirmed(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        key: SecretBytes,
        now: Instant,
    ) -> Result<(), ProfileError> {
        let want = self.p.key_role();
        if role != want {
            return Err(ProfileError::WrongRole { got: role, want });
        }
        if self.p.role == Role::Master {
            self.outstanding = self.outstanding.saturating_sub(1);
        }
        match self.p.kind {
            ProfileKind::Sak => {
                if key.len() != self.p.cipher.key_len() {
                    return Err(ProfileError::KeyLength {
                        key_id,
                        what: "SAK",
                        got: key.len(),
                        want: self.p.cipher.key_len(),
                    });
                }
                if self.buffer.iter().any(|h| h.key_id == key_id) {
                    return Ok(());
                }
                self.buffer.push_back(Held {
                    key_id,
                    kn,
                    key,
                    suspect: false,
                });
                let cap = self.p.buffer + EXTRA_HELD;
                while self.buffer.len() > cap {
                    if let Some(old) = self.buffer.pop_front() {
                        tracing::warn!(key_id = %old.key_id, "key store full; dropping the oldest unused key");
                    }
                }
            }
            ProfileKind::Cak => {
                if self.caks.iter().any(|c| c.key_id == key_id) {
                    return Ok(());
                }
                let cak = Cak::new(key_id, key, &self.p, now)?;
                self.caks.push_back(cak);
                // Keep the newest two: the one SAKs are being derived from, and the one that
                // replaces it (the peer may still install a SAK of the older while the newer
                // is being confirmed).
                while self.caks.len() > 2 {
                    self.caks.pop_front();
                }
                self.cak_expiry_reported = None;
            }
        }
        self.evaluate(now);
        Ok(())
    }

    /// Master: the SAK for the next rollover, or `None` when there is no usable key.
    /// `nonce` is a fresh random KS-nonce of the SAK's length (CAK profile; ignored otherwise).
    pub fn next_sak(&mut self, nonce: &[u8], now: Instant) -> Result<Option<Sak>, ProfileError> {
        match self.p.kind {
            ProfileKind::Sak => {
                // Fresh keys first: a suspect one may be unknown to the peer.
                let i = self.buffer.iter().position(|h| !h.suspect).unwrap_or(0);
                let Some(h) = self.buffer.remove(i) else {
                    return Ok(None);
                };
                self.evaluate(now);
                sak_from_qkd(h.key_id, h.kn, h.key, self.p.cipher).map(Some)
            }
            ProfileKind::Cak => {
                let lifetime = self.p.cak_lifetime;
                let Some(cak) = self.caks.back_mut() else {
                    return Ok(None);
                };
                if cak.expired(lifetime, now) {
                    return Err(ProfileError::CakExpired { key_id: cak.key_id });
                }
                let nonce = Nonce::new(nonce).ok_or(ProfileError::NonceLength {
                    got: nonce.len(),
                    want: self.p.cipher.key_len(),
                    cipher: self.p.cipher.ip_name(),
                })?;
                let kn = cak
                    .last_kn
                    .checked_add(1)
                    .ok_or(ProfileError::KnExhausted)?;
                cak.derive(kn, &nonce, self.p.cipher).map(Some)
            }
        }
    }

    /// Slave: the SAK an authenticated INSTALL asks for. The key leaves the store (SAK
    /// profile) or the KN is used up (CAK profile): asking twice fails.
    pub fn resolve_install(
        &mut self,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        nonce: Option<&Nonce>,
        now: Instant,
    ) -> Result<Sak, ProfileError> {
        let want = self.p.key_role();
        if role != want {
            return Err(ProfileError::WrongRole { got: role, want });
        }
        match self.p.kind {
            ProfileKind::Sak => {
                let i = self
                    .buffer
                    .iter()
                    .position(|h| h.key_id == key_id)
                    .ok_or(ProfileError::UnknownKey { key_id })?;
                if self.buffer[i].kn != kn {
                    return Err(ProfileError::KnMismatch {
                        key_id,
                        held: self.buffer[i].kn,
                        asked: kn,
                    });
                }
                let h = self
                    .buffer
                    .remove(i)
                    .ok_or(ProfileError::UnknownKey { key_id })?;
                sak_from_qkd(h.key_id, h.kn, h.key, self.p.cipher)
            }
            ProfileKind::Cak => {
                let lifetime = self.p.cak_lifetime;
                let cipher = self.p.cipher;
                let cak = self
                    .caks
                    .iter_mut()
                    .find(|c| c.key_id == key_id)
                    .ok_or(ProfileError::UnknownKey { key_id })?;
                if cak.expired(lifetime, now) {
                    return Err(ProfileError::CakExpired { key_id });
                }
                let nonce = nonce.ok_or(ProfileError::NonceLength {
                    got: 0,
                    want: cipher.key_len(),
                    cipher: cipher.ip_name(),
                })?;
                cak.derive(kn, nonce, cipher)
            }
        }
    }

    /// Master: the peer does not hold this key (an INSTALL under it timed out or was refused
    /// as unknown). It is dropped (zeroized) and never offered again; with nothing left, a
    /// replacement is fetched at once.
    pub fn forget(&mut self, key_id: KeyId, now: Instant) {
        let before = self.held();
        self.buffer.retain(|h| h.key_id != key_id);
        self.caks.retain(|c| c.key_id != key_id);
        if before > self.held() && self.urgent() && self.outstanding == 0 {
            // The peer needs a key now: the failure backoff is about the KME, not the peer.
            self.consecutive_failures = 0;
            self.next_fetch = Some(now);
        }
        self.evaluate(now);
    }

    /// Master: the peer says it holds no key while we hold some: it restarted and lost them,
    /// or the message is forged (HELLOs of a restarted peer cannot be authenticated). Nothing
    /// held is dropped, so a forgery cannot starve the link; a fresh key is fetched at once
    /// (CAK: it becomes the newest; SAK: the held keys become suspect and are used after it).
    pub fn peer_lost_keys(&mut self, now: Instant) {
        for h in &mut self.buffer {
            h.suspect = true;
        }
        self.consecutive_failures = 0;
        self.next_fetch = Some(now);
        self.evaluate(now);
    }

    /// Whether a key_ID is held (to answer duplicate ANNOUNCEs without a KME request).
    pub fn holds(&self, key_id: KeyId) -> bool {
        self.buffer.iter().any(|h| h.key_id == key_id)
            || self.caks.iter().any(|c| c.key_id == key_id)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.evaluate(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let fetch = if self.p.role == Role::Master && self.wants_more() {
            self.next_fetch
        } else {
            None
        };
        let expiry = match (self.p.kind, self.caks.back()) {
            (ProfileKind::Cak, Some(c)) if self.cak_expiry_reported != Some(c.key_id) => {
                Some(c.obtained + self.p.cak_lifetime)
            }
            _ => None,
        };
        match (fetch, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_action(&mut self) -> Option<SupplyAction> {
        self.actions.pop_front()
    }

    fn evaluate(&mut self, now: Instant) {
        if let (ProfileKind::Cak, Some(c)) = (self.p.kind, self.caks.back()) {
            if c.expired(self.p.cak_lifetime, now) && self.cak_expiry_reported != Some(c.key_id) {
                tracing::error!(key_id = %c.key_id, "CAK lifetime over and no new CAK confirmed");
                self.cak_expiry_reported = Some(c.key_id);
                self.actions
                    .push_back(SupplyAction::CakExpired { key_id: c.key_id });
            }
        }
        if self.p.role != Role::Master {
            return;
        }
        // With nothing held, don't wait for the regular schedule (but respect failure backoff).
        if self.urgent() && self.outstanding == 0 && self.consecutive_failures == 0 {
            self.next_fetch = Some(self.next_fetch.map_or(now, |t| t.min(now)));
        }
        if !self.wants_more() {
            return;
        }
        let due = self.next_fetch.is_none_or(|t| t <= now);
        if due {
            self.outstanding += 1;
            self.actions.push_back(SupplyAction::FetchKey {
                size_bytes: self.p.qkd_key_len(),
            });
            self.next_fetch = Some(now + self.p.key_request_interval);
        }
    }
}

#[cfg(test)]
mod tests;
