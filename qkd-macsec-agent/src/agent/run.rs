//! `qkd-macsec-agent run --config FILE`: the IO loop. One task per link drives its
//! [`LinkCore`] with the real outside world: the ETSI 014 client (async, one request per
//! spawned task), kernel MACsec over netlink (synchronous, owned by the link task so request
//! sequences never interleave), the eBPF data plane (stall switch, SA counters, PN crossings,
//! LLDP hand-off) and the LLDP sender. SIGINT and SIGTERM stop every link; a stall in force
//! stays in force (the data plane keeps its pins), so stopping the agent never opens the link.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::core::{Adoption, Command, FetchedKey, LinkCore, NonceSource, Start, RX_SA_FIRST_PN};
use super::ledger::Ledger;
use super::record::{self, KeyRecord};
use crate::certs::tls::TlsFiles;
use crate::config::{Config, Link, Role};
use crate::dataplane::{Dataplane, DataplaneEvent, DataplaneOptions, Direction};
use crate::etsi014::{Etsi014Error, KmeClient, KmeClientConfig};
use crate::keyx::wire::NackReason;
use crate::keyx::KeyId;
use crate::lldp::LldpSender;
use crate::macsec::{self, An, Macsec, MacsecLink, PeerRxConfirmation, SaKey, Salt};
use crate::profile::Sak;
use crate::secret::SecretBytes;

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The gateway's config file (docs/sample-config.toml documents every option).
    #[arg(long, env = "QKD_MACSEC_CONFIG")]
    pub config: PathBuf,
}

/// How often kernel SA state and SA counters are polled (PN crossings also arrive as events).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most data plane events handled in one turn of the link loop before timers, KME answers and
/// the status get their turn again.
const EVENT_BATCH: usize = 16;
/// TTL of our LLDPDUs (LLDP's own default is 120 s; the exchange sends more often than that).
const LLDP_TTL: u16 = 120;

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // Privileges first: without them nothing else can be checked meaningfully, and the
    // operator should hear about the unit file before anything about the config.
    let missing = crate::privs::missing_for_run(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
    );
    if !missing.is_empty() {
        bail!(
            "qkd-macsec-agent run lacks the capabilities {}: it needs CAP_NET_ADMIN (MACsec, XDP/TC), CAP_BPF and CAP_PERFMON (eBPF programs and maps; CAP_SYS_ADMIN instead on kernels before 5.8) and CAP_NET_RAW (LLDP); run it as root or from the packaged systemd unit",
            missing.join(", ")
        );
    }
    // Before any key (or the KME client's private key) is read: no core dumps, no swap.
    let memory = crate::privs::protect_key_memory()
        .context("prctl(PR_SET_DUMPABLE, 0): cannot keep key material out of core dumps")?;
    match &memory.locked {
        Ok(()) => {
            tracing::info!("core dumps off, memory locked (no key material in dumps or swap)")
        }
        Err(why) => {
            tracing::warn!(%why, "core dumps off, but memory is not locked: swap may hold key material; give the agent an unlimited RLIMIT_MEMLOCK (LimitMEMLOCK=infinity, which the packaged unit sets, or `ulimit -l unlimited`)")
        }
    }
    crate::privs::check_config_file(&args.config)?;
    let cfg = Config::load(&args.config)?;
    crate::privs::check_startup_files(&args.config, &cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(cfg))
}

