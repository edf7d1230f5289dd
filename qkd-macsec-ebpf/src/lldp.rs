//! LLDP frames (EtherType 0x88CC): the strict LLDPDU walk, the rate limit of the TLV hand-off and
//! the hand-off itself (a ring-buffer record). Counting happens in `outcome::settle`.

use aya_ebpf::{
    bindings::xdp_md,
    helpers::generated::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
    EbpfContext as _,
};
use qkd_macsec_common::{
    mac_key, DataplaneConfig, Gcra, LldpEvent, CFG_LLDP_DROP, ETH_HLEN, EVENT_LLDP,
    LLDP_BUCKET_OTHERS, LLDP_BUCKET_PEER, LLDP_MAX_TLVS, LLDP_TLV_ORG,
};

use crate::maps::{QKD_EVENTS, QKD_LLDP_BUCKETS, QKD_LLDP_SOURCES};

/// What became of an LLDP frame. Small enough to come back in a register from the non-inlined
/// [`try_lldp`].
#[derive(Clone, Copy)]
pub enum LldpOutcome {
    /// The configured TLV went to userspace; `drop`: the config says to drop the frame now.
    Delivered { drop: bool },
    /// A well-formed LLDPDU without the configured TLV: the stack's business.
    Ignored,
    /// Not a well-formed LLDPDU (or its TLV could not be copied): the stack's business.
    Malformed,
    /// The TLV's source (the frame's source MAC) is over its rate limit: dropped before it
    /// costs the agent anything.
    RateLimited,
    /// The ring buffer had no room for the record.
    RingFull,
}

/// Where the walk found the configured TLV's information string.
enum Walk {
    Malformed,
    NoTlv,
    /// Offset and length (4..=511) of the information string (OUI, subtype, payload).
    Found {
        off: u32,
        len: u32,
    },
}

/// Walks the LLDPDU, rate-limits and hands the configured TLV to userspace. `data..data + 14`
/// was checked by the caller. Not inlined: the walk makes one helper call per TLV in a bounded
/// loop, and as a function of its own it stays out of the MACsec path's code and registers.
#[inline(never)]
pub fn try_lldp(
    ctx: &XdpContext,
    cfg: *const DataplaneConfig,
    data: usize,
    end: usize,
) -> LldpOutcome {
    // SAFETY: valid map value pointer.
    let (oui, subtype, drop) = unsafe {
        (
            (*cfg).lldp_oui,
            (*cfg).lldp_subtype,
            (*cfg).flags & CFG_LLDP_DROP != 0,
        )
    };
    let want = u32::from_be_bytes([oui[0], oui[1], oui[2], subtype]);
    let raw = ctx.as_ptr() as *mut xdp_md;
    let (off, len) = match walk(raw, (end - data) as u32, want) {
        Walk::Malformed => return LldpOutcome::Malformed,
        Walk::NoTlv => return LldpOutcome::Ignored,
        Walk::Found { off, len } => (off, len),
    };
    // SAFETY: data..data+14 was checked by the caller.
    let src = unsafe { core::ptr::read_unaligned((data + 6) as *const [u8; 6]) };
    if !admit(cfg, mac_key(src)) {
        return LldpOutcome::RateLimited;
    }
    let Some(mut e) = QKD_EVENTS.reserve::<LldpEvent>(0) else {
        return LldpOutcome::RingFull;
    };
    let ev = e.as_mut_ptr();
    // Bound the copy length for the verifier: 4..=511 fits the 512-byte record field.
    let n = len & 0x1ff;
    // SAFETY: ev points at a reserved LldpEvent.
    let rc = unsafe {
        (*ev).kind = EVENT_LLDP;
        (*ev).ifindex = (*raw).ingress_ifindex;
        (*ev).src_mac = src;
        (*ev).info_len = n as u16;
        bpf_xdp_load_bytes(raw, off, (*ev).info.as_mut_ptr().cast(), n)
    };
    if rc != 0 {
        e.discard(0);
        return LldpOutcome::Malformed;
    }
    e.submit(0);
    LldpOutcome::Delivered { drop }
}

