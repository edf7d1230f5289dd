//! Two gateways with real agents, written once for `cargo xtask demo` and the end-to-end VM tests
//! (`tests/tests/vm_agent_*.rs`).
//!
//! Topology (every name is per testbed, so several can coexist):
//!
//! ```text
//!   ns kme: kme-sim (kme-a on 10.201.1.1:8443, kme-b on 10.201.2.1:8443, control 127.0.0.1:8445)
//!      ka0 10.201.1.1/30 ── kme0 10.201.1.2/30 (ns gw-a)      kb0 10.201.2.1/30 ── kme0 10.201.2.2/30 (ns gw-b)
//!   ns gw-a: agent A, wan0 ─────── veth (or a bridge in ns wire) ─────── wan0 :ns gw-b, agent B
//!            macsec0 10.200.0.1/24 (created by the agent)              macsec0 10.200.0.2/24
//! ```
//!
//! Why a third namespace for the KMEs: the simulator is one process serving both KMEs, and each
//! KME must be reachable only from its own gateway. A /30 veth per gateway into the KME namespace
//! gives exactly that: gw-a has no route to 10.201.2.0/30 and the KME namespace does not forward
//! (a fresh namespace starts with `ip_forward` = 0). The control endpoint stays on the KME
//! namespace's loopback, unreachable from either gateway.
//!
//! With [`Wire::Bridged`] the gateways are joined through a bridge in a `wire` namespace that also
//! has a port into an `eve` namespace (forged/replayed LLDP). The bridge forwards LLDP (group
//! address 01:80:c2:00:00:0e) only because `group_fwd_mask` says so; a real wire would carry it.
//!
//! Everything the testbed reports is observed from outside the agents: the kernel's MACsec state
//! dump in each namespace ([`qkd_macsec_agent::macsec`]), AF_PACKET captures of what each gateway
//! puts on the wire, and UDP sequence streams over the MACsec link that count every frame.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qkd_macsec_agent::config::Config;
use qkd_macsec_agent::macsec::{Macsec, SecyState};

use crate::{add_ipv4, agent_bin, ip_bin, NetNs};

/// Which gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::A, Side::B];
    pub fn label(self) -> &'static str {
        match self {
            Side::A => "gw-a",
            Side::B => "gw-b",
        }
    }
    fn idx(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    /// Address of the gateway on the MACsec link.
    pub fn macsec_ip(self) -> &'static str {
        match self {
            Side::A => "10.200.0.1",
            Side::B => "10.200.0.2",
        }
    }
}

/// How long the agents get to secure a new link in the tests. Generous because in the TCG VM on
/// a loaded 2-core machine loading and verifying the eBPF programs alone took about 50 s; this is
/// a hang detector, not a speed target (that is `agent.start_to_secure_s` in the benchmarks).
pub const SECURE_TIMEOUT: Duration = Duration::from_secs(240);

/// The lower (protected) interface in each gateway namespace.
pub const LOWER_IF: &str = "wan0";
/// The MACsec interface the agents create.
pub const MACSEC_IF: &str = "macsec0";
/// Control endpoint of the simulator, on the KME namespace's loopback.
pub const KME_CONTROL: &str = "127.0.0.1:8445";

/// How the two gateways are wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// One veth pair.
    Direct,
    /// Through a bridge in a `wire` namespace with a third port into an `eve` namespace.
    Bridged,
}

/// The agent-facing settings of one link, written into both gateways' configs.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    pub profile: &'static str,
    pub cipher: &'static str,
    pub key_request_interval: String,
    pub akl_max_age: String,
    pub akl_rollover_at: f64,
    pub akl_warn_at: f64,
    pub akl_max_pn: Option<u64>,
    pub sak_buffer: u32,
    pub cak_lifetime: String,
    pub cak_tolerated_failures: u32,
    pub availability_window: String,
    pub request_timeout: String,
    pub hello_interval: String,
    pub retransmit_initial: String,
    pub retransmit_max: String,
}

impl LinkSpec {
    /// Short lifetimes so that rollovers happen every few seconds: a SAK lives 4 s and is rolled
    /// at 3 s. `cak`: a new CAK every 10 s; `sak`: a new QKD key every 2 s, 4 held ahead.
    pub fn fast(profile: &'static str) -> LinkSpec {
        LinkSpec {
            profile,
            cipher: "gcm-aes-256",
            key_request_interval: if profile == "sak" { "2s" } else { "10s" }.into(),
            akl_max_age: "4s".into(),
            akl_rollover_at: 0.75,
            akl_warn_at: 0.9,
            akl_max_pn: None,
            sak_buffer: 4,
            cak_lifetime: "60s".into(),
            cak_tolerated_failures: 3,
            availability_window: "10s".into(),
            request_timeout: "2s".into(),
            hello_interval: "1s".into(),
            retransmit_initial: "100ms".into(),
            retransmit_max: "2s".into(),
        }
    }
}

/// The paths one gateway's agent uses.
#[derive(Clone, Debug)]
pub struct GatewayFiles {
    pub config: PathBuf,
    pub log: PathBuf,
    pub status_socket: PathBuf,
    pub bpffs_pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub ledger_dir: PathBuf,
}

/// Renders one gateway's config TOML. Every value comes from `spec`; the text is checked with
/// the agent's own loader before it is written (see [`Testbed::write_configs`]).
pub fn render_config(side: Side, spec: &LinkSpec, certs: &Path, files: &GatewayFiles) -> String {
    let (local, peer, kme_ip) = match side {
        Side::A => ("sae-a", "sae-b", "10.201.1.1"),
        Side::B => ("sae-b", "sae-a", "10.201.2.1"),
    };
    let mut s = String::new();
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let _ = writeln!(
        s,
        "# generated by qkd-macsec-tests::testbed for {}",
        side.label()
    );
    let _ = writeln!(s, "[global]");
    let _ = writeln!(s, "bpffs_pin_dir = {}", q(&files.bpffs_pin_dir));
    let _ = writeln!(s, "status_socket = {}", q(&files.status_socket));
    let _ = writeln!(s, "state_dir = {}", q(&files.state_dir));
    let _ = writeln!(s, "ledger_dir = {}", q(&files.ledger_dir));
    let _ = writeln!(s, "log_level = \"info\"\n");
    let _ = writeln!(s, "[[link]]");
    let _ = writeln!(s, "name = \"{}-link\"", side.label());
    let _ = writeln!(s, "lower_interface = \"{LOWER_IF}\"");
    let _ = writeln!(s, "macsec_interface = \"{MACSEC_IF}\"");
    let _ = writeln!(s, "cipher = \"{}\"", spec.cipher);
    let _ = writeln!(s, "local_sae_id = \"{local}\"");
    let _ = writeln!(s, "peer_sae_id = \"{peer}\"");
    let _ = writeln!(s, "role = \"auto\"");
    let _ = writeln!(s, "profile = \"{}\"", spec.profile);
    let _ = writeln!(
        s,
        "key_request_interval = \"{}\"\n",
        spec.key_request_interval
    );
    let _ = writeln!(s, "[link.kme]");
    let _ = writeln!(s, "url = \"https://{kme_ip}:8443\"");
    let _ = writeln!(s, "ca = {}", q(&certs.join("ca.pem")));
    let _ = writeln!(s, "cert = {}", q(&certs.join(format!("{local}.pem"))));
    let _ = writeln!(s, "key = {}", q(&certs.join(format!("{local}.key"))));
    let _ = writeln!(s, "availability_window = \"{}\"", spec.availability_window);
    let _ = writeln!(s, "request_timeout = \"{}\"\n", spec.request_timeout);
    let _ = writeln!(s, "[link.akl]");
    let _ = writeln!(s, "max_age = \"{}\"", spec.akl_max_age);
    if let Some(pn) = spec.akl_max_pn {
        let _ = writeln!(s, "max_pn = {pn}");
    }
    let _ = writeln!(s, "rollover_at = {:?}", spec.akl_rollover_at);
    let _ = writeln!(s, "warn_at = {:?}\n", spec.akl_warn_at);
    if spec.profile == "sak" {
        let _ = writeln!(s, "[link.sak]");
        let _ = writeln!(s, "buffer = {}\n", spec.sak_buffer);
    } else {
        let _ = writeln!(s, "[link.cak]");
        let _ = writeln!(s, "lifetime = \"{}\"", spec.cak_lifetime);
        let _ = writeln!(s, "tolerated_failures = {}\n", spec.cak_tolerated_failures);
    }
    let _ = writeln!(s, "[link.keyx]");
    let _ = writeln!(s, "retransmit_initial = \"{}\"", spec.retransmit_initial);
    let _ = writeln!(s, "retransmit_max = \"{}\"", spec.retransmit_max);
    let _ = writeln!(s, "hello_interval = \"{}\"", spec.hello_interval);
    s
}