async fn run_async(cfg: Config) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (hub, status_requests) = crate::ops::StatusHub::new(cfg.link.len());
    let status_gid = cfg
        .global
        .status_group
        .as_deref()
        .map(crate::ops::socket::resolve_group)
        .transpose()?;
    let status_task =
        spawn_status_socket(cfg.global.status_socket.clone(), status_gid, hub.clone())?;
    let metrics_task = match cfg.global.metrics_address {
        Some(addr) => Some(crate::ops::metrics::serve(addr, hub.clone()).await?.1),
        None => None,
    };
    let alarms = crate::ops::alarm::AlarmSink::start(cfg.global.alarm_hook.clone());
    let (startup_tokens, drop_caps) = crate::privs::drop_when_started(cfg.link.len());
    let mut tasks = Vec::new();
    for ((link, status_rx), startup) in cfg.link.iter().zip(status_requests).zip(startup_tokens) {
        let link = link.clone();
        let global = cfg.global.clone();
        let stop = stop_rx.clone();
        let alarms = alarms.clone();
        tasks.push(tokio::spawn(async move {
            let label = link.label().to_owned();
            // The token goes with the link: ready once it started, dropped if it failed first.
            let r = run_link(link, global, stop, status_rx, startup, alarms).await;
            if let Err(e) = &r {
                tracing::error!(link = %label, error = format!("{e:#}"), "link stopped");
            }
            r.with_context(|| format!("link {label}"))
        }));
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let all = futures_join(tasks);
    tokio::pin!(all);
    // Completes only if dropping privileges after start-up failed: then everything stops.
    let drop_failed = async {
        match drop_caps.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => anyhow::Error::new(e).context("dropping capabilities after start-up"),
            Err(e) => anyhow::anyhow!("the capability drop task failed: {e}"),
        }
    };
    let mut errors = Vec::new();
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); None }
        _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); None }
        e = drop_failed => {
            tracing::error!(error = format!("{e:#}"), "stopping");
            errors.push(e);
            None
        }
        r = &mut all => Some(r),
    };
    let _ = stop_tx.send(true);
    let results = match result {
        Some(r) => r,
        None => all.await,
    };
    status_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Err(e) = std::fs::remove_file(&cfg.global.status_socket) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errors.push(anyhow::Error::new(e).context(format!(
                "removing the status socket {}",
                cfg.global.status_socket.display()
            )));
        }
    }
    // Every link's outcome is reported, not only the first failure.
    for r in results {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(join) => errors.push(anyhow::anyhow!("link task panicked: {join}")),
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => {
            let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow::anyhow!("{n} failures: {}", all.join("; ")))
        }
    }
}

async fn futures_join<T>(
    tasks: Vec<tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// Serves the statuses as one JSON array per connection (schema: docs/status.md), asking every
/// link for its status per connection. Mode 0660, root and `gid` only (crate::ops::socket).
fn spawn_status_socket(
    path: PathBuf,
    gid: Option<u32>,
    hub: crate::ops::StatusHub,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = crate::ops::socket::bind_status_socket(&path, gid)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let hub = hub.clone();
            // Each client on its own task: one that reads slowly holds up nobody.
            tokio::spawn(async move {
                let body = serde_json::to_vec(&hub.collect().await).unwrap_or_default();
                let _ = conn.write_all(&body).await;
                let _ = conn.write_all(b"\n").await;
            });
        }
    }))
}

/// What a spawned KME request reports back.
enum KmeResult {
    Enc(Result<FetchedKey, String>, FetchMeta),
    Dec(KeyId, Result<SecretBytes, NackReason>, FetchMeta),
}

/// For the status and metrics: how long a KME request took and its result class.
struct FetchMeta {
    latency: Duration,
    result: &'static str,
    error: Option<String>,
}

impl FetchMeta {
    fn of<T>(started: Instant, r: &Result<T, Etsi014Error>) -> Self {
        Self {
            latency: started.elapsed(),
            result: r
                .as_ref()
                .map_or_else(crate::ops::status::fetch_result_class, |_| "ok"),
            error: r.as_ref().err().map(ToString::to_string),
        }
    }
}

fn nonce_source() -> NonceSource {
    let rng = ring::rand::SystemRandom::new();
    Box::new(move |buf: &mut [u8]| {
        // SystemRandom reads getrandom(2); a failure there means the kernel has no entropy
        // source at all, and no nonce may be made up.
        ring::rand::SecureRandom::fill(&rng, buf)
            .expect("the kernel's random source (getrandom) failed");
    })
}

/// A fresh, non-zero incarnation from the kernel's random source (see [`Start::incarnation`]).
fn incarnation() -> u64 {
    let mut b = [0u8; 8];
    loop {
        nonce_source()(&mut b);
        let v = u64::from_ne_bytes(b);
        if v != 0 {
            return v;
        }
    }
}

/// A ledger on a tmpfs forgets every used key at reboot; say so once (tests and VMs do that on
/// purpose).
fn warn_if_volatile(dir: &std::path::Path, label: &str) {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type == libc::TMPFS_MAGIC {
        tracing::warn!(link = %label, dir = %dir.display(), "global.ledger_dir is on a tmpfs: the record of used keys is lost at reboot, and a KME that serves a key_ID again could then get a key reused; put it on persistent storage");
    }
}

fn sci(mac: [u8; 6]) -> macsec::Sci {
    // The SCI the kernel gives a MACsec link: the lower device's MAC and port 1
    // (macsec::LinkConfig's default port).
    macsec::Sci::from_mac_port(mac, 1)
}

