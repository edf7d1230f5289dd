//! Types and constants shared by the eBPF programs (`qkd-macsec-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the verifier rejects map keys with
//! uninitialised padding bytes, and both sides must agree on the layout byte for byte. The layout
//! is documented in docs/dataplane.md; the compile-time size asserts at the bottom pin it.
#![no_std]

pub mod sectag;

/// Ethernet header without VLAN tags: two MAC addresses and the EtherType.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of LLDP (IEEE 802.1AB).
pub const ETH_P_LLDP: u16 = 0x88CC;
/// EtherType of MACsec (IEEE 802.1AE).
pub const ETH_P_MACSEC: u16 = 0x88E5;
/// EtherType of EAPOL / MKA (IEEE 802.1X).
pub const ETH_P_PAE: u16 = 0x888E;

// ---------------------------------------------------------------------------------------------
// The test object (`qkd-macsec-test`, qkd_macsec_agent::EBPF_TEST_OBJECT): programs that only
// tests and benchmarks load, kept out of the object the agent loads.

/// XDP program of the test object: counts frames by [`ProbeClass`] and passes everything (the
/// harness's proof that an XDP program loads and counts, tests/tests/host_xdp.rs).
pub const PROG_PROBE: &str = "probe";
/// A trivial XDP_PASS program of the test object, the eBPF benchmark's XDP baseline.
pub const PROG_XDP_PASS: &str = "qkd_xdp_pass";
/// A trivial TC program of the test object, the TC benchmark's baseline.
pub const PROG_TC_PASS: &str = "qkd_tc_pass";
/// `PerCpuArray<u64>` of the test object, [`PROBE_CLASSES`] entries indexed by [`ProbeClass`].
pub const MAP_PROBE_COUNTERS: &str = "PROBE_COUNTERS";

/// Index into the probe counter array: frames by class.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeClass {
    Other = 0,
    Lldp = 1,
    Macsec = 2,
    Ipv4 = 3,
}

/// Number of entries in the probe counter array.
pub const PROBE_CLASSES: u32 = 4;

// ---------------------------------------------------------------------------------------------
// Program and map names (the ELF symbol names; the loader looks them up by these).

/// XDP program on the lower device: LLDP hand-off, RX MACsec counters, RX stall.
pub const PROG_XDP: &str = "qkd_xdp";
/// TC egress program on the lower device: TX MACsec counters, TX stall.
pub const PROG_TC: &str = "qkd_tc";

/// `Array<DataplaneConfig>`, one entry.
pub const MAP_CONFIG: &str = "QKD_CONFIG";
/// `Array<SaReg>`, [`SA_SLOTS`] entries: the SAs the agent registered.
pub const MAP_SA_REG: &str = "QKD_SA_REG";
/// `PerCpuArray<SaStats>`, [`SA_SLOTS`] entries, same index as [`MAP_SA_REG`].
pub const MAP_SA_STATS: &str = "QKD_SA_STATS";
/// `PerCpuArray<Counter>`, [`IF_COUNTERS`] entries indexed by [`IfCounter`].
pub const MAP_IF_STATS: &str = "QKD_IF_STATS";
/// `RingBuf` of [`LldpEvent`] and [`PnEvent`] records (told apart by the first u32).
pub const MAP_EVENTS: &str = "QKD_EVENTS";
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// `LruHashMap<u64, u64>`: per-source-MAC LLDP rate-limit state (key: the source MAC as in
/// [`DataplaneConfig::peer_mac`], value: the bucket's theoretical arrival time, see
/// [`LldpRateLimits`]). Not pinned: rate state need not survive a restart.
pub const MAP_LLDP_SOURCES: &str = "QKD_LLDP_SOURCES";
/// Entries of [`MAP_LLDP_SOURCES`]: the LRU evicts the least recently seen source beyond this,
/// so a flood with rotating source MACs cannot grow kernel memory.
pub const LLDP_SOURCES_MAX: u32 = 1024;
/// `Array<u64>`, [`LLDP_BUCKETS`] entries: the shared buckets' theoretical arrival times
/// ([`LLDP_BUCKET_PEER`], [`LLDP_BUCKET_OTHERS`]). Not pinned.
pub const MAP_LLDP_BUCKETS: &str = "QKD_LLDP_BUCKETS";
/// Index in [`MAP_LLDP_BUCKETS`]: the bucket of the known peer's source MAC.
pub const LLDP_BUCKET_PEER: u32 = 0;
/// Index in [`MAP_LLDP_BUCKETS`]: the bucket all other sources share (per interface).
pub const LLDP_BUCKET_OTHERS: u32 = 1;
/// Entries of [`MAP_LLDP_BUCKETS`].
pub const LLDP_BUCKETS: u32 = 2;

