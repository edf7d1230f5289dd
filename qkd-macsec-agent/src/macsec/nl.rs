//! The netlink plumbing under [`super::Macsec`]: a socket owner that serialises request/reply
//! sequences, a message writer that owns (and wipes) its buffer, and an attribute reader.
//!
//! neli supplies the socket itself and the generic-netlink controller query (typed, since it
//! carries nothing secret). MACsec messages are encoded here because a key must live only in a
//! buffer this code owns and zeroizes after the send: neli's `Nlattr` payloads are plain
//! `Vec`s that would keep a copy of the key on the heap after drop.

use std::io::Cursor;
use std::os::fd::AsRawFd;

use neli::consts::genl::{CtrlAttr, CtrlCmd};
use neli::consts::nl::{GenlId, NlmF};
use neli::consts::socket::{Msg, NlFamily};
use neli::genl::{AttrTypeBuilder, GenlmsghdrBuilder, NlattrBuilder};
use neli::nl::{NlPayload, NlmsghdrBuilder};
use neli::socket::NlSocket;
use neli::types::GenlBuffer;
use neli::utils::Groups;
use neli::ToBytes;
use zeroize::Zeroizing;

pub(crate) const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
/// In an NLMSG_ERROR reply: extended-ack TLVs follow the (capped) original header.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Room for the largest request this module writes (an RX SA with a 32-byte key and XPN salt is
/// under 150 bytes; a link with every option under 200). The writer never grows past it, because
/// a reallocation would leave an unwiped copy of a key in freed memory.
const MSG_CAPACITY: usize = 1024;
/// Receive buffer: a dump message of one SecY with 4 TX SAs and a few RX SCs is a few KiB; the
/// kernel splits larger dumps across datagrams of at most this size.
const RECV_CAPACITY: usize = 64 * 1024;

/// A failure below the MACsec semantics: the caller maps it to a [`super::MacsecError`] with the
/// operation's context.
#[derive(Debug)]
pub(crate) enum NlError {
    /// The kernel answered with a negative errno, optionally with an extended-ack message.
    Kernel { errno: i32, msg: Option<String> },
    /// Socket-level failure (send/recv/setsockopt).
    Io(std::io::Error),
    /// A reply that does not parse as netlink.
    Malformed(&'static str),
    /// The message writer ran out of its fixed capacity (a bug: requests are bounded).
    TooLarge,
}

impl From<std::io::Error> for NlError {
    fn from(e: std::io::Error) -> Self {
        NlError::Io(e)
    }
}

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink request being written into a fixed-capacity buffer that is zeroized when dropped.
pub(crate) struct MsgWriter {
    buf: Zeroizing<Vec<u8>>,
    overflow: bool,
}

impl MsgWriter {
    /// Starts a message with an nlmsghdr whose length, sequence and port are filled at send time.
    pub(crate) fn new(msg_type: u16, flags: u16) -> Self {
        let mut buf = Zeroizing::new(Vec::with_capacity(MSG_CAPACITY));
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        Self {
            buf,
            overflow: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > self.buf.capacity() {
            self.overflow = true;
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        while self.buf.len() < padded && !self.overflow {
            self.push(&[0]);
        }
    }

    /// Raw family header bytes (ifinfomsg, genlmsghdr).
    pub(crate) fn header(&mut self, bytes: &[u8]) {
        self.push(bytes);
        self.pad();
    }

    pub(crate) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        let Ok(len16) = u16::try_from(len) else {
            self.overflow = true;
            return;
        };
        self.push(&len16.to_ne_bytes());
        self.push(&ty.to_ne_bytes());
        self.push(data);
        self.pad();
    }

    pub(crate) fn attr_u8(&mut self, ty: u16, v: u8) {
        self.attr(ty, &[v]);
    }

    pub(crate) fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    pub(crate) fn attr_u64(&mut self, ty: u16, v: u64) {
        self.attr(ty, &v.to_ne_bytes());
    }

    pub(crate) fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    /// Opens a nested attribute; returns the offset to hand to [`Self::nest_end`].
    pub(crate) fn nest_begin(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.push(&0u16.to_ne_bytes());
        self.push(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub(crate) fn nest_end(&mut self, at: usize) {
        if self.overflow {
            return;
        }
        let len = self.buf.len() - at;
        match u16::try_from(len) {
            Ok(l) => self.buf[at..at + 2].copy_from_slice(&l.to_ne_bytes()),
            Err(_) => self.overflow = true,
        }
    }

    fn finish(&mut self, seq: u32) -> Result<&[u8], NlError> {
        if self.overflow {
            return Err(NlError::TooLarge);
        }
        let len = u32::try_from(self.buf.len()).map_err(|_| NlError::TooLarge)?;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        Ok(&self.buf)
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Iterates the attributes in `data` as (type without flag bits, payload). Stops at the first
/// malformed header instead of panicking; a truncated tail is ignored.
pub(crate) fn attrs(data: &[u8]) -> AttrIter<'_> {
    AttrIter { data }
}

pub(crate) struct AttrIter<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.data[0], self.data[1]]) as usize;
        let ty = u16::from_ne_bytes([self.data[2], self.data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.data.len() {
            return None;
        }
        let payload = &self.data[4..len];
        let next = align4(len).min(self.data.len());
        self.data = &self.data[next..];
        Some((ty, payload))
    }
}

pub(crate) fn get_u8(p: &[u8]) -> Option<u8> {
    p.first().copied()
}

pub(crate) fn get_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

pub(crate) fn get_u64(p: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(p.get(..8)?.try_into().ok()?))
}

/// A PN attribute is u32 for plain ciphers and u64 for XPN; its length says which.
pub(crate) fn get_pn(p: &[u8]) -> Option<u64> {
    match p.len() {
        4 => get_u32(p).map(u64::from),
        8 => get_u64(p),
        _ => None,
    }
}

pub(crate) fn get_str(p: &[u8]) -> Option<String> {
    let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
    std::str::from_utf8(&p[..end]).ok().map(str::to_owned)
}

/// One netlink socket and its sequence counter. Every method takes `&mut self`, so a request and
/// its replies are never interleaved with another request on the same socket.
pub(crate) struct NlConn {
    sock: NlSocket,
    seq: u32,
    rx: Zeroizing<Vec<u8>>,
}

impl NlConn {
    pub(crate) fn open(family: NlFamily) -> Result<Self, NlError> {
        let sock = NlSocket::connect(family, None, Groups::empty())?;
        sock.block()?;
        let fd = sock.as_raw_fd();
        // CAP_ACK: error replies carry only the header of our request, not its payload (which
        // may hold a key). EXT_ACK: the kernel's explanation comes back with the errno.
        for opt in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            set_int_opt(fd, SOL_NETLINK, opt, 1)?;
        }
        // A reply that never comes must not hang the agent: 5 s is far above any control-plane
        // operation, even under TCG.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: fd is a valid socket for the lifetime of `sock`; tv outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Self {
            sock,
            seq: 0,
            rx: Zeroizing::new(vec![0u8; RECV_CAPACITY]),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NlError> {
        let n = self.sock.send(bytes, Msg::empty())?;
        if n != bytes.len() {
            return Err(NlError::Malformed("short netlink send"));
        }
        Ok(())
    }

