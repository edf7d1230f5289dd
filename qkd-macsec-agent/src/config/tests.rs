use super::*;

const SAMPLE: &str = include_str!("../../../docs/sample-config.toml");

const MINIMAL: &str = r#"
[[link]]
lower_interface = "eth1"
macsec_interface = "macsec0"
local_sae_id = "SAE_A"
peer_sae_id = "SAE_B"
[link.kme]
url = "https://127.0.0.1:8443"
ca = "/ca.pem"
cert = "/c.pem"
key = "/c.key"
"#;

#[test]
fn sample_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/sample-config.toml");
    let cfg = Config::load(&path).expect("docs/sample-config.toml must load");
    assert_eq!(cfg.link.len(), 2);
    let a = &cfg.link[0];
    assert_eq!(a.label(), "site-a-to-b");
    assert_eq!(a.cipher, Cipher::GcmAes256);
    assert_eq!(a.profile, ProfileKind::Sak);
    assert_eq!(a.role(), Role::Master, "SAE_A < SAE_B");
    assert_eq!(a.sak.buffer, 10);
    assert_eq!(a.lldp.oui_bytes(), qkd_macsec_common::LLDP_OUI);
    let b = &cfg.link[1];
    assert_eq!(b.label(), "macsec1");
    assert_eq!(b.profile, ProfileKind::Cak);
    assert_eq!(b.cipher, Cipher::GcmAesXpn256);
    assert_eq!(b.key_request_interval.get(), Duration::from_secs(86_400));
    assert_eq!(b.akl.effective_max_pn(b.cipher), 1 << 62);
}

/// The sample states every default; the defaults in code must be the same values, or the
/// documentation lies. Compare the first link of the sample with the minimal config.
#[test]
fn sample_documents_the_real_defaults() {
    let s = Config::parse(SAMPLE, "sample").unwrap();
    let m = Config::parse(MINIMAL, "minimal").unwrap();
    let (s0, m0) = (&s.link[0], &m.link[0]);
    assert_eq!(s.global.bpffs_pin_dir, m.global.bpffs_pin_dir);
    assert_eq!(s.global.status_socket, m.global.status_socket);
    assert_eq!(s.global.metrics_address, m.global.metrics_address);
    assert_eq!(s.global.log_level, m.global.log_level);
    assert_eq!(s0.cipher, m0.cipher);
    assert_eq!(s0.role, m0.role);
    assert_eq!(s0.profile, m0.profile);
    assert_eq!(s0.key_request_interval, m0.key_request_interval);
    assert_eq!(s0.kme.availability_window, m0.kme.availability_window);
    assert_eq!(s0.kme.request_timeout, m0.kme.request_timeout);
    assert_eq!(s0.akl.max_age, m0.akl.max_age);
    assert_eq!(s0.akl.max_pn, m0.akl.max_pn);
    assert_eq!(s0.akl.rollover_at, m0.akl.rollover_at);
    assert_eq!(s0.akl.warn_at, m0.akl.warn_at);
    assert_eq!(s0.akl.effective_max_pn(s0.cipher), 0xC000_0000);
    assert_eq!(s0.sak.buffer, m0.sak.buffer);
    assert_eq!(s0.cak.lifetime, m0.cak.lifetime);
    assert_eq!(s0.cak.tolerated_failures, m0.cak.tolerated_failures);
    assert_eq!(s0.lldp.oui, m0.lldp.oui);
    assert_eq!(s0.lldp.subtype, m0.lldp.subtype);
    assert_eq!(s0.lldp.rate_limits(), m0.lldp.rate_limits());
    assert_eq!(
        m0.lldp.rate_limits(),
        qkd_macsec_common::LldpRateLimits::DEFAULT,
        "the config's defaults are the data plane's"
    );
    assert_eq!(s0.keyx.retransmit_initial, m0.keyx.retransmit_initial);
    assert_eq!(s0.keyx.retransmit_max, m0.keyx.retransmit_max);
    assert_eq!(s0.keyx.hello_interval, m0.keyx.hello_interval);
    assert_eq!(s0.keyx.max_rx_per_sec, m0.keyx.max_rx_per_sec);
}

