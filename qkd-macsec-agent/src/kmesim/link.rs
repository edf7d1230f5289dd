//! The simulated QKD link shared by the two KMEs: a sans-IO state machine with the clock passed in
//! (`now`), so every timing rule is tested without sleeping.
//!
//! Key material accrues at `key_rate` keys (of `key_size` bits) per second into a pool capped at
//! `max_key_count` keys, unless generation is paused or the eavesdropper's QBER is above the abort
//! threshold (then the link produces nothing, like a real QKD link that aborts privacy
//! amplification). enc_keys takes bits from the pool and issues keys to a (master, slave) SAE
//! pair; each issued key is delivered to the slave once by dec_keys and then forgotten. A key the
//! slave has not fetched within the availability timeout disappears.

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
        }
    }
}

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

/// Counters for the control interface and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounters {
    pub issued: u64,
    pub delivered: u64,
    pub expired: u64,
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
            if self
                .issued
                .get(&id)
                .is_some_and(|k| k.deadline.is_some_and(|d| d <= now))
            {
                self.issued.remove(&id);
                self.counters.expired += 1;
            }
        }
    }

    /// Changes parameters at `now` (accrual up to `now` uses the old ones).
    pub fn set_params(&mut self, params: LinkParams, now: Instant) {
        self.advance(now);
        self.params = params;
        self.pool_bits = self.pool_bits.min(self.capacity_bits());
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

    /// enc_keys: issues `number` keys of `size_bits` to (master, slave). All or nothing.
    pub fn take(
        &mut self,
        now: Instant,
        master: &str,
        slave: &str,
        number: u32,
        size_bits: u32,
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
        // A little slack against float rounding in the accrual.
        if (requested as f64) > self.pool_bits + 1e-6 {
            return Err(LinkError::Exhausted {
                requested_bits: requested,
                stored_bits: self.pool_bits as u64,
            });
        }
        self.pool_bits = (self.pool_bits - requested as f64).max(0.0);
        let deadline = self.params.availability_timeout.map(|t| now + t);
        let mut out = Vec::with_capacity(number as usize);
        for _ in 0..number {
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
        self.counters.issued += u64::from(number);
        Ok(out)
    }

    /// dec_keys: delivers the keys `ids` to `caller` (the slave), issued by `master`. All or
    /// nothing: any unknown, foreign or duplicated ID fails the whole request and removes nothing.
    pub fn deliver(
        &mut self,
        now: Instant,
        caller: &str,
        master: &str,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, SecretBytes)>, LinkError> {
        self.advance(now);
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(LinkError::Duplicate(*id));
            }
            let k = match self.issued.get(id) {
                Some(k) if k.deadline.is_none_or(|d| d > now) => k,
                _ => return Err(LinkError::UnknownKey(*id)),
            };
            if k.slave != caller || k.master != master {
                return Err(LinkError::NotYours {
                    key_id: *id,
                    caller: caller.to_string(),
                    master: master.to_string(),
                });
            }
        }
        let out: Vec<_> = ids
            .iter()
            .filter_map(|id| self.issued.remove(id).map(|k| (*id, k.key)))
            .collect();
        self.counters.delivered += out.len() as u64;
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
        let k = l.take(t0, "m", "s", 2, 256).unwrap();
        assert_eq!(l.stored_key_count(t0), 3);
        let ids: Vec<_> = k.iter().map(|k| k.id).collect();
        assert!(matches!(
            l.deliver(t0, "x", "m", &ids[..1]),
            Err(LinkError::NotYours { .. })
        ));
        assert!(matches!(
            l.deliver(t0, "s", "other", &ids[..1]),
            Err(LinkError::NotYours { .. })
        ));
        let got = l.deliver(t0, "s", "m", &ids).unwrap();
        assert_eq!(got[0].1, k[0].key);
        assert_eq!(got[1].1, k[1].key);
        assert_eq!(
            l.deliver(t0, "s", "m", &ids[..1]).unwrap_err(),
            LinkError::UnknownKey(ids[0])
        );
    }

    #[test]
    fn failed_deliver_removes_nothing() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 1, 256).unwrap();
        let bogus = Uuid::new_v4();
        assert_eq!(
            l.deliver(t0, "s", "m", &[k[0].id, bogus]).unwrap_err(),
            LinkError::UnknownKey(bogus)
        );
        assert_eq!(
            l.deliver(t0, "s", "m", &[k[0].id, k[0].id]).unwrap_err(),
            LinkError::Duplicate(k[0].id)
        );
        assert_eq!(l.deliver(t0, "s", "m", &[k[0].id]).unwrap().len(), 1);
    }

    #[test]
    fn unfetched_key_expires_after_availability_timeout() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        l.fill(t0);
        let k = l.take(t0, "m", "s", 1, 256).unwrap();
        assert_eq!(k[0].expires_in, Some(Duration::from_secs(10)));
        let late = t0 + Duration::from_secs(10);
        assert_eq!(
            l.deliver(late, "s", "m", &[k[0].id]).unwrap_err(),
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
        let k = l.take(t0, "m", "s", 1, 512).unwrap();
        assert_eq!(l.stored_key_count(t0), 3);
        let later = t0 + Duration::from_secs(100_000);
        assert_eq!(l.deliver(later, "s", "m", &[k[0].id]).unwrap().len(), 1);
    }

    #[test]
    fn exhausted_and_too_large() {
        let t0 = Instant::now();
        let mut l = Link::new(params(), t0);
        assert!(matches!(
            l.take(t0, "m", "s", 1, 256),
            Err(LinkError::Exhausted { .. })
        ));
        assert!(matches!(
            l.take(t0, "m", "s", 6, 256),
            Err(LinkError::TooLarge { .. })
        ));
        assert_eq!(l.counters().issued, 0);
    }
}
