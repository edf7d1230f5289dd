//! A pair of simulated KMEs (kme-a, kme-b) sharing one simulated QKD link, serving ETSI GS QKD 014
//! over HTTPS with client certificates required and verified, plus a plain-HTTP control endpoint
//! on loopback for run-time fault injection. Usable in-process ([`KmeSim::start`]) or as the
//! `kme-sim` subcommand. Knobs, defaults, control interface and extensions: docs/kme-simulator.md.

pub mod bench;
pub mod cli;
pub mod control;
pub mod link;
mod server;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::certs::tls::{self, TlsFiles};
use crate::certs::{files, CertError};
pub use control::{ControlUpdate, KmeSel, SimState};
pub use link::{LinkCounters, LinkParams};

/// What can stop the simulator from starting.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("KME simulator certificates: {0}")]
    Certs(#[from] CertError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid simulator configuration: {0}")]
    Config(String),
    #[error("control endpoint at {addr}: {detail}")]
    Control { addr: String, detail: String },
}

/// Static configuration of the KME pair.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub link: LinkParams,
    pub kme_a_id: String,
    pub kme_b_id: String,
    /// SAEs attached to kme-a / kme-b (several SAE pairs per KME pair).
    pub saes_a: Vec<String>,
    pub saes_b: Vec<String>,
    pub max_key_per_request: u32,
    /// Bits.
    pub min_key_size: u32,
    /// Bits.
    pub max_key_size: u32,
    /// Start with a full pool instead of an empty one.
    pub prefill: bool,
    /// Test facility: append every issued key (hex) to this file, so that a leak audit knows
    /// what to search the agents' output for. Never on a real deployment.
    pub key_audit_log: Option<std::path::PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            link: LinkParams::default(),
            kme_a_id: files::KME_A.into(),
            kme_b_id: files::KME_B.into(),
            saes_a: vec![files::SAE_A.into()],
            saes_b: vec![files::SAE_B.into()],
            max_key_per_request: 128,
            min_key_size: 64,
            max_key_size: 4096,
            prefill: false,
            key_audit_log: None,
        }
    }
}

impl SimConfig {
    fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        let l = &self.link;
        if l.key_size == 0 || !l.key_size.is_multiple_of(8) {
            return bad(format!(
                "key size {} bits is not a positive multiple of 8",
                l.key_size
            ));
        }
        if !(self.min_key_size..=self.max_key_size).contains(&l.key_size)
            || !self.min_key_size.is_multiple_of(8)
            || !self.max_key_size.is_multiple_of(8)
            || self.min_key_size == 0
        {
            return bad(format!(
                "key sizes must be positive multiples of 8 with min {} <= key size {} <= max {}",
                self.min_key_size, l.key_size, self.max_key_size
            ));
        }
        if !l.key_rate.is_finite() || l.key_rate < 0.0 {
            return bad(format!(
                "key rate {} must be a finite number >= 0",
                l.key_rate
            ));
        }
        if l.key_history > link::MAX_KEY_HISTORY {
            return bad(format!(
                "key history {} is above the limit {}",
                l.key_history,
                link::MAX_KEY_HISTORY
            ));
        }
        if !(0.0..=1.0).contains(&l.qber) || !(0.0..=1.0).contains(&l.qber_abort) {
            return bad(format!(
                "QBER {} and abort threshold {} must be fractions in 0..=1",
                l.qber, l.qber_abort
            ));
        }
        if self.max_key_per_request == 0 || l.max_key_count == 0 {
            return bad("max keys per request and pool size must be at least 1".into());
        }
        if self.saes_a.is_empty() || self.saes_b.is_empty() {
            return bad("each KME needs at least one SAE".into());
        }
        for s in &self.saes_a {
            if self.saes_b.contains(s) {
                return bad(format!("SAE {s} is attached to both KMEs"));
            }
        }
        Ok(())
    }
}

/// The two server TLS configurations.
#[derive(Clone)]
pub struct SimTls {
    pub kme_a: Arc<rustls::ServerConfig>,
    pub kme_b: Arc<rustls::ServerConfig>,
}

