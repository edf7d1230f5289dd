//! End to end, in the MACsec VM: what an operator sees of two real agents. `qkd-macsec-agent
//! status` (table and JSON schema) over the real status socket, its mode, a scrape of the real
//! metrics endpoint, and the alarm hook run by the agent on a real stall (KME outage) and on
//! the recovery.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use qkd_macsec_agent::config::Config;
use qkd_macsec_tests::testbed::{LinkSpec, Side, Testbed, TestbedOptions, SECURE_TIMEOUT};
use qkd_macsec_tests::{agent_bin, require_macsec};

const METRICS: &str = "127.0.0.1:19464";

fn status_json(bed: &Testbed) -> serde_json::Value {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(&bed.files[0].status_socket)
        .output()
        .expect("run qkd-macsec-agent status");
    assert!(
        out.status.success(),
        "status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

fn metric(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix}:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn status_metrics_and_alarm_hook_on_a_real_link() {
    require_macsec();
    let mut spec = LinkSpec::fast("sak");
    // As in vm_agent_kme_outage: a small buffer so a KME outage stalls the link quickly.
    spec.key_request_interval = "1s".into();
    spec.sak_buffer = 1;
    spec.akl_max_age = "6s".into();
    spec.akl_rollover_at = 0.5;
    spec.akl_warn_at = 0.8;
    let opts = TestbedOptions {
        metrics_address: Some(METRICS.into()),
        ..Default::default()
    };
    let mut bed = Testbed::new("ops", &opts);
    bed.write_configs(&spec);
    let hook_log = bed.dir.join("alarms.log");
    // Both agents serve metrics (the testbed option); gw-a also gets a status group and an alarm hook (argv; the script only appends).
    let cfg_a = &bed.files[0].config;
    let text = std::fs::read_to_string(cfg_a).unwrap().replacen(
        "[global]\n",
        &format!(
            "[global]\nstatus_group = \"0\"\nalarm_hook = {{ command = [\"/bin/sh\", \"-c\", \"echo \\\"$QKD_MACSEC_ALARM_ID $QKD_MACSEC_ALARM_ACTION $QKD_MACSEC_LINK $QKD_MACSEC_KEY_ID\\\" >> {}\"], timeout = \"5s\" }}\n",
            hook_log.display()
        ),
        1,
    );
    Config::parse(&text, "ops A").unwrap_or_else(|e| panic!("{e}\n{text}"));
    std::fs::write(cfg_a, &text).unwrap();
    bed.start_agents("info");
    bed.wait_secured(SECURE_TIMEOUT);

    // Status over the real socket: mode, schema, content.
    let sock = std::fs::metadata(&bed.files[0].status_socket).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o660);
    assert_eq!(sock.gid(), 0);
    // Wait for a rollover so the counters have something to show.
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let v = status_json(&bed);
        let s = v[0].clone();
        if s["rollovers"].as_u64().unwrap_or(0) >= 2 && s["last_fetch"].is_object() {
            break s;
        }
        bed.check_agents_alive();
        assert!(
            Instant::now() < deadline,
            "no rollover within 60 s: {v}\n{}",
            bed.logs_tail(30)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(st["schema_version"], 1, "{st}");
    assert_eq!(st["link"], "gw-a-link");
    assert!(
        ["secured", "rekeying", "warning"].contains(&st["state"].as_str().unwrap()),
        "{st}"
    );
    assert!(
        st["active_key_id"].as_str().is_some_and(|k| k.len() == 36),
        "{st}"
    );
    assert!(
        st["akl_remaining_seconds"]
            .as_f64()
            .is_some_and(|t| t > 0.0 && t <= 6.0),
        "{st}"
    );
    assert!(
        st["akl_remaining_frames"].as_u64().is_some_and(|f| f > 0),
        "{st}"
    );
    assert_eq!(st["key_buffer_capacity"], 1);
    assert_eq!(st["last_fetch"]["result"], "ok", "{st}");
    assert!(st["fetch_outcomes"]["ok"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["fetch_latency"]["count"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["sas"].as_array().is_some_and(|a| !a.is_empty()), "{st}");
    // No key material anywhere: the only 64-hex-digit strings would be keys.
    let raw = st.to_string();
    assert!(!raw.contains("\"key\""), "{raw}");

    let table = Command::new(agent_bin())
        .args(["status", "--socket"])
        .arg(&bed.files[0].status_socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("gw-a-link  "), "{table}");
    assert!(table.contains("key buffer  "), "{table}");
    assert!(table.contains("last fetch  enc_keys ok in"), "{table}");

    // Metrics over the real endpoint.
    let m = bed.scrape_metrics(Side::A);
    assert!(m.contains("content-type: text/plain; version=0.0.4"), "{m}");
    assert!(metric(&m, "qkd_macsec_rollovers_total{link=\"gw-a-link\"}") >= 2.0);
    assert!(
        metric(
            &m,
            "qkd_macsec_key_fetch_total{link=\"gw-a-link\",result=\"ok\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &m,
            "qkd_macsec_key_fetch_duration_seconds_count{link=\"gw-a-link\"}"
        ) >= 2.0
    );
    assert!(metric(&m, "qkd_macsec_akl_remaining_seconds{link=\"gw-a-link\"}") > 0.0);
    assert!(
        m.contains("qkd_macsec_sa_frames_total{link=\"gw-a-link\",direction=\"tx\""),
        "{m}"
    );

    // A KME outage: the link stalls; the hook sees E001 raised, then cleared on recovery.
    bed.kme_ctl(&["set", "--fail-503", "true"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status_json(&bed);
        if s[0]["state"] == "stalled" {
            break;
        }
        bed.check_agents_alive();
        assert!(
            Instant::now() < deadline,
            "no stall within 120 s: {s}\n{}",
            bed.logs_tail(30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let m = bed.scrape_metrics(Side::A);
    assert_eq!(
        metric(
            &m,
            "qkd_macsec_link_state{link=\"gw-a-link\",state=\"stalled\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            "qkd_macsec_key_fetch_total{link=\"gw-a-link\",result=\"unavailable\"}"
        ) >= 1.0
    );
    bed.kme_ctl(&["set", "--fail-503", "false"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hooks = std::fs::read_to_string(&hook_log).unwrap_or_default();
        if hooks.contains("QKDMACSEC-E001 clear gw-a-link") {
            break;
        }
        bed.check_agents_alive();
        assert!(
            Instant::now() < deadline,
            "no E001 clear within 60 s of the KME's return; hook log:\n{hooks}\n{}",
            bed.logs_tail(30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let hooks = std::fs::read_to_string(&hook_log).unwrap();
    let raise = hooks
        .find("QKDMACSEC-E001 raise gw-a-link ")
        .unwrap_or_else(|| panic!("no E001 raise in the hook log:\n{hooks}"));
    assert!(
        raise < hooks.find("QKDMACSEC-E001 clear gw-a-link").unwrap(),
        "{hooks}"
    );
    // The raise names the exhausted key's key_ID (a UUID), never key bytes.
    let line = hooks[raise..].lines().next().unwrap();
    assert_eq!(line.rsplit(' ').next().unwrap().len(), 36, "{line}");
    let log = bed.agent_log(Side::A);
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("QKDMACSEC-E001 link-stalled raised")),
        "the stall is not in the log with its identifier:\n{log}"
    );
}
