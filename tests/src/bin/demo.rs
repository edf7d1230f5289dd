//! `qkd-macsec-demo`: two gateways keyed by the KME simulator, traffic across their MACsec link,
//! a live view once per second and a JSON summary as the last stdout line. Run through
//! `cargo xtask demo`, which builds it and boots the MACsec VM when the host kernel lacks MACsec.
//!
//! Everything shown is observed from outside the agents: kernel MACsec state dumps in each
//! gateway namespace, an AF_PACKET capture of what each gateway puts on the wire, and UDP
//! sequence streams (both directions) that account for every datagram.

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use qkd_macsec_tests::testbed::{
    LinkSpec, Monitor, Side, Stream, StreamReport, Testbed, TestbedOptions, WireCapture,
};

#[derive(Parser, Debug)]
#[command(
    name = "qkd-macsec-demo",
    about = "Two QKD-keyed MACsec gateways, live"
)]
struct Args {
    /// How long traffic runs once the link is secured, seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Key profile of the link: cak or sak.
    #[arg(long, default_value = "cak", value_parser = ["cak", "sak"])]
    profile: String,
    /// Datagrams per second in each direction.
    #[arg(long, default_value_t = 200)]
    pps: u32,
    /// How long the agents get to secure the link, seconds.
    #[arg(long, default_value_t = 90)]
    secure_timeout: u64,
    /// Also write the summary JSON to this file (used by `cargo xtask demo` inside the VM).
    #[arg(long)]
    summary_file: Option<std::path::PathBuf>,
    /// Agent log filter (QKD_MACSEC_LOG); the logs go to files named in the output.
    #[arg(long, default_value = "info")]
    agent_log: String,
}

