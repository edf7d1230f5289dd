//! The simulated QKD link shared by the two KMEs: a sans-IO state machine with the clock passed in
//! (`now`), so every timing rule is tested without sleeping.
//!
//! Key material accrues at `key_rate` keys (of `key_size` bits) per second into a pool capped at
//! `max_key_count` keys, unless generation is paused or the eavesdropper's QBER is above the abort
//! threshold (then the link produces nothing, like a real QKD link that aborts privacy
//! amplification). enc_keys takes bits from the pool and issues keys to a (master, slave) SAE
//! pair; each issued key is delivered to the slave once by dec_keys and then forgotten. A key the
//! slave has not fetched within the availability timeout disappears.
//!
//! Fault injection, a KME that hands keys out more than once (as independent field KMEs can):
//! with `key_history` > 0 the link keeps the newest `key_history` delivered or expired keys
//! (bytes zeroized when they fall out). A KME with `reserve` set answers dec_keys of such a
//! key_ID with the same bytes again; one with `reissue` set hands them out by enc_keys as if
//! they were new, before fresh ones: a KME rewound to an earlier state. [`Link::rewind`] (the
//! fault switched on) says where it rewinds to: every key retained by then is handed out once
//! more, oldest first; keys retained later wait for the next rewind.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::secret::SecretBytes;

/// Link parameters; all can change while the simulator runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// Keys of `key_size` bits produced per second.
    pub key_rate: f64,
    /// Default key size, bits.
    pub key_size: u32,
    /// Pool capacity, in keys of `key_size` bits.
    pub max_key_count: u64,
    /// Slave must fetch within this after the master did; None = unlimited.
    pub availability_timeout: Option<Duration>,
    /// Eavesdropper-induced quantum bit error rate (fraction).
    pub qber: f64,
    /// Above this QBER the link produces no key.
    pub qber_abort: f64,
    /// Generation paused (fault injection).
    pub paused: bool,
    /// Delivered and expired keys kept (newest first) for the re-serve fault; 0 = none, the
    /// behaviour of a KME that forgets a key once it is delivered.
    pub key_history: usize,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            key_rate: 1000.0,
            key_size: 256,
            max_key_count: 10_000,
            availability_timeout: Some(Duration::from_secs(10)),
            qber: 0.02,
            qber_abort: 0.11,
            paused: false,
            key_history: 0,
        }
    }
}

/// Largest `key_history`: 100,000 keys of the largest size (4096 bits) are 51 MB of key bytes
/// (about 72 MB with their bookkeeping), the most the two faults may cost.
pub const MAX_KEY_HISTORY: usize = 100_000;

impl LinkParams {
    /// True while the link produces key material.
    pub fn producing(&self) -> bool {
        !self.paused && self.qber <= self.qber_abort && self.key_rate > 0.0
    }
}

/// Why the link refused a request (mapped to 014 status codes by the server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("not enough key material: {requested_bits} bits requested, {stored_bits} stored; retry later")]
    Exhausted {
        requested_bits: u64,
        stored_bits: u64,
    },
    #[error("request for {requested_bits} bits can never be served: the pool holds at most {capacity_bits} bits")]
    TooLarge {
        requested_bits: u64,
        capacity_bits: u64,
    },
    #[error("unknown key_ID {0} (never issued, already delivered, or expired)")]
    UnknownKey(Uuid),
    #[error("key_ID {key_id} was not issued to slave SAE {caller} by master SAE {master}")]
    NotYours {
        key_id: Uuid,
        caller: String,
        master: String,
    },
    #[error("key_ID {0} requested twice")]
    Duplicate(Uuid),
}

struct Issued {
    master: String,
    slave: String,
    key: SecretBytes,
    deadline: Option<Instant>,
}

/// A delivered or expired key kept for the re-serve fault.
struct Retained {
    master: String,
    slave: String,
    key: SecretBytes,
    /// The [`Link::rewind`] count when it was first retained: it is eligible for re-issue
    /// from the next rewind on.
    retained_in: u64,
    /// The [`Link::rewind`] in which enc_keys last handed it out again (0: never).
    reissued_in: u64,
}

