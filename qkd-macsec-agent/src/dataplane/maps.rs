//! Typed views of the program's maps: SCIs, SA keys, slots and counters, and the open-addressed
//! slot choice the program's lookup mirrors (see qkd_macsec_common::sa_slot).

use std::fmt;

use qkd_macsec_common::{
    sa_bucket, sa_slot, Counter, Direction, SaReg, SaStats, SA_PROBES, SA_VALID, SA_XPN,
};

/// A Secure Channel Identifier as `ip macsec` prints it: the MAC in the upper 48 bits, the port in
/// the lower 16.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sci(pub u64);

impl Sci {
    /// The SCI of `mac` and `port`.
    pub fn from_mac_port(mac: [u8; 6], port: u16) -> Self {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&mac);
        b[6..].copy_from_slice(&port.to_be_bytes());
        Sci(u64::from_be_bytes(b))
    }

    /// The eight bytes as they appear in a SecTAG.
    pub fn wire_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// The representation in the maps: wire bytes read as a native u64.
    pub fn to_map(self) -> u64 {
        u64::from_ne_bytes(self.wire_bytes())
    }

    /// Inverse of [`Sci::to_map`].
    pub fn from_map(v: u64) -> Self {
        Sci(u64::from_be_bytes(v.to_ne_bytes()))
    }
}

impl fmt::Display for Sci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Sci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sci({:016x})", self.0)
    }
}

/// One SA as the data plane sees it: direction on the lower device, SCI and AN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SaKey {
    /// Rx (counted at XDP ingress) or Tx (counted at TC egress).
    pub direction: Direction,
    /// The SC's identifier.
    pub sci: Sci,
    /// Association number 0..=3.
    pub an: u8,
}

impl fmt::Display for SaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = match self.direction {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        };
        write!(f, "{d} sci {} an {}", self.sci, self.an)
    }
}

/// Index of a registered SA in the registration and stats maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SaSlot(pub u32);

/// Traffic of one SA summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaCounters {
    /// Frames counted.
    pub frames: u64,
    /// Bytes (whole frames without FCS).
    pub bytes: u64,
    /// Highest full PN seen on any CPU (0 when no frame was counted).
    pub highest_pn: u64,
}

impl SaCounters {
    pub(crate) fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a SaStats>) -> Self {
        per_cpu.into_iter().fold(Self::default(), |acc, s| Self {
            frames: acc.frames + s.frames,
            bytes: acc.bytes + s.bytes,
            highest_pn: acc.highest_pn.max(s.highest_pn),
        })
    }
}

/// The interface's own counters summed over CPUs (see qkd_macsec_common::IfCounter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounters {
    pub rx_unknown_sa: Counter,
    pub rx_malformed: Counter,
    pub tx_unknown_sa: Counter,
    pub tx_malformed: Counter,
    pub rx_stall_drop: Counter,
    pub tx_stall_drop: Counter,
    pub lldp_delivered: Counter,
    pub lldp_ignored: Counter,
    pub lldp_malformed: Counter,
    pub events_lost: Counter,
    pub lldp_rate_limited: Counter,
}

pub(crate) fn sum_counters<'a>(per_cpu: impl IntoIterator<Item = &'a Counter>) -> Counter {
    per_cpu
        .into_iter()
        .fold(Counter::default(), |a, c| Counter {
            frames: a.frames + c.frames,
            bytes: a.bytes + c.bytes,
        })
}

/// Where `key` lives or would go, given the current table contents.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SlotChoice {
    /// Already registered here.
    Existing(u32),
    /// Not registered; this is the first free slot on its probe sequence.
    Free(u32),
    /// Not registered and every slot on its probe sequence is taken.
    Full,
}

/// The probe sequence of `key`, in the order the program searches it.
pub(crate) fn probe_sequence(key: &SaKey) -> impl Iterator<Item = u32> {
    let dir = key.direction as u32;
    let bucket = sa_bucket(key.sci.to_map());
    let an = u32::from(key.an);
    (0..SA_PROBES).map(move |i| sa_slot(dir, bucket + i, an))
}

/// Finds `key` in a table read through `get`. An existing registration anywhere on the sequence
/// wins over an earlier free slot (slots free up when SAs are unregistered).
pub(crate) fn choose_slot(
    key: &SaKey,
    mut get: impl FnMut(u32) -> Result<SaReg, super::DataplaneError>,
) -> Result<SlotChoice, super::DataplaneError> {
    let want = key.sci.to_map();
    let mut free = None;
    for slot in probe_sequence(key) {
        let reg = get(slot)?;
        if reg.flags & SA_VALID != 0 {
            if reg.sci == want {
                return Ok(SlotChoice::Existing(slot));
            }
        } else if free.is_none() {
            free = Some(slot);
        }
    }
    Ok(free.map_or(SlotChoice::Full, SlotChoice::Free))
}

