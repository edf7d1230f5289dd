//! `bench-macsec`: rollover cost through this layer against the same rollover done by spawning
//! `ip macsec`, under a bidirectional sequence-numbered frame stream that counts every loss.
//!
//! Runs as root on a kernel with MACsec (the test VM). Topology, all in the current namespace:
//! veth pair qbench0/qbench1, MACsec qbms0 over qbench0 and qbms1 over qbench1. Frames are raw
//! Ethernet frames (ethertype 0x88B5, IEEE local experimental) sent with AF_PACKET on one MACsec
//! device and received on the other, so they always cross the encrypted veth wire, whatever the
//! routing table says.
//!
//! Prints `bench-result: <key> <value>` lines on stdout (logs go to stderr); `cargo xtask bench
//! macsec` runs it in the VM and merges them into target/bench/results.json.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{An, Cipher, KeyId, LinkConfig, Macsec, MacsecLink, PeerRxConfirmation, SaKey};
use crate::secret::SecretBytes;

const ETHERTYPE: u16 = 0x88B5;
const MAGIC: &[u8; 4] = b"QKDB";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Rollovers through this layer (each rolls both directions).
    pub rollovers: usize,
    /// Rollovers through `ip macsec` (the baseline; process spawns are slow under TCG).
    pub cli_rollovers: usize,
    /// Grace period between switching TX and retiring the old SA.
    pub grace: Duration,
    /// Gap between two frames of one direction.
    pub frame_gap: Duration,
    pub cipher: Cipher,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            rollovers: 200,
            cli_rollovers: 20,
            grace: Duration::from_millis(100),
            frame_gap: Duration::from_micros(500),
            cipher: Cipher::GcmAes256,
        }
    }
}

pub(crate) fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the pointer and length describe the unfilled tail of `v`.
        let r = unsafe { libc::getrandom(v[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("getrandom");
        }
        filled += r as usize;
    }
    Ok(v)
}

fn random_key(cipher: Cipher, ssci: u32) -> anyhow::Result<SaKey> {
    let key = SecretBytes::new(random_bytes(cipher.key_len())?);
    let id: [u8; 16] = random_bytes(16)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("key id"))?;
    let mut k = SaKey::new(key, KeyId(id));
    if cipher.is_xpn() {
        let salt = super::Salt::from_slice(&random_bytes(12)?)?;
        k = k.with_xpn(ssci, salt);
    }
    Ok(k)
}

/// One direction of a sequence-numbered raw-frame stream.
struct Stream {
    sent: Arc<AtomicU64>,
    received: Arc<std::sync::Mutex<HashSet<u64>>>,
}

fn packet_socket(ifindex: u32) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETHERTYPE.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("bind AF_PACKET");
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    let buf: libc::c_int = 8 << 20;
    // SAFETY: valid fd and option values of the sizes passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&buf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    Ok(owned)
}

/// Starts sender (on `from`) and receiver (on `to`) threads for one direction, tagged `dir`.
fn start_stream(
    from: &MacsecLink,
    to: &MacsecLink,
    dir: u8,
    gap: Duration,
    stop_tx: Arc<AtomicBool>,
    stop_rx: Arc<AtomicBool>,
    handles: &mut Vec<std::thread::JoinHandle<()>>,
) -> anyhow::Result<Stream> {
    use std::os::fd::AsRawFd;
    let tx = packet_socket(from.ifindex)?;
    let rx = packet_socket(to.ifindex)?;
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&to.mac);
    frame.extend_from_slice(&from.mac);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(MAGIC);
    frame.push(dir);
    let seq_at = frame.len();
    frame.extend_from_slice(&[0u8; 8]);
    frame.resize(60, 0);
    {
        let sent = sent.clone();
        handles.push(std::thread::spawn(move || {
            pin_to_cpu0();
            let mut seq = 0u64;
            while !stop_tx.load(Ordering::Relaxed) {
                frame[seq_at..seq_at + 8].copy_from_slice(&seq.to_be_bytes());
                // SAFETY: frame is a live buffer of the given length; tx is a bound socket.
                let n =
                    unsafe { libc::send(tx.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if n == frame.len() as isize {
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                }
                std::thread::sleep(gap);
            }
        }));
    }
    {
        let received = received.clone();
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                // SAFETY: buf is writable for its full length.
                let n =
                    unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    if stop_rx.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                let n = n as usize;
                // Outgoing frames of the other direction also show up on a packet socket bound
                // to this device: only count this direction's tag.
                if n >= seq_at + 8 && &buf[14..18] == MAGIC && buf[18] == dir {
                    let seq =
                        u64::from_be_bytes(buf[seq_at..seq_at + 8].try_into().unwrap_or([0; 8]));
                    if let Ok(mut set) = received.lock() {
                        set.insert(seq);
                    }
                }
            }
        }));
    }
    Ok(Stream { sent, received })
}