/// The strict walk: Chassis ID, Port ID, TTL first and non-empty (TTL exactly 2 bytes), every
/// TLV inside the frame, an End TLV of length 0, at most [`LLDP_MAX_TLVS`] TLVs; finds the
/// first organizationally specific TLV whose OUI and subtype are `want`.
#[inline(always)]
fn walk(raw: *mut xdp_md, frame_len: u32, want: u32) -> Walk {
    let mut off: u32 = ETH_HLEN as u32;
    let mut found_off: u32 = 0;
    let mut found_len: u32 = 0;
    let mut i: u32 = 0;
    while i < LLDP_MAX_TLVS {
        let mut hdr = [0u8; 2];
        // SAFETY: helper call with a 2-byte stack buffer.
        if unsafe { bpf_xdp_load_bytes(raw, off, hdr.as_mut_ptr().cast(), 2) } != 0 {
            return Walk::Malformed; // truncated TLV header or no End TLV before the frame ends
        }
        let h = u16::from_be_bytes(hdr) as u32;
        let ty = h >> 9;
        let len = h & 0x1ff;
        if ty == 0 {
            return if len != 0 || i < 3 {
                Walk::Malformed
            } else if found_len == 0 {
                Walk::NoTlv
            } else {
                Walk::Found {
                    off: found_off,
                    len: found_len,
                }
            };
        }
        let mandatory_ok = match i {
            0 => ty == 1 && len >= 2,
            1 => ty == 2 && len >= 2,
            2 => ty == 3 && len == 2,
            _ => ty > 3,
        };
        if !mandatory_ok || off + 2 + len > frame_len {
            return Walk::Malformed;
        }
        if ty == LLDP_TLV_ORG as u32 && len >= 4 && found_len == 0 {
            let mut id = [0u8; 4];
            // SAFETY: helper call with a 4-byte stack buffer.
            if unsafe { bpf_xdp_load_bytes(raw, off + 2, id.as_mut_ptr().cast(), 4) } == 0
                && u32::from_be_bytes(id) == want
            {
                found_off = off + 2;
                found_len = len;
            }
        }
        off += 2 + len;
        i += 1;
    }
    Walk::Malformed // more than LLDP_MAX_TLVS TLVs before an End TLV
}

/// Rate limit of the TLV hand-off: the known peer's source MAC has its own bucket; every other
/// source passes its own bucket (LRU map, so rotating MACs cannot grow memory) and then the
/// bucket all of them share on this interface, which bounds a flood with rotating spoofed MACs
/// without touching the peer's bucket.
///
/// The buckets are read and written without atomics: two CPUs handling frames at the same
/// moment may both read the same state and both conform, granting a frame or two beyond the
/// limit. That is benign (the bound stays proportional to the CPUs, not to the flood), and an
/// exact update would need a compare-and-swap loop the verifier makes awkward for no gain.
#[inline(always)]
fn admit(cfg: *const DataplaneConfig, src: u64) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: valid map value pointer; a torn read while the agent rewrites it is harmless.
    let (peer, limits) = unsafe { ((*cfg).peer_mac, (*cfg).lldp_limits) };
    if peer != 0 && src == peer {
        return shared_bucket(LLDP_BUCKET_PEER, &limits.peer, now);
    }
    match QKD_LLDP_SOURCES.get_ptr_mut(&src) {
        Some(tat) => {
            // SAFETY: valid map value pointer (see above for the race).
            let (ok, next) = limits.per_source.check(unsafe { *tat }, now);
            if !ok {
                return false;
            }
            // SAFETY: as above.
            unsafe { *tat = next };
        }
        None => {
            // A new source conforms (its bucket is full). Should the insert fail, the shared
            // bucket below still bounds it.
            let (_, next) = limits.per_source.check(0, now);
            let _ = QKD_LLDP_SOURCES.insert(&src, &next, 0);
        }
    }
    shared_bucket(LLDP_BUCKET_OTHERS, &limits.others, now)
}

#[inline(always)]
fn shared_bucket(index: u32, g: &Gcra, now: u64) -> bool {
    let Some(tat) = QKD_LLDP_BUCKETS.get_ptr_mut(index) else {
        return false;
    };
    // SAFETY: valid map value pointer; see admit for the race.
    unsafe {
        let (ok, next) = g.check(*tat, now);
        if ok {
            *tat = next;
        }
        ok
    }
}