/// Every map the loader pins per interface (the probe map is not pinned).
pub const PINNED_MAPS: [&str; 5] = [
    MAP_CONFIG,
    MAP_SA_REG,
    MAP_SA_STATS,
    MAP_IF_STATS,
    MAP_EVENTS,
];

// ---------------------------------------------------------------------------------------------
// LLDP

/// OUI of the project's organizationally specific LLDP TLV (locally administered, "ZQK").
pub const LLDP_OUI: [u8; 3] = [0x5A, 0x51, 0x4B];
/// Subtype of the project's TLV: key-exchange messages.
pub const LLDP_SUBTYPE: u8 = 0x01;
/// TLV type of an organizationally specific TLV (IEEE 802.1AB 8.6).
pub const LLDP_TLV_ORG: u8 = 127;
/// Largest TLV information string (9-bit length field).
pub const LLDP_INFO_MAX: usize = 511;
/// Nearest-bridge group address LLDP frames are sent to.
pub const LLDP_DST_MAC: [u8; 6] = [0x01, 0x80, 0xC2, 0x00, 0x00, 0x0E];
/// How many TLVs the XDP program walks before it calls an LLDPDU malformed.
pub const LLDP_MAX_TLVS: u32 = 32;

// ---------------------------------------------------------------------------------------------
// MACsec SecTAG (IEEE 802.1AE-2018 9.3)

/// TCI bit: version (must be 0).
pub const TCI_V: u8 = 0x80;
/// TCI bit: End Station.
pub const TCI_ES: u8 = 0x40;
/// TCI bit: SCI present.
pub const TCI_SC: u8 = 0x20;
/// TCI bit: Single Copy Broadcast.
pub const TCI_SCB: u8 = 0x10;
/// TCI bit: Encryption.
pub const TCI_E: u8 = 0x08;
/// TCI bit: Changed text.
pub const TCI_C: u8 = 0x04;
/// AN mask in the TCI/AN octet.
pub const TCI_AN_MASK: u8 = 0x03;
/// Reserved bits of the short-length octet (must be 0).
pub const SL_RESERVED: u8 = 0xC0;
/// ICV length the programs assume (every GCM-AES suite's default).
pub const MACSEC_ICV_LEN: usize = 16;
/// Secure data shorter than this is signalled through the short length.
pub const MACSEC_MIN_NON_SHORT_LEN: usize = 48;
/// Port identifier of the SCI implied by the ES bit.
pub const MACSEC_PORT_ES: u16 = 0x0001;

// ---------------------------------------------------------------------------------------------
// Configuration

/// [`DataplaneConfig::flags`]: drop delivered project LLDP frames instead of passing them on.
pub const CFG_LLDP_DROP: u32 = 1 << 0;
/// [`DataplaneConfig::flags`]: stall: drop every frame except LLDP and EAPOL, both directions.
pub const CFG_STALL: u32 = 1 << 1;