/// Counters for the control interface and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounters {
    pub issued: u64,
    pub delivered: u64,
    pub expired: u64,
    /// dec_keys deliveries of a key that was already delivered or expired (re-serve fault).
    pub reserved: u64,
    /// Retained keys enc_keys handed out again (re-issue fault).
    pub reissued: u64,
}

/// A key handed to the master.
pub struct IssuedKey {
    pub id: Uuid,
    pub key: SecretBytes,
    /// Time left for the slave to fetch it.
    pub expires_in: Option<Duration>,
}

pub struct Link {
    params: LinkParams,
    pool_bits: f64,
    last: Instant,
    issued: HashMap<Uuid, Issued>,
    /// Issue order; deadlines are monotonic while the timeout is unchanged, and a lookup checks
    /// the deadline itself, so a changed timeout can delay the sweep but never serve a stale key.
    expiry: VecDeque<(Instant, Uuid)>,
    counters: LinkCounters,
    /// Delivered and expired keys for the re-serve fault, at most `params.key_history`.
    retained: HashMap<Uuid, Retained>,
    /// `retained` oldest first.
    retained_order: VecDeque<Uuid>,
    /// Incremented each time a KME's re-serve fault is switched on.
    rewind: u64,
    rng: ring::rand::SystemRandom,
    /// Test facility: every issued key, hex, one per line (see `--key-audit-log`).
    audit: Option<std::fs::File>,
}

impl Link {
    /// Appends every key issued from now on to `f` (key_ID and key in hex), for leak audits.
    pub fn set_key_audit(&mut self, f: std::fs::File) {
        self.audit = Some(f);
    }