impl SimTls {
    /// Loads `ca.pem`, `kme-a.{pem,key}`, `kme-b.{pem,key}` from a `certs init` directory.
    pub fn from_dir(dir: &Path) -> Result<Self, SimError> {
        let side = |name: &str| -> Result<Arc<rustls::ServerConfig>, SimError> {
            Ok(Arc::new(tls::server_config(&TlsFiles {
                ca: dir.join(files::CA_CERT),
                cert: dir.join(files::cert(name)),
                key: dir.join(files::key(name)),
            })?))
        };
        Ok(Self {
            kme_a: side(files::KME_A)?,
            kme_b: side(files::KME_B)?,
        })
    }
}

/// Per-KME fault injection, changeable at run time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Answer every 014 request with 503.
    pub fail_503: bool,
    /// Delay every answer by this many milliseconds.
    pub latency_ms: u64,
    /// Close live connections now and every new one right after accept.
    pub drop_connections: bool,
    /// Serve keys again, as independent field KMEs can: dec_keys of a key_ID already delivered
    /// (or expired) answers with the same bytes (`key_history` bounds what is kept; see
    /// `link.rs`).
    #[serde(default)]
    pub reserve_keys: bool,
    /// Hand keys out again, as a KME rewound to an earlier state would: enc_keys returns the
    /// keys retained when the fault was switched on, old key_IDs and bytes, each once, before
    /// fresh ones.
    #[serde(default)]
    pub reissue_keys: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    A,
    B,
}

/// Answers per status code, for tests and the control endpoint.
#[derive(Default)]
pub(crate) struct Answered {
    pub ok: AtomicU64,
    pub bad_request: AtomicU64,
    pub unauthorized: AtomicU64,
    pub unavailable: AtomicU64,
    pub other: AtomicU64,
}

