//! `qkd-macsec-agent status`: reads the running agent's status socket and prints it.

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::status::{Status, STATUS_SCHEMA_VERSION};

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The status socket (default: global.status_socket of --config, else
    /// /run/qkd-macsec-agent/status.sock).
    #[arg(long, env = "QKD_MACSEC_STATUS_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Take the socket path from this config file.
    #[arg(long, env = "QKD_MACSEC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the agent's JSON (schema: docs/status.md) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent's status socket {path}: {source}; is `qkd-macsec-agent run` running, and are you root or in global.status_group?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the status socket {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} answered with JSON this client cannot read: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent at {path} speaks status schema {got}, this client {ours}; use the agent's own binary for `status`")]
    Schema { path: PathBuf, got: u32, ours: u32 },
    #[error("--watch {0}: must be a number of seconds of at least 0.1")]
    Watch(f64),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Reads one answer from the socket: the raw JSON text and its parsed form.
pub fn fetch(path: &Path) -> Result<(String, Vec<Option<Status>>), ClientError> {
    let mut s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    // The agent answers at once; a hung agent must not hang the operator's terminal.
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|source| ClientError::Read {
            path: path.to_owned(),
            source,
        })?;
    let v: Vec<Option<Status>> =
        serde_json::from_str(&text).map_err(|source| ClientError::Parse {
            path: path.to_owned(),
            source,
        })?;
    for s in v.iter().flatten() {
        if s.schema_version != STATUS_SCHEMA_VERSION {
            return Err(ClientError::Schema {
                path: path.to_owned(),
                got: s.schema_version,
                ours: STATUS_SCHEMA_VERSION,
            });
        }
    }
    Ok((text, v))
}

fn socket_path(args: &StatusArgs) -> Result<PathBuf, ClientError> {
    if let Some(p) = &args.socket {
        return Ok(p.clone());
    }
    if let Some(c) = &args.config {
        return Ok(crate::config::Config::load(c)?.global.status_socket);
    }
    Ok(crate::config::Global::default().status_socket)
}