    /// Sends `msg` straight out of its zeroizing buffer (no copy of the request is made) and
    /// drops it, wiping a key it may carry, before any reply is read. Returns the sequence.
    fn send_msg(&mut self, mut msg: MsgWriter) -> Result<u32, NlError> {
        let seq = self.next_seq();
        let bytes = msg.finish(seq)?;
        let sent = self
            .sock
            .send(bytes, Msg::empty())
            .map(|n| n == bytes.len());
        drop(msg);
        if !sent? {
            return Err(NlError::Malformed("short netlink send"));
        }
        Ok(seq)
    }

    /// Sends `msg` (which must carry NLM_F_ACK) and waits for its acknowledgement.
    pub(crate) fn request_ack(&mut self, msg: MsgWriter) -> Result<(), NlError> {
        let seq = self.send_msg(msg)?;
        self.wait(seq, |_, _| {})
    }

    /// Sends `msg` and collects the payload (after the nlmsghdr) of every reply message until the
    /// ack or NLMSG_DONE. Used for GET requests and dumps.
    pub(crate) fn request_collect(&mut self, msg: MsgWriter) -> Result<Vec<Vec<u8>>, NlError> {
        let seq = self.send_msg(msg)?;
        let mut out = Vec::new();
        self.wait(seq, |_, payload| out.push(payload.to_vec()))?;
        Ok(out)
    }

