//! `kme-sim` and `kme-sim-ctl` command lines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::control::{self, ControlUpdate, KmeSel};
use super::{KmeSim, LinkParams, SimConfig, SimTls};

/// Run a pair of simulated ETSI GS QKD 014 KMEs (kme-a, kme-b) sharing one simulated QKD link.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Directory written by `certs init` (ca.pem, kme-a.pem/.key, kme-b.pem/.key).
    #[arg(long)]
    pub certs: PathBuf,
    /// HTTPS listen address of kme-a (port 0 = any free port; the bound addresses are printed).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen_a: SocketAddr,
    /// HTTPS listen address of kme-b.
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub listen_b: SocketAddr,
    /// Control endpoint (plain HTTP, loopback addresses only).
    #[arg(long, default_value = "127.0.0.1:8445")]
    pub control: SocketAddr,
    /// Keys (of --key-size bits) the link produces per second.
    #[arg(long, default_value_t = 1000.0)]
    pub key_rate: f64,
    /// Default key size, bits (multiple of 8).
    #[arg(long, default_value_t = 256)]
    pub key_size: u32,
    /// Pool capacity (max_key_count), in keys of --key-size bits.
    #[arg(long, default_value_t = 10_000)]
    pub max_key_count: u64,
    /// max_key_per_request.
    #[arg(long, default_value_t = 128)]
    pub max_key_per_request: u32,
    /// min_key_size, bits.
    #[arg(long, default_value_t = 64)]
    pub min_key_size: u32,
    /// max_key_size, bits.
    #[arg(long, default_value_t = 4096)]
    pub max_key_size: u32,
    /// A key not fetched by the slave this many ms after the master fetched it disappears
    /// (0 = never). 10 s is what a real KME was observed to do.
    #[arg(long, default_value_t = 10_000)]
    pub availability_timeout_ms: u64,
    /// Delivered and expired keys kept for the re-serve and re-issue faults (`kme-sim-ctl set
    /// --reserve-keys true`, `--reissue-keys true`); 0 keeps none, like a KME that forgets a
    /// delivered key.
    #[arg(long, default_value_t = 0)]
    pub key_history: usize,
    /// Eavesdropper QBER (fraction).
    #[arg(long, default_value_t = 0.02)]
    pub qber: f64,
    /// QBER above which the link produces no key (fraction).
    #[arg(long, default_value_t = 0.11)]
    pub qber_abort: f64,
    /// Start with a full pool instead of an empty one.
    #[arg(long)]
    pub prefill: bool,
    /// Runtime worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// KME ID of kme-a (source_KME_ID / target_KME_ID).
    #[arg(long, default_value = "kme-a")]
    pub kme_a_id: String,
    /// KME ID of kme-b.
    #[arg(long, default_value = "kme-b")]
    pub kme_b_id: String,
    /// SAE ID attached to kme-a (repeatable; the CN or SAN of its client certificate).
    #[arg(long = "sae-a", default_values_t = vec!["sae-a".to_string()])]
    pub saes_a: Vec<String>,
    /// SAE ID attached to kme-b (repeatable).
    #[arg(long = "sae-b", default_values_t = vec!["sae-b".to_string()])]
    pub saes_b: Vec<String>,
    /// Test facility for leak audits: append every issued key (key_ID and key, hex) to FILE.
    /// Never use it with keys that protect anything.
    #[arg(long, hide = true)]
    pub key_audit_log: Option<PathBuf>,
}

impl SimArgs {
    pub fn config(&self) -> SimConfig {
        SimConfig {
            link: LinkParams {
                key_rate: self.key_rate,
                key_size: self.key_size,
                max_key_count: self.max_key_count,
                availability_timeout: (self.availability_timeout_ms > 0)
                    .then(|| Duration::from_millis(self.availability_timeout_ms)),
                qber: self.qber,
                qber_abort: self.qber_abort,
                paused: false,
                key_history: self.key_history,
            },
            kme_a_id: self.kme_a_id.clone(),
            kme_b_id: self.kme_b_id.clone(),
            saes_a: self.saes_a.clone(),
            saes_b: self.saes_b.clone(),
            max_key_per_request: self.max_key_per_request,
            min_key_size: self.min_key_size,
            max_key_size: self.max_key_size,
            prefill: self.prefill,
            key_audit_log: self.key_audit_log.clone(),
        }
    }
}

