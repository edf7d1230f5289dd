//! An AF_PACKET socket bound to one interface that sends whole Ethernet frames.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{LldpError, LldpFrame};

/// Sends LLDP frames (or, for tests and tools, any raw frame) out of one interface.
#[derive(Debug)]
pub struct LldpSender {
    fd: OwnedFd,
    ifname: String,
    ifindex: u32,
    mac: [u8; 6],
}

fn io_err(op: &'static str, ifname: &str, source: io::Error) -> LldpError {
    LldpError::Io {
        op,
        ifname: ifname.to_owned(),
        errno: source.raw_os_error(),
        message: source.to_string(),
    }
}

impl LldpSender {
    /// Opens a send-only packet socket on `ifname` (in the calling thread's network namespace).
    pub fn open(ifname: &str) -> Result<Self, LldpError> {
        let c = CString::new(ifname).map_err(|_| {
            io_err(
                "looking up",
                ifname,
                io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"),
            )
        })?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            return Err(io_err("looking up", ifname, io::Error::last_os_error()));
        }
        // Protocol 0: this socket only sends, it receives nothing.
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io_err(
                "opening an AF_PACKET socket for",
                ifname,
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll zeroed then filled; length passed matches.
        let rc = unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io_err(
                "binding an AF_PACKET socket to",
                ifname,
                io::Error::last_os_error(),
            ));
        }
        let mac =
            hw_addr(fd.as_raw_fd(), &c).map_err(|e| io_err("reading the MAC of", ifname, e))?;
        Ok(Self {
            fd,
            ifname: ifname.to_owned(),
            ifindex,
            mac,
        })
    }

    /// The interface's MAC (the LLDP source address and Chassis ID).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Sends an LLDPDU carrying `payload` in the project TLV, with this interface's MAC as source
    /// and Chassis ID and its name as Port ID.
    pub fn send_lldpdu(
        &self,
        payload: &[u8],
        ttl: u16,
        oui: [u8; 3],
        subtype: u8,
    ) -> Result<(), LldpError> {
        let f = LldpFrame {
            chassis_mac: self.mac,
            port_id: self.ifname.clone(),
            ttl,
            payload: payload.to_vec(),
        }
        .encode_frame(self.mac, oui, subtype)?;
        self.send_raw(&f)
    }

    /// Sends one complete Ethernet frame (destination MAC first, no FCS) as is.
    pub fn send_raw(&self, frame: &[u8]) -> Result<(), LldpError> {
        // SAFETY: frame is a valid buffer of frame.len() bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io_err(
                "sending a frame on",
                &self.ifname,
                io::Error::last_os_error(),
            ));
        }
        if n as usize != frame.len() {
            return Err(io_err(
                "sending a frame on",
                &self.ifname,
                io::Error::other(format!("short send: {n} of {} bytes", frame.len())),
            ));
        }
        Ok(())
    }
}

fn hw_addr(fd: i32, ifname: &CString) -> io::Result<[u8; 6]> {
    let bytes = ifname.as_bytes_with_nul();
    // SAFETY: ifreq zeroed; the name fits IFNAMSIZ (if_nametoindex accepted it).
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        if bytes.len() > ifr.ifr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
        let sa = ifr.ifr_ifru.ifru_hwaddr.sa_data;
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.iter()) {
            *d = *s as u8;
        }
        Ok(mac)
    }
}
