//! What a program decided about a frame ([`Outcome`]), and [`settle`]: the one place where an
//! outcome becomes counters, PN events, log records and a verdict.
//!
//! Log records (aya-log, routed into the agent's tracing at debug level) are written for the rare
//! outcomes an operator debugging a link wants to see, never for a registered SA's frame or a
//! delivered TLV. A flood of such frames must not become a flood of records, so each kind is
//! sampled by its counter: the first frame of a kind on a CPU and every [`LOG_EVERY`]th after it. When the loader
//! disabled logging (`AYA_LOG_LEVEL` 0, the default unless the agent logs the kernel target at
//! debug level) the verifier removes every log branch: `AYA_LOG_LEVEL` lives in the frozen
//! `.rodata` map, so the level test is a known constant.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use qkd_macsec_common::{sectag::SecTagError, Direction, IfCounter};

use crate::counters::{count, count_sa};
use crate::frame::Frame;
use crate::lldp::LldpOutcome;
use crate::macsec::SaHit;

/// `aya_log_ebpf::debug!` with the direction as the record's target (`rx` or `tx`), which the
/// agent puts in the `dir` field of its tracing event. `dir` is a constant after inlining, so
/// only one of the two arms is compiled into each program.
macro_rules! klog {
    ($ctx:expr, $dir:expr, $($fmt:tt)+) => {
        match $dir {
            Direction::Rx => debug!($ctx, target: "rx", $($fmt)+),
            Direction::Tx => debug!($ctx, target: "tx", $($fmt)+),
        }
    };
}

/// A sampled kind of frame is logged when its per-CPU count is 1 modulo this.
pub const LOG_EVERY: u64 = 256;

/// What a frame is, as far as these programs are concerned.
pub enum Outcome {
    /// Nothing to count or enforce: passes untouched (not ours, EAPOL, LLDP on egress, ...).
    Pass,
    /// The stall switch or an expired key: dropped.
    StallDrop,
    /// A well-formed MACsec frame of a registered SA.
    Sa(SaHit),
    /// A well-formed MACsec frame of an SA nobody registered.
    UnknownSa { sci: u64, an: u8 },
    /// An 0x88E5 frame the kernel would reject.
    Malformed(Malformed),
    /// An LLDP frame (ingress only).
    Lldp(LldpOutcome),
}

/// Why a MACsec frame is malformed.
pub enum Malformed {
    /// A structural rule of the SecTAG (the same enum the userspace decoder returns).
    SecTag(SecTagError),
    /// PN 0 on an SA not known to be XPN.
    PnZero,
}

/// What the program does with the frame; each entry maps it to its hook's return code.
pub enum Verdict {
    Pass,
    Drop,
}