fn dp_sci(s: macsec::Sci) -> crate::dataplane::Sci {
    crate::dataplane::Sci(s.0)
}

/// The kernel's view of a SAK for our TX SC (`tx`) or the peer's SC.
fn sa_key(sak: Sak, role: Role, tx: bool) -> SaKey {
    let k = SaKey::new(sak.key, macsec::KeyId(sak.kernel_key_id));
    match sak.xpn {
        Some(x) => {
            let (ours, theirs) = x.ssci_tx_rx(role);
            k.with_xpn(if tx { ours } else { theirs }, Salt::new(x.salt))
        }
        None => k,
    }
}

fn nack_of(e: &Etsi014Error) -> NackReason {
    match e {
        Etsi014Error::Unauthorized { .. } => NackReason::Unauthorized,
        e if e.is_transient() => NackReason::KmeUnavailable,
        _ => NackReason::KeyGone,
    }
}

struct LinkIo {
    label: String,
    role: Role,
    peer_sae: String,
    oui: [u8; 3],
    subtype: u8,
    macsec: Macsec,
    mlink: MacsecLink,
    dp: Dataplane,
    lldp: LldpSender,
    kme: KmeClient,
    kme_tx: mpsc::Sender<KmeResult>,
    /// KME requests in flight: owned by the link, so they end with it (dropping the set aborts
    /// them) and never answer a link that is gone.
    kme_tasks: tokio::task::JoinSet<()>,
    xpn: bool,
    /// The peer MAC the data plane's rate limiter gives its own bucket (see `sync_lldp_peer`).
    dp_peer: Option<[u8; 6]>,
    ops: crate::ops::LinkOps,
    /// AN and kernel key identifier of the TX SA we last switched to (for the record).
    tx_kernel_key_id: Option<(u8, [u8; 16])>,
    state_dir: PathBuf,
    /// What the record on disk says (key, AN, since), to write it only when it changes.
    recorded: Option<(crate::watchdog::KeyRef, u8, Instant)>,
    /// The key deadline last written to the data plane.
    deadline: Option<Instant>,
    /// Key_IDs ever installed on this link (see [`super::ledger`]).
    ledger: Ledger,
}

