//! Make-before-break key rollover, as explicit steps split between the two gateways.
//!
//! Each gateway's TX channel rolls independently. For the direction A -> B:
//! 1. B: [`Macsec::prepare_rx`] installs A's new SA (new AN, new key) on B's RX SC for A and
//!    activates it. B now accepts both the old and the new AN. B tells A (key exchange).
//! 2. A: [`Macsec::activate_tx`] with B's [`PeerRxConfirmation`]: installs the TX SA on the new
//!    AN and switches the encoding SA to it. Frames sent from now on use the new key; B already
//!    has it, so nothing is lost.
//! 3. After a grace period (frames with the old AN still in flight or queued), A
//!    [`Macsec::retire_tx`] the old TX SA and B [`Macsec::retire_rx`] the old RX SA: deactivate
//!    first, then delete (the kernel refuses to delete an active SA with EBUSY).
//!
//! [`RetireSchedule`] is the sans-IO timer for step 3.

use std::time::{Duration, Instant};

use super::{An, KeyId, Macsec, MacsecError, MacsecLink, SaKey, Sci};

/// The receiver finished step 1: its RX SA for the peer's new key is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPrepared {
    pub peer_sci: Sci,
    pub an: An,
    pub key_id: KeyId,
}

/// The peer's confirmation that it accepts our next TX key on `an` (step 1 done on its side).
/// The agent builds it from the peer's key-exchange message; [`Macsec::activate_tx`] refuses to
/// switch without one that names the same AN and key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRxConfirmation {
    pub an: An,
    pub key_id: KeyId,
}

impl PeerRxConfirmation {
    pub fn from_peer(an: An, key_id: KeyId) -> Self {
        Self { an, key_id }
    }
}

impl From<RxPrepared> for PeerRxConfirmation {
    /// For callers that drive both ends in one process (tests, the benchmark).
    fn from(p: RxPrepared) -> Self {
        Self {
            an: p.an,
            key_id: p.key_id,
        }
    }
}

/// Step 2 done: the link transmits on `new_an`; `old_an` (if any) awaits retirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxActivated {
    pub new_an: An,
    pub old_an: Option<An>,
}

impl Macsec {
    /// Step 1 (receiver): make sure the RX SC for `peer_sci` exists, install the peer's new SA
    /// on `an` active, accepting packet numbers from `lowest_pn` (normally 1).
    pub fn prepare_rx(
        &mut self,
        link: &MacsecLink,
        peer_sci: Sci,
        an: An,
        key: &SaKey,
        lowest_pn: u64,
    ) -> Result<RxPrepared, MacsecError> {
        self.add_rx_sc(link, peer_sci)?;
        self.add_rx_sa(link, peer_sci, an, lowest_pn, key, true)?;
        Ok(RxPrepared {
            peer_sci,
            an,
            key_id: key.key_id,
        })
    }

    /// Step 2 (sender): install the TX SA on `an` starting at PN 1 and switch the encoding SA
    /// to it, but only with the peer's confirmation for this AN and key. `link.encoding_sa` is
    /// updated; the previous encoding SA is returned for retirement.
    pub fn activate_tx(
        &mut self,
        link: &mut MacsecLink,
        an: An,
        key: &SaKey,
        confirmed: &PeerRxConfirmation,
    ) -> Result<TxActivated, MacsecError> {
        if confirmed.an != an || confirmed.key_id != key.key_id {
            return Err(MacsecError::InvalidArgument {
                field: "peer confirmation",
                value: format!("AN {} key id {}", confirmed.an, confirmed.key_id),
                reason: "does not match the TX SA being activated; wait for the peer to confirm this AN and key",
            });
        }
        let old = link.encoding_sa;
        if old == an {
            // Re-activation after a crash between add and switch is fine only if the SA there
            // already holds this key (add_tx_sa is idempotent on the same key id).
            self.add_tx_sa(link, an, 1, key, true)?;
            self.set_encoding_sa(link, an)?;
            return Ok(TxActivated {
                new_an: an,
                old_an: None,
            });
        }
        self.add_tx_sa(link, an, 1, key, true)?;
        self.set_encoding_sa(link, an)?;
        link.encoding_sa = an;
        tracing::info!(link = %link.name, from = %old, to = %an, key_id = %key.key_id, "TX switched to new SA");
        Ok(TxActivated {
            new_an: an,
            old_an: Some(old),
        })
    }

