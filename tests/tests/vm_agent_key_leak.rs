//! Key-leak audit, end to end in the MACsec VM: both agents log at TRACE through bootstrap,
//! rollovers, KME 503s and a KME outage (connections dropped); then every key the KME simulator issued
//! (it writes them to an audit file, `kme-sim --key-audit-log`) is searched for, in hex (both
//! cases) and base64 (standard and URL-safe, padded or not), in every log line of both agents
//! and of the simulator, in the status socket's answers, in the Prometheus metrics pages and in
//! the error text the agents logged.
//! One hit fails the test. In the `sak` profile the QKD keys are the SAKs themselves, so kernel
//! SA keys are covered too.

use std::time::Duration;

use base64::Engine as _;
use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{LinkSpec, Running, Side, TestbedOptions, SECURE_TIMEOUT};

/// Every textual form of `key` that a leak would plausibly take.
fn encodings(key: &[u8]) -> Vec<String> {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let e = base64::engine::general_purpose::STANDARD;
    let u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let std_b64 = e.encode(key);
    vec![
        hex.to_uppercase(),
        hex,
        std_b64.trim_end_matches('=').to_owned(),
        std_b64,
        u.encode(key),
        // Debug output of a byte slice, e.g. "[12, 200, ...]".
        format!("{key:?}"),
    ]
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex in the audit log"))
        .collect()
}

fn audit(profile: &'static str) {
    require_macsec();
    let audit =
        std::env::temp_dir().join(format!("qkd-keyaudit-{profile}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&audit);
    let opts = TestbedOptions {
        kme_args: vec![
            "--key-audit-log".into(),
            audit.to_string_lossy().into_owned(),
        ],
        agent_log: "trace".into(),
        metrics_address: Some("127.0.0.1:9477".into()),
        ..Default::default()
    };
    let spec = LinkSpec::fast(profile);
    let mut run = Running::up(&format!("leak{profile}"), &opts, &spec, SECURE_TIMEOUT);
    let [ab, ba] = run.streams(50);
    let base = run.rollovers();
    run.wait_for("3 rollovers", Duration::from_secs(60), |s| {
        s.rollovers[0].min(s.rollovers[1]) >= base + 3
    });
    let mut status_text = String::new();
    let mut metrics_text = String::new();
    for side in Side::BOTH {
        let st = run.bed.agent_status(side).expect("status socket answers");
        status_text.push_str(&st.to_string());
        metrics_text.push_str(&run.bed.scrape_metrics(side));
    }
    // Error paths: the KMEs answer 503 for a while, then drop every connection (an outage).
    run.bed.kme_ctl(&["set", "--fail-503", "true"]);
    std::thread::sleep(Duration::from_secs(3));
    run.bed
        .kme_ctl(&["set", "--fail-503", "false", "--drop-connections", "true"]);
    std::thread::sleep(Duration::from_secs(3));
    run.bed.kme_ctl(&["set", "--drop-connections", "false"]);
    std::thread::sleep(Duration::from_secs(3));
    for side in Side::BOTH {
        if let Some(st) = run.bed.agent_status(side) {
            status_text.push_str(&st.to_string());
        }
        // After the outage: fetch failures and alarms are on the page now.
        metrics_text.push_str(&run.bed.scrape_metrics(side));
    }
    assert!(
        metrics_text.contains("qkd_macsec_key_fetch_total"),
        "the metrics pages hold no key-fetch families, so the audit would prove little:\n{metrics_text}"
    );
    let _ = (ab.finish(Duration::from_secs(1)), ba.finish(Duration::ZERO));
    run.bed.check_agents_alive();

    let issued: Vec<(String, Vec<u8>)> = std::fs::read_to_string(&audit)
        .expect("the simulator wrote its key audit log")
        .lines()
        .filter_map(|l| {
            let (id, hex) = l.split_once(' ')?;
            Some((id.to_owned(), from_hex(hex.trim())))
        })
        .collect();
    assert!(
        issued.len() >= 3,
        "only {} keys issued: the audit would prove nothing",
        issued.len()
    );
    let mut haystacks = vec![
        ("status socket".to_owned(), status_text),
        ("metrics pages".to_owned(), metrics_text),
    ];
    for (i, f) in run.bed.files.iter().enumerate() {
        let log = std::fs::read_to_string(&f.log).expect("agent log");
        assert!(
            log.contains("TRACE"),
            "agent {i} did not log at TRACE, so the audit would miss what TRACE shows"
        );
        haystacks.push((f.log.display().to_string(), log));
    }
    let kme_log = run.bed.dir.join("kme-sim.log");
    haystacks.push((
        kme_log.display().to_string(),
        std::fs::read_to_string(&kme_log).unwrap_or_default(),
    ));
    let total: usize = haystacks.iter().map(|(_, h)| h.len()).sum();
    assert!(total > 10_000, "only {total} bytes of output to audit");
    let mut hits = Vec::new();
    for (id, key) in &issued {
        for needle in encodings(key) {
            for (name, hay) in &haystacks {
                if hay.contains(&needle) {
                    hits.push(format!("key {id} as {needle:?} in {name}"));
                }
            }
        }
    }
    assert!(hits.is_empty(), "key material leaked:\n{}", hits.join("\n"));
    eprintln!(
        "{profile}: {} keys, {} bytes of logs, status and metrics output searched, no hit",
        issued.len(),
        total
    );
    let _ = std::fs::remove_file(&audit);
}

#[test]
fn no_key_in_any_output_at_trace_sak() {
    audit("sak");
}

#[test]
fn no_key_in_any_output_at_trace_cak() {
    audit("cak");
}
