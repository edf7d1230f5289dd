//! Ring-buffer events: parsing the records the programs write, and an async stream over them.

use std::collections::VecDeque;
use std::mem::{offset_of, size_of};

use aya::maps::{MapData, RingBuf};
use qkd_macsec_common::{
    Direction, LldpEvent, PnEvent, EVENT_LLDP, EVENT_PN, LLDP_INFO_MAX, PN_THRESHOLDS,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::klog::AsyncKernelLog;
use super::maps::{SaKey, SaSlot, Sci};
use super::DataplaneError;

/// A project LLDP TLV the XDP program handed up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LldpTlvEvent {
    /// Interface it arrived on.
    pub ifindex: u32,
    /// Source MAC of the LLDP frame.
    pub src_mac: [u8; 6],
    /// The TLV's information string: OUI (3), subtype (1), payload.
    pub info: Vec<u8>,
}

impl LldpTlvEvent {
    /// The payload after OUI and subtype (the key-exchange message).
    pub fn payload(&self) -> &[u8] {
        &self.info[4..]
    }
}

/// An SA's PN reached one of its thresholds (sent once per threshold until re-armed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PnCrossing {
    /// Interface of the SA.
    pub ifindex: u32,
    /// The SA.
    pub sa: SaKey,
    /// Its slot.
    pub slot: SaSlot,
    /// The full PN of the frame that crossed.
    pub pn: u64,
    /// The threshold crossed.
    pub threshold: u64,
    /// Which of the SA's thresholds (index into what `set_thresholds` was given).
    pub threshold_index: usize,
}

/// One event from the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataplaneEvent {
    Lldp(LldpTlvEvent),
    Pn(PnCrossing),
}

fn bad(buf: &[u8], detail: impl Into<String>) -> DataplaneError {
    DataplaneError::BadEvent {
        len: buf.len(),
        detail: detail.into(),
    }
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
}

/// Parses one ring-buffer record; rejects anything that does not match the common layout.
pub fn parse_event(buf: &[u8]) -> Result<DataplaneEvent, DataplaneError> {
    if buf.len() < 8 {
        return Err(bad(buf, "shorter than the 8-byte header"));
    }
    match u32_at(buf, 0) {
        EVENT_LLDP => {
            if buf.len() < size_of::<LldpEvent>() {
                return Err(bad(buf, "LLDP record shorter than LldpEvent"));
            }
            let len_off = offset_of!(LldpEvent, info_len);
            let info_len = usize::from(u16::from_ne_bytes([buf[len_off], buf[len_off + 1]]));
            if !(4..=LLDP_INFO_MAX).contains(&info_len) {
                return Err(bad(
                    buf,
                    format!("LLDP info length {info_len} outside 4..=511"),
                ));
            }
            let mac_off = offset_of!(LldpEvent, src_mac);
            let info_off = offset_of!(LldpEvent, info);
            Ok(DataplaneEvent::Lldp(LldpTlvEvent {
                ifindex: u32_at(buf, offset_of!(LldpEvent, ifindex)),
                src_mac: buf[mac_off..mac_off + 6].try_into().expect("6 bytes"),
                info: buf[info_off..info_off + info_len].to_vec(),
            }))
        }
        EVENT_PN => {
            if buf.len() < size_of::<PnEvent>() {
                return Err(bad(buf, "PN record shorter than PnEvent"));
            }
            let direction = match buf[offset_of!(PnEvent, direction)] {
                0 => Direction::Rx,
                1 => Direction::Tx,
                d => {
                    return Err(bad(
                        buf,
                        format!("PN record direction {d} is neither 0 nor 1"),
                    ))
                }
            };
            let an = buf[offset_of!(PnEvent, an)];
            let threshold_index = usize::from(buf[offset_of!(PnEvent, threshold_index)]);
            if an > 3 || threshold_index >= PN_THRESHOLDS {
                return Err(bad(
                    buf,
                    format!("PN record AN {an} or threshold index {threshold_index} out of range"),
                ));
            }
            Ok(DataplaneEvent::Pn(PnCrossing {
                ifindex: u32_at(buf, offset_of!(PnEvent, ifindex)),
                sa: SaKey {
                    direction,
                    sci: Sci::from_map(u64_at(buf, offset_of!(PnEvent, sci))),
                    an,
                },
                slot: SaSlot(u32_at(buf, offset_of!(PnEvent, slot))),
                pn: u64_at(buf, offset_of!(PnEvent, pn)),
                threshold: u64_at(buf, offset_of!(PnEvent, threshold)),
                threshold_index,
            }))
        }
        k => Err(bad(buf, format!("unknown event kind {k}"))),
    }
}

/// The interface's events, read from the pinned ring buffer. Records that do not parse are
/// returned as errors (and logged), never silently skipped.
///
/// When the programs were loaded with logging on, the stream also drains their log ring into
/// tracing (super::klog) whenever it reads or waits for events; those records are never returned.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    pending: VecDeque<Result<DataplaneEvent, DataplaneError>>,
    klog: Option<AsyncKernelLog>,
}

