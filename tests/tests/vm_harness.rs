//! Harness proof for kernel MACsec (runs inside the test VM): two namespaces joined by a veth pair,
//! a MACsec link with static keys on each end, pings across, and the SecY counters show the frames
//! were encrypted by the sender and validated by the receiver. A wrong key must stop the traffic,
//! which shows the counter checks can fail.
//!
//! Scaffolding only: keys are installed with iproute2 here; the product installs them over netlink.

use qkd_macsec_tests::{require_macsec, veth_pair, NetNs};

const PINGS: u64 = 5;

#[derive(Clone, Copy, Debug)]
enum Cipher {
    GcmAes256,
    GcmAesXpn256,
}

impl Cipher {
    fn name(self) -> &'static str {
        match self {
            Cipher::GcmAes256 => "gcm-aes-256",
            Cipher::GcmAesXpn256 => "gcm-aes-xpn-256",
        }
    }
}

/// One end: namespace, lower veth, MACsec link, SCI parts.
struct End {
    ns: NetNs,
    mac: String,
}

/// SA options: PN (or XPN with SSCI and salt) and the key.
fn sa_args(cipher: Cipher, ssci: &str, key: &str) -> Vec<String> {
    let mut v: Vec<String> = match cipher {
        Cipher::GcmAes256 => vec!["pn".into(), "1".into()],
        Cipher::GcmAesXpn256 => vec![
            "xpn".into(),
            "1".into(),
            "ssci".into(),
            ssci.into(),
            // 96-bit salt: test value, not key material of the product.
            "salt".into(),
            "a1a2a3a4a5a6a7a8a9aaabac".into(),
        ],
    };
    v.extend(["on", "key", "01", key].map(String::from));
    v
}

/// Builds the pair: `a` sends with `key_a`, `b` sends with `key_b`; `b` expects `a` to use
/// `b_expects_from_a` (equal to `key_a` unless the test wants a mismatch).
fn setup(cipher: Cipher, key_a: &str, key_b: &str, b_expects_from_a: &str) -> (End, End) {
    require_macsec();
    let na = NetNs::new("qmt-msa");
    let nb = NetNs::new("qmt-msb");
    let pair = veth_pair(&na, "veth0", &nb, "veth0");
    let a = End {
        ns: na,
        mac: pair.a_mac.to_string(),
    };
    let b = End {
        ns: nb,
        mac: pair.b_mac.to_string(),
    };
    for (me, peer, tx_key, rx_key, my_ssci, peer_ssci, ip) in [
        (&a, &b, key_a, key_b, "1", "2", "10.204.0.1/24"),
        (&b, &a, key_b, b_expects_from_a, "2", "1", "10.204.0.2/24"),
    ] {
        // One `ip -batch` per end: every process start costs noticeable time in the VM.
        let cmds = [
            format!(
                "link add link veth0 name macsec0 type macsec port 1 encrypt on cipher {}",
                cipher.name()
            ),
            format!(
                "macsec add macsec0 tx sa 0 {}",
                sa_args(cipher, my_ssci, tx_key).join(" ")
            ),
            format!("macsec add macsec0 rx port 1 address {}", peer.mac),
            format!(
                "macsec add macsec0 rx port 1 address {} sa 0 {}",
                peer.mac,
                sa_args(cipher, peer_ssci, rx_key).join(" ")
            ),
            "link set macsec0 up".to_owned(),
            format!("addr add {ip} dev macsec0"),
        ];
        me.ns
            .ip_batch(&cmds.iter().map(String::as_str).collect::<Vec<_>>());
    }
    (a, b)
}

/// `ip -s macsec show macsec0` in `ns`.
fn stats(ns: &NetNs) -> String {
    String::from_utf8_lossy(&ns.ip(&["-s", "macsec", "show", "macsec0"]).stdout).into_owned()
}

/// The first value of counter `name` in `ip -s macsec show` output: the SecY/SC-level block comes
/// before the per-SA blocks.
fn counter(text: &str, name: &str) -> u64 {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(header) = line.trim().strip_prefix("stats:") else {
            continue;
        };
        let Some(col) = header.split_whitespace().position(|h| h == name) else {
            continue;
        };
        let values = lines
            .get(i + 1)
            .unwrap_or_else(|| panic!("no values after stats header in:\n{text}"));
        let v = values
            .split_whitespace()
            .nth(col)
            .unwrap_or_else(|| panic!("no column {col} for {name} in:\n{text}"));
        return v
            .parse()
            .unwrap_or_else(|e| panic!("{name} value {v:?} not a number ({e}) in:\n{text}"));
    }
    panic!("counter {name} not in `ip -s macsec show macsec0`:\n{text}");
}

const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_B: &str = "f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";
const KEY_WRONG: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn ping_encrypted(cipher: Cipher) {
    let (a, b) = setup(cipher, KEY_A, KEY_B, KEY_A);
    let enc_before = counter(&stats(&a.ns), "OutPktsEncrypted");
    let ok_before = counter(&stats(&b.ns), "InPktsOK");
    a.ns.exec(&[
        "ping",
        "-c",
        &PINGS.to_string(),
        "-i",
        "0.2",
        "-W",
        "3",
        "10.204.0.2",
    ]);
    let enc = counter(&stats(&a.ns), "OutPktsEncrypted") - enc_before;
    let ok = counter(&stats(&b.ns), "InPktsOK") - ok_before;
    assert!(
        enc >= PINGS,
        "{cipher:?}: sender's OutPktsEncrypted rose by {enc}, expected >= {PINGS}"
    );
    assert!(
        ok >= PINGS,
        "{cipher:?}: receiver's InPktsOK rose by {ok}, expected >= {PINGS}"
    );
}

#[test]
fn ping_over_gcm_aes_256() {
    ping_encrypted(Cipher::GcmAes256);
}

#[test]
fn ping_over_gcm_aes_xpn_256() {
    ping_encrypted(Cipher::GcmAesXpn256);
}

#[test]
fn wrong_key_stops_traffic_and_counts_invalid_frames() {
    let (a, b) = setup(Cipher::GcmAes256, KEY_A, KEY_B, KEY_WRONG);
    let ok_before = counter(&stats(&b.ns), "InPktsOK");
    let out =
        a.ns.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.204.0.2"]);
    assert!(
        !out.status.success(),
        "ping succeeded although b expects a different key from a"
    );
    let after = stats(&b.ns);
    assert_eq!(
        counter(&after, "InPktsOK"),
        ok_before,
        "b validated frames encrypted with a key it does not have"
    );
    let bad = counter(&after, "InPktsNotValid") + counter(&after, "InPktsInvalid");
    assert!(bad > 0, "b counted no invalid frames from the wrong key");
}