/// One token bucket in GCRA form (the "virtual scheduling" formulation of a token bucket,
/// ITU-T I.371): a frame at time `now` conforms when the bucket's theoretical arrival time
/// `tat` satisfies `max(tat, now) - now <= tolerance_ns`; it then moves `tat` to
/// `max(tat, now) + interval_ns`. That is exactly a bucket of `burst` tokens refilled at
/// `rate` per second, with `interval_ns = 1e9 / rate` and `tolerance_ns = (burst - 1) *
/// interval_ns`, kept in one u64 per bucket and computed without a division in the program.
/// `interval_ns == 0` means unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds per token (1e9 / rate); 0 = no limit.
    pub interval_ns: u64,
    /// Nanoseconds of credit a bucket may hold beyond one token ((burst - 1) * interval).
    pub tolerance_ns: u64,
}

impl Gcra {
    /// No limit.
    pub const UNLIMITED: Self = Self {
        interval_ns: 0,
        tolerance_ns: 0,
    };

    /// `rate` frames per second with a burst of `burst` frames (both at least 1; 0 is taken as
    /// 1). Rates above 1e9/s are unlimited for practical purposes and clamp to 1 ns.
    pub const fn new(rate_per_sec: u32, burst: u32) -> Self {
        let rate = if rate_per_sec == 0 { 1 } else { rate_per_sec } as u64;
        let burst = if burst == 0 { 1 } else { burst } as u64;
        let interval = 1_000_000_000 / rate;
        let interval = if interval == 0 { 1 } else { interval };
        Self {
            interval_ns: interval,
            tolerance_ns: (burst - 1) * interval,
        }
    }

    /// One frame at `now` (ns) against the bucket state `tat`: whether it conforms, and the
    /// new state (unchanged when it does not). The program and the unit tests share this.
    #[inline(always)]
    pub const fn check(&self, tat: u64, now: u64) -> (bool, u64) {
        if self.interval_ns == 0 {
            return (true, tat);
        }
        let t = if tat > now { tat } else { now };
        if t - now > self.tolerance_ns {
            (false, tat)
        } else {
            (true, t + self.interval_ns)
        }
    }
}

/// Rate limits of the project LLDP TLV hand-off to userspace (see [`LldpRateLimits::DEFAULT`]
/// for the numbers and docs/dataplane.md for the reasoning).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LldpRateLimits {
    /// Every source MAC other than the peer's, each on its own (LRU map).
    pub per_source: Gcra,
    /// All sources other than the peer together, per interface.
    pub others: Gcra,
    /// The known peer's source MAC ([`DataplaneConfig::peer_mac`]).
    pub peer: Gcra,
}

impl LldpRateLimits {
    /// Defaults: per source 10/s (burst 20), all non-peer sources 20/s (burst 40), the peer
    /// 100/s (burst 200). A link's agent sends a HELLO every 1-5 s plus announces, installs and
    /// ACKs around a rollover: with `sak.buffer` 10 and a 250 ms first retransmission a master
    /// bootstrapping a link sends about 40 TLVs/s at its peak, so the located peer's bucket has
    /// 2.5x headroom. Other sources matter only until the peer is located (and when its MAC
    /// changes): 10/s lets a not-yet-located peer's exchange through (it retransmits what is
    /// dropped), and 20/s for all of them keeps what a flood can make the agent do small (the
    /// end-to-end flood test showed 50/s keeping a debug build under emulation busy).
    pub const DEFAULT: Self = Self {
        per_source: Gcra::new(10, 20),
        others: Gcra::new(20, 40),
        peer: Gcra::new(100, 200),
    };

    /// No limits at all (tests that need more frames than any sane limit).
    pub const UNLIMITED: Self = Self {
        per_source: Gcra::UNLIMITED,
        others: Gcra::UNLIMITED,
        peer: Gcra::UNLIMITED,
    };
}