#[derive(Default)]
struct Outcome {
    error: Option<String>,
    start_to_secure_s: Option<f64>,
    rollovers: [u64; 2],
    streams: Vec<(Side, StreamReport)>,
    plaintext_frames: u64,
    plaintext_stream_frames: u64,
    macsec_frames: u64,
    lldp_frames: u64,
    stalls: u64,
    in_invalid: u64,
    in_ok: [u64; 2],
    traffic_s: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let t0 = Instant::now();
    let mut out = Outcome::default();
    // Failures are reported once, in the summary's "error" and on stderr, not as a backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    // The testbed panics with a full explanation when something is missing (the tests share it);
    // here that becomes an error in the summary instead of a bare abort, and the testbed's Drop
    // still cleans up.
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| run(&args, &mut out)));
    if let Err(p) = r {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        out.error = Some(msg);
    }
    let lost: u64 = out.streams.iter().map(|(_, r)| r.lost).sum();
    let sent: u64 = out.streams.iter().map(|(_, r)| r.sent).sum();
    let received: u64 = out.streams.iter().map(|(_, r)| r.received).sum();
    let reordered: u64 = out.streams.iter().map(|(_, r)| r.reordered).sum();
    let duplicated: u64 = out.streams.iter().map(|(_, r)| r.duplicated).sum();
    // Secured: the link came up, traffic went through MACsec in both directions, nothing of
    // ours crossed the wire in the clear, no frame failed validation and the link never stalled.
    let secured = out.error.is_none()
        && out.start_to_secure_s.is_some()
        && out.streams.len() == 2
        && out.streams.iter().all(|(_, r)| r.received > 0)
        && out.in_ok.iter().all(|&n| n > 0)
        && out.plaintext_frames == 0
        && out.plaintext_stream_frames == 0
        && out.in_invalid == 0
        && out.stalls == 0;
    let summary = serde_json::json!({
        "secured": secured,
        "rollovers": out.rollovers[0].min(out.rollovers[1]),
        "rollovers_gw_a": out.rollovers[0],
        "rollovers_gw_b": out.rollovers[1],
        "lost_frames": lost,
        "sent_frames": sent,
        "received_frames": received,
        "reordered_frames": reordered,
        "duplicated_frames": duplicated,
        "plaintext_frames_on_wire": out.plaintext_frames,
        "macsec_frames_on_wire": out.macsec_frames,
        "lldp_frames_on_wire": out.lldp_frames,
        "invalid_frames": out.in_invalid,
        "stalls": out.stalls,
        "profile": args.profile,
        "start_to_secure_s": out.start_to_secure_s,
        "traffic_s": out.traffic_s,
        "wall_s": t0.elapsed().as_secs_f64(),
        "error": out.error,
    });
    let line = summary.to_string();
    if let Some(p) = &args.summary_file {
        if let Err(e) = std::fs::write(p, &line) {
            eprintln!("demo: cannot write {}: {e}", p.display());
        }
    }
    if let Some(e) = &out.error {
        eprintln!("demo: FAILED: {e}");
    }
    println!("{line}");
    let _ = std::io::stdout().flush();
    if secured && lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(args: &Args, out: &mut Outcome) {
    say(&format!(
        "demo: profile {}, {} s of traffic at {} datagrams/s each way",
        args.profile, args.seconds, args.pps
    ));
    let mut bed = Testbed::new(
        "demo",
        &TestbedOptions {
            agent_log: args.agent_log.clone(),
            ..Default::default()
        },
    );
    say(&format!(
        "demo: namespaces {} and {} joined by a veth pair; KMEs in {} (kme-a reachable only \
         from gw-a, kme-b only from gw-b); files in {}",
        bed.ns(Side::A).name(),
        bed.ns(Side::B).name(),
        bed.kme_ns.name(),
        bed.dir.display()
    ));
    let spec = LinkSpec::fast(if args.profile == "sak" { "sak" } else { "cak" });
    bed.write_configs(&spec);
    say(&format!(
        "demo: configs {} and {}: SAK lifetime {} (rollover at {:.0}%), key request every {}",
        bed.files[0].config.display(),
        bed.files[1].config.display(),
        spec.akl_max_age,
        spec.akl_rollover_at * 100.0,
        spec.key_request_interval
    ));
    let capture = WireCapture::start(&bed);
    bed.start_agents(&args.agent_log);
    say("demo: agents started; waiting for the link to be secured");
    let secured_after = bed.wait_secured(Duration::from_secs(args.secure_timeout));
    out.start_to_secure_s = Some(secured_after.as_secs_f64());
    say(&format!(
        "demo: link secured {:.1} s after start",
        secured_after.as_secs_f64()
    ));
    // ARP over the fresh link before the streams start, so the first datagrams are not
    // queued behind neighbour resolution.
    let replies = bed.ping(Side::A, 3, "0.2");
    assert!(
        replies > 0,
        "no ping reply across the secured link\n{}",
        bed.logs_tail(30)
    );
    let monitor = Monitor::start(&bed, Duration::from_millis(50));
    let streams = [
        Stream::start(&bed, Side::A, 5001, args.pps),
        Stream::start(&bed, Side::B, 5002, args.pps),
    ];
    let traffic_start = Instant::now();
    let end = traffic_start + Duration::from_secs(args.seconds);
    let mut tick = traffic_start;
    while Instant::now() < end {
        tick += Duration::from_secs(1);
        if let Some(d) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        bed.check_agents_alive();
        let (views, rolls, stalls) = monitor.snapshot(|s| {
            (
                s.latest.clone(),
                s.rollovers,
                s.stalls(Side::A).len() + s.stalls(Side::B).len(),
            )
        });
        let reps = streams
            .iter()
            .map(|s| s.report(Duration::from_secs(1)))
            .collect::<Vec<_>>();
        let wire = capture.counts(|_| true);
        let side = |i: usize| {
            let v = &views[i];
            format!(
                "{} {} AN {} key {} tx {} rx {}",
                Side::BOTH[i].label(),
                if v.secured() {
                    "secured"
                } else {
                    "NOT-SECURED"
                },
                v.encoding_an.map_or("-".into(), |a| a.to_string()),
                v.tx_key_short(),
                v.out_encrypted,
                v.in_ok
            )
        };
        say(&format!(
            "[{:>3}s] {} | {} | rollovers {}/{} stalls {} | a>b {}/{} lost {} | b>a {}/{} lost {} | wire macsec {} lldp {} plain {}",
            traffic_start.elapsed().as_secs(),
            side(0),
            side(1),
            rolls[0],
            rolls[1],
            stalls,
            reps[0].received,
            reps[0].sent,
            reps[0].lost,
            reps[1].received,
            reps[1].sent,
            reps[1].lost,
            wire.macsec,
            wire.lldp,
            wire.plaintext
        ));
    }
    let [s1, s2] = streams;
    out.streams = vec![
        (Side::A, s1.finish(Duration::from_secs(1))),
        (Side::B, s2.finish(Duration::ZERO)),
    ];
    out.traffic_s = traffic_start.elapsed().as_secs_f64();
    let st = monitor.stop();
    out.rollovers = st.rollovers;
    out.stalls = (st.stalls(Side::A).len() + st.stalls(Side::B).len()) as u64;
    for (i, v) in st.latest.iter().enumerate() {
        out.in_ok[i] = v.in_ok;
        out.in_invalid += v.in_invalid + v.in_not_valid;
    }
    let wire = capture.counts(|_| true);
    out.plaintext_frames = wire.plaintext;
    out.plaintext_stream_frames = wire.plaintext_stream;
    out.macsec_frames = wire.macsec;
    out.lldp_frames = wire.lldp;
    for (side, r) in &out.streams {
        say(&format!(
            "demo: {} -> {}: sent {} received {} lost {} (send errors {}) reordered {} duplicated {}",
            side.label(),
            side.other().label(),
            r.sent,
            r.received,
            r.lost,
            r.send_errors,
            r.reordered,
            r.duplicated
        ));
    }
    say("demo: stopping agents and the KME simulator, deleting namespaces");
    drop(capture);
    drop(bed);
}

/// Progress and the live view go to stdout; only the summary is machine-read (the last line).
fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}
