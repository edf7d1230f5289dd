//! `qkd-macsec-agent bench-agent`: what one key-exchange message costs the agent, as ratios to
//! one AES-CMAC over a message-sized buffer measured in the same run (the floor any
//! authenticated message must pay). Prints `bench-result: agent.<key> <value>` lines for
//! `cargo xtask bench agent`.
//!
//! Measured: a genuine authenticated message (decode, verify, replay window, event), a forged
//! one (bad tag: decode, verify, rate limit), a malformed one (rejected by the decoder), a
//! replayed one (verify, then the window), and a SAK derivation (802.1X KDF).

use std::time::{Duration, Instant};

use crate::config::Role;
use crate::kdf;
use crate::keyx::machine::{Keyx, KeyxConfig};
use crate::keyx::wire::KeyRole;
use crate::keyx::KeyId;
use crate::secret::SecretBytes;

const ROUNDS: usize = 5;

fn cfg(role: Role) -> KeyxConfig {
    let (local, peer) = match role {
        Role::Master => ("SAE_A", "SAE_B"),
        Role::Slave => ("SAE_B", "SAE_A"),
    };
    KeyxConfig {
        role,
        local_sae: local.into(),
        peer_sae: peer.into(),
        retransmit_initial: Duration::from_millis(250),
        retransmit_max: Duration::from_secs(4),
        hello_interval: Duration::from_millis(100),
        availability_window: Duration::from_secs(10),
        max_rx_per_sec: 50,
        initial_seq: 1,
        incarnation: sci(role),
        local_sci: sci(role),
    }
}

/// The SCI of each end (port 1); also a fine non-zero incarnation for a benchmark.
fn sci(role: Role) -> u64 {
    match role {
        Role::Master => 0x0200_0000_000a_0001,
        Role::Slave => 0x0200_0000_000b_0001,
    }
}

/// The Ethernet source address of frames from `role`.
fn mac(role: Role) -> [u8; 6] {
    crate::keyx::wire::sci_mac(sci(role))
}

/// A master and a slave that share one confirmed key (so messages are authenticated).
fn keyed_pair(t: Instant) -> (Keyx, Keyx) {
    let mut m = Keyx::new(cfg(Role::Master), t);
    let mut s = Keyx::new(cfg(Role::Slave), t);
    let key_id = KeyId([7; 16]);
    m.announce(
        key_id,
        KeyRole::Sak,
        1,
        SecretBytes::new(vec![9; 32]),
        t,
        None,
        t,
    )
    .expect("announce");
    while let Some(p) = m.poll_transmit() {
        let _ = s.handle_payload(&p, mac(Role::Master), t);
    }
    while s.poll_event().is_some() {}
    s.fetched(key_id, Ok(SecretBytes::new(vec![9; 32])))
        .expect("fetched");
    while let Some(p) = s.poll_transmit() {
        let _ = m.handle_payload(&p, mac(Role::Slave), t);
    }
    while s.poll_event().is_some() {}
    while m.poll_event().is_some() {}
    assert_eq!(m.anchor(), Some(key_id), "bench setup: key not confirmed");
    (m, s)
}

/// `n` authenticated HELLOs from the master, each with its own sequence number.
fn hellos(m: &mut Keyx, t: Instant, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    let mut now = t;
    while out.len() < n {
        now += Duration::from_millis(100);
        m.handle_timeout(now);
        while let Some(p) = m.poll_transmit() {
            out.push(p);
        }
    }
    out.truncate(n);
    out
}

/// Median over rounds of the time per item of `f` over `items`.
fn per_item(items: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / items as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[ROUNDS / 2]
}

pub fn run(n: usize) -> anyhow::Result<()> {
    let t = Instant::now();
    let (mut m, _) = keyed_pair(t);
    let genuine = hellos(&mut m, t, n);
    let len = genuine[0].len();

    // Baseline: one AES-128-CMAC over a message-sized buffer.
    let buf = vec![0x5au8; len - 16];
    let key = [1u8; 16];
    let cmac_ns = per_item(n, || {
        for _ in 0..n {
            std::hint::black_box(kdf::aes_cmac(&key, &[std::hint::black_box(&buf)]).ok());
        }
    });

    let genuine_ns = per_item(n, || {
        // A fresh receiver per round, so every message is new to its replay window.
        let (_, mut s) = keyed_pair(t);
        for p in &genuine {
            std::hint::black_box(s.handle_payload(p, mac(Role::Master), t));
            while s.poll_event().is_some() {}
        }
    });
    let forged: Vec<Vec<u8>> = genuine
        .iter()
        .map(|p| {
            let mut q = p.clone();
            let last = q.len() - 1;
            q[last] ^= 1;
            q
        })
        .collect();
    let forged_ns = per_item(n, || {
        let (_, mut s) = keyed_pair(t);
        for p in &forged {
            std::hint::black_box(s.handle_payload(p, mac(Role::Master), t));
        }
    });
    let malformed: Vec<Vec<u8>> = genuine
        .iter()
        .map(|p| {
            let mut q = p.clone();
            q[0] = 9;
            q
        })
        .collect();
    let malformed_ns = per_item(n, || {
        let (_, mut s) = keyed_pair(t);
        for p in &malformed {
            std::hint::black_box(s.handle_payload(p, mac(Role::Master), t));
        }
    });
    let replay_ns = per_item(n, || {
        let (_, mut s) = keyed_pair(t);
        let _ = s.handle_payload(&genuine[0], mac(Role::Master), t);
        for _ in 0..n {
            std::hint::black_box(s.handle_payload(&genuine[0], mac(Role::Master), t));
        }
        while s.poll_event().is_some() {}
    });
    let cak = SecretBytes::new(vec![3; 32]);
    let sak_ns = per_item(n / 10, || {
        for i in 0..n / 10 {
            std::hint::black_box(
                kdf::derive_sak(&cak, &[0; 32], &[[1; 12], [2; 12]], i as u32 + 1, 32).ok(),
            );
        }
    });

    let r = |k: &str, v: f64| println!("bench-result: agent.{k} {v:.3}");
    r("cmac_ns", cmac_ns);
    r("keyx_genuine_ns", genuine_ns);
    r("keyx_genuine_per_cmac", genuine_ns / cmac_ns);
    r("keyx_forged_per_cmac", forged_ns / cmac_ns);
    r("keyx_malformed_per_cmac", malformed_ns / cmac_ns);
    r("keyx_replay_per_cmac", replay_ns / cmac_ns);
    r("kdf_sak256_per_cmac", sak_ns / cmac_ns);
    r("keyx_genuine_msgs_per_s", 1e9 / genuine_ns);
    Ok(())
}
