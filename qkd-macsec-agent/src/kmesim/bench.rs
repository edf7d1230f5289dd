//! `bench-kme` (hidden): the `kme` benchmark area. Starts the simulator as a child process (so its
//! RSS and CPU are its own), then measures over mTLS on loopback:
//! - `kme.status_rps_c1`: baseline, status requests per second on one keep-alive connection;
//! - `kme.keys_per_s_c1` / `kme.keys_per_s_c16`: enc_keys + dec_keys pairs per second with one
//!   client and with 16 concurrent ones;
//! - `kme.enc_dec_p50_ms` / `kme.enc_dec_p99_ms` (one client) and `kme.enc_dec_p99_ms_c16`;
//! - `kme.pairs_vs_status_ratio`: pairs/s over the status baseline (a pair is two requests, so
//!   0.5 means a key request costs what a status request costs);
//! - `kme.sim_cpu_us_per_pair` / `kme.client_cpu_us_per_pair`: where the time goes;
//! - `kme.sim_rss_mb` (after the load) and `kme.sim_peak_rss_mb`.
//!
//! Prints `bench-result: <key> <value>` lines (the xtask convention) and, with `--results`,
//! merges them into that flat JSON file.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::certs::tls::TlsFiles;
use crate::certs::{self, files, InitOptions};
use crate::etsi014::{KmeClient, KmeClientConfig};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Concurrent clients for the concurrent measurement.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Merge the results into this flat JSON file (created if missing).
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Simulator worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 1)]
    pub sim_threads: usize,
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        // SIGTERM our own child by its pid, then reap it.
        // SAFETY: kill(2) on a pid we spawned and have not yet waited for.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, microseconds.
fn proc_cpu_us(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some(ticks * 1_000_000 / hz.max(1))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn pairs(a: KmeClient, b: KmeClient, until: Instant) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(8192);
    while Instant::now() < until {
        let t = Instant::now();
        let keys = a.enc_keys(files::SAE_B, 1, None).await?;
        let k = b.dec_key(files::SAE_A, keys[0].id, Some(256)).await?;
        if k.material != keys[0].material {
            bail!(
                "key mismatch between enc_keys and dec_keys for {}",
                keys[0].id
            );
        }
        lat.push(t.elapsed());
    }
    Ok(lat)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("qkd-bench-kme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    certs::init(&InitOptions {
        out: dir.clone(),
        hosts: vec![],
        saes: vec![],
        days: 1,
        force: true,
    })?;
    let exe = std::env::current_exe().context("locating the agent binary")?;
    let mut child = Command::new(&exe)
        .args(["kme-sim", "--certs"])
        .arg(&dir)
        .args([
            "--listen-a",
            "127.0.0.1:0",
            "--listen-b",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--key-rate",
            "1000000",
            "--max-key-count",
            "2000000",
            "--prefill",
        ])
        .env("QKD_MACSEC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting kme-sim")?;
    let stdout = child.stdout.take().context("kme-sim stdout")?;
    let child = Child(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let info: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("kme-sim printed {line:?}"))?;
    let addr = |k: &str| {
        info[k]
            .as_str()
            .map(String::from)
            .context("kme-sim address")
    };
    let (url_a, url_b) = (
        format!("https://{}", addr("kme_a")?),
        format!("https://{}", addr("kme_b")?),
    );
    let sim_pid = child.0.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    // Run the measurement on a worker thread (spawned), not in block_on on this thread: block_on
    // would bounce every wake-up between this thread and the worker that drives the sockets.
    let dir2 = dir.clone();
    let task = rt.spawn(async move {
        let dir = dir2;
        let mut out: Vec<(String, f64)> = Vec::new();
        let tlsf = |sae: &str| TlsFiles {
            ca: dir.join(files::CA_CERT),
            cert: dir.join(files::cert(sae)),
            key: dir.join(files::key(sae)),
        };
        let a = KmeClient::new(&KmeClientConfig::new(url_a, tlsf(files::SAE_A)))?;
        let b = KmeClient::new(&KmeClientConfig::new(url_b, tlsf(files::SAE_B)))?;
        let dur = Duration::from_secs_f64(args.seconds);

        // Warm up connections and code paths.
        pairs(
            a.clone(),
            b.clone(),
            Instant::now() + Duration::from_millis(300),
        )
        .await?;

        // Baseline: the cheapest 014 call on one connection.
        let until = Instant::now() + dur;
        let t0 = Instant::now();
        let mut n = 0u64;
        while Instant::now() < until {
            a.status(files::SAE_B).await?;
            n += 1;
        }
        let status_rps = n as f64 / t0.elapsed().as_secs_f64();
        out.push(("kme.status_rps_c1".into(), status_rps));

        // One client.
        let cpu0 = proc_cpu_us(sim_pid);
        let self0 = proc_cpu_us(std::process::id());
        let t0 = Instant::now();
        let mut lat = pairs(a.clone(), b.clone(), Instant::now() + dur).await?;
        let secs = t0.elapsed().as_secs_f64();
        let pairs_c1 = lat.len() as f64;
        if let (Some(c0), Some(c1), Some(s0), Some(s1)) = (
            cpu0,
            proc_cpu_us(sim_pid),
            self0,
            proc_cpu_us(std::process::id()),
        ) {
            out.push((
                "kme.sim_cpu_us_per_pair".into(),
                (c1 - c0) as f64 / pairs_c1,
            ));
            out.push((
                "kme.client_cpu_us_per_pair".into(),
                (s1 - s0) as f64 / pairs_c1,
            ));
        }
        lat.sort();
        out.push(("kme.keys_per_s_c1".into(), pairs_c1 / secs));
        out.push(("kme.enc_dec_p50_ms".into(), percentile(&lat, 0.50)));
        out.push(("kme.enc_dec_p99_ms".into(), percentile(&lat, 0.99)));
        out.push((
            "kme.pairs_vs_status_ratio".into(),
            pairs_c1 / secs / status_rps,
        ));

        // Concurrent clients (one pooled client per side, as an agent with many SAs would have).
        let until = Instant::now() + dur;
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|_| tokio::spawn(pairs(a.clone(), b.clone(), until)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let secs = t0.elapsed().as_secs_f64();
        all.sort();
        out.push((
            format!("kme.keys_per_s_c{}", args.concurrency),
            all.len() as f64 / secs,
        ));
        out.push((
            format!("kme.enc_dec_p99_ms_c{}", args.concurrency),
            percentile(&all, 0.99),
        ));
        Ok::<_, anyhow::Error>(out)
    });
    let mut out = rt.block_on(task)??;
    if let Some(kb) = proc_status_kb(sim_pid, "VmRSS:") {
        out.push(("kme.sim_rss_mb".into(), kb as f64 / 1024.0));
    }
    if let Some(kb) = proc_status_kb(sim_pid, "VmHWM:") {
        out.push(("kme.sim_peak_rss_mb".into(), kb as f64 / 1024.0));
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    for (k, v) in &out {
        println!("bench-result: {k} {v:.3}");
    }
    if let Some(path) = args.results {
        let mut obj: serde_json::Map<String, serde_json::Value> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is not a JSON object", path.display()))?,
            Err(_) => serde_json::Map::new(),
        };
        for (k, v) in out {
            obj.insert(k, serde_json::json!((v * 1000.0).round() / 1000.0));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&obj)?)?;
    }
    Ok(())
}