impl EventStream {
    pub(crate) fn new(
        ring: RingBuf<MapData>,
        klog: Option<AsyncKernelLog>,
    ) -> Result<Self, DataplaneError> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as the
        // AsyncFd owns the RingBuf.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                DataplaneError::Io {
                    context: "registering the event ring buffer with tokio".into(),
                    source: e.into_parts().1,
                }
            })?;
        Ok(Self {
            ring,
            pending: VecDeque::new(),
            klog,
        })
    }

    /// Moves every record in the ring into `pending`. Called only when `pending` is empty, so
    /// `pending` never holds more than one ring's worth (256 KiB of records, about 490 LLDP
    /// events): however fast frames arrive, the ring's fixed size (and the XDP rate limit in
    /// front of it) bounds what the agent buffers.
    fn drain(&mut self) {
        if let Some(k) = &mut self.klog {
            k.flush();
        }
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            let ev = parse_event(&item);
            if let Err(e) = &ev {
                tracing::warn!(error = %e, "data plane event record does not parse");
            }
            self.pending.push_back(ev);
        }
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Result<DataplaneEvent, DataplaneError>> {
        if self.pending.is_empty() {
            self.drain();
        }
        self.pending.pop_front()
    }

    /// Waits for the next event. Cancel-safe (fine in `tokio::select!`): records already read
    /// from the ring wait in an internal queue, and a cancelled wait consumes nothing.
    ///
    /// Takes part in tokio's cooperative scheduling: records already queued would otherwise be
    /// returned without ever yielding, and a task selecting over this stream and its timers
    /// would, under a flood of events, run the event branch only (timers, whose budget is spent,
    /// never fire) and starve every other task on its worker. Found by tests/tests/vm_agent_flood.rs.
    pub async fn next(&mut self) -> Result<DataplaneEvent, DataplaneError> {
        // Before anything is taken, so that a cancelled wait still consumes nothing.
        tokio::task::coop::consume_budget().await;
        loop {
            if let Some(ev) = self.try_next() {
                return ev;
            }
            let Self { ring, klog, .. } = self;
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(|source| DataplaneError::Io {
                        context: "waiting on the event ring buffer".into(),
                        source,
                    })?;
                    guard.clear_ready();
                }
                r = wait_log(klog) => {
                    if let Err(e) = r {
                        // The events matter, the log records do not: go on without them.
                        tracing::warn!(error = %e, "eBPF log records no longer read");
                        *klog = None;
                    }
                }
            }
        }
    }

    /// Moves the stream onto a task that forwards every event into a channel (for select loops).
    pub fn into_channel(
        mut self,
        capacity: usize,
    ) -> tokio::sync::mpsc::Receiver<Result<DataplaneEvent, DataplaneError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        tokio::spawn(async move {
            loop {
                let ev = self.next().await;
                let stop = matches!(ev, Err(DataplaneError::Io { .. }));
                if tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        rx
    }
}

/// Waits for and writes out log records; never completes without a log ring.
async fn wait_log(klog: &mut Option<AsyncKernelLog>) -> Result<(), DataplaneError> {
    match klog {
        Some(k) => k.wait_and_flush().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lldp_record(info: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; size_of::<LldpEvent>()];
        b[0..4].copy_from_slice(&EVENT_LLDP.to_ne_bytes());
        b[4..8].copy_from_slice(&7u32.to_ne_bytes());
        b[8..14].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        b[14..16].copy_from_slice(&(info.len() as u16).to_ne_bytes());
        b[16..16 + info.len()].copy_from_slice(info);
        b
    }

    #[test]
    fn parses_an_lldp_record() {
        let ev = parse_event(&lldp_record(&[0x5A, 0x51, 0x4B, 1, 9, 9])).unwrap();
        let DataplaneEvent::Lldp(l) = ev else {
            panic!("not LLDP: {ev:?}")
        };
        assert_eq!(l.ifindex, 7);
        assert_eq!(l.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(l.payload(), &[9, 9]);
    }

    #[test]
    fn parses_a_pn_record() {
        let ev = PnEvent {
            kind: EVENT_PN,
            ifindex: 3,
            sci: Sci(0x0200_0000_0001_0001).to_map(),
            pn: 1001,
            threshold: 1000,
            slot: 300,
            direction: 1,
            an: 2,
            threshold_index: 1,
            _pad: 0,
        };
        // SAFETY: PnEvent is repr(C) plain data without implicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&ev as *const PnEvent).cast::<u8>(), size_of::<PnEvent>())
        };
        let DataplaneEvent::Pn(p) = parse_event(bytes).unwrap() else {
            panic!("not PN")
        };
        assert_eq!(p.sa.sci, Sci(0x0200_0000_0001_0001));
        assert_eq!(p.sa.direction, Direction::Tx);
        assert_eq!(
            (p.sa.an, p.pn, p.threshold, p.threshold_index),
            (2, 1001, 1000, 1)
        );
        assert_eq!(p.slot, SaSlot(300));
    }

    #[test]
    fn rejects_short_unknown_and_inconsistent_records() {
        assert!(matches!(
            parse_event(&[1, 0, 0]),
            Err(DataplaneError::BadEvent { .. })
        ));
        let mut unknown = lldp_record(&[0; 4]);
        unknown[0] = 9;
        assert!(parse_event(&unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown event kind 9"));
        let mut short_info = lldp_record(&[0; 4]);
        short_info[14] = 3;
        assert!(parse_event(&short_info).is_err());
        assert!(parse_event(&lldp_record(&[0; 4])[..100]).is_err());
        let mut pn = vec![0u8; size_of::<PnEvent>()];
        pn[0] = EVENT_PN as u8;
        pn[offset_of!(PnEvent, direction)] = 5;
        assert!(parse_event(&pn).is_err());
    }
}
