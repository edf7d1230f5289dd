//! The frame a program looks at: packet pointers, length, direction, interface.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use qkd_macsec_common::{Direction, IfCounter, ETH_HLEN};

/// What the MACsec parse needs in the linear part of a TC frame: Ethernet header plus the SecTAG
/// with an explicit SCI.
const TC_LINEAR_WANT: usize = ETH_HLEN + 16;

/// One frame as both programs see it.
pub struct Frame {
    /// Start of the packet data (bounds-checked against `end` before every read).
    pub data: usize,
    /// End of the directly readable part (XDP: the frame; TC: the linear part of the skb).
    pub end: usize,
    /// The whole frame in bytes, without FCS: what byte counters add up. For TC `skb->len`,
    /// which may exceed `end - data`.
    pub len: u64,
    /// XDP ingress is [`Direction::Rx`], TC egress [`Direction::Tx`]; a constant after inlining.
    pub dir: Direction,
    /// The program's context (`xdp_md` for Rx, `__sk_buff` for Tx), for [`Frame::ifindex`].
    ctx: *mut c_void,
}

impl Frame {
    #[inline(always)]
    pub fn xdp(ctx: &XdpContext) -> Frame {
        let (data, end) = (ctx.data(), ctx.data_end());
        Frame {
            data,
            end,
            len: (end - data) as u64,
            dir: Direction::Rx,
            ctx: ctx.as_ptr(),
        }
    }

    /// Also pulls the SecTAG (with SCI) into the linear part when it is not there yet.
    #[inline(always)]
    pub fn tc(ctx: &TcContext) -> Frame {
        let len = ctx.len() as usize;
        let mut data = ctx.data();
        let mut end = ctx.data_end();
        if data + TC_LINEAR_WANT > end && len > end - data {
            let pull = if len < TC_LINEAR_WANT {
                len as u32
            } else {
                TC_LINEAR_WANT as u32
            };
            // A failed pull leaves a short linear part, which the parse handles. Either way the
            // helper call invalidated every packet pointer: re-read both.
            let _ = ctx.pull_data(pull);
            data = ctx.data();
            end = ctx.data_end();
        }
        Frame {
            data,
            end,
            len: len as u64,
            dir: Direction::Tx,
            ctx: ctx.as_ptr(),
        }
    }

    /// Interface of the frame (PN and LLDP events carry it). Read only when an event is written,
    /// not for every frame.
    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: `ctx` is the running program's context, of the type its direction implies.
        unsafe {
            match self.dir {
                Direction::Rx => (*(self.ctx as *const xdp_md)).ingress_ifindex,
                Direction::Tx => (*(self.ctx as *const __sk_buff)).ifindex,
            }
        }
    }

    /// The (untagged) EtherType, or `None` when the frame is shorter than an Ethernet header.
    #[inline(always)]
    pub fn ethertype(&self) -> Option<u16> {
        if self.data + ETH_HLEN > self.end {
            return None;
        }
        // SAFETY: 14 bytes checked above.
        Some(u16::from_be(unsafe { load::<u16>(self.data + 12) }))
    }

    /// The counter of a malformed 0x88E5 frame in this direction.
    #[inline(always)]
    pub fn malformed_counter(&self) -> IfCounter {
        match self.dir {
            Direction::Rx => IfCounter::RxMalformed,
            Direction::Tx => IfCounter::TxMalformed,
        }
    }

    /// The counter of a well-formed MACsec frame of an unregistered SA in this direction.
    #[inline(always)]
    pub fn unknown_sa_counter(&self) -> IfCounter {
        match self.dir {
            Direction::Rx => IfCounter::RxUnknownSa,
            Direction::Tx => IfCounter::TxUnknownSa,
        }
    }

    /// The counter of a frame the stall dropped in this direction.
    #[inline(always)]
    pub fn stall_drop_counter(&self) -> IfCounter {
        match self.dir {
            Direction::Rx => IfCounter::RxStallDrop,
            Direction::Tx => IfCounter::TxStallDrop,
        }
    }
}

/// A load from packet memory at `addr` (bounds already checked by the caller).
///
/// Deliberately a plain typed load, not `read_unaligned`: on the BPF target the latter becomes one
/// byte load plus shift per byte (23 instructions for an SCI), while the kernel accepts unaligned
/// packet loads on the architectures with efficient unaligned access (x86-64, arm64) and the JIT
/// emits one instruction.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must lie inside the packet (checked against data_end).
#[inline(always)]
pub unsafe fn load<T: Copy>(addr: usize) -> T {
    // SAFETY: see above; alignment is the JIT's business for packet pointers.
    unsafe { *(addr as *const T) }
}
