//! `qkd-macsec-agent run` refuses malformed config files before touching anything: non-zero exit,
//! an error that names the file and the field, no MACsec link created, no status socket left.
//! Needs no MACsec (the config is checked first), so it runs anywhere as root.

use std::time::{Duration, Instant};

use qkd_macsec_tests::testbed::{
    render_config, require_run_subcommand, GatewayFiles, LinkSpec, Side,
};
use qkd_macsec_tests::{agent_bin, ip_bin, require_root, veth_pair, NetNs};

struct Case {
    name: &'static str,
    /// Edit of a valid config.
    edit: fn(String) -> String,
    /// Text the error must contain (the field, or for syntax errors the line).
    field: &'static str,
}

fn replace(s: String, from: &str, to: &str) -> String {
    assert!(s.contains(from), "test bug: {from:?} not in the config");
    s.replacen(from, to, 1)
}

const CASES: &[Case] = &[
    Case {
        name: "warn_at below rollover_at",
        edit: |s| replace(s, "warn_at = 0.9", "warn_at = 0.5"),
        field: "link[0].akl.warn_at",
    },
    Case {
        name: "unknown cipher",
        edit: |s| replace(s, "cipher = \"gcm-aes-256\"", "cipher = \"aes-ccm\""),
        field: "link[0].cipher",
    },
    Case {
        name: "plain http KME",
        edit: |s| replace(s, "url = \"https://", "url = \"http://"),
        field: "link[0].kme.url",
    },
    Case {
        name: "misspelt key",
        edit: |s| replace(s, "max_age = ", "max_agee = "),
        field: "max_agee",
    },
    Case {
        name: "bad duration",
        edit: |s| replace(s, "max_age = \"4s\"", "max_age = \"4 fortnights\""),
        field: "link[0].akl.max_age",
    },
    Case {
        name: "missing lower interface",
        edit: |s| replace(s, "lower_interface = \"wan0\"\n", ""),
        field: "lower_interface",
    },
    Case {
        name: "same SAE on both ends",
        edit: |s| replace(s, "peer_sae_id = \"sae-b\"", "peer_sae_id = \"sae-a\""),
        field: "link[0].peer_sae_id",
    },
    Case {
        name: "TOML syntax error",
        edit: |s| replace(s, "[link.akl]", "[link.akl"),
        field: "(syntax)",
    },
];

#[test]
fn malformed_configs_are_rejected_with_the_field_named() {
    require_root("network namespaces");
    require_run_subcommand();
    let ns = NetNs::new("cfgbad");
    let peer = NetNs::new("cfgpeer");
    veth_pair(&ns, "wan0", &peer, "wan0");
    let dir = std::env::temp_dir().join(format!("qkd-cfgbad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = GatewayFiles {
        config: dir.join("gw.toml"),
        log: dir.join("gw.log"),
        status_socket: dir.join("gw.sock"),
        bpffs_pin_dir: dir.join("bpffs"),
        state_dir: dir.join("state"),
        ledger_dir: dir.join("ledger"),
    };
    let valid = render_config(Side::A, &LinkSpec::fast("cak"), &dir.join("certs"), &files);
    qkd_macsec_agent::config::Config::parse(&valid, "valid").expect("the base config is valid");
    let bin = agent_bin().to_string_lossy().into_owned();
    let mut failures = Vec::new();
    for case in CASES {
        let text = (case.edit)(valid.clone());
        std::fs::write(&files.config, &text).unwrap();
        let t = Instant::now();
        let out = ns.try_exec(&[&bin, "run", "--config", &files.config.to_string_lossy()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let links = ns.exec_stdout(&[ip_bin(), "-o", "link", "show"]);
        if out.status.success() {
            failures.push(format!("{}: accepted (exit 0)", case.name));
        } else if !err.contains(case.field) {
            failures.push(format!(
                "{}: error does not name {:?}: {err}",
                case.name, case.field
            ));
        } else if !err.contains(&files.config.display().to_string()) {
            failures.push(format!(
                "{}: error does not name the file: {err}",
                case.name
            ));
        } else if links.contains("macsec") {
            failures.push(format!("{}: a MACsec link was created: {links}", case.name));
        } else if files.status_socket.exists() {
            failures.push(format!("{}: status socket left behind", case.name));
        } else if t.elapsed() > Duration::from_secs(10) {
            failures.push(format!("{}: took {:?} to refuse", case.name, t.elapsed()));
        }
    }
    // A config file that does not exist names the path.
    let missing = dir.join("nope.toml");
    let out = ns.try_exec(&[&bin, "run", "--config", &missing.to_string_lossy()]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains(&missing.display().to_string()) {
        failures.push(format!("missing file: exit {}, said {err}", out.status));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