/// Per-interface configuration, entry 0 of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// OUI of the TLV to deliver (default [`LLDP_OUI`]).
    pub lldp_oui: [u8; 3],
    /// Subtype of the TLV to deliver (default [`LLDP_SUBTYPE`]).
    pub lldp_subtype: u8,
    /// `CFG_*` bits.
    pub flags: u32,
    /// SCI (wire bytes read as a native u64, see [`SaReg::sci`]) for SecTAGs with SC=0 and ES=0,
    /// i.e. the peer's SCI on a point-to-point link. 0: use source MAC + port 1 as for ES=1.
    pub implicit_sci: u64,
    /// CLOCK_MONOTONIC time (ns, the clock of `bpf_ktime_get_ns`) at which the active key's
    /// lifetime ends; from then on the programs behave as if [`CFG_STALL`] were set. 0: none.
    /// The agent stalls the link itself at that moment; this copy is for when it cannot (killed,
    /// hung, restarting): the programs and this map stay pinned, so the key still expires.
    pub key_deadline_ns: u64,
    /// The peer's MAC as the program loads a source MAC: its six wire bytes followed by two
    /// zero bytes, read as a native u64 ([`mac_key`]). 0: peer not located yet (every source
    /// goes through the per-source and shared buckets).
    pub peer_mac: u64,
    /// Rate limits of the TLV hand-off.
    pub lldp_limits: LldpRateLimits,
}

impl DataplaneConfig {
    /// The configuration a freshly created map gets from the loader.
    pub const DEFAULT: Self = Self {
        lldp_oui: LLDP_OUI,
        lldp_subtype: LLDP_SUBTYPE,
        flags: 0,
        implicit_sci: 0,
        key_deadline_ns: 0,
        peer_mac: 0,
        lldp_limits: LldpRateLimits::DEFAULT,
    };
}

/// A MAC address in the form the program compares and keys [`MAP_LLDP_SOURCES`] by: the six
/// wire bytes and two zero bytes, as a native u64.
#[inline(always)]
pub const fn mac_key(mac: [u8; 6]) -> u64 {
    u64::from_ne_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

// ---------------------------------------------------------------------------------------------
// SA registration table
//
// A small open-addressed table in a plain ARRAY map (whose lookups the verifier inlines): the slot
// of (direction, SCI, AN) is `dir * SA_SLOTS_PER_DIR + bucket * 4 + AN` where `bucket` is
// `sa_bucket(sci)` plus a probe offset 0..SA_PROBES. The agent picks a free slot when it registers
// an SA; the program probes the same sequence and stops at the first entry whose SCI matches, so a
// registered SA costs one array lookup in the common case.

/// Buckets per direction (each bucket holds the four ANs of one SCI).
pub const SA_BUCKETS: u32 = 64;
/// Probe length of the open-addressed table.
pub const SA_PROBES: u32 = 4;
/// Slots per direction.
pub const SA_SLOTS_PER_DIR: u32 = SA_BUCKETS * 4;
/// Entries of [`MAP_SA_REG`] and [`MAP_SA_STATS`].
pub const SA_SLOTS: u32 = SA_SLOTS_PER_DIR * 2;
/// Number of PN thresholds per SA.
pub const PN_THRESHOLDS: usize = 4;

/// Direction of an SA on the lower device.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received (XDP ingress).
    Rx = 0,
    /// Sent (TC egress).
    Tx = 1,
}

/// [`SaReg::flags`]: the entry is in use.
pub const SA_VALID: u32 = 1 << 0;
/// [`SaReg::flags`]: extended packet numbering (64-bit PN, the SecTAG carries the lower 32).
pub const SA_XPN: u32 = 1 << 1;

