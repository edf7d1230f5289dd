//! Loading, attaching, pinning and detaching the programs, and the typed map API.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcHandle};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfError, EbpfLoader};
use qkd_macsec_common::{
    mac_key, Counter, DataplaneConfig, IfCounter, LldpRateLimits, SaReg, SaStats, CFG_LLDP_DROP,
    CFG_STALL, MAP_CONFIG, MAP_EVENTS, MAP_IF_STATS, MAP_LLDP_SOURCES, MAP_SA_REG, MAP_SA_STATS,
    PINNED_MAPS, PN_THRESHOLDS, PROG_TC, PROG_XDP, SA_PROBES, SA_SLOTS, SA_VALID, SA_XPN,
};

use super::events::EventStream;
use super::klog::{self, KernelLog};
use super::maps::{
    choose_slot, new_entry, probe_sequence, sum_counters, IfCounters, SaCounters, SaKey, SaSlot,
    Sci, SlotChoice,
};
use super::{chain, errno_of, DataplaneError};

/// Default bpffs directory of the per-interface pins.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/qkd-macsec";
/// Pin name of the XDP link.
const XDP_LINK_PIN: &str = "xdp_link";
/// Pin name of the TCX link.
const TC_LINK_PIN: &str = "tc_link";
/// Fixed netlink filter priority and handle, so that a restarted loader finds and replaces its
/// own filter instead of stacking a second one.
const NL_PRIORITY: u16 = 0x51;
const NL_HANDLE: u16 = 0x51;

/// How to attach XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// Native only.
    Native,
    /// Generic (skb) only.
    Generic,
}

/// How TC egress was (or is to be) attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcBackend {
    /// TCX on kernels >= 6.6, netlink clsact below.
    #[default]
    Auto,
    /// TCX link (kernel >= 6.6).
    Tcx,
    /// cls_bpf filter on the clsact qdisc.
    Netlink,
}

/// Options of [`Dataplane::attach`].
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Directory under which `<ifname>/` holds the pins (default /sys/fs/bpf/qkd-macsec).
    pub bpffs_root: PathBuf,
    /// XDP mode.
    pub xdp_mode: XdpAttachMode,
    /// TC backend.
    pub tc_backend: TcBackend,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            bpffs_root: PathBuf::from(DEFAULT_BPFFS_ROOT),
            xdp_mode: XdpAttachMode::Auto,
            tc_backend: TcBackend::Auto,
        }
    }
}

enum TcAttachment {
    Pinned(PathBuf),
    Netlink(SchedClassifierLink),
}

/// The programs attached to one interface and the typed handles on their maps.
pub struct Dataplane {
    ifname: String,
    ifindex: u32,
    pin_dir: PathBuf,
    reopened: bool,
    xdp_mode: XdpMode,
    tc_backend: TcBackend,
    /// Pin path of the XDP bpf_link.
    xdp: Option<PathBuf>,
    tc: Option<TcAttachment>,
    config: Array<MapData, DataplaneConfig>,
    sa_reg: Array<MapData, SaReg>,
    sa_stats: PerCpuArray<MapData, SaStats>,
    if_stats: PerCpuArray<MapData, Counter>,
    lldp_sources: HashMap<MapData, u64, u64>,
    events: Option<RingBuf<MapData>>,
    /// The programs' log records, when enabled at load; goes with the events to the stream.
    klog: Option<KernelLog>,
    nr_cpus: usize,
    // Last: programs stay loaded while the maps above are used.
    _ebpf: Ebpf,
}

fn ifindex_of(ifname: &str) -> Result<u32, DataplaneError> {
    let c = CString::new(ifname).map_err(|_| DataplaneError::InterfaceNotFound {
        ifname: ifname.to_owned(),
    })?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DataplaneError::InterfaceNotFound {
            ifname: ifname.to_owned(),
        });
    }
    Ok(idx)
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; c is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