/// Options of a testbed.
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    pub wire: Wire,
    /// Extra `kme-sim` arguments (e.g. `--key-rate 5`).
    pub kme_args: Vec<String>,
    /// `QKD_MACSEC_LOG` for the agents.
    pub agent_log: String,
    /// Links between the gateways (each agent serves all of them). Link 0 is `wan0`/`macsec0`,
    /// observed by the monitor and capture; link i > 0 is `wan<i>`/`macsec<i>` over its own
    /// veth pair (Wire::Direct only), addressed 10.200.<i>.1 and .2.
    pub links: usize,
    /// Run the agents and the stream senders on CPU 0 ([`crate::pin_to_cpu0`] says why): the
    /// loss a test counts is then the agents' alone, not the 6.1 kernel's SA-switch race.
    pub one_cpu: bool,
    /// Each agent serves Prometheus metrics on this address in its own namespace (loopback is
    /// brought up there); see [`Testbed::scrape_metrics`].
    pub metrics_address: Option<String>,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        Self {
            wire: Wire::Direct,
            kme_args: Vec::new(),
            agent_log: "info".into(),
            links: 1,
            one_cpu: true,
            metrics_address: None,
        }
    }
}

/// The SAE IDs of `links` links: link 0 is sae-a/sae-b, link i > 0 sae-a<i>/sae-b<i> (one SAE
/// pair per link: the config refuses a pair on two links, key_IDs would be ambiguous).
pub fn sae_ids(links: usize) -> Vec<String> {
    let mut v = vec!["sae-a".to_owned(), "sae-b".to_owned()];
    for i in 1..links {
        v.push(format!("sae-a{i}"));
        v.push(format!("sae-b{i}"));
    }
    v
}

/// Appends the `[[link]]` tables of links 1..n (link 0 is [`render_config`]'s own): the same
/// spec on `wan<i>`/`macsec<i>` with the SAE pair sae-a<i>/sae-b<i>.
pub fn render_extra_links(text: &str, links: usize) -> String {
    let start = text
        .find("[[link]]")
        .expect("a rendered config has a [[link]]");
    let block = &text[start..];
    let mut out = text.to_owned();
    for i in 1..links {
        let b = block
            .replacen("-link\"", &format!("-link{i}\""), 1)
            .replacen(&format!("\"{LOWER_IF}\""), &format!("\"wan{i}\""), 1)
            .replacen(&format!("\"{MACSEC_IF}\""), &format!("\"macsec{i}\""), 1)
            .replace("sae-a\"", &format!("sae-a{i}\""))
            .replace("sae-b\"", &format!("sae-b{i}\""))
            .replace("sae-a.", &format!("sae-a{i}."))
            .replace("sae-b.", &format!("sae-b{i}."));
        out.push('\n');
        out.push_str(&b);
    }
    out
}

static BED_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running agent process.
pub struct AgentProc {
    pub child: Child,
    pub started: Instant,
}

/// Namespaces, certificates, the KME simulator and (once started) the two agents. Dropping it
/// stops every process it started (agents first) and deletes the namespaces; teardown carries on
/// past errors and reports them on stderr.
pub struct Testbed {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub gw: [Arc<NetNs>; 2],
    pub kme_ns: Arc<NetNs>,
    pub wire_ns: Option<NetNs>,
    pub eve: Option<Arc<NetNs>>,
    pub files: [GatewayFiles; 2],
    agents: [Option<AgentProc>; 2],
    kme: Option<Child>,
    keep_dir: bool,
    /// Links between the gateways ([`TestbedOptions::links`]).
    pub links: usize,
    /// [`TestbedOptions::one_cpu`].
    pub one_cpu: bool,
    /// [`TestbedOptions::metrics_address`].
    pub metrics_address: Option<String>,
}