async fn run_link(
    link: Link,
    global: crate::config::Global,
    mut stop: watch::Receiver<bool>,
    mut status_rx: mpsc::Receiver<crate::ops::StatusRequest>,
    mut startup: crate::privs::StartupToken,
    alarms: crate::ops::alarm::AlarmSink,
) -> anyhow::Result<()> {
    let label = link.label().to_owned();
    // Before anything touches the kernel: without its ledger a link could install a key that
    // an earlier life already used.
    // Named after the SAE pair, which names the stream of keys the KMEs serve (the config
    // refuses one pair on two links): renaming the link or its interface keeps its ledger.
    let ledger = Ledger::open(
        &global.ledger_dir,
        &format!("{}--{}", link.local_sae_id, link.peer_sae_id),
    )
    .with_context(|| format!("loading the ledger of used keys of link {label}"))?;
    warn_if_volatile(&global.ledger_dir, &label);
    let mut macsec = Macsec::open().context("opening kernel MACsec")?;
    let lcfg = macsec::LinkConfig::new(&link.macsec_interface, &link.lower_interface, link.cipher);
    let adopted = macsec
        .ensure_link(&lcfg)
        .with_context(|| format!("creating or adopting MACsec link {}", link.macsec_interface))?;
    let adoption = adoption(&link, &global, &adopted.state);
    let adopted_kid = adoption.and_then(|a| {
        let st = &adopted.state;
        st.tx_sa(st.encoding_sa).map(|t| (a.an, t.key_id.0))
    });
    let mlink = adopted.link;
    let first_an = match adoption {
        Some(_) => None,
        None => remove_unvouched(&mut macsec, &mlink, &adopted.state, &label),
    };
    macsec
        .set_up(&mlink)
        .with_context(|| format!("setting {} up", link.macsec_interface))?;
    let opts = DataplaneOptions {
        bpffs_root: global.bpffs_pin_dir.clone(),
        ..DataplaneOptions::default()
    };
    let mut dp = Dataplane::attach(&link.lower_interface, &opts)
        .with_context(|| format!("attaching the data plane to {}", link.lower_interface))?;
    let oui = link.lldp.oui_bytes();
    dp.set_lldp_filter(oui, link.lldp.subtype, true)
        .context("configuring the LLDP filter")?;
    // Flood resistance: XDP rate-limits the TLVs it hands up (docs/dataplane.md), so neither
    // the ring buffer consumer below nor the key exchange's tag checks see more than these
    // rates, whatever arrives on the wire.
    dp.set_lldp_rate_limits(link.lldp.rate_limits())
        .context("configuring the LLDP rate limits")?;
    let adopted_peer = adoption.map(|a| a.peer_mac);
    dp.set_lldp_peer(adopted_peer)
        .context("configuring the LLDP peer bucket")?;
    let mut events = dp.take_events().context("opening data plane events")?;
    let lldp = LldpSender::open(&link.lower_interface)
        .with_context(|| format!("opening the LLDP sender on {}", link.lower_interface))?;
    let mut kcfg = KmeClientConfig::new(
        link.kme.url.clone(),
        TlsFiles {
            ca: link.kme.ca.clone(),
            cert: link.kme.cert.clone(),
            key: link.kme.key.clone(),
        },
    );
    kcfg.request_timeout = link.kme.request_timeout.get();
    let kme = KmeClient::new(&kcfg).context("setting up the KME client")?;
    let (kme_tx, mut kme_rx) = mpsc::channel(16);
    let start = Start {
        initial_seq: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64),
        incarnation: incarnation(),
        local_sci: mlink.sci.0,
        used_keys: ledger.used(),
    };
    let mut core = match (adoption, first_an) {
        (Some(a), _) => {
            LinkCore::new_adopted(link.core_config(), start, nonce_source(), a, Instant::now())
        }
        (None, Some(an)) => LinkCore::new_with_first_an(
            link.core_config(),
            start,
            nonce_source(),
            an.get(),
            Instant::now(),
        ),
        (None, None) => LinkCore::new(link.core_config(), start, nonce_source(), Instant::now()),
    };
    let mut io = LinkIo {
        label: label.clone(),
        role: link.role(),
        peer_sae: link.peer_sae_id.clone(),
        oui,
        subtype: link.lldp.subtype,
        macsec,
        mlink,
        dp,
        lldp,
        kme,
        kme_tx,
        kme_tasks: tokio::task::JoinSet::new(),
        xpn: link.cipher.is_xpn(),
        ops: crate::ops::LinkOps::new(&label, alarms),
        dp_peer: adopted_peer,
        tx_kernel_key_id: adopted_kid,
        state_dir: global.state_dir.clone(),
        recorded: None,
        deadline: None,
        ledger,
    };
    tracing::info!(link = %label, role = ?io.role, lower = %link.lower_interface, macsec = %link.macsec_interface, "link started");
    startup.ready();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    loop {
        // Reap finished KME requests (their results came through `kme_rx`).
        while io.kme_tasks.try_join_next().is_some() {}
        io.execute(&mut core);
        io.sync_lldp_peer(&core);
        io.record(&core);
        io.key_deadline(&core);
        io.ops.observe(&core.snapshot(Instant::now()));
        let wake = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + POLL_INTERVAL);
        tokio::select! {
            _ = stop.changed() => break,
            Some(reply) = status_rx.recv() => {
                let _ = reply.send(io.ops.status(&core.snapshot(Instant::now())));
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                core.handle_timeout(Instant::now());
            }
            r = kme_rx.recv() => match r {
                Some(KmeResult::Enc(r, m)) => {
                    io.ops.fetch_done("enc_keys", m.result, m.latency, m.error);
                    core.handle_enc_key(r, Instant::now())
                }
                Some(KmeResult::Dec(id, r, m)) => {
                    io.ops.fetch_done("dec_keys", m.result, m.latency, m.error);
                    core.handle_dec_key(id, r, Instant::now())
                }
                None => bail!("KME result channel closed"),
            },
            ev = events.next() => {
                // Whatever is already queued goes in one batch (bounded), so that the status and
                // the commands are refreshed once per batch instead of once per TLV: under a
                // flood the per-event work stays the key exchange's own.
                let mut next = Some(ev);
                let mut handled = 0;
                while let Some(ev) = next.take() {
                    match ev {
                        Ok(DataplaneEvent::Lldp(e)) => {
                            if e.info.len() >= 4 {
                                core.handle_tlv(e.payload(), e.src_mac, Instant::now());
                            }
                        }
                        Ok(DataplaneEvent::Pn(c)) => match c.sa.direction {
                            Direction::Tx => core.handle_tx_pn(c.sa.an, c.pn, Instant::now()),
                            // Never armed (see WatchSa); and what XDP counted on an RX SA has
                            // not passed the kernel's ICV check: anyone can send it.
                            Direction::Rx => {
                                tracing::debug!(link = %label, sa = %c.sa, pn = c.pn, "ignoring a PN event of an RX SA");
                            }
                        },
                        Err(e) => {
                            if io.dp.check_interface().is_err() {
                                return Err(e).context("data plane events stopped: the interface is gone");
                            }
                            tracing::warn!(link = %label, error = %e, "bad data plane event");
                        }
                    }
                    handled += 1;
                    if handled < EVENT_BATCH {
                        next = events.try_next();
                    }
                }
                // Let the status socket and the KME requests run between batches: with one
                // worker thread (the agent pinned to one CPU) they would otherwise wait until
                // the event queue is empty, which a flood can postpone for seconds.
                tokio::task::yield_now().await;
            },
            _ = poll.tick() => io.poll_kernel(&mut core),
        }
    }
    tracing::info!(link = %label, stalled = core.is_stalled(), "stopping link");
    // With the stall set, the data plane stays pinned and attached: stopping the agent must not
    // let traffic through a link whose keys ran out.
    io.dp.shutdown(true).context("detaching the data plane")?;
    Ok(())
}