impl Dataplane {
    /// Loads the programs and attaches them to `ifname` (XDP ingress, TC egress), re-using the
    /// maps (and replacing the programs of the links) pinned by an earlier run if there are any.
    pub fn attach(ifname: &str, opts: &DataplaneOptions) -> Result<Self, DataplaneError> {
        let ifindex = ifindex_of(ifname)?;
        let parent = opts
            .bpffs_root
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        if !is_bpffs(&parent) && !is_bpffs(&opts.bpffs_root) {
            return Err(DataplaneError::BpffsMissing { path: parent });
        }
        let pin_dir = opts.bpffs_root.join(ifname);
        std::fs::create_dir_all(&pin_dir).map_err(|source| DataplaneError::Pin {
            path: pin_dir.clone(),
            source,
        })?;
        let reopened = pin_dir.join(MAP_CONFIG).exists();

        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> =
            PINNED_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // The programs write log records only when tracing would show them (klog.rs).
        let log_level = klog::load_level();
        loader.override_global(klog::LEVEL_GLOBAL, &log_level, true);
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(|e| load_error("the eBPF object's maps", e))?;
        // During start-up, with every capability still held; the programs' instructions refer to
        // the ring, so it stays open at least as long as they are loaded (in `klog`).
        let klog = if log_level == 0 {
            None
        } else {
            Some(KernelLog::new(&mut ebpf, ifname)?)
        };

        let mut config: Array<MapData, DataplaneConfig> = take(&mut ebpf, MAP_CONFIG)?;
        if !reopened {
            config
                .set(0, &DataplaneConfig::DEFAULT, 0)
                .map_err(|e| map_err(MAP_CONFIG, &e))?;
        }
        let sa_reg = take(&mut ebpf, MAP_SA_REG)?;
        let sa_stats = take(&mut ebpf, MAP_SA_STATS)?;
        let if_stats = take(&mut ebpf, MAP_IF_STATS)?;
        let lldp_sources = take(&mut ebpf, MAP_LLDP_SOURCES)?;
        let events = RingBuf::try_from(
            ebpf.take_map(MAP_EVENTS)
                .ok_or_else(|| missing_map(MAP_EVENTS))?,
        )
        .map_err(|e| map_err(MAP_EVENTS, &e))?;
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, source)| DataplaneError::Io {
                context: format!("reading {what}"),
                source,
            })?
            .get() as usize;

        let mut dp = Dataplane {
            ifname: ifname.to_owned(),
            ifindex,
            pin_dir,
            reopened,
            xdp_mode: XdpMode::Default,
            tc_backend: opts.tc_backend,
            xdp: None,
            tc: None,
            config,
            sa_reg,
            sa_stats,
            if_stats,
            lldp_sources,
            events: Some(events),
            klog,
            nr_cpus,
            _ebpf: ebpf,
        };
        dp.attach_xdp(opts.xdp_mode)?;
        dp.attach_tc(opts.tc_backend)?;
        tracing::info!(
            ifname,
            ifindex,
            reopened,
            xdp_mode = ?dp.xdp_mode,
            tc = ?dp.tc_backend,
            kernel_log = dp.klog.is_some(),
            "data plane attached"
        );
        Ok(dp)
    }

    fn attach_xdp(&mut self, mode: XdpAttachMode) -> Result<(), DataplaneError> {
        let ifname = self.ifname.clone();
        let prog: &mut Xdp = program(&mut self._ebpf, PROG_XDP)?;
        prog.load().map_err(|e| prog_load_error(PROG_XDP, e))?;
        let pin = self.pin_dir.join(XDP_LINK_PIN);
        if pin.exists() {
            // A previous run's link: swap our program in atomically (the stall never lapses).
            let old = PinnedLink::from_pin(&pin).map_err(|e| attach_err(PROG_XDP, &ifname, &e))?;
            let link = XdpLink::try_from(FdLink::from(old))
                .map_err(|e| attach_err(PROG_XDP, &ifname, &e))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // The pin keeps the link; our fd may go.
                    drop(prog.take_link(id));
                    self.xdp = Some(pin);
                    return Ok(());
                }
                Err(e) if errno_of(&e) == Some(libc::ENOLINK) => {
                    // The link's device is gone (the interface was deleted and re-created): the
                    // pin is stale. Replace it with a fresh attachment below.
                    tracing::warn!(ifname, pin = %pin.display(), "stale XDP link pin replaced");
                    remove_pin(&pin)?;
                }
                Err(e) => return Err(attach_err(PROG_XDP, &ifname, &e)),
            }
        }
        let modes: &[XdpMode] = match mode {
            XdpAttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttachMode::Native => &[XdpMode::Driver],
            XdpAttachMode::Generic => &[XdpMode::Skb],
        };
        let mut last = None;
        for &m in modes {
            match prog.attach(self.ifindex, m) {
                Ok(id) => {
                    let link = prog
                        .take_link(id)
                        .map_err(|e| attach_err(PROG_XDP, &ifname, &e))?;
                    self.xdp_mode = m;
                    // Kernels without XDP bpf_links (< 5.9) get a netlink attachment, which
                    // cannot be pinned; the conversion fails and dropping it detaches again.
                    let fd_link = FdLink::try_from(link).map_err(|e| DataplaneError::Attach {
                        program: PROG_XDP.into(),
                        ifname: ifname.clone(),
                        detail: format!(
                            "no XDP bpf_link on this kernel (needs >= 5.9): {}",
                            chain(&e)
                        ),
                    })?;
                    fd_link.pin(&pin).map_err(|e| DataplaneError::Pin {
                        path: pin.clone(),
                        source: io::Error::other(chain(&e)),
                    })?;
                    self.xdp = Some(pin);
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(mode = ?m, error = %chain(&e), "XDP attach mode failed");
                    last = Some(e);
                }
            }
        }
        let e = last.expect("at least one mode tried");
        Err(attach_err(PROG_XDP, &ifname, &e))
    }

    fn attach_tc(&mut self, backend: TcBackend) -> Result<(), DataplaneError> {
        let ifname = self.ifname.clone();
        let ifindex = self.ifindex;
        let pin = self.pin_dir.join(TC_LINK_PIN);
        let prog: &mut SchedClassifier = program(&mut self._ebpf, PROG_TC)?;
        prog.load().map_err(|e| prog_load_error(PROG_TC, e))?;
        let use_tcx = match backend {
            TcBackend::Auto => KernelVersion::current()
                .map(|v| v >= KernelVersion::new(6, 6, 0))
                .unwrap_or(false),
            TcBackend::Tcx => true,
            TcBackend::Netlink => false,
        };
        if use_tcx {
            self.tc_backend = TcBackend::Tcx;
            let mut replaced = None;
            if pin.exists() {
                let old =
                    PinnedLink::from_pin(&pin).map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
                match prog.attach_to_link(link) {
                    Ok(id) => replaced = Some(id),
                    Err(e) if errno_of(&e) == Some(libc::ENOLINK) => {
                        tracing::warn!(ifname, pin = %pin.display(), "stale TCX link pin replaced");
                        remove_pin(&pin)?;
                    }
                    Err(e) => return Err(attach_err(PROG_TC, &ifname, &e)),
                }
            }
            let id = if let Some(id) = replaced {
                id
            } else {
                let id = prog
                    .attach(
                        ifindex,
                        TcAttach::Tcx {
                            attach_type: TcAttachType::Egress,
                            order: Default::default(),
                        },
                    )
                    .map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
                let fd_link =
                    FdLink::try_from(link).map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
                fd_link.pin(&pin).map_err(|e| DataplaneError::Pin {
                    path: pin.clone(),
                    source: io::Error::other(chain(&e)),
                })?;
                self.tc = Some(TcAttachment::Pinned(pin));
                return Ok(());
            };
            drop(prog.take_link(id));
            self.tc = Some(TcAttachment::Pinned(pin));
            return Ok(());
        }
        self.tc_backend = TcBackend::Netlink;
        match tc::qdisc_add_clsact(ifindex) {
            Ok(()) => {}
            Err(tc::TcError::AlreadyAttached) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(attach_err(PROG_TC, &ifname, &e)),
        }
        // Replace our own filter if a previous run left it (netlink filters outlive processes);
        // otherwise create it.
        let existing = SchedClassifierLink::attached(
            ifindex,
            TcAttachType::Egress.into(),
            NL_PRIORITY,
            TcHandle::new(0, NL_HANDLE),
            None,
        )
        .map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
        let id = match prog.attach_to_link(existing) {
            Ok(id) => id,
            Err(replace_err) => {
                tracing::debug!(error = %chain(&replace_err), "no earlier TC filter to replace");
                prog.attach(
                    ifindex,
                    TcAttach::Netlink {
                        parent: TcAttachType::Egress.into(),
                        options: NlOptions {
                            priority: NL_PRIORITY,
                            handle: TcHandle::new(0, NL_HANDLE),
                            classid: None,
                        },
                    },
                )
                .map_err(|e| attach_err(PROG_TC, &ifname, &e))?
            }
        };
        let link = prog
            .take_link(id)
            .map_err(|e| attach_err(PROG_TC, &ifname, &e))?;
        self.tc = Some(TcAttachment::Netlink(link));
        Ok(())
    }

    /// Interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The bpffs directory holding this interface's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// True when the maps came from an earlier run's pins (state such as a stall carried over).
    pub fn reopened(&self) -> bool {
        self.reopened
    }

    /// XDP mode in use (Driver or Skb; Default when a pinned link was re-used).
    pub fn xdp_mode(&self) -> XdpMode {
        self.xdp_mode
    }

    /// TC backend in use (Tcx or Netlink).
    pub fn tc_backend(&self) -> TcBackend {
        self.tc_backend
    }

    /// Takes the event stream (once). Needs a tokio runtime with IO enabled. The stream also
    /// writes the programs' log records to tracing, if they were enabled at load ([`klog`]).
    pub fn take_events(&mut self) -> Result<EventStream, DataplaneError> {
        let ring = self
            .events
            .take()
            .ok_or_else(|| DataplaneError::EventsTaken {
                ifname: self.ifname.clone(),
            })?;
        let klog = self.klog.take().map(KernelLog::into_async).transpose()?;
        EventStream::new(ring, klog)
    }

    fn get_config(&self) -> Result<DataplaneConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|e| self.map_error(MAP_CONFIG, &e))
    }

    fn put_config(&mut self, cfg: DataplaneConfig) -> Result<(), DataplaneError> {
        let r = self.config.set(0, &cfg, 0);
        r.map_err(|e| self.map_error(MAP_CONFIG, &e))
    }

    /// Checks that the interface still exists under the same index (links vanish with their
    /// programs; the maps would silently keep working).
    pub fn check_interface(&self) -> Result<(), DataplaneError> {
        match ifindex_of(&self.ifname) {
            Ok(idx) if idx == self.ifindex => Ok(()),
            Ok(idx) => Err(DataplaneError::InterfaceGone {
                ifname: self.ifname.clone(),
                context: format!(
                    "the name now belongs to ifindex {idx}, not {}",
                    self.ifindex
                ),
            }),
            Err(_) => Err(DataplaneError::InterfaceGone {
                ifname: self.ifname.clone(),
                context: format!("ifindex {} no longer exists", self.ifindex),
            }),
        }
    }

    /// Sets or clears the stall switch: while set, every frame except LLDP and EAPOL is dropped
    /// in both directions. The flag lives in the pinned config map, so it outlives this process.
    /// Fails with [`DataplaneError::InterfaceGone`] when the interface vanished (a stall there
    /// would be a no-op the caller must know about).
    pub fn set_stall(&mut self, stall: bool) -> Result<(), DataplaneError> {
        self.check_interface()?;
        let mut cfg = self.get_config()?;
        if stall {
            cfg.flags |= CFG_STALL;
        } else {
            cfg.flags &= !CFG_STALL;
        }
        self.put_config(cfg)?;
        tracing::info!(ifname = %self.ifname, stall, "stall switch set");
        Ok(())
    }

    /// Whether the stall switch is set.
    pub fn stall(&self) -> Result<bool, DataplaneError> {
        Ok(self.get_config()?.flags & CFG_STALL != 0)
    }

    /// Which organizationally specific TLV to deliver, and whether to drop the LLDP frame once
    /// delivered (otherwise it goes on to the stack).
    pub fn set_lldp_filter(
        &mut self,
        oui: [u8; 3],
        subtype: u8,
        drop_delivered: bool,
    ) -> Result<(), DataplaneError> {
        let mut cfg = self.get_config()?;
        cfg.lldp_oui = oui;
        cfg.lldp_subtype = subtype;
        if drop_delivered {
            cfg.flags |= CFG_LLDP_DROP;
        } else {
            cfg.flags &= !CFG_LLDP_DROP;
        }
        self.put_config(cfg)
    }

    /// Rate limits of the project TLV hand-off (see [`LldpRateLimits`]); applies from the next
    /// frame on.
    pub fn set_lldp_rate_limits(&mut self, limits: LldpRateLimits) -> Result<(), DataplaneError> {
        let mut cfg = self.get_config()?;
        cfg.lldp_limits = limits;
        self.put_config(cfg)
    }

    /// The located peer's source MAC, which gets its own rate-limit bucket so that a flood from
    /// other sources cannot starve it; `None` while the peer is unknown.
    pub fn set_lldp_peer(&mut self, peer: Option<[u8; 6]>) -> Result<(), DataplaneError> {
        let mut cfg = self.get_config()?;
        cfg.peer_mac = peer.map_or(0, mac_key);
        self.put_config(cfg)?;
        tracing::debug!(ifname = %self.ifname, ?peer, "LLDP peer bucket set");
        Ok(())
    }

    /// How many source MACs the per-source LLDP rate limiter tracks right now (at most
    /// [`qkd_macsec_common::LLDP_SOURCES_MAX`]: the map is an LRU).
    pub fn lldp_sources_tracked(&self) -> Result<usize, DataplaneError> {
        let mut n = 0;
        for k in self.lldp_sources.keys() {
            k.map_err(|e| self.map_error(MAP_LLDP_SOURCES, &e))?;
            n += 1;
        }
        Ok(n)
    }

    /// The SCI to assume for SecTAGs with neither SC nor ES set (the peer's SCI on a
    /// point-to-point link); `None` falls back to source MAC + port 1.
    pub fn set_implicit_sci(&mut self, sci: Option<Sci>) -> Result<(), DataplaneError> {
        let mut cfg = self.get_config()?;
        cfg.implicit_sci = sci.map_or(0, Sci::to_map);
        self.put_config(cfg)
    }

    /// Sets the end of the active key's lifetime (`None`: no key, no deadline): from then on the
    /// programs drop data as if stalled, whether or not this process is still alive to set the
    /// stall switch. Like the switch it lives in the pinned config map.
    pub fn set_key_deadline(&mut self, deadline: Option<Instant>) -> Result<(), DataplaneError> {
        let mut cfg = self.get_config()?;
        cfg.key_deadline_ns = deadline.map_or(0, monotonic_ns);
        self.put_config(cfg)
    }

    /// The deadline [`Dataplane::set_key_deadline`] wrote, as CLOCK_MONOTONIC nanoseconds (0:
    /// none); for tests and diagnostics.
    pub fn key_deadline_ns(&self) -> Result<u64, DataplaneError> {
        Ok(self.get_config()?.key_deadline_ns)
    }

    fn reg(&self, slot: u32) -> Result<SaReg, DataplaneError> {
        self.sa_reg
            .get(&slot, 0)
            .map_err(|e| self.map_error(MAP_SA_REG, &e))
    }

    fn check_an(key: &SaKey) -> Result<(), DataplaneError> {
        if key.an > 3 {
            return Err(DataplaneError::BadAn { an: key.an });
        }
        Ok(())
    }

    /// Registers an SA so its frames are counted on their own (instead of the unknown bucket).
    /// `pn_hi` is the upper half of the PN for XPN SAs (ignored otherwise). Registering an SA
    /// again keeps its counters and thresholds and updates `xpn`/`pn_hi`.
    pub fn register_sa(
        &mut self,
        key: SaKey,
        xpn: bool,
        pn_hi: u32,
    ) -> Result<SaSlot, DataplaneError> {
        Self::check_an(&key)?;
        let choice = choose_slot(&key, |s| self.reg(s))?;
        let slot = match choice {
            SlotChoice::Existing(slot) => {
                let mut e = self.reg(slot)?;
                e.flags = SA_VALID | if xpn { SA_XPN } else { 0 };
                e.pn_hi = if xpn { pn_hi } else { 0 };
                self.write_reg(slot, e)?;
                slot
            }
            SlotChoice::Free(slot) => {
                // Fresh counters first, then the entry that makes the program use them.
                let zeros = PerCpuValues::try_from(vec![SaStats::default(); self.nr_cpus])
                    .map_err(|e| DataplaneError::Map {
                        map: MAP_SA_STATS,
                        detail: e.to_string(),
                    })?;
                let r = self.sa_stats.set(slot, zeros, 0);
                r.map_err(|e| self.map_error(MAP_SA_STATS, &e))?;
                self.write_reg(slot, new_entry(&key, xpn, pn_hi, [0; PN_THRESHOLDS]))?;
                slot
            }
            SlotChoice::Full => {
                return Err(DataplaneError::SaTableFull {
                    key,
                    probes: SA_PROBES,
                })
            }
        };
        tracing::debug!(ifname = %self.ifname, sa = %key, slot, xpn, "SA registered");
        Ok(SaSlot(slot))
    }

    fn write_reg(&mut self, slot: u32, e: SaReg) -> Result<(), DataplaneError> {
        let r = self.sa_reg.set(slot, &e, 0);
        r.map_err(|err| self.map_error(MAP_SA_REG, &err))
    }

    fn find(&self, key: &SaKey) -> Result<u32, DataplaneError> {
        Self::check_an(key)?;
        match choose_slot(key, |s| self.reg(s))? {
            SlotChoice::Existing(slot) => Ok(slot),
            _ => Err(DataplaneError::SaNotRegistered { key: *key }),
        }
    }

    /// Removes an SA; its frames go to the unknown bucket from now on.
    pub fn unregister_sa(&mut self, key: &SaKey) -> Result<(), DataplaneError> {
        let slot = self.find(key)?;
        self.write_reg(slot, SaReg::EMPTY)?;
        tracing::debug!(ifname = %self.ifname, sa = %key, slot, "SA unregistered");
        Ok(())
    }

    /// The SAs registered (read back from the map, e.g. after a restart).
    pub fn registered_sas(&self) -> Result<Vec<(SaKey, SaSlot, bool)>, DataplaneError> {
        let mut out = Vec::new();
        for slot in 0..SA_SLOTS {
            let e = self.reg(slot)?;
            if e.flags & SA_VALID == 0 {
                continue;
            }
            let key = SaKey {
                direction: if slot < SA_SLOTS / 2 {
                    qkd_macsec_common::Direction::Rx
                } else {
                    qkd_macsec_common::Direction::Tx
                },
                sci: Sci::from_map(e.sci),
                an: (slot % 4) as u8,
            };
            // Only report entries the program would find (a defence against foreign writes).
            if probe_sequence(&key).any(|s| s == slot) {
                out.push((key, SaSlot(slot), e.flags & SA_XPN != 0));
            }
        }
        Ok(out)
    }

    /// Sets the SA's PN thresholds (full 64-bit PNs, at most [`PN_THRESHOLDS`]; 0 or absent =
    /// unused) and re-arms them: each produces one event when the PN first reaches it.
    pub fn set_thresholds(
        &mut self,
        key: &SaKey,
        thresholds: &[u64],
    ) -> Result<(), DataplaneError> {
        if thresholds.len() > PN_THRESHOLDS {
            return Err(DataplaneError::TooManyThresholds {
                given: thresholds.len(),
                max: PN_THRESHOLDS,
            });
        }
        let slot = self.find(key)?;
        let mut e = self.reg(slot)?;
        e.thresholds = [0; PN_THRESHOLDS];
        e.thresholds[..thresholds.len()].copy_from_slice(thresholds);
        e.fired = 0;
        e.next_check = SaReg::min_threshold(&e.thresholds);
        self.write_reg(slot, e)
    }

    /// Updates the upper PN half of an XPN SA (the agent calls this from its counter polls; the
    /// program also infers wraps on its own).
    pub fn set_pn_hi(&mut self, key: &SaKey, pn_hi: u32) -> Result<(), DataplaneError> {
        let slot = self.find(key)?;
        let mut e = self.reg(slot)?;
        e.pn_hi = pn_hi;
        self.write_reg(slot, e)
    }

    /// The SA's counters summed over CPUs.
    pub fn sa_counters(&self, key: &SaKey) -> Result<SaCounters, DataplaneError> {
        let slot = self.find(key)?;
        let v = self
            .sa_stats
            .get(&slot, 0)
            .map_err(|e| self.map_error(MAP_SA_STATS, &e))?;
        Ok(SaCounters::sum(v.iter()))
    }

    /// Raises the stored upper PN half of every XPN SA to what the counters show (so a CPU that
    /// has been idle across a wrap still computes full PNs right). Returns how many changed.
    pub fn sync_xpn_upper(&mut self) -> Result<usize, DataplaneError> {
        let mut changed = 0;
        for (key, slot, xpn) in self.registered_sas()? {
            if !xpn {
                continue;
            }
            let c = self.sa_counters(&key)?;
            let hi = (c.highest_pn >> 32) as u32;
            let mut e = self.reg(slot.0)?;
            if hi > e.pn_hi {
                e.pn_hi = hi;
                self.write_reg(slot.0, e)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The interface counters summed over CPUs.
    pub fn if_counters(&self) -> Result<IfCounters, DataplaneError> {
        let get = |c: IfCounter| -> Result<Counter, DataplaneError> {
            let v = self
                .if_stats
                .get(&(c as u32), 0)
                .map_err(|e| self.map_error(MAP_IF_STATS, &e))?;
            Ok(sum_counters(v.iter()))
        };
        Ok(IfCounters {
            rx_unknown_sa: get(IfCounter::RxUnknownSa)?,
            rx_malformed: get(IfCounter::RxMalformed)?,
            tx_unknown_sa: get(IfCounter::TxUnknownSa)?,
            tx_malformed: get(IfCounter::TxMalformed)?,
            rx_stall_drop: get(IfCounter::RxStallDrop)?,
            tx_stall_drop: get(IfCounter::TxStallDrop)?,
            lldp_delivered: get(IfCounter::LldpDelivered)?,
            lldp_ignored: get(IfCounter::LldpIgnored)?,
            lldp_malformed: get(IfCounter::LldpMalformed)?,
            events_lost: get(IfCounter::EventsLost)?,
            lldp_rate_limited: get(IfCounter::LldpRateLimited)?,
        })
    }

    /// Detaches the programs and removes the pins. With `keep_stall` and the stall set, leaves
    /// everything pinned and attached instead, so the stall stays in force after this process.
    pub fn shutdown(mut self, keep_stall: bool) -> Result<(), DataplaneError> {
        if keep_stall && self.stall()? {
            tracing::warn!(ifname = %self.ifname, pins = %self.pin_dir.display(),
                "leaving the data plane attached: the stall stays in force");
            if let Some(TcAttachment::Netlink(l)) = self.tc.take() {
                std::mem::forget(l);
            }
            return Ok(());
        }
        self.detach_all()
    }

    fn detach_all(&mut self) -> Result<(), DataplaneError> {
        let mut first_err = None;
        let unpin = |path: &Path| -> Result<(), DataplaneError> {
            let link = PinnedLink::from_pin(path).map_err(|e| DataplaneError::Pin {
                path: path.to_owned(),
                source: io::Error::other(chain(&e)),
            })?;
            let fd = link.unpin().map_err(|source| DataplaneError::Pin {
                path: path.to_owned(),
                source,
            })?;
            // Dropping the last fd of an unpinned link detaches it.
            drop(fd);
            Ok(())
        };
        if let Some(p) = self.xdp.take() {
            if let Err(e) = unpin(&p) {
                first_err.get_or_insert(e);
            }
        }
        match self.tc.take() {
            Some(TcAttachment::Pinned(p)) => {
                if let Err(e) = unpin(&p) {
                    first_err.get_or_insert(e);
                }
            }
            Some(TcAttachment::Netlink(l)) => drop(l),
            None => {}
        }
        for m in PINNED_MAPS {
            let p = self.pin_dir.join(m);
            if let Err(source) = std::fs::remove_file(&p) {
                if source.kind() != io::ErrorKind::NotFound {
                    first_err.get_or_insert(DataplaneError::Pin { path: p, source });
                }
            }
        }
        if let Err(source) = std::fs::remove_dir(&self.pin_dir) {
            if source.kind() != io::ErrorKind::NotFound {
                first_err.get_or_insert(DataplaneError::Pin {
                    path: self.pin_dir.clone(),
                    source,
                });
            }
        }
        tracing::info!(ifname = %self.ifname, "data plane detached");
        first_err.map_or(Ok(()), Err)
    }

    fn map_error(&self, map: &'static str, e: &aya::maps::MapError) -> DataplaneError {
        if matches!(errno_of(e), Some(libc::ENODEV | libc::ENXIO))
            || ifindex_of(&self.ifname).is_err()
        {
            return DataplaneError::InterfaceGone {
                ifname: self.ifname.clone(),
                context: format!("map {map}: {}", chain(e)),
            };
        }
        map_err(map, e)
    }
}

impl Drop for Dataplane {
    /// A `Dataplane` dropped without [`Dataplane::shutdown`] leaves the pins (and thus the
    /// attachments) in place: the safe side when the agent unwinds from an error.
    fn drop(&mut self) {
        if let Some(TcAttachment::Netlink(l)) = self.tc.take() {
            std::mem::forget(l);
        }
    }
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    std::fs::remove_file(path).map_err(|source| DataplaneError::Pin {
        path: path.to_owned(),
        source,
    })
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DataplaneError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| missing_map(name))?;
    M::try_from(map).map_err(|e| map_err(name, &e))
}

fn missing_map(name: &'static str) -> DataplaneError {
    DataplaneError::Map {
        map: name,
        detail: "not in the embedded eBPF object (stale build?)".into(),
    }
}

fn map_err(map: &'static str, e: &aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map {
        map,
        detail: chain(e),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| DataplaneError::Load {
        what: format!("program {name}"),
        detail: "not in the embedded eBPF object (stale build?)".into(),
    })?;
    p.try_into()
        .map_err(|e: ProgramError| DataplaneError::Load {
            what: format!("program {name}"),
            detail: chain(&e),
        })
}