impl Testbed {
    /// Builds the topology, creates certificates and starts the KME simulator. Panics with what
    /// went wrong (these are test fixtures; the demo turns panics into its failure summary).
    pub fn new(prefix: &str, opts: &TestbedOptions) -> Testbed {
        crate::require_root("network namespaces and the agents");
        let n = BED_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qkd-{prefix}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let gw_a = Arc::new(NetNs::new(&format!("{prefix}-gwa")));
        let gw_b = Arc::new(NetNs::new(&format!("{prefix}-gwb")));
        let kme_ns = Arc::new(NetNs::new(&format!("{prefix}-kme")));
        for (ns, lower) in [(&gw_a, LOWER_IF), (&gw_b, LOWER_IF)] {
            // Before any interface exists: no IPv6 autoconfiguration chatter (router and
            // neighbour solicitations) in plaintext on the lower link, which would otherwise be
            // counted as unprotected frames by the wire capture.
            sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1");
            sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1");
            let _ = lower;
        }
        let (wire_ns, eve) = match opts.wire {
            Wire::Direct => {
                crate::veth_pair(&gw_a, LOWER_IF, &gw_b, LOWER_IF);
                (None, None)
            }
            Wire::Bridged => {
                let wire = NetNs::new(&format!("{prefix}-wire"));
                let eve = Arc::new(NetNs::new(&format!("{prefix}-eve")));
                sysctl(&eve, "net.ipv6.conf.default.disable_ipv6", "1");
                sysctl(&eve, "net.ipv6.conf.all.disable_ipv6", "1");
                sysctl(&wire, "net.ipv6.conf.default.disable_ipv6", "1");
                sysctl(&wire, "net.ipv6.conf.all.disable_ipv6", "1");
                wire.ip(&["link", "add", "br0", "type", "bridge"]);
                // Bit 14 = 01:80:c2:00:00:0e (LLDP), which a bridge drops by default.
                wire.ip(&[
                    "link",
                    "set",
                    "br0",
                    "type",
                    "bridge",
                    "group_fwd_mask",
                    "16384",
                ]);
                wire.ip(&["link", "set", "br0", "up"]);
                crate::veth_pair(&gw_a, LOWER_IF, &wire, "pa");
                crate::veth_pair(&gw_b, LOWER_IF, &wire, "pb");
                crate::veth_pair(&eve, LOWER_IF, &wire, "pe");
                for p in ["pa", "pb", "pe"] {
                    wire.ip(&["link", "set", p, "master", "br0"]);
                }
                // Eve replays frames with the gateways' source MACs: without this the bridge
                // would learn those MACs on her port and misdirect the gateways' traffic, which
                // tests the bridge rather than the agents.
                wire.ip(&[
                    "link",
                    "set",
                    "pe",
                    "type",
                    "bridge_slave",
                    "learning",
                    "off",
                ]);
                (Some(wire), Some(eve))
            }
        };
        crate::veth_pair(&kme_ns, "ka0", &gw_a, "kme0");
        crate::veth_pair(&kme_ns, "kb0", &gw_b, "kme0");
        add_ipv4(&kme_ns, "ka0", "10.201.1.1/30");
        add_ipv4(&gw_a, "kme0", "10.201.1.2/30");
        add_ipv4(&kme_ns, "kb0", "10.201.2.1/30");
        add_ipv4(&gw_b, "kme0", "10.201.2.2/30");

        let certs = dir.join("certs");
        let out = std::process::Command::new(agent_bin())
            .args(["certs", "init", "--out"])
            .arg(&certs)
            .args(["--host", "10.201.1.1", "--host", "10.201.2.1"])
            .args(
                sae_ids(opts.links)
                    .iter()
                    .flat_map(|s| ["--sae".to_owned(), s.clone()]),
            )
            .stdin(Stdio::null())
            .output()
            .expect("cannot start qkd-macsec-agent certs init");
        assert!(
            out.status.success(),
            "qkd-macsec-agent certs init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );

        // A private bpffs: `ip netns exec` remounts /sys for the command it starts, which hides
        // /sys/fs/bpf from the agents. Unmounting it on drop removes every pin they left.
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs).expect("bpffs mount point");
        crate::run(&["mount", "-t", "bpf", "bpf", &bpffs.to_string_lossy()]);
        let files = [Side::A, Side::B].map(|s| GatewayFiles {
            config: dir.join(format!("{}.toml", s.label())),
            log: dir.join(format!("{}.log", s.label())),
            status_socket: dir.join(format!("{}.status.sock", s.label())),
            bpffs_pin_dir: bpffs.join(s.label()),
            state_dir: dir.join(format!("{}.state", s.label())),
            ledger_dir: dir.join(format!("{}.ledger", s.label())),
        });
        let mut bed = Testbed {
            dir,
            certs,
            gw: [gw_a, gw_b],
            kme_ns,
            wire_ns,
            eve,
            files,
            agents: [None, None],
            kme: None,
            keep_dir: std::env::var_os("QKD_KEEP_TESTBED").is_some(),
            links: opts.links.max(1),
            one_cpu: opts.one_cpu,
            metrics_address: opts.metrics_address.clone(),
        };
        assert!(
            bed.links == 1 || matches!(opts.wire, Wire::Direct),
            "several links need Wire::Direct"
        );
        for i in 1..bed.links {
            let name = format!("wan{i}");
            crate::veth_pair(&bed.gw[0], &name, &bed.gw[1], &name);
        }
        let mut kme_args = opts.kme_args.clone();
        if bed.links > 1 {
            // Every SAE pair's A side on kme-a, B side on kme-b.
            for (j, sae) in sae_ids(bed.links).into_iter().enumerate() {
                let flag = if j % 2 == 0 { "--sae-a" } else { "--sae-b" };
                kme_args.extend([flag.to_owned(), sae]);
            }
        }
        bed.start_kme(&kme_args);
        bed
    }

    /// Process id of the side's running agent.
    pub fn agent_pid(&self, side: Side) -> Option<u32> {
        self.agents[side.idx()].as_ref().map(|a| a.child.id())
    }

    /// The agent's status socket answer: one JSON object per link (null before it started).
    pub fn agent_status(&self, side: Side) -> Option<serde_json::Value> {
        use std::io::Read as _;
        let mut c =
            std::os::unix::net::UnixStream::connect(&self.files[side.idx()].status_socket).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut body = String::new();
        c.read_to_string(&mut body).ok()?;
        serde_json::from_str(&body).ok()
    }