/// What the previous agent left running, if its record vouches for it (see [`record`]).
fn adoption(
    link: &Link,
    global: &crate::config::Global,
    st: &macsec::SecyState,
) -> Option<Adoption> {
    let label = link.label();
    let rec = match KeyRecord::load(&global.state_dir, label) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(link = %label, error = %e, "ignoring the key record");
            return None;
        }
    };
    let tx = st.tx_sa(st.encoding_sa);
    let peer_rx_active = st
        .rx_sc(sci(rec.peer_mac))
        .and_then(|sc| sc.sa(st.encoding_sa))
        .is_some_and(|sa| sa.active);
    match rec.adoption(
        st.encoding_sa.get(),
        tx.is_some_and(|t| t.active),
        tx.map(|t| t.key_id.0).unwrap_or_default(),
        tx.map_or(0, |t| t.next_pn),
        peer_rx_active,
        record::boottime(),
    ) {
        Ok(a) => Some(a),
        Err(why) => {
            // Confidentiality first: a key whose age nobody can vouch for is not used.
            tracing::warn!(link = %label, %why, "not adopting the kernel's running key; the link stalls until re-keyed");
            None
        }
    }
}

/// Without adoption, the SAs a previous agent left are keys nobody can vouch for (their age is
/// unknown, and their bytes died with that agent, so no rollover can build on them): they go at
/// start-up, TX (deactivated first) and RX alike. The link is stalled until re-keyed anyway.
/// Returns the AN the first rollover should try (after the kernel's encoding SA, past every AN
/// that held an SA: the peer may still transmit there), or `None` when there was nothing.
///
/// Merely deactivating the old encoding SA (the watchdog's reaction to it) left it installed on
/// the kernel's encoding AN: a first rollover onto that AN failed on the occupied slot, the
/// retry picked the same AN, and the link never re-keyed (issue 17; vm_agent_restart).
fn remove_unvouched(
    macsec: &mut Macsec,
    mlink: &MacsecLink,
    found: &macsec::SecyState,
    label: &str,
) -> Option<An> {
    if found.is_bare() {
        return None;
    }
    let first_an = found.first_free_an_after(found.encoding_sa);
    match macsec.clear_sas(mlink) {
        Ok(removed) => {
            tracing::warn!(link = %label, %removed, encoding_sa = %found.encoding_sa, first_an = %first_an,
                "removed the SAs the previous agent left (no record vouches for them); the link stays stalled until re-keyed")
        }
        Err(e) => {
            // What stays is harmless to confidentiality: the watchdog switches off any active TX
            // SA it did not install, the data plane stall drops traffic, and a rollover replaces
            // a stale SA in its way (`execute`).
            tracing::error!(link = %label, error = %e, "could not remove every SA the previous agent left")
        }
    }
    Some(first_an)
}