pub fn run(args: StatusArgs) -> Result<(), ClientError> {
    let path = socket_path(&args)?;
    let Some(secs) = args.watch else {
        let (text, v) = fetch(&path)?;
        print!("{}", output(&text, &v, args.json)?);
        return Ok(());
    };
    if !(secs >= 0.1 && secs.is_finite()) {
        return Err(ClientError::Watch(secs));
    }
    loop {
        let body = match fetch(&path) {
            Ok((text, v)) => output(&text, &v, args.json)?,
            // The agent restarting is worth watching through, not a reason to quit.
            Err(e) => format!("{e}\n"),
        };
        if args.json {
            print!("{body}");
        } else {
            // Clear the screen and home the cursor, then the fresh table.
            print!("\x1b[2J\x1b[H{}\n{body}", chrono_like_now());
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

fn output(text: &str, v: &[Option<Status>], json: bool) -> Result<String, ClientError> {
    if json {
        // One compact line per answer (the agent's own text), so --watch --json is JSON lines.
        return Ok(format!("{}\n", text.trim()));
    }
    Ok(render(v, super::status::unix_now()))
}

fn chrono_like_now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn dur(secs: f64) -> String {
    if secs >= 86_400.0 {
        format!("{:.1}d", secs / 86_400.0)
    } else if secs >= 3600.0 {
        format!("{:.1}h", secs / 3600.0)
    } else if secs >= 60.0 {
        format!("{:.1}m", secs / 60.0)
    } else {
        format!("{secs:.1}s")
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// The human view: one block per link.
pub fn render(v: &[Option<Status>], now_unix: f64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if v.is_empty() {
        o.push_str("no links configured\n");
    }
    for (i, s) in v.iter().enumerate() {
        let Some(s) = s else {
            let _ = writeln!(o, "link #{i}: starting (no status yet)\n");
            continue;
        };
        let _ = writeln!(
            o,
            "{}  {}  profile {}  role {}  peer {}",
            s.link,
            s.state.to_uppercase(),
            s.profile,
            s.role,
            opt(&s.peer_mac)
        );
        if let Some(r) = &s.stall_reason {
            let _ = writeln!(o, "  stalled     {r}");
        }
        let _ = writeln!(
            o,
            "  active      AN {}  key_ID {}  KN {}",
            opt(&s.active_an),
            opt(&s.active_key_id),
            opt(&s.active_kn)
        );
        let next = match (&s.next_key_id, s.next_an) {
            (Some(k), Some(an)) => format!("AN {an}  key_ID {k}  (rollover in progress)"),
            _ => "-".into(),
        };
        let _ = writeln!(o, "  next        {next}");
        let akl = match (s.akl_remaining_seconds, s.akl_remaining_frames, s.used) {
            (Some(t), Some(f), Some(u)) => {
                format!("{} and {f} frames left ({:.1}% used)", dur(t), u * 100.0)
            }
            _ => "-".into(),
        };
        let _ = writeln!(o, "  AKL         {akl}");
        let cap = s
            .key_buffer_capacity
            .map_or_else(String::new, |c| format!(" of {c}"));
        let _ = writeln!(o, "  key buffer  {}{cap} keys", s.keys_held);
        let fetch = match &s.io.last_fetch {
            Some(f) => format!(
                "{} {} in {:.1} ms, {} ago{}",
                f.request,
                f.result,
                f.latency_seconds * 1000.0,
                dur((now_unix - f.unix_time).max(0.0)),
                if s.consecutive_fetch_failures > 0 {
                    format!(" ({} consecutive failures)", s.consecutive_fetch_failures)
                } else {
                    String::new()
                }
            ),
            None => "-".into(),
        };
        let _ = writeln!(o, "  last fetch  {fetch}");
        let totals: Vec<String> =
            s.io.fetch_outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
        if !totals.is_empty() {
            let _ = writeln!(o, "  fetches     {}", totals.join(", "));
        }
        let _ = writeln!(
            o,
            "  counters    rollovers {}, warnings {}, alarms {}, stall drops rx {} tx {}",
            s.rollovers, s.warnings, s.alarms, s.io.stall_drops_rx, s.io.stall_drops_tx
        );
        let _ = writeln!(
            o,
            "  lldp        TLVs delivered {}, rate-limited {}, events lost {}",
            s.io.lldp_delivered, s.io.lldp_rate_limited, s.io.events_lost
        );
        for sa in &s.io.sas {
            let _ = writeln!(
                o,
                "  SA          {} AN {}  frames {}  PN {}",
                sa.direction, sa.an, sa.frames, sa.highest_pn
            );
        }
        if !s.io.active_alarms.is_empty() {
            let _ = writeln!(o, "  alarms      {}", s.io.active_alarms.join(", "));
        }
        let err = match (&s.io.last_error, s.io.last_error_unix_time) {
            (Some(e), Some(t)) => format!("{e} ({} ago)", dur((now_unix - t).max(0.0))),
            (Some(e), None) => e.clone(),
            _ => "-".into(),
        };
        let _ = writeln!(o, "  last error  {err}");
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::status::tests::sample_status;

    #[test]
    fn table_shows_state_keys_ids_and_counters_but_no_keys() {
        let s = sample_status();
        let json = serde_json::to_string(&vec![Some(s.clone()), None]).unwrap();
        let v: Vec<Option<Status>> = serde_json::from_str(&json).unwrap();
        let now = s.io.last_fetch.as_ref().unwrap().unix_time + 5.0;
        let t = render(&v, now);
        assert!(
            t.starts_with("site-a  WARNING  profile sak  role master"),
            "{t}"
        );
        assert!(
            t.contains("key_ID 4a1e6c1e-0000-4000-8000-000000000001  KN 1"),
            "{t}"
        );
        assert!(
            t.contains("AN 2  key_ID 4a1e6c1e-0000-4000-8000-000000000002  (rollover in progress)"),
            "{t}"
        );
        assert!(
            t.contains("AKL         54.0s and 4000000000 frames left (91.0% used)"),
            "{t}"
        );
        assert!(t.contains("key buffer  3 of 4 keys"), "{t}");
        assert!(
            t.contains(
                "last fetch  enc_keys unavailable in 3000.0 ms, 5.0s ago (1 consecutive failures)"
            ),
            "{t}"
        );
        assert!(
            t.contains("rollovers 12, warnings 1, alarms 0, stall drops rx 7 tx 0"),
            "{t}"
        );
        assert!(
            t.contains("SA          tx AN 1  frames 1000  PN 1001"),
            "{t}"
        );
        assert!(t.contains("alarms      QKDMACSEC-W001"), "{t}");
        assert!(
            t.contains("last error  KME https://kme unavailable (503)"),
            "{t}"
        );
        assert!(t.contains("link #1: starting"), "{t}");
    }

    #[test]
    fn client_errors_name_the_socket() {
        let e = fetch(Path::new("/nonexistent/qkd/status.sock")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/qkd/status.sock"),
            "{e}"
        );
        assert!(e.to_string().contains("status_group"), "{e}");
    }

    /// A real socket: a listener answering like the agent, then one with a newer schema and
    /// one with garbage.
    #[test]
    fn client_reads_a_real_socket_and_rejects_bad_answers() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("qkd-ops-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let good = serde_json::to_string(&vec![Some(sample_status())]).unwrap();
        let newer = good.replace("\"schema_version\":1", "\"schema_version\":2");
        let answers = vec![good.clone(), newer, "not json".to_owned()];
        let server = std::thread::spawn(move || {
            for a in answers {
                let (mut c, _) = l.accept().unwrap();
                c.write_all(a.as_bytes()).unwrap();
                c.write_all(b"\n").unwrap();
            }
        });
        let (text, v) = fetch(&path).unwrap();
        assert_eq!(text.trim(), good);
        assert_eq!(v[0].as_ref().unwrap().link, "site-a");
        let e = fetch(&path).unwrap_err();
        assert!(matches!(e, ClientError::Schema { got: 2, .. }), "{e}");
        let e = fetch(&path).unwrap_err();
        assert!(matches!(e, ClientError::Parse { .. }), "{e}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