#[test]
fn auto_role_is_complementary() {
    let m = Config::parse(MINIMAL, "m").unwrap();
    assert_eq!(m.link[0].role(), Role::Master);
    let swapped = MINIMAL
        .replace("\"SAE_A\"", "\"TMP\"")
        .replace("\"SAE_B\"", "\"SAE_A\"")
        .replace("\"TMP\"", "\"SAE_B\"");
    let s = Config::parse(&swapped, "s").unwrap();
    assert_eq!(s.link[0].role(), Role::Slave);
}

#[test]
fn explicit_role_wins_over_auto() {
    let c = Config::parse(
        &MINIMAL.replace(
            "peer_sae_id = \"SAE_B\"",
            "peer_sae_id = \"SAE_B\"\nrole = \"slave\"",
        ),
        "m",
    )
    .unwrap();
    assert_eq!(c.link[0].role(), Role::Slave);
}

#[test]
fn missing_file_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/qkd.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("/nonexistent/qkd.toml"), "{e}");
}

/// MINIMAL with `line` placed in `section` (appended when MINIMAL lacks the section), replacing
/// a line that sets the same key there.
fn with(section: &str, line: &str) -> String {
    let key = line.split('=').next().unwrap().trim();
    let mut lines: Vec<&str> = MINIMAL.lines().collect();
    let Some(start) = lines.iter().position(|l| *l == section) else {
        return format!("{MINIMAL}{section}\n{line}\n");
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with('['))
        .map_or(lines.len(), |p| start + 1 + p);
    if let Some(p) = lines[start + 1..end]
        .iter()
        .position(|l| l.split('=').next().map(str::trim) == Some(key))
    {
        lines.remove(start + 1 + p);
    }
    lines.insert(start + 1, line);
    lines.join("\n") + "\n"
}

#[track_caller]
fn rejects(text: &str, field: &str, fragment: &str) {
    let e = Config::parse(text, "test.toml").expect_err("must be rejected");
    assert_eq!(
        e.field(),
        field,
        "wrong field in: {e}\n--- input ---\n{text}"
    );
    let msg = e.to_string();
    assert!(msg.starts_with("test.toml: "), "{msg}");
    assert!(msg.contains(field), "{msg}");
    assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
}

#[test]
fn the_helper_builds_valid_variants() {
    // Guard for the malformed-file tests below: a benign edit through `with` must still load,
    // so a rejection there is due to the value, not to the helper mangling the file.
    Config::parse(&with("[[link]]", "cipher = \"gcm-aes-128\""), "t").unwrap();
    Config::parse(&with("[link.akl]", "warn_at = 0.95"), "t").unwrap();
    Config::parse(&with("[global]", "log_level = \"debug\""), "t").unwrap();
}