impl LinkIo {
    /// Gives the peer's MAC its own rate-limit bucket in XDP as soon as the core located the
    /// peer (it does so only on an authenticated message, so a forged source MAC cannot claim
    /// the bucket).
    fn sync_lldp_peer(&mut self, core: &LinkCore) {
        let peer = core.peer_mac();
        if peer == self.dp_peer || peer.is_none() {
            return;
        }
        match self.dp.set_lldp_peer(peer) {
            Ok(()) => self.dp_peer = peer,
            Err(e) => {
                tracing::warn!(link = %self.label, error = %e, "cannot give the peer its LLDP rate-limit bucket; its TLVs share the others' bucket")
            }
        }
    }

    /// Keeps the data plane's copy of the active key's expiry in step with the watchdog (see
    /// `DataplaneConfig::key_deadline_ns`). Written after the commands of this round ran, so a
    /// new key's deadline replaces the old one only once the kernel transmits with it; the old
    /// one is later, never earlier, than any moment the old key is still used.
    fn key_deadline(&mut self, core: &LinkCore) {
        let want = core.active_expiry();
        if want == self.deadline {
            return;
        }
        match self.dp.set_key_deadline(want) {
            Ok(()) => self.deadline = want,
            Err(e) => {
                tracing::warn!(link = %self.label, error = %e, "cannot update the data plane's key deadline; a killed agent's key would not expire by itself")
            }
        }
    }

    /// Keeps the record of the active key in step with the core: written when a key becomes
    /// active, removed when none is (stalled), so a restart adopts exactly what is running.
    fn record(&mut self, core: &LinkCore) {
        let now_active = core.active().zip(core.active_since());
        let current = now_active.map(|((k, an), since)| (k, an, since));
        if current == self.recorded {
            return;
        }
        let r = match (current, core.peer_mac(), self.tx_kernel_key_id) {
            (Some((key, an, since)), Some(peer), Some((kan, kid))) if kan == an => {
                let age = Instant::now().saturating_duration_since(since);
                let since_boot = record::boottime().saturating_sub(age);
                KeyRecord::new(&self.label, key, an, kid, peer, since_boot).save(&self.state_dir)
            }
            // Stalled, or a key we cannot describe fully: nothing a restart may adopt.
            _ => KeyRecord::remove(&self.state_dir, &self.label),
        };
        match r {
            Ok(()) => self.recorded = current,
            Err(e) => {
                tracing::warn!(link = %self.label, error = %e, "cannot update the key record; a restart will stall the link until re-keyed")
            }
        }
    }

    /// Carries out every command the core has queued, in order, feeding results back to it.
    fn execute(&mut self, core: &mut LinkCore) {
        while let Some(c) = core.poll_command() {
            let now = Instant::now();
            match c {
                Command::FetchEncKey { size_bytes } => self.fetch_enc_key(size_bytes),
                Command::FetchDecKey { key_id, size_bytes } => {
                    self.fetch_dec_key(key_id, size_bytes)
                }
                Command::SendTlv(p) => {
                    if let Err(e) = self.lldp.send_lldpdu(&p, LLDP_TTL, self.oui, self.subtype) {
                        tracing::warn!(link = %self.label, error = %e, "sending LLDPDU failed");
                    }
                }
                Command::PrepareRx { peer_mac, an, sak } => {
                    let active_an = core.active().map(|(_, a)| a);
                    let r = self.prepare_rx(peer_mac, an, sak, active_an);
                    core.handle_rx_prepared(an, r, now);
                }
                Command::ActivateTx { an, sak } => {
                    let active_an = core.active().map(|(_, a)| a);
                    let r = self.activate_tx(an, sak, active_an);
                    core.handle_tx_activated(an, r.map_err(|e| e.to_string()), now);
                }
                Command::RetireTx { an } => {
                    let r = An::new(an).and_then(|a| self.macsec.retire_tx(&self.mlink, a));
                    if let Err(e) = r {
                        tracing::warn!(link = %self.label, an, error = %e, "retiring TX SA failed");
                    }
                }
                Command::RemoveStalledTx { an } => {
                    let r = An::new(an).and_then(|a| self.macsec.remove_stalled_tx(&self.mlink, a));
                    if let Err(e) = r {
                        tracing::warn!(link = %self.label, an, error = %e, "removing the exhausted TX SA failed");
                    }
                }
                Command::RetireRx { peer_mac, an } => {
                    let r = An::new(an)
                        .and_then(|a| self.macsec.retire_rx(&self.mlink, sci(peer_mac), a));
                    if let Err(e) = r {
                        tracing::warn!(link = %self.label, an, error = %e, "retiring RX SA failed");
                    }
                }
                Command::SetStall(on) => {
                    if let Err(e) = self.dp.set_stall(on) {
                        tracing::error!(link = %self.label, stall = on, error = %e, "cannot set the stall switch");
                    }
                }
                Command::DeactivateTx { an } => {
                    let r = An::new(an)
                        .and_then(|a| self.macsec.set_tx_sa_active(&self.mlink, a, false));
                    match r {
                        Ok(()) | Err(macsec::MacsecError::NotFound { .. }) => {}
                        Err(e) => {
                            tracing::error!(link = %self.label, an, error = %e, "cannot deactivate TX SA")
                        }
                    }
                }
                Command::WatchSa {
                    an,
                    peer_mac,
                    tx_thresholds,
                } => self.watch_sa(an, peer_mac, &tx_thresholds),
                Command::UnwatchSa { an, peer_mac } => {
                    for key in self.sa_keys(an, peer_mac) {
                        let _ = self.dp.unregister_sa(&key);
                    }
                }
                // Logged with a stable identifier (docs/alarms.md), hook run, status updated.
                Command::Report(r) => self.ops.report(&r),
            }
        }
    }