/// `kme-sim`: runs until SIGINT or SIGTERM. Prints one JSON line with the bound addresses.
pub fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    if !args.control.ip().is_loopback() {
        anyhow::bail!(
            "--control {} is not a loopback address: the control endpoint has no authentication, keep it on 127.0.0.1 or ::1",
            args.control
        );
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let tls = SimTls::from_dir(&args.certs)?;
        let bind = |a: SocketAddr, what: &'static str| async move {
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot bind {what} on {a}"))
        };
        let la = bind(args.listen_a, "kme-a").await?;
        let lb = bind(args.listen_b, "kme-b").await?;
        let lc = bind(args.control, "control endpoint").await?;
        let sim = KmeSim::start(args.config(), tls, la, lb, Some(lc)).await?;
        println!(
            "{}",
            serde_json::json!({
                "kme_a": sim.addr_a().to_string(),
                "kme_b": sim.addr_b().to_string(),
                "control": sim.control_addr().map(|a| a.to_string()),
                "pid": std::process::id(),
            })
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("KME simulator shutting down");
        sim.shutdown().await;
        Ok(())
    })
}

/// Change or show a running simulator's knobs (talks to its --control endpoint).
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The simulator's control endpoint.
    #[arg(long, default_value = "127.0.0.1:8445", env = "QKD_KME_SIM_CONTROL")]
    pub control: SocketAddr,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlCmd {
    /// Print the current state as JSON.
    Show,
    /// Change knobs; only the options given change. Prints the new state.
    Set(SetArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Pause (true) or resume (false) key generation.
    #[arg(long)]
    pub paused: Option<bool>,
    /// Keys per second.
    #[arg(long)]
    pub key_rate: Option<f64>,
    /// Eavesdropper QBER (fraction).
    #[arg(long)]
    pub qber: Option<f64>,
    /// QBER abort threshold (fraction).
    #[arg(long)]
    pub qber_abort: Option<f64>,
    /// Availability timeout, ms (0 = unlimited).
    #[arg(long)]
    pub availability_timeout_ms: Option<u64>,
    /// Pool capacity, keys.
    #[arg(long)]
    pub max_key_count: Option<u64>,
    /// Fill the pool to capacity now.
    #[arg(long)]
    pub fill: bool,
    /// Delivered and expired keys kept for --reserve-keys and --reissue-keys (0 = none).
    #[arg(long)]
    pub key_history: Option<u64>,
    /// Which KME the fault options below apply to.
    #[arg(long, value_enum, default_value_t = KmeSel::Both)]
    pub kme: KmeSel,
    /// Answer every 014 request with 503.
    #[arg(long)]
    pub fail_503: Option<bool>,
    /// Added latency per answer, ms.
    #[arg(long)]
    pub latency_ms: Option<u64>,
    /// Drop live connections and refuse new ones (true) or accept again (false).
    #[arg(long)]
    pub drop_connections: Option<bool>,
    /// dec_keys serves delivered and expired keys again, with the same bytes (true), as
    /// independent field KMEs can.
    #[arg(long)]
    pub reserve_keys: Option<bool>,
    /// enc_keys hands out the keys retained by now again, old key_IDs and bytes, each once,
    /// before fresh ones (true): a KME rewound to an earlier state. Each switch-on rewinds.
    #[arg(long)]
    pub reissue_keys: Option<bool>,
}

/// `kme-sim-ctl`.
pub fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    let update = match args.cmd {
        CtlCmd::Show => None,
        CtlCmd::Set(s) => Some(ControlUpdate {
            paused: s.paused,
            key_rate: s.key_rate,
            qber: s.qber,
            qber_abort: s.qber_abort,
            availability_timeout_ms: s.availability_timeout_ms,
            max_key_count: s.max_key_count,
            fill: s.fill.then_some(true),
            key_history: s.key_history,
            kme: Some(s.kme),
            fail_503: s.fail_503,
            latency_ms: s.latency_ms,
            drop_connections: s.drop_connections,
            reserve_keys: s.reserve_keys,
            reissue_keys: s.reissue_keys,
        }),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let state = rt.block_on(control::request(args.control, update.as_ref()))?;
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(())
}