#[test]
fn malformed_files_name_the_field() {
    let cases: &[(String, &str, &str)] = &[
        // Syntax and schema
        ("[[link]\n".into(), "(syntax)", "line 1"),
        (
            with("[[link]]", "colour = \"red\""),
            "link[0].colour",
            "unknown field",
        ),
        (
            with("[link.akl]", "warn_at = \"high\""),
            "link[0].akl.warn_at",
            "invalid type",
        ),
        (
            with("[[link]]", "cipher = \"aes-cbc\""),
            "link[0].cipher",
            "unknown variant",
        ),
        (
            with("[[link]]", "role = \"boss\""),
            "link[0].role",
            "unknown variant",
        ),
        (
            with("[[link]]", "profile = \"both\""),
            "link[0].profile",
            "unknown variant",
        ),
        (
            with("[[link]]", "key_request_interval = \"5\""),
            "link[0].key_request_interval",
            "no unit",
        ),
        (
            with("[[link]]", "key_request_interval = 300"),
            "link[0].key_request_interval",
            "duration string",
        ),
        (
            with("[link.kme]", "availability_window = \"10 sec\""),
            "link[0].kme.availability_window",
            "unknown unit",
        ),
        (
            with("[global]", "metrics_address = \"localhost\""),
            "global.metrics_address",
            "invalid",
        ),
        (
            MINIMAL.replace("lower_interface = \"eth1\"\n", ""),
            "link[0]",
            "missing field `lower_interface`",
        ),
        (
            MINIMAL.replace("ca = \"/ca.pem\"\n", ""),
            "link[0].kme",
            "missing field `ca`",
        ),
        (
            with("[link.sak]", "buffer = -1"),
            "link[0].sak.buffer",
            "invalid value",
        ),
        (
            with("[link.lldp]", "subtype = 256"),
            "link[0].lldp.subtype",
            "invalid value",
        ),
        // Semantic rules
        ("".into(), "link", "no [[link]]"),
        (
            with("[global]", "log_level = \"loud\""),
            "global.log_level",
            "not a level",
        ),
        (
            with("[global]", "bpffs_pin_dir = \"bpf\""),
            "global.bpffs_pin_dir",
            "absolute",
        ),
        (
            with("[[link]]", "lower_interface = \"a-very-long-ifname\""),
            "link[0].lower_interface",
            "IFNAMSIZ",
        ),
        (
            with("[[link]]", "macsec_interface = \"mac sec\""),
            "link[0].macsec_interface",
            "not a valid interface name",
        ),
        (
            with("[[link]]", "macsec_interface = \"eth1\""),
            "link[0].macsec_interface",
            "also the lower interface",
        ),
        (
            with("[[link]]", "local_sae_id = \"\""),
            "link[0].local_sae_id",
            "1 to 64 bytes",
        ),
        (
            with("[[link]]", "local_sae_id = \"SAE/A\""),
            "link[0].local_sae_id",
            "may only contain",
        ),
        (
            with("[[link]]", "peer_sae_id = \"SAE_A\""),
            "link[0].peer_sae_id",
            "equals local_sae_id",
        ),
        (with("[[link]]", "name = \"\""), "link[0].name", "printable"),
        (
            with("[[link]]", "key_request_interval = \"500ms\""),
            "link[0].key_request_interval",
            "minimum of 1s",
        ),
        (
            with("[[link]]", "key_request_interval = \"8m\""),
            "link[0].key_request_interval",
            "buffer would drain",
        ),
        (
            with("[link.kme]", "url = \"http://kme:80\""),
            "link[0].kme.url",
            "https://",
        ),
        (
            with("[link.kme]", "url = \"https://\""),
            "link[0].kme.url",
            "https://host",
        ),
        (
            with("[link.kme]", "url = \"https://kme/?x=1\""),
            "link[0].kme.url",
            "without query",
        ),
        (
            with("[link.kme]", "key = \"\""),
            "link[0].kme.key",
            "must not be empty",
        ),
        (
            with("[link.kme]", "availability_window = \"500ms\""),
            "link[0].kme.availability_window",
            "minimum of 1s",
        ),
        (
            with("[link.kme]", "request_timeout = \"0s\""),
            "link[0].kme.request_timeout",
            "above zero",
        ),
        (
            with("[link.akl]", "max_age = \"0s\""),
            "link[0].akl.max_age",
            "minimum of 1s",
        ),
        (
            with("[link.akl]", "max_pn = 0"),
            "link[0].akl.max_pn",
            "above zero",
        ),
        (
            with("[link.akl]", "max_pn = 4294967296"),
            "link[0].akl.max_pn",
            "exceeds the PN space of gcm-aes-256",
        ),
        (
            with("[link.akl]", "warn_at = 0.95\nrollover_at = 1.0"),
            "link[0].akl.rollover_at",
            "1 must be below 1.0",
        ),
        (
            with("[link.akl]", "warn_at = 1.5"),
            "link[0].akl.warn_at",
            "1.5 must be below 1.0",
        ),
        (
            with("[link.akl]", "warn_at = 0.0"),
            "link[0].akl.warn_at",
            "must be above 0.0",
        ),
        (
            with("[link.akl]", "warn_at = nan"),
            "link[0].akl.warn_at",
            "must be above 0.0",
        ),
        (
            with("[link.akl]", "warn_at = 0.5"),
            "link[0].akl.warn_at",
            "must be above akl.rollover_at",
        ),
        (
            with("[link.sak]", "buffer = 0"),
            "link[0].sak.buffer",
            "between 1 and 64",
        ),
        (
            with("[link.sak]", "buffer = 65"),
            "link[0].sak.buffer",
            "between 1 and 64",
        ),
        (
            with(
                "[[link]]",
                "profile = \"cak\"\nkey_request_interval = \"10d\"",
            ),
            "link[0].cak.lifetime",
            "must exceed key_request_interval",
        ),
        (
            with("[link.lldp]", "oui = \"acde48\""),
            "link[0].lldp.oui",
            "not an OUI",
        ),
        (
            with("[link.lldp]", "oui = \"ac:de:48:00\""),
            "link[0].lldp.oui",
            "not an OUI",
        ),
        (
            with("[link.keyx]", "retransmit_initial = \"1ms\""),
            "link[0].keyx.retransmit_initial",
            "minimum of 10ms",
        ),
        (
            with("[link.keyx]", "retransmit_max = \"100ms\""),
            "link[0].keyx.retransmit_max",
            "at least keyx.retransmit_initial",
        ),
        (
            with("[link.keyx]", "retransmit_max = \"10s\""),
            "link[0].keyx.retransmit_max",
            "below kme.availability_window",
        ),
        (
            with("[link.keyx]", "hello_interval = \"10ms\""),
            "link[0].keyx.hello_interval",
            "minimum of 100ms",
        ),
        (
            with("[link.keyx]", "max_rx_per_sec = 0"),
            "link[0].keyx.max_rx_per_sec",
            "at least 1",
        ),
        (
            with("[link.lldp]", "rate_per_source = 0"),
            "link[0].lldp.rate_per_source",
            "at least 1",
        ),
        (
            with("[link.lldp]", "burst_others = 0"),
            "link[0].lldp.burst_others",
            "at least 1",
        ),
        (
            with("[link.lldp]", "burst_peer = 1000000"),
            "link[0].lldp.burst_peer",
            "above the maximum of 100000",
        ),
        (
            with("[link.lldp]", "rate_peer = 100001"),
            "link[0].lldp.rate_peer",
            "above the maximum",
        ),
        (
            with("[link.lldp]", "rate_per_source = 60"),
            "link[0].lldp.rate_per_source",
            "must not exceed lldp.rate_others (20)",
        ),
        (
            with("[link.lldp]", "rate_others = -1"),
            "link[0].lldp.rate_others",
            "",
        ),
    ];
    for (text, field, fragment) in cases {
        rejects(text, field, fragment);
    }
}