/// A registration entry for `key`.
pub(crate) fn new_entry(key: &SaKey, xpn: bool, pn_hi: u32, thresholds: [u64; 4]) -> SaReg {
    SaReg {
        sci: key.sci.to_map(),
        pn_hi: if xpn { pn_hi } else { 0 },
        flags: SA_VALID | if xpn { SA_XPN } else { 0 },
        thresholds,
        fired: 0,
        next_check: SaReg::min_threshold(&thresholds),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use qkd_macsec_common::{SA_SLOTS, SA_SLOTS_PER_DIR};

    use super::*;

    #[test]
    fn sci_round_trips_between_display_wire_and_map_forms() {
        let sci = Sci::from_mac_port([0x02, 0, 0, 0, 0x10, 0x01], 1);
        assert_eq!(sci.0, 0x0200_0000_1001_0001);
        assert_eq!(sci.wire_bytes(), [0x02, 0, 0, 0, 0x10, 0x01, 0, 1]);
        assert_eq!(Sci::from_map(sci.to_map()), sci);
        assert_eq!(sci.to_string(), "0200000010010001");
    }

    #[test]
    fn slots_stay_inside_their_direction() {
        for sci in [0u64, 1, u64::MAX, 0x0200_0000_1001_0001] {
            for an in 0..4 {
                let rx = SaKey {
                    direction: Direction::Rx,
                    sci: Sci(sci),
                    an,
                };
                let tx = SaKey {
                    direction: Direction::Tx,
                    ..rx
                };
                assert!(probe_sequence(&rx).all(|s| s < SA_SLOTS_PER_DIR));
                assert!(probe_sequence(&tx).all(|s| (SA_SLOTS_PER_DIR..SA_SLOTS).contains(&s)));
                assert!(probe_sequence(&rx).all(|s| s % 4 == u32::from(an)));
            }
        }
    }

    #[test]
    fn colliding_scis_probe_onwards_and_fill_up() {
        let mut table: HashMap<u32, SaReg> = HashMap::new();
        // Find SCIs that share the first bucket.
        let base = Sci(0x0200_0000_0000_0001);
        let bucket = sa_bucket(base.to_map());
        let colliding: Vec<Sci> = (0..u64::MAX)
            .map(|i| Sci(0x0200_0000_0000_0001 + (i << 16)))
            .filter(|s| sa_bucket(s.to_map()) == bucket)
            .take(SA_PROBES as usize + 1)
            .collect();
        let mut slots = Vec::new();
        for sci in &colliding[..SA_PROBES as usize] {
            let key = SaKey {
                direction: Direction::Rx,
                sci: *sci,
                an: 2,
            };
            let choice =
                choose_slot(&key, |s| Ok(table.get(&s).copied().unwrap_or(SaReg::EMPTY))).unwrap();
            let SlotChoice::Free(slot) = choice else {
                panic!("expected a free slot for {key}, got {choice:?}")
            };
            table.insert(slot, new_entry(&key, false, 0, [0; 4]));
            slots.push(slot);
        }
        slots.dedup();
        assert_eq!(slots.len(), SA_PROBES as usize, "each SCI got its own slot");
        let extra = SaKey {
            direction: Direction::Rx,
            sci: colliding[SA_PROBES as usize],
            an: 2,
        };
        assert_eq!(
            choose_slot(&extra, |s| Ok(table
                .get(&s)
                .copied()
                .unwrap_or(SaReg::EMPTY)))
            .unwrap(),
            SlotChoice::Full
        );
        // A registered SA is found again even after an earlier slot was freed.
        let third = SaKey {
            direction: Direction::Rx,
            sci: colliding[2],
            an: 2,
        };
        table.remove(&slots[0]);
        assert_eq!(
            choose_slot(&third, |s| Ok(table
                .get(&s)
                .copied()
                .unwrap_or(SaReg::EMPTY)))
            .unwrap(),
            SlotChoice::Existing(slots[2])
        );
    }

    #[test]
    fn counters_sum_frames_and_take_the_highest_pn() {
        let per_cpu = [
            SaStats {
                frames: 2,
                bytes: 100,
                highest_pn: 7,
            },
            SaStats {
                frames: 3,
                bytes: 10,
                highest_pn: 5,
            },
        ];
        assert_eq!(
            SaCounters::sum(&per_cpu),
            SaCounters {
                frames: 5,
                bytes: 110,
                highest_pn: 7
            }
        );
    }
}