    /// `enc_keys` for one key, answered through `kme_rx`.
    fn fetch_enc_key(&mut self, size_bytes: usize) {
        let kme = self.kme.clone();
        let tx = self.kme_tx.clone();
        let slave = self.peer_sae.clone();
        self.kme_tasks.spawn(async move {
            let started = Instant::now();
            let r = kme.enc_keys(&slave, 1, Some((size_bytes * 8) as u32)).await;
            let meta = FetchMeta::of(started, &r);
            let r = r.map_err(|e| e.to_string()).and_then(|mut keys| {
                let k = keys.pop().ok_or_else(|| "KME returned no key".to_owned())?;
                Ok(FetchedKey {
                    key_id: KeyId(k.id.into_bytes()),
                    key: k.material,
                    slave_deadline: k.slave_deadline,
                })
            });
            let _ = tx.send(KmeResult::Enc(r, meta)).await;
        });
    }

    /// `dec_keys` for `key_id`, answered through `kme_rx`.
    fn fetch_dec_key(&mut self, key_id: KeyId, size_bytes: usize) {
        let kme = self.kme.clone();
        let tx = self.kme_tx.clone();
        let master = self.peer_sae.clone();
        self.kme_tasks.spawn(async move {
            let started = Instant::now();
            let r = kme
                .dec_key(
                    &master,
                    uuid::Uuid::from_bytes(key_id.0),
                    Some((size_bytes * 8) as u32),
                )
                .await;
            let meta = FetchMeta::of(started, &r);
            let r = r.map(|k| k.material).map_err(|e| {
                tracing::warn!(%key_id, error = %e, "dec_keys failed");
                nack_of(&e)
            });
            let _ = tx.send(KmeResult::Dec(key_id, r, meta)).await;
        });
    }