    /// One scrape of `side`'s metrics endpoint ([`TestbedOptions::metrics_address`]) from inside
    /// its namespace: the whole HTTP answer. Panics unless it is a 200.
    pub fn scrape_metrics(&self, side: Side) -> String {
        use std::io::{Read as _, Write as _};
        let addr = self
            .metrics_address
            .as_deref()
            .expect("the testbed was built without metrics_address");
        let _in = self.ns(side).enter();
        let mut c = std::net::TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("{}: metrics endpoint {addr}: {e}", side.label()));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{}: {body}", side.label());
        body
    }

    pub fn ns(&self, side: Side) -> &Arc<NetNs> {
        &self.gw[side.idx()]
    }

    fn start_kme(&mut self, extra: &[String]) {
        let bin = agent_bin();
        let bin = bin.to_string_lossy().into_owned();
        let certs = self.certs.to_string_lossy().into_owned();
        let log = fs::File::create(self.dir.join("kme-sim.log")).expect("kme-sim log file");
        let mut args: Vec<&str> = vec![
            &bin,
            "kme-sim",
            "--certs",
            &certs,
            "--listen-a",
            "10.201.1.1:8443",
            "--listen-b",
            "10.201.2.1:8443",
            "--control",
            KME_CONTROL,
            "--prefill",
        ];
        args.extend(extra.iter().map(String::as_str));
        let mut child = self.kme_ns.spawn_with(&args, |c| {
            c.stdout(Stdio::piped()).stderr(log);
        });
        // The simulator prints one JSON line once all three listeners are bound.
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
        if n == 0 || !line.contains("kme_a") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kme-sim did not start (said {line:?}); its log: {}",
                tail(&self.dir.join("kme-sim.log"), 20)
            );
        }
        self.kme = Some(child);
    }

    /// `kme-sim-ctl set ARGS` in the KME namespace; returns the new state (JSON).
    pub fn kme_ctl(&self, args: &[&str]) -> serde_json::Value {
        let bin = agent_bin();
        let bin = bin.to_string_lossy().into_owned();
        let mut full = vec![bin.as_str(), "kme-sim-ctl", "--control", KME_CONTROL];
        full.extend_from_slice(args);
        let out = self.kme_ns.exec_stdout(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kme-sim-ctl said {out:?}: {e}"))
    }

    /// Writes both configs for `spec`, after checking each with the agent's config loader, so
    /// that a test never blames the agent for a config the schema rejects.
    pub fn write_configs(&self, spec: &LinkSpec) {
        for side in Side::BOTH {
            let f = &self.files[side.idx()];
            let mut text =
                render_extra_links(&render_config(side, spec, &self.certs, f), self.links);
            if let Some(addr) = &self.metrics_address {
                text = text.replacen(
                    "[global]\n",
                    &format!("[global]\nmetrics_address = \"{addr}\"\n"),
                    1,
                );
                self.ns(side).ip(&["link", "set", "lo", "up"]);
            }
            if let Err(e) = Config::parse(&text, &f.config.display().to_string()) {
                panic!(
                    "the testbed generated an invalid config for {}: {e}\n{text}",
                    side.label()
                );
            }
            fs::write(&f.config, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", f.config.display()));
        }
    }

    /// Starts `qkd-macsec-agent run --config <side>.toml` inside the gateway's namespace, its
    /// stderr appended to `<side>.log`.
    pub fn start_agent(&mut self, side: Side, log_filter: &str) {
        assert!(
            self.agents[side.idx()].is_none(),
            "agent {} already running",
            side.label()
        );
        require_run_subcommand();
        let f = &self.files[side.idx()];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", f.log.display()));
        let log2 = log.try_clone().expect("dup log fd");
        let bin = agent_bin();
        let bin = bin.to_string_lossy().into_owned();
        let cfg = f.config.to_string_lossy().into_owned();
        let filter = log_filter.to_owned();
        let one_cpu = self.one_cpu;
        let child = self.gw[side.idx()].spawn_with(&[&bin, "run", "--config", &cfg], |c| {
            c.stdout(log).stderr(log2).env("QKD_MACSEC_LOG", filter);
            if one_cpu {
                use std::os::unix::process::CommandExt as _;
                // SAFETY: pin_to_cpu0 only calls sched_setaffinity (async-signal-safe).
                unsafe {
                    c.pre_exec(crate::pin_to_cpu0);
                }
            }
        });
        self.agents[side.idx()] = Some(AgentProc {
            child,
            started: Instant::now(),
        });
    }

    /// Starts both agents.
    pub fn start_agents(&mut self, log_filter: &str) {
        for side in Side::BOTH {
            self.start_agent(side, log_filter);
        }
    }

    /// Panics with the agent's log tail when it has exited.
    pub fn check_agents_alive(&mut self) {
        for side in Side::BOTH {
            if let Some(a) = self.agents[side.idx()].as_mut() {
                if let Ok(Some(status)) = a.child.try_wait() {
                    panic!(
                        "agent {} exited ({status}); its log:\n{}",
                        side.label(),
                        tail(&self.files[side.idx()].log, 40)
                    );
                }
            }
        }
    }

    /// Whether the agent of `side` is still running.
    pub fn agent_running(&mut self, side: Side) -> bool {
        self.agents[side.idx()]
            .as_mut()
            .is_some_and(|a| matches!(a.child.try_wait(), Ok(None)))
    }

    /// `kill -9` the agent of `side` and reap it.
    pub fn kill9_agent(&mut self, side: Side) {
        let mut a = self.agents[side.idx()]
            .take()
            .unwrap_or_else(|| panic!("agent {} is not running", side.label()));
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(
            rc,
            0,
            "kill -9 {}: {}",
            a.child.id(),
            std::io::Error::last_os_error()
        );
        let _ = a.child.wait();
    }

    /// SIGTERM the agent and wait up to `grace` for it to exit; returns its exit status, or
    /// `None` after SIGKILL when it did not stop in time.
    pub fn stop_agent(&mut self, side: Side, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut a = self.agents[side.idx()].take()?;
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = a.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = a.child.kill();
        let _ = a.child.wait();
        None
    }

    /// The log of `side`'s agent so far.
    pub fn agent_log(&self, side: Side) -> String {
        fs::read_to_string(&self.files[side.idx()].log).unwrap_or_default()
    }

    /// Both agents' log tails, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut s = String::new();
        for side in Side::BOTH {
            let _ = writeln!(
                s,
                "---- {} ({}) ----\n{}",
                side.label(),
                self.files[side.idx()].log.display(),
                tail(&self.files[side.idx()].log, lines)
            );
        }
        s
    }

    /// The kernel's MACsec state in `side`'s namespace (None: no MACsec link there yet).
    pub fn secy(&self, side: Side) -> Option<SecyState> {
        let ns = Arc::clone(&self.gw[side.idx()]);
        std::thread::spawn(move || {
            let _in = ns.enter();
            let mut m = Macsec::open().unwrap_or_else(|e| panic!("macsec netlink: {e}"));
            m.dump_all()
                .unwrap_or_else(|e| panic!("macsec dump: {e}"))
                .into_iter()
                .next()
        })
        .join()
        .expect("macsec dump thread panicked")
    }

    /// [`Wire::Bridged`]: what eve injects reaches only `to` (None: both gateways again). The
    /// bridge ports of eve and of the other gateway are made `isolated`, and isolated ports do
    /// not forward to each other; the gateways still reach each other and eve still hears `to`.
    pub fn eve_towards(&self, to: Option<Side>) {
        let wire = self
            .wire_ns
            .as_ref()
            .expect("eve_towards needs Wire::Bridged");
        let port = |s: Side| if s == Side::A { "pa" } else { "pb" };
        let isolated = |p: &str, on: bool| {
            format!(
                "link set dev {p} type bridge_slave isolated {}",
                if on { "on" } else { "off" }
            )
        };
        wire.ip_batch(&[
            &isolated("pe", to.is_some()),
            &isolated(port(Side::A), to == Some(Side::B)),
            &isolated(port(Side::B), to == Some(Side::A)),
        ]);
    }

    /// The MAC address of `side`'s lower interface, as the SCI of its MACsec link says (the
    /// source address of every frame the gateway sends on the wire).
    pub fn lower_mac(&self, side: Side) -> [u8; 6] {
        self.secy(side)
            .unwrap_or_else(|| panic!("{} has no MACsec link yet", side.label()))
            .sci
            .mac()
    }

    /// Waits until both agents have a secured link (see [`LinkView::secured`]), then gives the
    /// MACsec interfaces their addresses and checks that IP gets through. Returns the time from
    /// the first agent start. Panics with both logs on timeout.
    pub fn wait_secured(&mut self, timeout: Duration) -> Duration {
        let t0 = self
            .agents
            .iter()
            .flatten()
            .map(|a| a.started)
            .min()
            .unwrap_or_else(Instant::now);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_agents_alive();
            let views = Side::BOTH.map(|s| LinkView::from_secy(self.secy(s).as_ref()));
            if views.iter().all(LinkView::secured) && views[0].tx_key == views[1].rx_key {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the link was not secured within {timeout:?}: gw-a {:?}, gw-b {:?}\n{}",
                views[0],
                views[1],
                self.logs_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let secured_after = t0.elapsed();
        self.address_macsec();
        secured_after
    }

    /// Adds the demo addresses to macsec0 on both sides (idempotent) and brings it up.
    pub fn address_macsec(&self) {
        for side in Side::BOTH {
            let ns = &self.gw[side.idx()];
            let cidr = format!("{}/24", side.macsec_ip());
            let have = ns.exec_stdout(&[ip_bin(), "-4", "addr", "show", "dev", MACSEC_IF]);
            if !have.contains(&format!("inet {cidr}")) {
                add_ipv4(ns, MACSEC_IF, &cidr);
            }
            ns.ip(&["link", "set", MACSEC_IF, "up"]);
        }
    }

    /// `ping -c count -i interval` from `from` to the other side over MACsec; returns replies.
    pub fn ping(&self, from: Side, count: u32, interval: &str) -> u32 {
        let out = self.gw[from.idx()].try_exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            from.other().macsec_ip(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let (_, rest) = l.split_once(" transmitted, ")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for side in Side::BOTH {
            if let Some(mut a) = self.agents[side.idx()].take() {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline && matches!(a.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = a.child.kill();
                let _ = a.child.wait();
            }
        }
        if let Some(mut k) = self.kme.take() {
            // SAFETY: as above.
            unsafe { libc::kill(k.id() as libc::pid_t, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(100));
            let _ = k.kill();
            let _ = k.wait();
        }
        // Pins outlive the agent by design (restart without a gap); the testbed is done.
        let _ = crate::try_run(&["umount", "-l", &self.dir.join("bpffs").to_string_lossy()]);
        if self.keep_dir {
            eprintln!("testbed files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        // The namespaces (and every interface in them) go when the NetNs fields drop.
    }
}

/// Panics with a clear message when the agent binary has no `run` subcommand yet.
pub fn require_run_subcommand() {
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .output()
        .expect("cannot start qkd-macsec-agent");
    assert!(
        out.status.success(),
        "`qkd-macsec-agent run` is not available in {} (issue 6: the agent's run loop); \
         `run --help` said: {}",
        agent_bin().display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn sysctl(ns: &NetNs, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.exec(&["sh", "-c", &format!("echo {value} > {path}")]);
}

/// The last `n` lines of a file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read: {e})"));
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What one gateway's kernel MACsec state says, reduced to what the demo shows. Key ids are the
/// 16-byte kernel key identifiers (derived from the ETSI key_ID); keys are never visible here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkView {
    pub exists: bool,
    pub operational: bool,
    pub encrypt: bool,
    pub encoding_an: Option<u8>,
    pub tx_key: Option<[u8; 16]>,
    pub tx_active: bool,
    /// Key ids of the active RX SAs (the peer's keys we accept).
    pub rx_key: Option<[u8; 16]>,
    pub rx_active_sas: usize,
    pub out_protected: u64,
    pub out_encrypted: u64,
    pub in_ok: u64,
    pub in_invalid: u64,
    pub in_not_valid: u64,
    pub in_no_sa: u64,
    pub in_untagged: u64,
    pub out_untagged: u64,
}

impl LinkView {
    pub fn from_secy(s: Option<&SecyState>) -> LinkView {
        let Some(s) = s else {
            return LinkView::default();
        };
        let tx = s.tx_sa(s.encoding_sa);
        // The RX SA that matches the peer's current key is the newest active one; with two
        // active during a grace period, the one with the lower next PN is the newer.
        let rx = s
            .rx_scs
            .iter()
            .flat_map(|sc| sc.sas.iter())
            .filter(|sa| sa.active)
            .min_by_key(|sa| sa.next_pn);
        let mut v = LinkView {
            exists: true,
            operational: s.operational,
            encrypt: s.encrypt,
            encoding_an: Some(s.encoding_sa.get()),
            tx_key: tx.map(|t| t.key_id.0),
            tx_active: tx.is_some_and(|t| t.active),
            rx_key: rx.map(|r| r.key_id.0),
            rx_active_sas: s
                .rx_scs
                .iter()
                .flat_map(|sc| sc.sas.iter())
                .filter(|sa| sa.active)
                .count(),
            out_protected: s.txsc_stats.out_pkts_protected,
            out_encrypted: s.txsc_stats.out_pkts_encrypted,
            out_untagged: s.secy_stats.out_pkts_untagged,
            in_untagged: s.secy_stats.in_pkts_untagged,
            ..Default::default()
        };
        for sc in &s.rx_scs {
            v.in_ok += sc.stats.in_pkts_ok;
            v.in_invalid += sc.stats.in_pkts_invalid;
            v.in_not_valid += sc.stats.in_pkts_not_valid;
            v.in_no_sa += sc.stats.in_pkts_not_using_sa + sc.stats.in_pkts_unused_sa;
        }
        v
    }

    /// Traffic can flow protected: the SecY is operational with encryption, its encoding TX SA
    /// is active, and at least one RX SA is active.
    pub fn secured(&self) -> bool {
        self.operational && self.encrypt && self.tx_active && self.rx_active_sas > 0
    }

    /// The TX key id shortened for display: first and last 4 bytes. The last 4 matter: in the
    /// cak profile the kernel key id is MKA-style (12-byte member id, then the 4-byte KN).
    pub fn tx_key_short(&self) -> String {
        self.tx_key.map_or("-".into(), |k| key_short(&k))
    }
}

/// `aabbccdd..eeff0011`: first and last 4 bytes of a 16-byte key id.
pub fn key_short(k: &[u8; 16]) -> String {
    let h = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!("{}..{}", h(&k[..4]), h(&k[12..]))
}

/// A timestamped change seen by the [`Monitor`].
#[derive(Clone, Debug)]
pub struct Change {
    pub at: Instant,
    pub side: Side,
    pub what: ChangeKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// First time the side was secured.
    Secured,
    /// The encoding SA's key changed (a rollover), to this AN and key id.
    Rollover { an: u8, key: [u8; 16] },
    /// The side stopped being able to send protected frames.
    Stalled,
    /// It can again.
    Resumed,
}

/// Samples both gateways' kernel MACsec state every `period` in the background and records
/// rollovers (encoding-SA key changes) and stalls. Rollovers closer together than `period` would
/// be counted once; the tests use rollover periods of seconds and a 50 ms sampler.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub state: Arc<Mutex<MonitorState>>,
}

#[derive(Debug, Default)]
pub struct MonitorState {
    pub latest: [LinkView; 2],
    pub changes: Vec<Change>,
    pub rollovers: [u64; 2],
    pub secured_at: [Option<Instant>; 2],
    pub samples: u64,
    pub errors: Vec<String>,
    /// Every SA (TX or RX) the monitor saw put into the kernel, with its kernel key identifier;
    /// the SAs of the first sample count as installed then.
    pub sa_installs: Vec<SaInstall>,
}

/// An SA that appeared between two [`Monitor`] samples: new on its slot (direction, SC, AN),
/// another key on its slot, or the same key with its packet number gone back (deleted and added
/// again in between). An SA added and removed within one period is missed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaInstall {
    pub at: Instant,
    pub side: Side,
    /// Our TX SA (else an RX SA of the peer's SC).
    pub tx: bool,
    pub an: u8,
    pub key: [u8; 16],
    /// The SA's next PN when first seen.
    pub next_pn: u64,
}

/// The SAs of `s` that are new against `slots` (what the previous sample held), which becomes
/// this sample; see [`SaInstall`].
pub fn sa_installs(
    slots: &mut std::collections::HashMap<(bool, u64, u8), ([u8; 16], u64)>,
    s: Option<&SecyState>,
    side: Side,
    at: Instant,
) -> Vec<SaInstall> {
    let mut now = std::collections::HashMap::new();
    if let Some(s) = s {
        for sa in &s.tx_sas {
            now.insert((true, s.sci.0, sa.an.get()), (sa.key_id.0, sa.next_pn));
        }
        for sc in &s.rx_scs {
            for sa in &sc.sas {
                now.insert((false, sc.sci.0, sa.an.get()), (sa.key_id.0, sa.next_pn));
            }
        }
    }
    let mut out: Vec<SaInstall> = now
        .iter()
        .filter(|(slot, (key, pn))| {
            !slots
                .get(*slot)
                .is_some_and(|(k, p)| k == key && (p <= pn || *pn == 0))
        })
        .map(|(&(tx, _, an), &(key, next_pn))| SaInstall {
            at,
            side,
            tx,
            an,
            key,
            next_pn,
        })
        .collect();
    out.sort_by_key(|i| (!i.tx, i.an));
    *slots = now;
    out
}

impl MonitorState {
    pub fn stalls(&self, side: Side) -> Vec<(Instant, Option<Instant>)> {
        let mut out = Vec::new();
        let mut open = None;
        for c in self.changes.iter().filter(|c| c.side == side) {
            match c.what {
                ChangeKind::Stalled => open = Some(c.at),
                ChangeKind::Resumed => {
                    if let Some(s) = open.take() {
                        out.push((s, Some(c.at)));
                    }
                }
                _ => {}
            }
        }
        if let Some(s) = open {
            out.push((s, None));
        }
        out
    }
}

impl Monitor {
    pub fn start(bed: &Testbed, period: Duration) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(MonitorState::default()));
        let mut threads = Vec::new();
        for side in Side::BOTH {
            let ns = Arc::clone(bed.ns(side));
            let stop = Arc::clone(&stop);
            let state = Arc::clone(&state);
            threads.push(std::thread::spawn(move || {
                let mut m = {
                    let _in = ns.enter();
                    match Macsec::open() {
                        Ok(m) => m,
                        Err(e) => {
                            lock(&state).errors.push(format!("{}: {e}", side.label()));
                            return;
                        }
                    }
                };
                let mut prev: Option<(u8, [u8; 16])> = None;
                let mut was_secured = false;
                let mut slots = std::collections::HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let dump = m.dump_all();
                    let now = Instant::now();
                    let mut installs = Vec::new();
                    let view = match dump {
                        Ok(v) => {
                            installs = sa_installs(&mut slots, v.first(), side, now);
                            LinkView::from_secy(v.first())
                        }
                        Err(e) => {
                            lock(&state).errors.push(format!("{}: {e}", side.label()));
                            LinkView::default()
                        }
                    };
                    let mut st = lock(&state);
                    st.samples += 1;
                    st.sa_installs.extend(installs);
                    let secured = view.secured();
                    if secured && st.secured_at[side.idx()].is_none() {
                        st.secured_at[side.idx()] = Some(now);
                        st.changes.push(Change {
                            at: now,
                            side,
                            what: ChangeKind::Secured,
                        });
                    } else if secured && !was_secured {
                        st.changes.push(Change {
                            at: now,
                            side,
                            what: ChangeKind::Resumed,
                        });
                    } else if !secured && was_secured {
                        st.changes.push(Change {
                            at: now,
                            side,
                            what: ChangeKind::Stalled,
                        });
                    }
                    if secured {
                        let cur = (
                            view.encoding_an.unwrap_or(0),
                            view.tx_key.unwrap_or_default(),
                        );
                        if let Some(p) = prev {
                            if p != cur {
                                st.rollovers[side.idx()] += 1;
                                st.changes.push(Change {
                                    at: now,
                                    side,
                                    what: ChangeKind::Rollover {
                                        an: cur.0,
                                        key: cur.1,
                                    },
                                });
                            }
                        }
                        prev = Some(cur);
                    }
                    was_secured = secured;
                    st.latest[side.idx()] = view;
                    drop(st);
                    std::thread::sleep(period);
                }
            }));
        }
        Monitor {
            stop,
            threads,
            state,
        }
    }

    pub fn snapshot<T>(&self, f: impl FnOnce(&MonitorState) -> T) -> T {
        f(&lock(&self.state))
    }

    pub fn stop(mut self) -> MonitorState {
        self.halt();
        std::mem::take(&mut *lock(&self.state))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.halt();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first bytes of every stream datagram; the wire capture looks for them in the clear.
pub const STREAM_MAGIC: &[u8; 8] = b"QKDSEQ01";

/// Per-stream counts, exact: every sequence number is accounted for.
#[derive(Clone, Debug, Default)]
pub struct StreamReport {
    pub sent: u64,
    /// Datagrams the sender's socket refused (no route/ARP failure); counted as lost.
    pub send_errors: u64,
    pub received: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
    /// Send time of each lost datagram.
    pub lost_at: Vec<Instant>,
}

struct StreamShared {
    send_times: Mutex<Vec<Instant>>,
    send_errors: AtomicU32,
    /// Times each sequence number arrived.
    seen: Mutex<Vec<u32>>,
    reordered: AtomicU32,
    highest: Mutex<Option<u64>>,
}

/// A UDP sequence stream from one gateway to the other over the MACsec link at a fixed rate.
/// Datagram: magic (8) | sequence (8, big-endian) | padding to 64 bytes.
pub struct Stream {
    pub from: Side,
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
    shared: Arc<StreamShared>,
}

impl Stream {
    pub fn start(bed: &Testbed, from: Side, port: u16, pps: u32) -> Stream {
        let shared = Arc::new(StreamShared {
            send_times: Mutex::new(Vec::new()),
            send_errors: AtomicU32::new(0),
            seen: Mutex::new(Vec::new()),
            reordered: AtomicU32::new(0),
            highest: Mutex::new(None),
        });
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        let to = from.other();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = {
            let ns = Arc::clone(bed.ns(to));
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop_recv);
            std::thread::spawn(move || {
                let sock = {
                    let _in = ns.enter();
                    UdpSocket::bind(SocketAddrV4::new(to.macsec_ip().parse().unwrap(), port))
                        .unwrap_or_else(|e| panic!("bind {}:{port}: {e}", to.macsec_ip()))
                };
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("read timeout");
                // A receiver starved of CPU for a few seconds (the emulated VM verifying a
                // restarted agent's eBPF programs) must not overflow its socket buffer: the
                // stream counts what MACsec loses, not what this thread failed to read.
                let big: libc::c_int = 16 << 20;
                // SAFETY: a valid socket fd and a c_int option value of the stated size.
                let rc = unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&big as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
                let _ = ready_tx.send(());
                let mut buf = [0u8; 128];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = sock.recv(&mut buf) else {
                        continue;
                    };
                    if n < 16 || &buf[..8] != STREAM_MAGIC {
                        continue;
                    }
                    let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap());
                    let mut seen = lock(&shared.seen);
                    let i = seq as usize;
                    if seen.len() <= i {
                        seen.resize(i + 1, 0);
                    }
                    seen[i] += 1;
                    let first = seen[i] == 1;
                    drop(seen);
                    let mut hi = lock(&shared.highest);
                    match *hi {
                        Some(h) if seq < h => {
                            if first {
                                shared.reordered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => *hi = Some(seq),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("stream receiver did not start");
        let sender = {
            let ns = Arc::clone(bed.ns(from));
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop_send);
            let one_cpu = bed.one_cpu;
            std::thread::spawn(move || {
                if one_cpu {
                    crate::pin_to_cpu0().expect("pinning the stream sender to CPU 0");
                }
                let sock = {
                    let _in = ns.enter();
                    UdpSocket::bind(SocketAddrV4::new(from.macsec_ip().parse().unwrap(), 0))
                        .unwrap_or_else(|e| panic!("bind {}: {e}", from.macsec_ip()))
                };
                let dst = SocketAddrV4::new(to.macsec_ip().parse().unwrap(), port);
                let interval = Duration::from_secs_f64(1.0 / f64::from(pps.max(1)));
                let mut next = Instant::now();
                let mut seq: u64 = 0;
                let mut buf = [0u8; 64];
                buf[..8].copy_from_slice(STREAM_MAGIC);
                while !stop.load(Ordering::Relaxed) {
                    buf[8..16].copy_from_slice(&seq.to_be_bytes());
                    let now = Instant::now();
                    lock(&shared.send_times).push(now);
                    if sock.send_to(&buf, dst).is_err() {
                        shared.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    seq += 1;
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_secs(1) {
                        // Fell far behind (a loaded VM): keep the rate, do not burst.
                        next = now;
                    }
                }
            })
        };
        Stream {
            from,
            stop_send,
            stop_recv,
            sender: Some(sender),
            receiver: Some(receiver),
            shared,
        }
    }

    /// Counts so far; datagrams sent within the last `settle` are not judged yet.
    pub fn report(&self, settle: Duration) -> StreamReport {
        let times = lock(&self.shared.send_times).clone();
        let seen = lock(&self.shared.seen).clone();
        let cutoff = Instant::now()
            .checked_sub(settle)
            .unwrap_or_else(Instant::now);
        let mut r = StreamReport {
            sent: times.len() as u64,
            send_errors: u64::from(self.shared.send_errors.load(Ordering::Relaxed)),
            reordered: u64::from(self.shared.reordered.load(Ordering::Relaxed)),
            ..Default::default()
        };
        for (i, t) in times.iter().enumerate() {
            let c = seen.get(i).copied().unwrap_or(0);
            if c > 0 {
                r.received += 1;
                r.duplicated += u64::from(c - 1);
            } else if *t <= cutoff {
                r.lost += 1;
                r.lost_at.push(*t);
            }
        }
        r
    }

    /// Stops sending, lets in-flight datagrams arrive for `drain`, stops receiving and returns
    /// the final, exact counts.
    pub fn finish(mut self, drain: Duration) -> StreamReport {
        self.stop_send.store(true, Ordering::Relaxed);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        std::thread::sleep(drain);
        self.stop_recv.store(true, Ordering::Relaxed);
        if let Some(t) = self.receiver.take() {
            let _ = t.join();
        }
        self.report(Duration::ZERO)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop_send.store(true, Ordering::Relaxed);
        self.stop_recv.store(true, Ordering::Relaxed);
        for t in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// One frame a gateway put on the wire, as classified by the [`WireCapture`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireFrame {
    pub at: Instant,
    pub side: Side,
    pub kind: FrameKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// EtherType 0x88E5 with this AN.
    Macsec { an: u8 },
    /// EtherType 0x88CC (the key-ID exchange; unprotected by design).
    Lldp,
    /// Anything else: unprotected traffic. `stream_payload`: it carries a stream datagram in the
    /// clear.
    Plain {
        ethertype: u16,
        stream_payload: bool,
    },
}

/// Counts of captured frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireCounts {
    pub macsec: u64,
    pub lldp: u64,
    pub plaintext: u64,
    pub plaintext_stream: u64,
}

/// AF_PACKET capture of every frame each gateway sends on its lower interface (after the
/// agent's TC program: what really reaches the wire). Keeps the frame kinds and times, not the
/// bytes.
pub struct WireCapture {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    frames: Arc<Mutex<VecDeque<WireFrame>>>,
}

impl WireCapture {
    pub fn start(bed: &Testbed) -> WireCapture {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(VecDeque::new()));
        let mut threads = Vec::new();
        for side in Side::BOTH {
            let ns = Arc::clone(bed.ns(side));
            let stop = Arc::clone(&stop);
            let frames = Arc::clone(&frames);
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                let fd = {
                    let _in = ns.enter();
                    packet_socket(LOWER_IF)
                };
                let _ = tx.send(());
                recv_frames(&fd, &stop, |pkttype, f| {
                    if f.len() < 14 || pkttype != libc::PACKET_OUTGOING {
                        return;
                    }
                    let ethertype = u16::from_be_bytes([f[12], f[13]]);
                    let kind = match ethertype {
                        0x88E5 => FrameKind::Macsec {
                            an: f.get(14).map_or(0, |tci| tci & 0x03),
                        },
                        0x88CC => FrameKind::Lldp,
                        _ => FrameKind::Plain {
                            ethertype,
                            stream_payload: f.windows(8).any(|w| w == STREAM_MAGIC),
                        },
                    };
                    lock(&frames).push_back(WireFrame {
                        at: Instant::now(),
                        side,
                        kind,
                    });
                });
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .expect("wire capture did not start");
        }
        WireCapture {
            stop,
            threads,
            frames,
        }
    }

    /// Every frame captured so far.
    pub fn frames(&self) -> Vec<WireFrame> {
        lock(&self.frames).iter().cloned().collect()
    }

    /// Counts over frames matching `filter`.
    pub fn counts(&self, filter: impl Fn(&WireFrame) -> bool) -> WireCounts {
        let mut c = WireCounts::default();
        for f in lock(&self.frames).iter().filter(|f| filter(f)) {
            match f.kind {
                FrameKind::Macsec { .. } => c.macsec += 1,
                FrameKind::Lldp => c.lldp += 1,
                FrameKind::Plain { stream_payload, .. } => {
                    c.plaintext += 1;
                    if stream_payload {
                        c.plaintext_stream += 1;
                    }
                }
            }
        }
        c
    }
}

impl Drop for WireCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An AF_PACKET socket receiving every frame on `ifname` (in the calling thread's namespace),
/// with a 100 ms receive timeout.
/// Receives frames on an AF_PACKET socket until `stop`, handing each to `on_frame` with its
/// packet type (`PACKET_OUTGOING` for what this host sent). The socket needs a receive timeout
/// (`packet_socket` sets one) so that `stop` is noticed.
fn recv_frames(fd: &OwnedFd, stop: &AtomicBool, mut on_frame: impl FnMut(u8, &[u8])) {
    let mut buf = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: an all-zero sockaddr_ll is a valid value for the kernel to overwrite.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and sll are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut sll).cast(),
                &raw mut len,
            )
        };
        if n > 0 {
            on_frame(sll.sll_pkttype, &buf[..n as usize]);
        }
    }
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a new, owned descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "interface {ifname} not found for capture");
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind AF_PACKET to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: tv is a valid timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    fd
}

/// Sends raw Ethernet frames on `ifname` inside `ns` (the eavesdropper's injections).
pub fn inject_frames(ns: &NetNs, ifname: &str, frames: &[Vec<u8>]) {
    let _in = ns.enter();
    let fd = packet_socket(ifname);
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    for f in frames {
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
        // SAFETY: f and sll are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            f.len() as isize,
            "inject: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Captures raw LLDP frames seen on `ifname` inside `ns` (any direction) for `dur`.
pub fn capture_lldp(ns: &NetNs, ifname: &str, dur: Duration) -> Vec<Vec<u8>> {
    let _in = ns.enter();
    let fd = packet_socket(ifname);
    let deadline = Instant::now() + dur;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 14 && buf[12] == 0x88 && buf[13] == 0xCC {
            out.push(buf[..n as usize].to_vec());
        }
    }
    out
}

/// Frames with when they were captured.
pub type TimedFrames = Vec<(Instant, Vec<u8>)>;

/// [`capture_lldp`] in the background until stopped: every LLDP frame `ifname` inside `ns`
/// receives (not those it sends itself, such as a [`Replayer`]'s), with when it arrived.
pub struct LldpRecorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    frames: Arc<Mutex<TimedFrames>>,
}

impl LldpRecorder {
    pub fn start(ns: &Arc<NetNs>, ifname: &str) -> LldpRecorder {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (ns, ifname, stop, frames) = (
                Arc::clone(ns),
                ifname.to_owned(),
                Arc::clone(&stop),
                Arc::clone(&frames),
            );
            std::thread::spawn(move || {
                let fd = {
                    let _in = ns.enter();
                    packet_socket(&ifname)
                };
                let _ = tx.send(());
                recv_frames(&fd, &stop, |pkttype, f| {
                    if f.len() >= 14
                        && pkttype != libc::PACKET_OUTGOING
                        && f[12] == 0x88
                        && f[13] == 0xCC
                    {
                        lock(&frames).push((Instant::now(), f.to_vec()));
                    }
                });
            })
        };
        rx.recv_timeout(Duration::from_secs(5))
            .expect("LLDP recorder did not start");
        LldpRecorder {
            stop,
            thread: Some(thread),
            frames,
        }
    }

    /// What was recorded so far, in order.
    pub fn frames(&self) -> TimedFrames {
        lock(&self.frames).clone()
    }

    /// Stops and returns everything recorded.
    pub fn stop(mut self) -> TimedFrames {
        self.halt();
        std::mem::take(&mut *lock(&self.frames))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LldpRecorder {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Injects `frames` on `ifname` inside `ns` in order, one every `gap`, from the first to the
/// last and then again from the first, until stopped (the eavesdropper replaying what it
/// recorded, verbatim, source addresses included).
pub struct Replayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    passes: Arc<AtomicU32>,
}

impl Replayer {
    pub fn start(ns: &Arc<NetNs>, ifname: &str, frames: Vec<Vec<u8>>, gap: Duration) -> Replayer {
        assert!(!frames.is_empty(), "nothing to replay");
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU32::new(0));
        let thread = {
            let (ns, ifname, stop, passes) = (
                Arc::clone(ns),
                ifname.to_owned(),
                Arc::clone(&stop),
                Arc::clone(&passes),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for f in &frames {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        inject_frames(&ns, &ifname, std::slice::from_ref(f));
                        std::thread::sleep(gap);
                    }
                    passes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Replayer {
            stop,
            thread: Some(thread),
            passes,
        }
    }

    /// Complete passes over the frames so far.
    pub fn passes(&self) -> u32 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Stops; returns the complete passes.
    pub fn stop(mut self) -> u32 {
        self.halt();
        self.passes()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Offset and length of the project TLV payload (after OUI and subtype) in an LLDPDU
/// frame: the first organizationally specific TLV (type 127) that fits in the frame.
pub fn org_tlv_payload(frame: &[u8]) -> Option<(usize, usize)> {
    let mut off = 14;
    while off + 2 <= frame.len() {
        let hdr = u16::from_be_bytes([frame[off], frame[off + 1]]);
        let (ty, len) = (hdr >> 9, usize::from(hdr & 0x1ff));
        if ty == 0 {
            return None;
        }
        if ty == 127 && len > 4 && off + 2 + len <= frame.len() {
            return Some((off + 2 + 4, len - 4));
        }
        off += 2 + len;
    }
    None
}

/// Frames in `r` lost outside every window in `windows` (each widened by `margin` on both sides);
/// an open window runs to now. "Lost while keys were valid" in the tests.
pub fn lost_outside(
    r: &StreamReport,
    windows: &[(Instant, Option<Instant>)],
    margin: Duration,
) -> Vec<Instant> {
    r.lost_at
        .iter()
        .copied()
        .filter(|t| {
            !windows.iter().any(|(s, e)| {
                let s = s.checked_sub(margin).unwrap_or(*s);
                let e = e.map_or(Instant::now(), |e| e + margin);
                *t >= s && *t <= e
            })
        })
        .collect()
}

/// A secured link with the observers running: what most end-to-end tests start from.
pub struct Running {
    pub bed: Testbed,
    pub monitor: Monitor,
    pub capture: WireCapture,
    pub start_to_secure: Duration,
}

impl Running {
    /// Testbed, configs from `spec`, capture, both agents, wait until secured (`timeout`), IP
    /// over MACsec checked with ping, monitor sampling every 50 ms.
    pub fn up(prefix: &str, opts: &TestbedOptions, spec: &LinkSpec, timeout: Duration) -> Running {
        let mut bed = Testbed::new(prefix, opts);
        bed.write_configs(spec);
        let capture = WireCapture::start(&bed);
        bed.start_agents(&opts.agent_log);
        let start_to_secure = bed.wait_secured(timeout);
        let replies = bed.ping(Side::A, 3, "0.2");
        assert!(
            replies > 0,
            "the link looks secured but no ping crossed it\n{}",
            bed.logs_tail(30)
        );
        let monitor = Monitor::start(&bed, Duration::from_millis(50));
        Running {
            bed,
            monitor,
            capture,
            start_to_secure,
        }
    }

    /// Streams in both directions at `pps`.
    pub fn streams(&self, pps: u32) -> [Stream; 2] {
        [
            Stream::start(&self.bed, Side::A, 5001, pps),
            Stream::start(&self.bed, Side::B, 5002, pps),
        ]
    }

    /// Rollovers counted so far, the lower of the two sides.
    pub fn rollovers(&self) -> u64 {
        self.monitor
            .snapshot(|s| s.rollovers[0].min(s.rollovers[1]))
    }

    /// Waits until `cond` holds on the monitor state, checking the agents stay alive; panics
    /// with `what` and both logs after `timeout`. Returns when it held.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&MonitorState) -> bool,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if self.monitor.snapshot(&cond) {
                return Instant::now();
            }
            self.bed.check_agents_alive();
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {timeout:?}; monitor: {:?}\n{}",
                self.monitor
                    .snapshot(|s| (s.latest.clone(), s.rollovers, s.changes.len())),
                self.bed.logs_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every stall window seen on either side so far.
    pub fn stall_windows(&self) -> Vec<(Instant, Option<Instant>)> {
        self.monitor.snapshot(|s| {
            let mut w = s.stalls(Side::A);
            w.extend(s.stalls(Side::B));
            w
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_links_render_a_config_the_agent_accepts() {
        let files = GatewayFiles {
            config: "/t/gw.toml".into(),
            log: "/t/gw.log".into(),
            status_socket: "/t/gw.sock".into(),
            bpffs_pin_dir: "/t/bpffs".into(),
            state_dir: "/t/state".into(),
            ledger_dir: "/t/ledger".into(),
        };
        for side in Side::BOTH {
            let text = render_extra_links(
                &render_config(side, &LinkSpec::fast("cak"), Path::new("/t/certs"), &files),
                3,
            );
            let cfg = Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(cfg.link.len(), 3);
            assert_eq!(cfg.link[2].lower_interface, "wan2");
            assert_eq!(cfg.link[2].macsec_interface, "macsec2");
            let (local, peer) = if side == Side::A {
                ("sae-a2", "sae-b2")
            } else {
                ("sae-b2", "sae-a2")
            };
            assert_eq!(
                (
                    cfg.link[2].local_sae_id.as_str(),
                    cfg.link[2].peer_sae_id.as_str()
                ),
                (local, peer)
            );
            assert!(cfg.link[2].kme.cert.ends_with(format!("{local}.pem")));
        }
        assert_eq!(sae_ids(2), ["sae-a", "sae-b", "sae-a1", "sae-b1"]);
    }
}