#[test]
fn duplicate_links_are_rejected() {
    let two = format!("{MINIMAL}\n{}", MINIMAL.replace("eth1", "eth2"));
    rejects(&two, "link[1].macsec_interface", "used by an earlier link");
    let two = format!(
        "{MINIMAL}\n{}",
        MINIMAL
            .replace("macsec0", "macsec1")
            .replace("SAE_B", "SAE_C")
    );
    rejects(&two, "link[1].lower_interface", "used by an earlier link");
    let two = format!(
        "{MINIMAL}\n{}",
        MINIMAL
            .replace("macsec0", "macsec1")
            .replace("eth1", "eth2")
    );
    rejects(&two, "link[1].peer_sae_id", "ambiguous");
}

#[test]
fn xpn_accepts_large_pn() {
    let t = with("[[link]]", "cipher = \"gcm-aes-xpn-128\"");
    let t = t.replace(
        "[link.kme]",
        "[link.akl]\nmax_pn = 18446744073709551615\n[link.kme]",
    );
    let c = Config::parse(&t, "t").unwrap();
    assert_eq!(c.link[0].akl.effective_max_pn(c.link[0].cipher), u64::MAX);
    let t = with("[[link]]", "cipher = \"gcm-aes-xpn-128\"")
        .replace("[link.kme]", "[link.akl]\nmax_pn = 4294967296\n[link.kme]");
    let c = Config::parse(&t, "t").unwrap();
    assert_eq!(c.link[0].akl.effective_max_pn(c.link[0].cipher), 1 << 32);
}