    /// Step 3 (sender): deactivate, then delete the old TX SA. Refuses the current encoding SA.
    /// An SA that is already gone is success.
    pub fn retire_tx(&mut self, link: &MacsecLink, old_an: An) -> Result<(), MacsecError> {
        if old_an == link.encoding_sa {
            return Err(MacsecError::Busy {
                op: "retire TX SA",
                name: link.name.clone(),
                what: format!("TX SA {old_an}"),
                hint: "it is the encoding SA; activate the new SA before retiring the old one",
            });
        }
        match self.set_tx_sa_active(link, old_an, false) {
            Ok(()) | Err(MacsecError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.del_tx_sa(link, old_an)
    }

    /// A stalled link's exhausted TX SA: deactivate, then delete it even though it is still the
    /// encoding SA. The kernel then has no SA to transmit with and drops every frame (it never
    /// sends plaintext on a SecY with `protect on`), and the used-up key leaves kernel memory.
    /// An SA that is already gone is success.
    pub fn remove_stalled_tx(&mut self, link: &MacsecLink, an: An) -> Result<(), MacsecError> {
        match self.set_tx_sa_active(link, an, false) {
            Ok(()) | Err(MacsecError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.del_tx_sa(link, an)
    }

    /// Step 3 (receiver): deactivate, then delete the peer's old RX SA. Already gone is success.
    pub fn retire_rx(
        &mut self,
        link: &MacsecLink,
        peer_sci: Sci,
        old_an: An,
    ) -> Result<(), MacsecError> {
        match self.set_rx_sa_active(link, peer_sci, old_an, false) {
            Ok(()) | Err(MacsecError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.del_rx_sa(link, peer_sci, old_an)
    }
}

/// Something to retire when its grace period ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    Tx(An),
    Rx(Sci, An),
}

/// Sans-IO grace-period timer for step 3: the IO loop feeds `now`, asks when to wake up, and
/// executes what is due. An AN with a pending retirement must not be reused for a new key.
#[derive(Debug)]
pub struct RetireSchedule {
    grace: Duration,
    pending: Vec<(Retire, Instant)>,
}

impl RetireSchedule {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            pending: Vec::new(),
        }
    }

    pub fn schedule(&mut self, what: Retire, now: Instant) {
        self.pending.retain(|(w, _)| *w != what);
        self.pending.push((what, now + self.grace));
    }

    /// Removes and returns everything whose grace period has ended, oldest first.
    pub fn due(&mut self, now: Instant) -> Vec<Retire> {
        let mut due: Vec<(Retire, Instant)> = Vec::new();
        self.pending.retain(|(w, at)| {
            if *at <= now {
                due.push((*w, *at));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|(_, at)| *at);
        due.into_iter().map(|(w, _)| w).collect()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.iter().map(|(_, at)| *at).min()
    }

    /// True while a TX SA on `an` still waits for retirement: a new key must not go there yet.
    pub fn tx_pending(&self, an: An) -> bool {
        self.pending.iter().any(|(w, _)| *w == Retire::Tx(an))
    }

    pub fn rx_pending(&self, sci: Sci, an: An) -> bool {
        self.pending.iter().any(|(w, _)| *w == Retire::Rx(sci, an))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_releases_after_grace_in_order() {
        let t0 = Instant::now();
        let a0 = An::new(0).unwrap();
        let a1 = An::new(1).unwrap();
        let sci = Sci(5);
        let mut s = RetireSchedule::new(Duration::from_millis(100));
        assert_eq!(s.poll_timeout(), None);
        s.schedule(Retire::Tx(a0), t0);
        s.schedule(Retire::Rx(sci, a1), t0 + Duration::from_millis(10));
        assert!(s.tx_pending(a0) && s.rx_pending(sci, a1) && !s.tx_pending(a1));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(100)));
        assert!(s.due(t0 + Duration::from_millis(99)).is_empty());
        assert_eq!(s.due(t0 + Duration::from_millis(100)), vec![Retire::Tx(a0)]);
        assert_eq!(
            s.due(t0 + Duration::from_secs(1)),
            vec![Retire::Rx(sci, a1)]
        );
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn rescheduling_replaces() {
        let t0 = Instant::now();
        let a0 = An::new(0).unwrap();
        let mut s = RetireSchedule::new(Duration::from_millis(100));
        s.schedule(Retire::Tx(a0), t0);
        s.schedule(Retire::Tx(a0), t0 + Duration::from_millis(50));
        assert!(s.due(t0 + Duration::from_millis(120)).is_empty());
        assert_eq!(s.due(t0 + Duration::from_millis(150)), vec![Retire::Tx(a0)]);
    }

    #[test]
    fn confirmation_from_prepared() {
        let p = RxPrepared {
            peer_sci: Sci(1),
            an: An::new(2).unwrap(),
            key_id: KeyId([3; 16]),
        };
        let c: PeerRxConfirmation = p.into();
        assert_eq!(
            c,
            PeerRxConfirmation::from_peer(An::new(2).unwrap(), KeyId([3; 16]))
        );
    }
}