/// Counts the outcome, writes its event or log record, and says what to do with the frame.
#[inline(always)]
pub fn settle<C: EbpfContext>(ctx: &C, f: &Frame, outcome: Outcome) -> Verdict {
    match outcome {
        Outcome::Pass => Verdict::Pass,
        Outcome::Sa(hit) => {
            count_sa(ctx, f, &hit);
            Verdict::Pass
        }
        Outcome::StallDrop => {
            let n = count(f.stall_drop_counter(), f.len);
            if sampled(n) {
                klog!(ctx, f.dir, "stall: dropping data frames (stall switch set or key lifetime over); {} dropped on this CPU", n);
            }
            Verdict::Drop
        }
        Outcome::UnknownSa { sci, an } => {
            let n = count(f.unknown_sa_counter(), f.len);
            if sampled(n) {
                // The SCI's wire bytes (MAC, port) in hex, as `ip macsec` shows it.
                let sci = sci.to_ne_bytes();
                klog!(ctx, f.dir, "MACsec frame of an unregistered SA: SCI {:x} AN {}; {} such frames on this CPU", &sci[..], an, n);
            }
            Verdict::Pass
        }
        Outcome::Malformed(m) => {
            let n = count(f.malformed_counter(), f.len);
            if sampled(n) {
                log_malformed(ctx, f, &m, n);
            }
            Verdict::Pass
        }
        Outcome::Lldp(l) => match l {
            LldpOutcome::Delivered { drop } => {
                count(IfCounter::LldpDelivered, f.len);
                if drop {
                    Verdict::Drop
                } else {
                    Verdict::Pass
                }
            }
            LldpOutcome::Ignored => {
                count(IfCounter::LldpIgnored, f.len);
                Verdict::Pass
            }
            LldpOutcome::Malformed => {
                count(IfCounter::LldpMalformed, f.len);
                Verdict::Pass
            }
            LldpOutcome::RateLimited => {
                // Dropped, not passed: a frame carrying our TLV is only for the agent, and
                // passing the excess of a flood on would hand the same flood to the stack and
                // to every packet socket (an LLDP daemon, a capture) instead; an LLDP
                // neighbour's genuine frames come at most every few seconds and stay far below
                // any limit.
                let n = count(IfCounter::LldpRateLimited, f.len);
                if sampled(n) {
                    // SAFETY: the dispatch checked the 14-byte Ethernet header.
                    let mac = unsafe { core::ptr::read_unaligned((f.data + 6) as *const [u8; 6]) };
                    klog!(ctx, f.dir, "LLDP: project TLV from {:mac} over its rate limit, dropped; {} rate-limited on this CPU", mac, n);
                }
                Verdict::Drop
            }
            LldpOutcome::RingFull => {
                events_lost(ctx, f);
                Verdict::Pass
            }
        },
    }
}

/// A record (LLDP TLV or PN event) found the ring buffer full.
#[inline(always)]
pub fn events_lost<C: EbpfContext>(ctx: &C, f: &Frame) {
    let n = count(IfCounter::EventsLost, 0);
    if sampled(n) {
        klog!(
            ctx,
            f.dir,
            "event ring buffer full: record lost (the agent is not reading); {} lost on this CPU",
            n
        );
    }
}

#[inline(always)]
fn sampled(n: u64) -> bool {
    n % LOG_EVERY == 1
}

/// One log call per reason, each with a literal message: aya-log copies strings with a constant
/// length only.
#[inline(always)]
fn log_malformed<C: EbpfContext>(ctx: &C, f: &Frame, m: &Malformed, n: u64) {
    match *m {
        Malformed::PnZero => {
            klog!(ctx, f.dir, "malformed MACsec frame: PN 0 on an SA not known to be XPN; {} malformed on this CPU", n);
        }
        Malformed::SecTag(SecTagError::TooShort { len }) => {
            klog!(ctx, f.dir, "malformed MACsec frame: {} bytes, too short for a SecTAG; {} malformed on this CPU", len, n);
        }
        Malformed::SecTag(SecTagError::Version) => {
            klog!(
                ctx,
                f.dir,
                "malformed MACsec frame: SecTAG version bit set; {} malformed on this CPU",
                n
            );
        }
        Malformed::SecTag(SecTagError::ScWithEsOrScb { tci }) => {
            klog!(
                ctx,
                f.dir,
                "malformed MACsec frame: TCI {:x} has SC with ES or SCB; {} malformed on this CPU",
                tci,
                n
            );
        }
        Malformed::SecTag(SecTagError::ReservedShortLength { sl }) => {
            klog!(ctx, f.dir, "malformed MACsec frame: short length {:x} has reserved bits set; {} malformed on this CPU", sl, n);
        }
        Malformed::SecTag(SecTagError::Length {
            after_macs,
            short_len,
            overhead,
        }) => {
            klog!(ctx, f.dir, "malformed MACsec frame: {} bytes after the MACs, short length {}, {} bytes of EtherType, SecTAG and ICV; {} malformed on this CPU", after_macs, short_len, overhead, n);
        }
        // The dispatch sends only 0x88E5 here.
        Malformed::SecTag(SecTagError::NotMacsec { .. }) => {}
    }
}