    /// The peer's RX SA at `an`. Every key's first SA is this one (master and slave both
    /// prepare RX before anything transmits with it), so the key goes on the ledger first, or
    /// nothing is installed.
    fn prepare_rx(
        &mut self,
        peer_mac: [u8; 6],
        an: u8,
        sak: Sak,
        active_an: Option<u8>,
    ) -> Result<(), String> {
        if let Err(e) = self.ledger.record(sak.key_ref.key_id) {
            tracing::error!(link = %self.label, error = %e, "cannot record the key as used; not installing it");
            return Err(format!("recording the key in the ledger: {e}"));
        }
        let key = sa_key(sak, self.role, false);
        let r = An::new(an).and_then(|a| {
            let peer = sci(peer_mac);
            match self
                .macsec
                .prepare_rx(&self.mlink, peer, a, &key, RX_SA_FIRST_PN)
            {
                // Left over from a rollover that failed half way (or from before a restart).
                // Never the AN we receive on now, so it carries nothing.
                Err(macsec::MacsecError::SaOccupied { .. }) if active_an != Some(an) => {
                    tracing::info!(link = %self.label, an, "replacing a stale RX SA");
                    self.macsec.retire_rx(&self.mlink, peer, a)?;
                    self.macsec
                        .prepare_rx(&self.mlink, peer, a, &key, RX_SA_FIRST_PN)
                }
                r => r,
            }
        });
        r.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Our TX SA at `an`, and the switch of the encoding SA to it.
    fn activate_tx(
        &mut self,
        an: u8,
        sak: Sak,
        active_an: Option<u8>,
    ) -> Result<(), macsec::MacsecError> {
        let kid = macsec::KeyId(sak.kernel_key_id);
        self.tx_kernel_key_id = Some((an, sak.kernel_key_id));
        let key = sa_key(sak, self.role, true);
        let a = An::new(an)?;
        let confirmed = PeerRxConfirmation::from_peer(a, kid);
        match self
            .macsec
            .activate_tx(&mut self.mlink, a, &key, &confirmed)
        {
            // A stale TX SA on an AN that is not our active key's: remove, then retry.
            Err(macsec::MacsecError::SaOccupied { .. }) if active_an != Some(an) => {
                if a == self.mlink.encoding_sa {
                    // Still the kernel's encoding SA (left by a previous agent, or set by
                    // someone else): `retire_tx` refuses that one, and a retry would meet it
                    // again. It is no key of ours: remove it as an exhausted one; the switch
                    // below follows at once.
                    tracing::warn!(link = %self.label, an, "replacing a stale TX SA that is still the encoding SA");
                    self.macsec.remove_stalled_tx(&self.mlink, a)?;
                } else {
                    tracing::info!(link = %self.label, an, "replacing a stale TX SA");
                    self.macsec.retire_tx(&self.mlink, a)?;
                }
                self.macsec
                    .activate_tx(&mut self.mlink, a, &key, &confirmed)
                    .map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// Counts our TX SA and the peer's RX SA on `an`. Thresholds on our TX SA only: the RX SA
    /// is counted for the statistics and explicitly disarmed (registering keeps what a pinned
    /// map holds, e.g. thresholds an older agent armed): its frames are unauthenticated in XDP.
    fn watch_sa(&mut self, an: u8, peer_mac: [u8; 6], tx_thresholds: &[u64]) {
        let [tx, rx] = self.sa_keys(an, peer_mac);
        for (key, thresholds) in [(tx, tx_thresholds), (rx, &[][..])] {
            let r = self
                .dp
                .register_sa(key, self.xpn, 0)
                .and_then(|_| self.dp.set_thresholds(&key, thresholds));
            if let Err(e) = r {
                tracing::error!(link = %self.label, sa = %key, error = %e, "cannot watch SA");
            }
        }
    }

    fn sa_keys(&self, an: u8, peer_mac: [u8; 6]) -> [crate::dataplane::SaKey; 2] {
        [
            crate::dataplane::SaKey {
                direction: Direction::Tx,
                sci: dp_sci(self.mlink.sci),
                an,
            },
            crate::dataplane::SaKey {
                direction: Direction::Rx,
                sci: dp_sci(sci(peer_mac)),
                an,
            },
        ]
    }

    /// Into the core, once per poll: the kernel's TX SA state and the peer's RX SA on the
    /// active AN as the kernel validated it, and our own TX frames as TC counted them. The data
    /// plane's RX counters are statistics only (status and metrics): XDP counts a frame before
    /// the kernel checks its ICV, so they never reach the watchdog or the retiring of old SAs.
    fn poll_kernel(&mut self, core: &mut LinkCore) {
        let now = Instant::now();
        match self.macsec.state(&self.mlink) {
            Ok(st) => {
                // Only the encoding SA transmits; an old SA still active during its grace
                // period sends nothing and is no cause for alarm.
                if let Some(sa) = st.tx_sa(st.encoding_sa) {
                    core.handle_sa_state(sa.an.get(), sa.active, sa.next_pn, now);
                }
                if let (Some((_, an)), Some(peer)) = (core.active(), core.peer_mac()) {
                    let rx = An::new(an)
                        .ok()
                        .and_then(|a| st.rx_sc(sci(peer))?.sa(a).map(|sa| sa.next_pn));
                    if let Some(next_pn) = rx {
                        core.handle_rx_validated(an, next_pn, now);
                    }
                }
            }
            Err(e) => tracing::warn!(link = %self.label, error = %e, "reading MACsec state failed"),
        }
        if let (Some((_, an)), Some(peer)) = (core.active(), core.peer_mac()) {
            let [tx, _] = self.sa_keys(an, peer);
            if let Ok(c) = self.dp.sa_counters(&tx) {
                if c.highest_pn > 0 {
                    core.handle_tx_pn(an, c.highest_pn, now);
                }
            }
        }
        if self.xpn {
            let _ = self.dp.sync_xpn_upper();
        }
        self.ops.read_dataplane(&self.dp);
        self.execute(core);
    }
}