/// Bucket of an SCI (a multiplicative hash; `sci` as stored in [`SaReg::sci`]).
#[inline(always)]
pub const fn sa_bucket(sci: u64) -> u32 {
    (sci.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as u32
}

/// Slot of (direction, bucket after probing, AN).
#[inline(always)]
pub const fn sa_slot(direction: u32, bucket: u32, an: u32) -> u32 {
    direction * SA_SLOTS_PER_DIR + (bucket % SA_BUCKETS) * 4 + (an & 3)
}

/// One registered SA, an entry of [`MAP_SA_REG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaReg {
    /// The SCI's eight wire bytes (MAC then port, network order) loaded as a native-endian u64,
    /// which is what the program compares without byte swapping.
    pub sci: u64,
    /// Upper 32 bits of the PN for XPN SAs (0 otherwise); the program infers a wrap of the lower
    /// half relative to the highest PN it saw and the agent refreshes this from the counters.
    pub pn_hi: u32,
    /// `SA_*` bits.
    pub flags: u32,
    /// Full (64-bit) PN thresholds; 0 = unused. One event each when the PN first reaches it.
    pub thresholds: [u64; PN_THRESHOLDS],
    /// Bit i set: threshold i's event was sent. Set atomically by the program, cleared by the
    /// agent when it (re)writes the thresholds. 64 bits because the BPF target's atomics are.
    pub fired: u64,
    /// The smallest non-zero threshold (u64::MAX when none): the program's one-compare fast path.
    /// Written by the agent together with `thresholds` (see [`SaReg::min_threshold`]).
    pub next_check: u64,
}

impl SaReg {
    /// An unused slot.
    pub const EMPTY: Self = Self {
        sci: 0,
        pn_hi: 0,
        flags: 0,
        thresholds: [0; PN_THRESHOLDS],
        fired: 0,
        next_check: u64::MAX,
    };

    /// The `next_check` value for `thresholds`.
    pub const fn min_threshold(thresholds: &[u64; PN_THRESHOLDS]) -> u64 {
        let mut min = u64::MAX;
        let mut i = 0;
        while i < PN_THRESHOLDS {
            if thresholds[i] != 0 && thresholds[i] < min {
                min = thresholds[i];
            }
            i += 1;
        }
        min
    }
}

/// Per-CPU traffic of one SA, an entry of [`MAP_SA_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaStats {
    /// Frames counted.
    pub frames: u64,
    /// Bytes counted (whole frame from the destination MAC, without FCS).
    pub bytes: u64,
    /// Highest full PN seen on this CPU.
    pub highest_pn: u64,
}

/// A frames/bytes pair, an entry of [`MAP_IF_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Frames counted.
    pub frames: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// Index into [`MAP_IF_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IfCounter {
    /// Well-formed received MACsec frames of an SA nobody registered.
    RxUnknownSa = 0,
    /// Received 0x88E5 frames the kernel would reject as invalid SecTAGs.
    RxMalformed = 1,
    /// Well-formed sent MACsec frames of an unregistered SA.
    TxUnknownSa = 2,
    /// Sent 0x88E5 frames with an invalid SecTAG.
    TxMalformed = 3,
    /// Received frames dropped by the stall switch.
    RxStallDrop = 4,
    /// Sent frames dropped by the stall switch.
    TxStallDrop = 5,
    /// LLDP frames whose project TLV went to userspace.
    LldpDelivered = 6,
    /// Well-formed LLDP frames without the configured TLV (left to the stack).
    LldpIgnored = 7,
    /// LLDP frames that are not a well-formed LLDPDU (left to the stack, nothing delivered).
    LldpMalformed = 8,
    /// Events (LLDP or PN) the ring buffer had no room for.
    EventsLost = 9,
    /// Project LLDP TLVs over their source's rate limit (dropped, nothing delivered).
    LldpRateLimited = 10,
}

/// Entries of [`MAP_IF_STATS`].
pub const IF_COUNTERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Events (ring buffer records)

/// [`LldpEvent::kind`].
pub const EVENT_LLDP: u32 = 1;
/// [`PnEvent::kind`].
pub const EVENT_PN: u32 = 2;

/// A project LLDP TLV received on the interface.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LldpEvent {
    /// [`EVENT_LLDP`].
    pub kind: u32,
    /// Interface the frame arrived on.
    pub ifindex: u32,
    /// Source MAC of the frame.
    pub src_mac: [u8; 6],
    /// Bytes of `info` in use: the TLV's information string (OUI, subtype, payload), 4..=511.
    pub info_len: u16,
    /// The information string; bytes past `info_len` are unspecified.
    pub info: [u8; LLDP_INFO_MAX + 1],
}