    /// A link with an empty pool at `now`.
    pub fn new(params: LinkParams, now: Instant) -> Self {
        Self {
            params,
            pool_bits: 0.0,
            last: now,
            issued: HashMap::new(),
            expiry: VecDeque::new(),
            counters: LinkCounters::default(),
            retained: HashMap::new(),
            retained_order: VecDeque::new(),
            rewind: 0,
            rng: ring::rand::SystemRandom::new(),
            audit: None,
        }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    fn capacity_bits(&self) -> f64 {
        self.params.max_key_count as f64 * f64::from(self.params.key_size)
    }

    /// Brings the pool and the expiry sweep up to `now`.
    pub fn advance(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        if self.params.producing() {
            self.pool_bits = (self.pool_bits
                + dt * self.params.key_rate * f64::from(self.params.key_size))
            .min(self.capacity_bits());
        }
        while let Some(&(deadline, id)) = self.expiry.front() {
            if deadline > now {
                break;
            }
            self.expiry.pop_front();
            self.expire_if_due(id, now);
        }
    }

    /// Drops an issued key whose availability deadline has passed (kept for the re-serve fault
    /// when `key_history` allows).
    fn expire_if_due(&mut self, id: Uuid, now: Instant) {
        if !self
            .issued
            .get(&id)
            .is_some_and(|k| k.deadline.is_some_and(|d| d <= now))
        {
            return;
        }
        if let Some(k) = self.issued.remove(&id) {
            self.counters.expired += 1;
            self.retain(id, k.master, k.slave, k.key);
        }
    }

    /// Keeps a delivered or expired key for the re-serve fault, newest last, within
    /// `key_history`; what falls out is zeroized on drop. A key kept twice (served again, then
    /// delivered again) keeps one entry and its re-issue mark.
    fn retain(&mut self, id: Uuid, master: String, slave: String, key: SecretBytes) {
        let (retained_in, reissued_in) = match self.retained.remove(&id) {
            Some(old) => {
                self.retained_order.retain(|k| *k != id);
                (old.retained_in, old.reissued_in)
            }
            None => (self.rewind, 0),
        };
        if self.params.key_history == 0 {
            return;
        }
        self.retained.insert(
            id,
            Retained {
                master,
                slave,
                key,
                retained_in,
                reissued_in,
            },
        );
        self.retained_order.push_back(id);
        self.trim_retained();
    }

    fn trim_retained(&mut self) {
        while self.retained_order.len() > self.params.key_history {
            if let Some(old) = self.retained_order.pop_front() {
                self.retained.remove(&old);
            }
        }
    }

    /// Keys kept for the re-serve fault.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// A KME's re-issue fault was switched on: every key retained so far may be handed out by
    /// enc_keys once more.
    pub fn rewind(&mut self) {
        self.rewind += 1;
    }

    /// Changes parameters at `now` (accrual up to `now` uses the old ones). A smaller
    /// `key_history` drops (and zeroizes) the oldest retained keys at once.
    pub fn set_params(&mut self, params: LinkParams, now: Instant) {
        self.advance(now);
        self.params = params;
        self.pool_bits = self.pool_bits.min(self.capacity_bits());
        self.trim_retained();
    }

    /// Fills the pool to capacity (tests and benchmarks start from a full link).
    pub fn fill(&mut self, now: Instant) {
        self.advance(now);
        self.pool_bits = self.capacity_bits();
    }

    /// Keys of the default size available now.
    pub fn stored_key_count(&mut self, now: Instant) -> u64 {
        self.advance(now);
        (self.pool_bits / f64::from(self.params.key_size)).floor() as u64
    }

    /// Keys issued and not yet fetched by their slave.
    pub fn pending(&self) -> usize {
        self.issued.len()
    }

    /// Hands `key` out to (master, slave) under `id`: into the answer, the issued set (for
    /// dec_keys) and, when keys expire, the expiry queue.
    fn hand_out(
        &mut self,
        out: &mut Vec<IssuedKey>,
        id: Uuid,
        key: SecretBytes,
        master: &str,
        slave: &str,
        deadline: Option<Instant>,
    ) {
        out.push(IssuedKey {
            id,
            key: key.duplicate(),
            expires_in: self.params.availability_timeout,
        });
        self.issued.insert(
            id,
            Issued {
                master: master.to_string(),
                slave: slave.to_string(),
                key,
                deadline,
            },
        );
        if let Some(d) = deadline {
            self.expiry.push_back((d, id));
        }
    }

    /// enc_keys: issues `number` keys of `size_bits` to (master, slave). All or nothing.
    /// `reissue` (the KME's re-issue fault): keys of this pair and size retained before the
    /// last [`Link::rewind`] and not handed out again since come first, oldest first, with
    /// their old key_IDs and bytes (pending again, so the slave can fetch them once more); only
    /// the rest is new.
    pub fn take(
        &mut self,
        now: Instant,
        master: &str,
        slave: &str,
        number: u32,
        size_bits: u32,
        reissue: bool,
    ) -> Result<Vec<IssuedKey>, LinkError> {
        self.advance(now);
        let requested = u64::from(number) * u64::from(size_bits);
        let capacity = self.capacity_bits() as u64;
        if requested > capacity {
            return Err(LinkError::TooLarge {
                requested_bits: requested,
                capacity_bits: capacity,
            });
        }
        let again: Vec<Uuid> = if reissue {
            self.retained_order
                .iter()
                .filter(|id| {
                    self.retained.get(id).is_some_and(|r| {
                        r.master == master
                            && r.slave == slave
                            && r.key.len() * 8 == size_bits as usize
                            && r.retained_in < self.rewind
                            && r.reissued_in < self.rewind
                            && !self.issued.contains_key(id)
                    })
                })
                .take(number as usize)
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        let fresh = number - again.len() as u32;
        let fresh_bits = u64::from(fresh) * u64::from(size_bits);
        // A little slack against float rounding in the accrual.
        if (fresh_bits as f64) > self.pool_bits + 1e-6 {
            return Err(LinkError::Exhausted {
                requested_bits: fresh_bits,
                stored_bits: self.pool_bits as u64,
            });
        }
        self.pool_bits = (self.pool_bits - fresh_bits as f64).max(0.0);
        let deadline = self.params.availability_timeout.map(|t| now + t);
        let mut out = Vec::with_capacity(number as usize);
        for id in again {
            let Some(r) = self.retained.get_mut(&id) else {
                continue;
            };
            r.reissued_in = self.rewind;
            let key = r.key.duplicate();
            self.hand_out(&mut out, id, key, master, slave, deadline);
            self.counters.reissued += 1;
        }
        for _ in 0..fresh {
            let mut bytes = vec![0u8; (size_bits / 8) as usize];
            // The OS RNG stands in for QKD output; failure here is an unrecoverable OS fault.
            ring::rand::SecureRandom::fill(&self.rng, &mut bytes)
                .expect("the operating system's random number generator failed");
            let key = SecretBytes::new(bytes);
            let id = Uuid::new_v4();
            if let Some(f) = self.audit.as_mut() {
                use std::io::Write as _;
                let hex: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
                // A failed audit write must not look like a clean audit: stop serving.
                writeln!(f, "{id} {hex}").expect("writing the key audit log");
            }
            self.hand_out(&mut out, id, key, master, slave, deadline);
        }
        self.counters.issued += u64::from(fresh);
        Ok(out)
    }

    /// dec_keys: delivers the keys `ids` to `caller` (the slave), issued by `master`. All or
    /// nothing: any unknown, foreign or duplicated ID fails the whole request and removes nothing.
    /// `reserve` (the KME's re-serve fault): a retained key (already delivered, or expired) is
    /// delivered again with the same bytes instead of being unknown.
    pub fn deliver(
        &mut self,
        now: Instant,
        caller: &str,
        master: &str,
        ids: &[Uuid],
        reserve: bool,
    ) -> Result<Vec<(Uuid, SecretBytes)>, LinkError> {
        self.advance(now);
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(LinkError::Duplicate(*id));
            }
            // The sweep can lag behind a changed timeout; an overdue key is expired here.
            self.expire_if_due(*id, now);
            let (slave, owner) = match (self.issued.get(id), self.retained.get(id)) {
                (Some(k), _) => (&k.slave, &k.master),
                (None, Some(r)) if reserve => (&r.slave, &r.master),
                _ => return Err(LinkError::UnknownKey(*id)),
            };
            if slave != caller || owner != master {
                return Err(LinkError::NotYours {
                    key_id: *id,
                    caller: caller.to_string(),
                    master: master.to_string(),
                });
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(k) = self.issued.remove(id) {
                self.counters.delivered += 1;
                if self.params.key_history > 0 {
                    out.push((*id, k.key.duplicate()));
                    self.retain(*id, k.master, k.slave, k.key);
                } else {
                    out.push((*id, k.key));
                }
            } else if let Some(r) = self.retained.get(id) {
                self.counters.reserved += 1;
                out.push((*id, r.key.duplicate()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LinkParams {
        LinkParams {
            key_rate: 10.0,
            key_size: 256,
            max_key_count: 5,
            availability_timeout: Some(Duration::from_secs(10)),
            qber: 0.0,
            qber_abort: 0.11,
            paused: false,
            key_history: 0,
        }
    }

    #[test]
    fn pool_accrues_at_rate_and_caps() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        assert_eq!(l.stored_key_count(t0), 0);
        assert_eq!(l.stored_key_count(t0 + Duration::from_millis(250)), 2);
        assert_eq!(l.stored_key_count(t0 + Duration::from_secs(100)), 5);
    }

    #[test]
    fn qber_above_threshold_and_pause_stop_generation() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        let mut p = params();
        p.qber = 0.12;
        l.set_params(p.clone(), t0);
        assert_eq!(l.stored_key_count(t0 + Duration::from_secs(5)), 0);
        p.qber = 0.05;
        p.paused = true;
        l.set_params(p.clone(), t0 + Duration::from_secs(5));
        assert_eq!(l.stored_key_count(t0 + Duration::from_secs(9)), 0);
        p.paused = false;
        l.set_params(p, t0 + Duration::from_secs(9));
        assert_eq!(l.stored_key_count(t0 + Duration::from_millis(9200)), 2);
    }

    #[test]
    fn key_goes_to_slave_once_and_same_bytes() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 2, 256, false).unwrap();
        assert_eq!(l.stored_key_count(t0), 3);
        let ids: Vec<_> = k.iter().map(|k| k.id).collect();
        assert!(matches!(
            l.deliver(t0, "x", "m", &ids[..1], false),
            Err(LinkError::NotYours { .. })
        ));
        assert!(matches!(
            l.deliver(t0, "s", "other", &ids[..1], false),
            Err(LinkError::NotYours { .. })
        ));
        let got = l.deliver(t0, "s", "m", &ids, false).unwrap();
        assert_eq!(got[0].1, k[0].key);
        assert_eq!(got[1].1, k[1].key);
        assert_eq!(
            l.deliver(t0, "s", "m", &ids[..1], false).unwrap_err(),
            LinkError::UnknownKey(ids[0])
        );
    }

    #[test]
    fn failed_deliver_removes_nothing() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 1, 256, false).unwrap();
        let bogus = Uuid::new_v4();
        assert_eq!(
            l.deliver(t0, "s", "m", &[k[0].id, bogus], false)
                .unwrap_err(),
            LinkError::UnknownKey(bogus)
        );
        assert_eq!(
            l.deliver(t0, "s", "m", &[k[0].id, k[0].id], false)
                .unwrap_err(),
            LinkError::Duplicate(k[0].id)
        );
        assert_eq!(l.deliver(t0, "s", "m", &[k[0].id], false).unwrap().len(), 1);
    }