#[test]
fn cipher_properties() {
    assert_eq!(Cipher::GcmAes128.key_len(), 16);
    assert_eq!(Cipher::GcmAesXpn256.key_len(), 32);
    assert!(!Cipher::GcmAes256.is_xpn());
    assert!(Cipher::GcmAesXpn128.is_xpn());
    assert_eq!(Cipher::GcmAesXpn256.id(), 0x0080_C200_0100_0004);
    assert_eq!(Cipher::GcmAes128.max_pn(), 0xFFFF_FFFF);
}

#[test]
fn ops_options_are_checked() {
    let ok = Config::parse(
        &format!(
            "{MINIMAL}[global]\nmetrics_address = \"127.0.0.1:9464\"\nstatus_group = \"qkd-macsec\"\n[global.alarm_hook]\ncommand = [\"/usr/bin/logger\", \"-t\", \"qkd\"]\n"
        ),
        "t",
    )
    .unwrap();
    assert_eq!(ok.global.status_group.as_deref(), Some("qkd-macsec"));
    let hook = ok.global.alarm_hook.unwrap();
    assert_eq!(hook.command, ["/usr/bin/logger", "-t", "qkd"]);
    assert_eq!(hook.timeout.get(), Duration::from_secs(10));
    rejects(
        &with("[global]", "metrics_address = \"0.0.0.0:9464\""),
        "global.metrics_address",
        "metrics_allow_remote",
    );
    let remote = format!(
        "{MINIMAL}[global]\nmetrics_address = \"0.0.0.0:9464\"\nmetrics_allow_remote = true\n"
    );
    assert!(Config::parse(&remote, "t").is_ok());
    rejects(
        &with("[global]", "status_group = \"a b\""),
        "global.status_group",
        "not a group",
    );
    rejects(
        &format!("{MINIMAL}[global.alarm_hook]\ncommand = []\n"),
        "global.alarm_hook.command",
        "is empty",
    );
    rejects(
        &format!("{MINIMAL}[global.alarm_hook]\ncommand = [\"page-me\"]\n"),
        "global.alarm_hook.command",
        "absolute path",
    );
    rejects(
        &format!("{MINIMAL}[global.alarm_hook]\ncommand = [\"/bin/true\"]\ntimeout = \"1h\"\n"),
        "global.alarm_hook.timeout",
        "between 100ms and 5m",
    );
    rejects(
        &format!("{MINIMAL}[global.alarm_hook]\ncommand = [\"/bin/true\"]\nshell = true\n"),
        "global.alarm_hook.shell",
        "unknown field",
    );
}

/// Regression (fuzz target `config`): an unknown top-level key with an empty name gave the error
/// "origin: : ..." with no field at all.
#[test]
fn unknown_top_level_key_names_the_top_level() {
    for text in ["\"\" = \"=\"\n", "colour = 1\n"] {
        let e = Config::parse(text, "t.toml").unwrap_err();
        assert!(!e.field().is_empty(), "{e}");
        assert!(!e.to_string().starts_with("t.toml: : "), "{e}");
    }
}