/// An SA's PN reached one of its thresholds (sent once per threshold and registration).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PnEvent {
    /// [`EVENT_PN`].
    pub kind: u32,
    /// Interface of the SA.
    pub ifindex: u32,
    /// SCI as in [`SaReg::sci`].
    pub sci: u64,
    /// The full PN of the frame that crossed the threshold.
    pub pn: u64,
    /// The threshold value crossed.
    pub threshold: u64,
    /// Slot in [`MAP_SA_REG`].
    pub slot: u32,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// Association number.
    pub an: u8,
    /// Index of the threshold in [`SaReg::thresholds`].
    pub threshold_index: u8,
    /// Explicit padding (zero).
    pub _pad: u8,
}

// Layout pins: a change here is a change of the documented format (docs/dataplane.md).
const _: () = assert!(core::mem::size_of::<Gcra>() == 16);
const _: () = assert!(core::mem::size_of::<LldpRateLimits>() == 48);
const _: () = assert!(core::mem::size_of::<DataplaneConfig>() == 80);
const _: () = assert!(core::mem::size_of::<SaReg>() == 64);
const _: () = assert!(core::mem::size_of::<SaStats>() == 24);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<LldpEvent>() == 528);
const _: () = assert!(core::mem::size_of::<PnEvent>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte arrays, with every
    // padding byte an explicit field, so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::SaReg {}
    unsafe impl aya::Pod for super::SaStats {}
    unsafe impl aya::Pod for super::Counter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of a flood at `every_ns` for `dur_ns`, starting at `start`: how many conform.
    fn run(g: &Gcra, tat: &mut u64, start: u64, every_ns: u64, dur_ns: u64) -> u64 {
        let mut ok = 0;
        let mut t = start;
        while t < start + dur_ns {
            let (pass, next) = g.check(*tat, t);
            *tat = next;
            ok += u64::from(pass);
            t += every_ns;
        }
        ok
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let g = Gcra::new(20, 40);
        let mut tat = 0;
        // 10 s of a 1 MHz flood starting at 5 s after boot: burst + rate * time.
        let ok = run(&g, &mut tat, 5_000_000_000, 1_000, 10_000_000_000);
        assert!((40 + 199..=40 + 200).contains(&ok), "{ok}");
        // Idle for a second refills 20 tokens (plus the fraction left when the flood ended).
        let ok = run(&g, &mut tat, 16_000_000_000, 1_000, 1_000_000);
        assert!((20..=21).contains(&ok), "{ok}");
        // Idle for an hour refills the burst, no more.
        let ok = run(&g, &mut tat, 3_600_000_000_000, 1_000, 1_000_000);
        assert_eq!(ok, 40);
    }

    #[test]
    fn gcra_passes_traffic_below_the_rate_untouched() {
        let g = Gcra::new(50, 1);
        let mut tat = 0;
        // 40/s for a minute: every frame conforms even with a burst of 1.
        assert_eq!(run(&g, &mut tat, 1, 25_000_000, 60_000_000_000), 2400);
    }

    #[test]
    fn gcra_unlimited_and_degenerate_parameters() {
        let mut tat = 0;
        assert_eq!(run(&Gcra::UNLIMITED, &mut tat, 0, 1, 100_000), 100_000);
        assert_eq!(Gcra::new(0, 0), Gcra::new(1, 1));
        assert_eq!(Gcra::new(u32::MAX, 1).interval_ns, 1);
        assert_eq!(Gcra::new(4, 3).tolerance_ns, 500_000_000);
    }

    #[test]
    fn mac_key_matches_the_programs_two_loads() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let lo = u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]) as u64;
        let hi = u16::from_ne_bytes([mac[4], mac[5]]) as u64;
        if cfg!(target_endian = "little") {
            assert_eq!(mac_key(mac), lo | (hi << 32));
        }
        assert_ne!(mac_key(mac), 0);
    }
}