    /// Reads replies for `seq` until the final ack/DONE; hands every data message to `each`.
    fn wait(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> Result<(), NlError> {
        loop {
            let (n, _) = self.sock.recv(&mut self.rx[..], Msg::empty())?;
            let mut data = &self.rx[..n];
            let mut finished = false;
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap_or([0; 4])) as usize;
                let ty = u16::from_ne_bytes([data[4], data[5]]);
                let flags = u16::from_ne_bytes([data[6], data[7]]);
                let mseq = u32::from_ne_bytes(data[8..12].try_into().unwrap_or([0; 4]));
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(NlError::Malformed("netlink message length out of bounds"));
                }
                let payload = &data[NLMSG_HDRLEN..len];
                data = &data[align4(len).min(data.len())..];
                if mseq != seq {
                    // A late reply to an earlier request that timed out: not ours.
                    continue;
                }
                match ty {
                    NLMSG_ERROR => {
                        finished = true;
                        let errno = payload
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_ne_bytes)
                            .ok_or(NlError::Malformed("short NLMSG_ERROR"))?;
                        if errno != 0 {
                            let msg = if flags & NLM_F_ACK_TLVS != 0 {
                                // Capped ack: errno, then the original nlmsghdr, then TLVs.
                                payload.get(4 + NLMSG_HDRLEN..).and_then(|tlvs| {
                                    attrs(tlvs)
                                        .find(|(t, _)| *t == NLMSGERR_ATTR_MSG)
                                        .and_then(|(_, p)| get_str(p))
                                })
                            } else {
                                None
                            };
                            return Err(NlError::Kernel { errno: -errno, msg });
                        }
                    }
                    NLMSG_DONE => {
                        finished = true;
                        if let Some(e) = payload.get(..4).and_then(|b| b.try_into().ok()) {
                            let errno = i32::from_ne_bytes(e);
                            if errno < 0 {
                                return Err(NlError::Kernel {
                                    errno: -errno,
                                    msg: None,
                                });
                            }
                        }
                    }
                    _ => each(ty, payload),
                }
            }
            if finished {
                return Ok(());
            }
        }
    }

    /// Resolves a generic netlink family name to its id through the controller. This message
    /// holds nothing secret, so it is built and parsed with neli's typed API.
    pub(crate) fn resolve_genl_family(&mut self, name: &str) -> Result<u16, NlError> {
        let seq = self.next_seq();
        let attr = NlattrBuilder::default()
            .nla_type(
                AttrTypeBuilder::default()
                    .nla_type(CtrlAttr::FamilyName)
                    .build()
                    .map_err(|_| NlError::Malformed("building CTRL_ATTR_FAMILY_NAME"))?,
            )
            .nla_payload(name)
            .build()
            .map_err(|_| NlError::Malformed("building CTRL_ATTR_FAMILY_NAME"))?;
        let genl = GenlmsghdrBuilder::default()
            .cmd(CtrlCmd::Getfamily)
            .version(2)
            .attrs(std::iter::once(attr).collect::<GenlBuffer<_, _>>())
            .build()
            .map_err(|_| NlError::Malformed("building CTRL_CMD_GETFAMILY"))?;
        let msg = NlmsghdrBuilder::default()
            .nl_type(GenlId::Ctrl)
            .nl_flags(NlmF::REQUEST | NlmF::ACK)
            .nl_seq(seq)
            .nl_payload(NlPayload::Payload(genl))
            .build()
            .map_err(|_| NlError::Malformed("building nlmsghdr"))?;
        let mut cur = Cursor::new(Vec::new());
        msg.to_bytes(&mut cur)
            .map_err(|_| NlError::Malformed("serialising CTRL_CMD_GETFAMILY"))?;
        self.send_raw(cur.get_ref())?;

        // The reply is parsed by the same reader as every other message: neli's typed parser
        // does not accept the capped, extended-ack error replies this socket asks for.
        let mut id = None;
        self.wait(seq, |_, payload| {
            if let Some(attrs_bytes) = payload.get(4..) {
                for (ty, p) in attrs(attrs_bytes) {
                    if ty == CTRL_ATTR_FAMILY_ID {
                        id = p
                            .get(..2)
                            .and_then(|b| b.try_into().ok())
                            .map(u16::from_ne_bytes);
                    }
                }
            }
        })?;
        match id {
            Some(0) | None => Err(NlError::Kernel {
                errno: libc::ENOENT,
                msg: None,
            }),
            Some(id) => Ok(id),
        }
    }
}

fn set_int_opt(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> Result<(), NlError> {
    // SAFETY: fd is an open socket; the option value is a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_pads_and_nests() {
        let mut w = MsgWriter::new(16, NLM_F_REQUEST | NLM_F_ACK);
        w.header(&[1, 0, 0, 0]);
        let n = w.nest_begin(2);
        w.attr_u8(1, 7);
        w.attr_u64(3, 0x0102_0304_0506_0708);
        w.nest_end(n);
        let b = w.finish(9).expect("fits").to_vec();
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        let body = &b[NLMSG_HDRLEN + 4..];
        let outer: Vec<_> = attrs(body).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, 2, "nested flag is masked off");
        let inner: Vec<_> = attrs(outer[0].1).collect();
        assert_eq!(
            inner,
            vec![
                (1, &[7u8][..]),
                (3, &0x0102_0304_0506_0708u64.to_ne_bytes()[..])
            ]
        );
        // u8 attribute is padded to 8 bytes: 4 header + 1 + 3 pad.
        assert_eq!(outer[0].1.len(), 8 + 12);
    }

    #[test]
    fn writer_refuses_to_grow() {
        let mut w = MsgWriter::new(16, 0);
        w.attr(1, &[0u8; MSG_CAPACITY]);
        assert!(matches!(w.finish(1), Err(NlError::TooLarge)));
        assert!(w.bytes().len() <= MSG_CAPACITY);
    }

    #[test]
    fn attr_iter_stops_on_garbage() {
        let garbage = [0xffu8, 0xff, 1, 0, 9, 9];
        assert_eq!(attrs(&garbage).count(), 0);
        let short = [8u8, 0, 1, 0, 1];
        assert_eq!(attrs(&short).count(), 0);
    }

    #[test]
    fn pn_width_follows_length() {
        assert_eq!(get_pn(&5u32.to_ne_bytes()), Some(5));
        assert_eq!(get_pn(&(1u64 << 40).to_ne_bytes()), Some(1 << 40));
        assert_eq!(get_pn(&[1, 2, 3]), None);
    }
}