impl Answered {
    pub(crate) fn count(&self, code: u16) {
        let c = match code {
            200 => &self.ok,
            400 => &self.bad_request,
            401 => &self.unauthorized,
            503 => &self.unavailable,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub link: Mutex<link::Link>,
    pub faults: [Mutex<Faults>; 2],
    pub drop_epoch: [watch::Sender<u64>; 2],
    pub answered: Answered,
    /// TLS connections accepted (handshake completed), both KMEs.
    pub connections: AtomicU64,
    /// Connections closed by the drop_connections fault.
    pub dropped: AtomicU64,
}

impl Shared {
    pub(crate) fn idx(side: Side) -> usize {
        match side {
            Side::A => 0,
            Side::B => 1,
        }
    }
    pub(crate) fn faults(&self, side: Side) -> Faults {
        lock(&self.faults[Self::idx(side)]).clone()
    }
    pub(crate) fn kme_id(&self, side: Side) -> &str {
        match side {
            Side::A => &self.cfg.kme_a_id,
            Side::B => &self.cfg.kme_b_id,
        }
    }
    pub(crate) fn saes(&self, side: Side) -> &[String] {
        match side {
            Side::A => &self.cfg.saes_a,
            Side::B => &self.cfg.saes_b,
        }
    }
}

/// Locks a mutex; a poisoned one (a panic while holding it) still holds consistent data here
/// because every critical section leaves the state valid at each step.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// In-process handle to change knobs and read state (what the control endpoint calls).
#[derive(Clone)]
pub struct SimControl(Arc<Shared>);

impl SimControl {
    pub fn state(&self) -> SimState {
        control::state(&self.0)
    }
    /// Applies a partial update; an invalid value changes nothing and says why.
    pub fn apply(&self, update: &ControlUpdate) -> Result<SimState, String> {
        control::apply(&self.0, update)
    }
}

/// A running simulator.
pub struct KmeSim {
    addr_a: SocketAddr,
    addr_b: SocketAddr,
    control_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl KmeSim {
    /// Starts kme-a on `listen_a`, kme-b on `listen_b` and, if given, the control endpoint.
    pub async fn start(
        cfg: SimConfig,
        tls: SimTls,
        listen_a: TcpListener,
        listen_b: TcpListener,
        control: Option<TcpListener>,
    ) -> Result<Self, SimError> {
        cfg.validate()?;
        let now = Instant::now();
        let mut l = link::Link::new(cfg.link.clone(), now);
        if let Some(p) = &cfg.key_audit_log {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| SimError::Config(format!("--key-audit-log {}: {e}", p.display())))?;
            l.set_key_audit(f);
        }
        if cfg.prefill {
            l.fill(now);
        }
        let local = |l: &TcpListener, what| {
            l.local_addr().map_err(|source| SimError::Bind {
                what,
                addr: "?".into(),
                source,
            })
        };
        let addr_a = local(&listen_a, "kme-a")?;
        let addr_b = local(&listen_b, "kme-b")?;
        let control_addr = match &control {
            Some(c) => Some(local(c, "control")?),
            None => None,
        };
        let shared = Arc::new(Shared {
            cfg,
            link: Mutex::new(l),
            faults: Default::default(),
            drop_epoch: [watch::channel(0).0, watch::channel(0).0],
            answered: Answered::default(),
            connections: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let (shutdown, _) = watch::channel(false);
        let mut tasks = vec![
            tokio::spawn(server::serve(
                Side::A,
                listen_a,
                tokio_rustls::TlsAcceptor::from(tls.kme_a),
                shared.clone(),
                shutdown.subscribe(),
            )),
            tokio::spawn(server::serve(
                Side::B,
                listen_b,
                tokio_rustls::TlsAcceptor::from(tls.kme_b),
                shared.clone(),
                shutdown.subscribe(),
            )),
        ];
        if let Some(c) = control {
            tasks.push(tokio::spawn(control::serve(
                c,
                shared.clone(),
                shutdown.subscribe(),
            )));
        }
        tracing::info!(%addr_a, %addr_b, ?control_addr, "KME simulator started");
        Ok(Self {
            addr_a,
            addr_b,
            control_addr,
            shared,
            shutdown,
            tasks,
        })
    }

    pub fn addr_a(&self) -> SocketAddr {
        self.addr_a
    }
    pub fn addr_b(&self) -> SocketAddr {
        self.addr_b
    }
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }
    pub fn control(&self) -> SimControl {
        SimControl(self.shared.clone())
    }

    /// Stops accepting, closes every connection and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_bad_value() {
        assert!(SimConfig::default().validate().is_ok());
        type Mutate = fn(&mut SimConfig);
        let cases: Vec<(Mutate, &str)> = vec![
            (|c| c.link.key_size = 100, "100"),
            (|c| c.link.key_size = 8192, "8192"),
            (|c| c.link.key_rate = f64::NAN, "key rate"),
            (|c| c.link.qber = 2.0, "QBER"),
            (|c| c.link.key_history = 100_001, "key history 100001"),
            (|c| c.max_key_per_request = 0, "at least 1"),
            (|c| c.saes_b = vec![], "at least one SAE"),
            (|c| c.saes_b = vec!["sae-a".into()], "sae-a"),
        ];
        for (f, needle) in cases {
            let mut c = SimConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    /// The re-serve and re-issue faults over the real 014 interface, per KME: dec_keys of a
    /// delivered key answers with the same bytes again, enc_keys hands the old key_ID out again
    /// once the fault is switched on, and both need a key history.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reserve_and_reissue_serve_delivered_keys_again_per_kme() {
        use crate::certs::tls::TlsFiles;
        use crate::etsi014::{KmeClient, KmeClientConfig};

        let dir = std::env::temp_dir().join(format!("qkd-kmesim-reserve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::certs::init(&crate::certs::InitOptions {
            out: dir.clone(),
            hosts: vec![],
            saes: vec![files::SAE_A.into(), files::SAE_B.into()],
            days: 2,
            force: false,
        })
        .unwrap();
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
        let mut cfg = SimConfig {
            prefill: true,
            ..SimConfig::default()
        };
        cfg.link.key_history = 16;
        let sim = KmeSim::start(
            cfg,
            SimTls::from_dir(&dir).unwrap(),
            bind().await,
            bind().await,
            None,
        )
        .await
        .unwrap();
        let client = |addr: SocketAddr, sae: &str| {
            KmeClient::new(&KmeClientConfig::new(
                format!("https://{addr}"),
                TlsFiles {
                    ca: dir.join(files::CA_CERT),
                    cert: dir.join(files::cert(sae)),
                    key: dir.join(files::key(sae)),
                },
            ))
            .unwrap()
        };
        let (master, slave) = (
            client(sim.addr_a(), files::SAE_A),
            client(sim.addr_b(), files::SAE_B),
        );
        let ctl = sim.control();
        let first = master.enc_keys(files::SAE_B, 1, None).await.unwrap();
        let id = first[0].id;
        let got = slave.dec_key(files::SAE_A, id, None).await.unwrap();
        assert_eq!(got.material, first[0].material);
        assert!(slave.dec_key(files::SAE_A, id, None).await.is_err());
        // Both faults on kme-a only: kme-b, where the slave fetches, still says no.
        let st = ctl
            .apply(&ControlUpdate {
                kme: Some(KmeSel::A),
                reserve_keys: Some(true),
                reissue_keys: Some(true),
                ..Default::default()
            })
            .unwrap();
        assert!(st.faults_a.reserve_keys && !st.faults_b.reserve_keys);
        assert!(st.faults_a.reissue_keys && !st.faults_b.reissue_keys);
        assert!(slave.dec_key(files::SAE_A, id, None).await.is_err());
        // kme-a hands the old key_ID out again, with its bytes, once; then fresh keys.
        let again = master.enc_keys(files::SAE_B, 1, None).await.unwrap();
        assert_eq!((again[0].id, &again[0].material), (id, &first[0].material));
        let fresh = master.enc_keys(files::SAE_B, 1, None).await.unwrap();
        assert_ne!(fresh[0].id, id);
        // The re-issued key is pending again: kme-b delivers it once as usual.
        assert_eq!(
            slave
                .dec_key(files::SAE_A, id, None)
                .await
                .unwrap()
                .material,
            first[0].material
        );
        assert!(slave.dec_key(files::SAE_A, id, None).await.is_err());
        // Re-serve on kme-b too: as often as asked, the same bytes.
        ctl.apply(&ControlUpdate {
            kme: Some(KmeSel::B),
            reserve_keys: Some(true),
            ..Default::default()
        })
        .unwrap();
        for _ in 0..2 {
            let k = slave.dec_key(files::SAE_A, id, None).await.unwrap();
            assert_eq!(k.material, first[0].material);
        }
        // Still on, re-issue does not rewind by itself: nothing old comes back.
        let fresh = master.enc_keys(files::SAE_B, 1, None).await.unwrap();
        assert_ne!(fresh[0].id, id);
        let st = ctl.state();
        assert_eq!((st.reissued, st.reserved, st.retained_keys), (1, 2, 1));
        // Off again: delivered keys are gone for good, as on an honest KME.
        ctl.apply(&ControlUpdate {
            reserve_keys: Some(false),
            reissue_keys: Some(false),
            ..Default::default()
        })
        .unwrap();
        assert!(slave.dec_key(files::SAE_A, id, None).await.is_err());
        // Without a history the fault has nothing to serve, and says so.
        for u in [
            ControlUpdate {
                key_history: Some(0),
                reserve_keys: Some(true),
                ..Default::default()
            },
            ControlUpdate {
                key_history: Some(0),
                reissue_keys: Some(true),
                ..Default::default()
            },
        ] {
            let e = ctl.apply(&u).unwrap_err();
            assert!(e.contains("key_history"), "{e}");
        }
        assert_eq!(
            ctl.state().key_history,
            16,
            "a refused update changes nothing"
        );
        ctl.apply(&ControlUpdate {
            key_history: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ctl.state().retained_keys, 0);
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