    #[test]
    fn unfetched_key_expires_after_availability_timeout() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 1, 256, false).unwrap();
        assert_eq!(k[0].expires_in, Some(Duration::from_secs(10)));
        let late = t0 + Duration::from_secs(10);
        assert_eq!(
            l.deliver(late, "s", "m", &[k[0].id], false).unwrap_err(),
            LinkError::UnknownKey(k[0].id)
        );
        assert_eq!(l.counters().expired, 1);
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn unlimited_availability_keeps_keys() {
        let t0 = Instant::now();
        let mut p = params();
        p.availability_timeout = None;
        let mut l = Link::new(p, t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 1, 512, false).unwrap();
        assert_eq!(l.stored_key_count(t0), 3);
        let later = t0 + Duration::from_secs(100_000);
        assert_eq!(
            l.deliver(later, "s", "m", &[k[0].id], false).unwrap().len(),
            1
        );
    }

    #[test]
    fn exhausted_and_too_large() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        assert!(matches!(
            l.take(t0, "m", "s", 1, 256, false),
            Err(LinkError::Exhausted { .. })
        ));
        assert!(matches!(
            l.take(t0, "m", "s", 6, 256, false),
            Err(LinkError::TooLarge { .. })
        ));
        assert_eq!(l.counters().issued, 0);
    }

    fn history(n: usize) -> LinkParams {
        LinkParams {
            max_key_count: 100,
            key_history: n,
            ..params()
        }
    }

    #[test]
    fn reserve_serves_a_delivered_or_expired_key_again_with_the_same_bytes() {
        let t0 = Instant::now();
        let mut l = Link::new(history(8), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 2, 256, false).unwrap();
        let (a, b) = (k[0].id, k[1].id);
        assert_eq!(l.deliver(t0, "s", "m", &[a], false).unwrap()[0].1, k[0].key);
        // Without the fault a delivered key is gone, as before.
        assert_eq!(
            l.deliver(t0, "s", "m", &[a], false).unwrap_err(),
            LinkError::UnknownKey(a)
        );
        // With it, any number of times, the same bytes; the key stays retained.
        for _ in 0..3 {
            let again = l.deliver(t0, "s", "m", &[a], true).unwrap();
            assert_eq!((again[0].0, &again[0].1), (a, &k[0].key));
        }
        // An expired key (never fetched) too.
        let late = t0 + Duration::from_secs(10);
        assert_eq!(
            l.deliver(late, "s", "m", &[b], false).unwrap_err(),
            LinkError::UnknownKey(b)
        );
        assert_eq!(
            l.deliver(late, "s", "m", &[b], true).unwrap()[0].1,
            k[1].key
        );
        // Still only to the slave it was issued to, and all or nothing.
        assert!(matches!(
            l.deliver(late, "x", "m", &[a], true),
            Err(LinkError::NotYours { .. })
        ));
        let bogus = Uuid::new_v4();
        assert_eq!(
            l.deliver(late, "s", "m", &[a, bogus], true).unwrap_err(),
            LinkError::UnknownKey(bogus)
        );
        let c = l.counters();
        assert_eq!((c.delivered, c.expired, c.reserved), (1, 1, 4));
        assert_eq!(l.retained(), 2);
    }

    #[test]
    fn reissue_hands_out_old_key_ids_once_per_rewind_then_fresh_ones() {
        let t0 = Instant::now();
        let mut l = Link::new(history(8), t0);
        l.fill(t0);
        let old = l.take(t0, "m", "s", 3, 256, false).unwrap();
        let ids: Vec<Uuid> = old.iter().map(|k| k.id).collect();
        l.deliver(t0, "s", "m", &ids, false).unwrap();
        // Another pair's retained key is never handed to this one.
        let other = l.take(t0, "m2", "s2", 1, 256, false).unwrap();
        l.deliver(t0, "s2", "m2", &[other[0].id], false).unwrap();
        let stored = l.stored_key_count(t0);
        // The fault is on, but no rewind yet: nothing is eligible.
        let k = l.take(t0, "m", "s", 1, 256, true).unwrap();
        assert!(!ids.contains(&k[0].id));
        l.rewind();
        // Oldest first, the old bytes, no key material taken from the pool; the rest fresh.
        let again = l.take(t0, "m", "s", 2, 256, true).unwrap();
        assert_eq!((again[0].id, again[1].id), (ids[0], ids[1]));
        assert_eq!((&again[0].key, &again[1].key), (&old[0].key, &old[1].key));
        assert_eq!(l.stored_key_count(t0), stored - 1);
        let mixed = l.take(t0, "m", "s", 2, 256, true).unwrap();
        assert_eq!(mixed[0].id, ids[2]);
        assert!(!ids.contains(&mixed[1].id) && mixed[1].id != other[0].id);
        // A key delivered after the rewind waits for the next one.
        l.deliver(t0, "s", "m", &[mixed[1].id], false).unwrap();
        // Each once per rewind; another size is never a match.
        let fresh = l.take(t0, "m", "s", 1, 256, true).unwrap();
        assert!(!ids.contains(&fresh[0].id) && fresh[0].id != mixed[1].id);
        let _ = l.take(t0, "m", "s", 1, 128, true).unwrap();
        // A re-issued key is pending again: the slave fetches it normally, once.
        assert_eq!(
            l.deliver(t0, "s", "m", &[ids[0]], false).unwrap()[0].1,
            old[0].key
        );
        // The next rewind makes every key retained by then eligible once more (oldest first:
        // mixed[1], then ids[0], delivered again after its re-issue), but not one still
        // pending from its re-issue (ids[1], ids[2]): a key_ID is never pending twice.
        l.rewind();
        let again = l.take(t0, "m", "s", 3, 256, true).unwrap();
        assert_eq!((again[0].id, again[1].id), (mixed[1].id, ids[0]));
        assert!(!ids.contains(&again[2].id));
        let c = l.counters();
        assert_eq!(c.reissued, 5);
        assert_eq!(c.issued, 3 + 1 + 1 + 1 + 1 + 1 + 1);
    }

    #[test]
    fn history_is_bounded_and_zero_keeps_nothing() {
        let t0 = Instant::now();
        let mut l = Link::new(history(2), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 5, 256, false).unwrap();
        let ids: Vec<Uuid> = k.iter().map(|k| k.id).collect();
        l.deliver(t0, "s", "m", &ids, false).unwrap();
        assert_eq!(l.retained(), 2);
        // Only the newest two can come back.
        assert!(l.deliver(t0, "s", "m", &ids[2..3], true).is_err());
        assert_eq!(l.deliver(t0, "s", "m", &ids[3..], true).unwrap().len(), 2);
        // Lowering the bound drops (zeroizes) the oldest at once; 0 keeps nothing.
        let mut p = history(1);
        l.set_params(p.clone(), t0);
        assert_eq!(l.retained(), 1);
        assert!(l.deliver(t0, "s", "m", &ids[3..4], true).is_err());
        p.key_history = 0;
        l.set_params(p, t0);
        assert_eq!(l.retained(), 0);
        let k = l.take(t0, "m", "s", 1, 256, false).unwrap();
        l.deliver(t0, "s", "m", &[k[0].id], false).unwrap();
        assert_eq!(l.retained(), 0);
        assert_eq!(
            l.deliver(t0, "s", "m", &[k[0].id], true).unwrap_err(),
            LinkError::UnknownKey(k[0].id)
        );
    }
}