/// Keeps the calling thread on CPU 0 (senders and the rollover driver). veth hands frames over
/// through the sending CPU's backlog, so a sender migrating between CPUs reorders its own frames
/// and replay protection (window 0) drops them as late. And Linux 6.1 reads `encoding_sa` twice
/// per frame (SA lookup in macsec_encrypt, AN in macsec_fill_sectag): a frame encrypted on
/// another CPU during the switch gets the new AN with the old key and is dropped by the peer as
/// not valid. On one CPU neither can happen (transmit runs with bottom halves off), so every
/// loss counted here is the rollover's. See docs/macsec.md.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::warn!(err = %std::io::Error::last_os_error(), "cannot pin to CPU 0; loss counts may include reordering");
    }
}

struct Topology {
    a: MacsecLink,
    b: MacsecLink,
}

fn setup(m: &mut Macsec, cipher: Cipher) -> anyhow::Result<Topology> {
    for n in ["qbench0", "qbench1"] {
        m.delete_any_link(n)?;
    }
    m.create_veth_pair("qbench0", "qbench1")?;
    m.set_link_up_by_name("qbench0")?;
    m.set_link_up_by_name("qbench1")?;
    let a = m.create_link(&LinkConfig::new("qbms0", "qbench0", cipher))?;
    let b = m.create_link(&LinkConfig::new("qbms1", "qbench1", cipher))?;
    let an0 = An::new(0)?;
    let (ssci_a, ssci_b) = (1, 2);
    let ka = random_key(cipher, ssci_a)?;
    let kb = random_key(cipher, ssci_b)?;
    m.prepare_rx(&b, a.sci, an0, &ka, 1)?;
    m.add_tx_sa(&a, an0, 1, &ka, true)?;
    m.prepare_rx(&a, b.sci, an0, &kb, 1)?;
    m.add_tx_sa(&b, an0, 1, &kb, true)?;
    m.set_up(&a)?;
    m.set_up(&b)?;
    Ok(Topology { a, b })
}