fn is_perm(code: Option<i32>) -> bool {
    matches!(code, Some(libc::EPERM | libc::EACCES))
}

fn load_error(what: &str, e: EbpfError) -> DataplaneError {
    if is_perm(errno_of(&e)) {
        return DataplaneError::NoPermission {
            what: format!("load {what}"),
            source: io::Error::other(chain(&e)),
        };
    }
    DataplaneError::Load {
        what: what.to_owned(),
        detail: chain(&e),
    }
}

fn prog_load_error(name: &str, e: ProgramError) -> DataplaneError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            if is_perm(io_error.raw_os_error()) && verifier_log.to_string().trim().is_empty() {
                DataplaneError::NoPermission {
                    what: format!("load program {name}"),
                    source: io_error,
                }
            } else {
                DataplaneError::Verifier {
                    program: name.to_owned(),
                    errno: io_error,
                    log: verifier_log.to_string(),
                }
            }
        }
        other => {
            if is_perm(errno_of(&other)) {
                DataplaneError::NoPermission {
                    what: format!("load program {name}"),
                    source: io::Error::other(chain(&other)),
                }
            } else {
                DataplaneError::Load {
                    what: format!("program {name}"),
                    detail: chain(&other),
                }
            }
        }
    }
}

fn attach_err(
    program: &str,
    ifname: &str,
    e: &(dyn std::error::Error + 'static),
) -> DataplaneError {
    match errno_of(e) {
        code if is_perm(code) => DataplaneError::NoPermission {
            what: format!("attach {program} to {ifname}"),
            source: io::Error::other(chain(e)),
        },
        Some(libc::ENODEV | libc::ENXIO) => DataplaneError::InterfaceGone {
            ifname: ifname.to_owned(),
            context: format!("attaching {program}: {}", chain(e)),
        },
        _ => DataplaneError::Attach {
            program: program.to_owned(),
            ifname: ifname.to_owned(),
            detail: chain(e),
        },
    }
}

/// `t` on CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads. `Instant` is
/// CLOCK_MONOTONIC on Linux but opaque, so the offset is taken from a reading of both now.
/// Never 0 (which means "no deadline"): a deadline in the past is 1 ns.
pub fn monotonic_ns(t: Instant) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let now = Instant::now();
    let now_ns = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    let ns = if t >= now {
        now_ns.saturating_add(u64::try_from((t - now).as_nanos()).unwrap_or(u64::MAX))
    } else {
        now_ns.saturating_sub(u64::try_from((now - t).as_nanos()).unwrap_or(u64::MAX))
    };
    ns.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn clock_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid timespec pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn monotonic_ns_maps_instants_onto_the_bpf_clock() {
        let before = clock_ns();
        let now = monotonic_ns(Instant::now());
        let later = monotonic_ns(Instant::now() + Duration::from_secs(5));
        let earlier = monotonic_ns(Instant::now() - Duration::from_secs(1));
        let after = clock_ns();
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
        // Each conversion reads the clocks again, so allow the time the test itself takes.
        let slack = after - before + 1_000_000;
        assert!(
            later.abs_diff(now + 5_000_000_000) <= slack,
            "{later} vs {now}+5 s"
        );
        assert!(
            earlier.abs_diff(now - 1_000_000_000) <= slack,
            "{earlier} vs {now}-1 s"
        );
    }
}