fn ip(args: &[String]) -> anyhow::Result<()> {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("iproute2 `ip` not found: the baseline needs it")?;
    let out = std::process::Command::new(ip)
        .args(args)
        .output()
        .with_context(|| format!("spawn ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.first().map(String::as_str).unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One direction of one rollover through `ip`: the same 7 steps as through this layer.
fn cli_rollover(
    tx: &MacsecLink,
    rx: &MacsecLink,
    old: An,
    new: An,
    key: &SaKey,
) -> anyhow::Result<()> {
    let s = |v: &str| v.to_owned();
    let sa_args = |dev: &str, dir: &[String]| -> Vec<String> {
        let mut v = vec![s("macsec"), s("add"), s(dev)];
        v.extend_from_slice(dir);
        // iproute2 6.1 sends `pn` as a u32, which an XPN SecY rejects; XPN takes `xpn`.
        let pn_kw = if key.xpn.is_some() { "xpn" } else { "pn" };
        v.extend([s("sa"), new.to_string(), s(pn_kw), s("1"), s("on")]);
        if let Some(x) = &key.xpn {
            v.extend([
                s("ssci"),
                // iproute2 reads the SSCI as hex.
                format!("{:x}", x.ssci),
                s("salt"),
                hex(x.salt.expose()),
            ]);
        }
        // The baseline is iproute2's interface as operators use it: the key on the command
        // line. Throw-away random keys, inside the benchmark VM only.
        v.extend([s("key"), key.key_id.to_hex(), hex(key.key.expose())]);
        v
    };
    let sci = tx.sci.to_string();
    ip(&sa_args(&rx.name, &[s("rx"), s("sci"), sci.clone()]))?;
    ip(&sa_args(&tx.name, &[s("tx")]))?;
    ip(&[
        s("link"),
        s("set"),
        tx.name.clone(),
        s("type"),
        s("macsec"),
        s("encodingsa"),
        new.to_string(),
    ])?;
    ip(&[
        s("macsec"),
        s("set"),
        tx.name.clone(),
        s("tx"),
        s("sa"),
        old.to_string(),
        s("off"),
    ])?;
    ip(&[
        s("macsec"),
        s("del"),
        tx.name.clone(),
        s("tx"),
        s("sa"),
        old.to_string(),
    ])?;
    ip(&[
        s("macsec"),
        s("set"),
        rx.name.clone(),
        s("rx"),
        s("sci"),
        sci.clone(),
        s("sa"),
        old.to_string(),
        s("off"),
    ])?;
    ip(&[
        s("macsec"),
        s("del"),
        rx.name.clone(),
        s("rx"),
        s("sci"),
        sci,
        s("sa"),
        old.to_string(),
    ])?;
    Ok(())
}

fn median_ms(v: &mut [Duration]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

/// (key, value) pairs, printed as `bench-result: <key> <value>` lines for `cargo xtask bench`.
pub type BenchResult = Vec<(&'static str, f64)>;

/// Runs the benchmark and returns its numbers.
pub fn run_bench(opts: &BenchOptions) -> anyhow::Result<BenchResult> {
    pin_to_cpu0();
    let mut m = Macsec::open()?;
    let mut topo = setup(&mut m, opts.cipher)?;
    // Let the links settle (IPv6 DAD, carrier) before the stream starts.
    std::thread::sleep(Duration::from_millis(200));

    let stop_tx = Arc::new(AtomicBool::new(false));
    let stop_rx = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let ab = start_stream(
        &topo.a,
        &topo.b,
        1,
        opts.frame_gap,
        stop_tx.clone(),
        stop_rx.clone(),
        &mut handles,
    )?;
    let ba = start_stream(
        &topo.b,
        &topo.a,
        2,
        opts.frame_gap,
        stop_tx.clone(),
        stop_rx.clone(),
        &mut handles,
    )?;
    std::thread::sleep(Duration::from_millis(100));

    let mut lib_times = Vec::with_capacity(opts.rollovers * 2);
    let mut ssci = 10u32;
    for i in 0..opts.rollovers {
        let old_a = topo.a.encoding_sa;
        let old_b = topo.b.encoding_sa;
        let (new_a, new_b) = (old_a.next(), old_b.next());
        ssci += 2;
        let ka = random_key(opts.cipher, ssci)?;
        let kb = random_key(opts.cipher, ssci + 1)?;

        // Make: both directions, each in contract order (peer RX, then local TX + switch).
        let t = Instant::now();
        let pa = m.prepare_rx(&topo.b, topo.a.sci, new_a, &ka, 1)?;
        m.activate_tx(&mut topo.a, new_a, &ka, &PeerRxConfirmation::from(pa))?;
        let make_a = t.elapsed();
        let t = Instant::now();
        let pb = m.prepare_rx(&topo.a, topo.b.sci, new_b, &kb, 1)?;
        m.activate_tx(&mut topo.b, new_b, &kb, &PeerRxConfirmation::from(pb))?;
        let make_b = t.elapsed();

        std::thread::sleep(opts.grace);

        // Break: retire the old SAs on both ends.
        let t = Instant::now();
        m.retire_tx(&topo.a, old_a)?;
        m.retire_rx(&topo.b, topo.a.sci, old_a)?;
        lib_times.push(make_a + t.elapsed());
        let t = Instant::now();
        m.retire_tx(&topo.b, old_b)?;
        m.retire_rx(&topo.a, topo.b.sci, old_b)?;
        lib_times.push(make_b + t.elapsed());
        if i % 50 == 0 {
            tracing::info!(rollover = i, "bench-macsec progress");
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    stop_tx.store(true, Ordering::Relaxed);
    // Frames still queued in the kernel reach the receivers well within this.
    std::thread::sleep(Duration::from_millis(500));
    stop_rx.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let count = |s: &Stream| -> (u64, u64) {
        let sent = s.sent.load(Ordering::Relaxed);
        let got = s.received.lock().map(|r| r.len() as u64).unwrap_or(0);
        (sent, got)
    };
    let (sent_ab, got_ab) = count(&ab);
    let (sent_ba, got_ba) = count(&ba);
    if got_ab == 0 || got_ba == 0 {
        bail!("no frames arrived (A->B {got_ab}/{sent_ab}, B->A {got_ba}/{sent_ba}): the MACsec path is broken, the loss count would be meaningless");
    }
    let lost = (sent_ab - got_ab.min(sent_ab)) + (sent_ba - got_ba.min(sent_ba));

    // The baseline runs without the stream: spawned `ip` processes inherit the CPU pinning and
    // would otherwise compete with the senders, inflating the baseline. This favours `ip`.
    let mut cli_times = Vec::with_capacity(opts.cli_rollovers);
    for _ in 0..opts.cli_rollovers {
        let old = topo.a.encoding_sa;
        let new = old.next();
        ssci += 2;
        let k = random_key(opts.cipher, ssci)?;
        let t = Instant::now();
        cli_rollover(&topo.a, &topo.b, old, new, &k)?;
        cli_times.push(t.elapsed());
        topo.a.encoding_sa = new;
        std::thread::sleep(opts.grace);
    }

    let lib_p50 = median_ms(&mut lib_times);
    let cli_p50 = median_ms(&mut cli_times);
    let state_a = m.state(&topo.a)?;
    m.delete_any_link("qbench0")?;

    let out: BenchResult = vec![
        ("macsec.rollovers", (opts.rollovers * 2) as f64),
        ("macsec.rollover_lost", lost as f64),
        ("macsec.rollover_frames_sent", (sent_ab + sent_ba) as f64),
        ("macsec.rollover_ms_p50", lib_p50),
        ("macsec.ip_cli_rollovers", opts.cli_rollovers as f64),
        ("macsec.ip_cli_rollover_ms_p50", cli_p50),
        ("macsec.ip_cli_over_lib_ratio", cli_p50 / lib_p50),
        (
            "macsec.final_encoding_sa",
            f64::from(state_a.encoding_sa.get()),
        ),
    ];
    Ok(out)
}
