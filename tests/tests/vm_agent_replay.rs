//! End to end, in the MACsec VM: issue 17 item 2, a restart plus replayed messages must never put
//! an old key on a new SA. Eve (a bridge port on the wire) records the key-ID exchange over
//! several rollovers; then the KMEs are made to serve keys again (the simulator's faults:
//! `reserve_keys`, dec_keys answers a delivered key_ID with the same bytes; `reissue_keys`,
//! enc_keys hands the old key_IDs out again), one agent is `kill -9`ed and restarted, and eve
//! replays what the other side sent, in order and with its source address, towards the
//! restarted agent until the link is back with fresh keys. First the slave, then the master.
//!
//! Checked from outside the agents: no SA (TX or RX) that either kernel gets after the kill
//! carries a kernel key identifier any SA had before it (in the sak profile that identifier is
//! the QKD key_ID; in the cak profile the CAK's member identifier and the KN, so a replayed
//! INSTALL would show as well), and neither side switches its TX back to such a key (an SA the
//! kill left behind); the restarted agent refused the replays (the slave's NACKs on the wire
//! name the replayed key_IDs; the master's KME handed it old key_IDs, which its log shows
//! refused); and the link comes back secured, with fresh keys, and carries IP.
//!
//! `QKD_REPLAY_LOG` sets the restarted agent's `QKD_MACSEC_LOG` filter (default `info`).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use qkd_macsec_agent::keyx::wire::{Body, Message, NackReason};
use qkd_macsec_agent::keyx::KeyId;
use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{
    key_short, org_tlv_payload, ChangeKind, LinkSpec, LldpRecorder, Replayer, Running, SaInstall,
    Side, TestbedOptions, Wire, LOWER_IF, SECURE_TIMEOUT,
};

/// One injected frame every this often: 10 a second, within the data plane's per-source LLDP
/// limit (10/s, burst 20) that applies before the restarted agent has located its peer.
const GAP: Duration = Duration::from_millis(100);
/// Rollovers (both sides) eve records at least.
const ROLLOVERS_RECORDED: u64 = 4;
/// Keys whose ANNOUNCE and INSTALL eve records at least.
const KEYS_RECORDED: usize = 2;

fn decode(frame: &[u8]) -> Option<Message> {
    let (off, len) = org_tlv_payload(frame)?;
    Message::decode(&frame[off..off + len]).ok()
}

fn key_id_of(body: &Body) -> Option<KeyId> {
    match body {
        Body::Announce { key_id, .. }
        | Body::Install { key_id, .. }
        | Body::Ack { key_id, .. }
        | Body::Nack { key_id, .. } => Some(*key_id),
        Body::Hello { .. } => None,
    }
}

fn kind(body: &Body) -> &'static str {
    match body {
        Body::Announce { .. } => "announce",
        Body::Install { .. } => "install",
        Body::Ack { .. } => "ack",
        Body::Nack { .. } => "nack",
        Body::Hello { .. } => "hello",
    }
}

/// The exchange frames one gateway sent (source address `mac`), in order.
struct Recording {
    frames: Vec<Vec<u8>>,
    key_ids: HashSet<KeyId>,
    kinds: BTreeMap<&'static str, usize>,
    announced: HashSet<KeyId>,
    installed: HashSet<KeyId>,
}

impl Recording {
    fn of(frames: &[(Instant, Vec<u8>)], mac: [u8; 6]) -> Recording {
        let mut r = Recording {
            frames: Vec::new(),
            key_ids: HashSet::new(),
            kinds: BTreeMap::new(),
            announced: HashSet::new(),
            installed: HashSet::new(),
        };
        for (_, f) in frames
            .iter()
            .filter(|(_, f)| f.len() > 12 && f[6..12] == mac)
        {
            let Some(m) = decode(f) else { continue };
            *r.kinds.entry(kind(&m.body)).or_default() += 1;
            r.key_ids.extend(key_id_of(&m.body));
            match m.body {
                Body::Announce { key_id, .. } => {
                    r.announced.insert(key_id);
                }
                Body::Install { key_id, .. } => {
                    r.installed.insert(key_id);
                }
                _ => {}
            }
            r.frames.push(f.clone());
        }
        r
    }

    /// Keys whose ANNOUNCE and at least one INSTALL are both in the recording.
    fn announced_and_installed(&self) -> usize {
        self.announced.intersection(&self.installed).count()
    }
}

fn kme_counter(st: &serde_json::Value, name: &str) -> u64 {
    st[name]
        .as_u64()
        .unwrap_or_else(|| panic!("kme-sim state has no {name}: {st}"))
}

/// Both agents' status and log tails and the simulator's state, for failure messages.
fn diagnostics(run: &Running) -> String {
    let mut s = String::new();
    for side in Side::BOTH {
        s.push_str(&format!(
            "---- {} status: {}\n",
            side.label(),
            run.bed
                .agent_status(side)
                .map_or("(no answer)".into(), |v| v.to_string())
        ));
    }
    s.push_str(&format!("---- KME: {}\n", run.bed.kme_ctl(&["show"])));
    s.push_str(&run.bed.logs_tail(60));
    s
}

/// Every kernel key identifier any SA on either side had so far.
fn keys_so_far(run: &Running) -> HashSet<[u8; 16]> {
    run.monitor
        .snapshot(|s| s.sa_installs.iter().map(|i| i.key).collect())
}

/// What one kill, restart and replay showed besides the SAs.
struct Phase {
    /// The exchange frames the victim sent meanwhile (the answers eve heard).
    answers: Recording,
    /// Old key_IDs the KMEs handed out again by enc_keys meanwhile.
    reissued: u64,
    /// Old key_IDs the victim's log says it refused from its KME.
    refused_from_kme: usize,
}

/// Kills `victim`, applies `faults` (`kme-sim-ctl` arguments), restarts it and replays
/// `replay` towards it until the link is secured again with keys no SA had before the kill
/// (plus two more full passes); asserts that no SA got an old key meanwhile, and that IP
/// crosses the link.
fn kill_restart_and_replay(
    run: &mut Running,
    victim: Side,
    faults: &[&str],
    replay: &Recording,
) -> Phase {
    let eve = run.bed.eve.clone().expect("bridged testbed has eve");
    let old = keys_so_far(run);
    let kme0 = run.bed.kme_ctl(&["show"]);
    let log_before = run.bed.agent_log(victim).len();
    let victim_mac = run.bed.lower_mac(victim);
    run.bed.eve_towards(Some(victim));
    let killed = Instant::now();
    run.bed.kill9_agent(victim);
    // After the kill: a KME that re-issues keys the running agent holds would only test
    // that agent (see `a_kme_that_reissues_a_held_key_never_stops_key_delivery`).
    let st = run.bed.kme_ctl(faults);
    eprintln!(
        "{} killed; KME faults now a {} b {}",
        victim.label(),
        st["faults_a"],
        st["faults_b"]
    );
    let heard = LldpRecorder::start(&eve, LOWER_IF);
    let replayer = Replayer::start(&eve, LOWER_IF, replay.frames.clone(), GAP);
    run.bed.start_agent(
        victim,
        &std::env::var("QKD_REPLAY_LOG").unwrap_or_else(|_| "info".into()),
    );
    let back = run.wait_for(
        &format!(
            "{} restarted under replay: both sides secured with keys no SA had before the kill",
            victim.label()
        ),
        SECURE_TIMEOUT,
        |s| {
            s.latest
                .iter()
                .all(|v| v.secured() && v.tx_key.is_some_and(|k| !old.contains(&k)))
        },
    );
    // At least one whole pass of the recording after the link came back, when the restarted
    // agent is surely listening.
    let passes_at_back = replayer.passes();
    let pass_time = GAP * replay.frames.len() as u32;
    let deadline = Instant::now() + pass_time * 3 + Duration::from_secs(10);
    while replayer.passes() < passes_at_back + 2 {
        run.bed.check_agents_alive();
        assert!(
            Instant::now() < deadline,
            "the replayer made no progress ({} passes)",
            replayer.passes()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let passes = replayer.stop();
    let heard = heard.stop();
    run.bed.eve_towards(None);
    eprintln!(
        "{}: killed, restarted and secured with fresh keys after {:.1} s; {} passes of {} replayed frames",
        victim.label(),
        (back - killed).as_secs_f64(),
        passes,
        replay.frames.len()
    );

    let (installs, switches) = run.monitor.snapshot(|s| {
        (
            s.sa_installs
                .iter()
                .filter(|i| i.at >= killed)
                .cloned()
                .collect::<Vec<SaInstall>>(),
            s.changes
                .iter()
                .filter(|c| c.at >= killed)
                .filter_map(|c| match c.what {
                    ChangeKind::Rollover { an, key } => Some((c.at, c.side, an, key)),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )
    });
    let mut reused: Vec<String> = installs
        .iter()
        .filter(|i| old.contains(&i.key))
        .map(|i| {
            format!(
                "{} {} SA AN {} key {} (next PN {}) {:.1} s after the kill: an old key on a \
                 new SA (same key, PN from 1: AES-GCM keystream reuse)",
                i.side.label(),
                if i.tx { "TX" } else { "RX" },
                i.an,
                key_short(&i.key),
                i.next_pn,
                (i.at - killed).as_secs_f64()
            )
        })
        .collect();
    // An old SA the kill left in the kernel keeps its packet numbers, but transmitting on it
    // again puts a retired key back into use, past its lifetime.
    reused.extend(switches.iter().filter(|(.., key)| old.contains(key)).map(
        |(at, side, an, key)| {
            format!(
                "{} switched its TX to AN {an}, key {} {:.1} s after the kill: a retired \
                     key back in use",
                side.label(),
                key_short(key),
                (*at - killed).as_secs_f64()
            )
        },
    ));
    assert!(
        reused.is_empty(),
        "after {} restarted, an old key came back:\n  {}\nKME: {}\n{}",
        victim.label(),
        reused.join("\n  "),
        run.bed.kme_ctl(&["show"]),
        diagnostics(run)
    );
    let fresh = installs.iter().filter(|i| !old.contains(&i.key)).count();
    assert!(fresh > 0, "the monitor saw no SA installed after the kill");
    // Traffic: the restarted side may still be catching up (a key the KME re-issued can cost
    // the master a request or an availability window), so ping until it gets through.
    let ping_deadline = Instant::now() + Duration::from_secs(60);
    let replies = loop {
        let r = run.bed.ping(Side::A, 5, "0.2");
        if r > 0 {
            break r;
        }
        run.bed.check_agents_alive();
        assert!(
            Instant::now() < ping_deadline,
            "secured with fresh keys, but no ping crossed the link within 60 s\n{}",
            diagnostics(run)
        );
    };
    let ping_after = back.elapsed();
    let kme1 = run.bed.kme_ctl(&["show"]);
    let reissued = kme_counter(&kme1, "reissued") - kme_counter(&kme0, "reissued");
    let log = run.bed.agent_log(victim);
    let refused_from_kme = log[log_before..]
        .lines()
        .filter(|l| l.contains("cannot announce fetched key"))
        .count();
    eprintln!(
        "{}: {} SAs installed since the kill, all with new keys; ping {replies}/5 {:.1} s after \
         that; the KMEs \
         served {} delivered keys again (dec_keys) and handed out {reissued} old key_IDs again \
         (enc_keys); the victim's log shows {refused_from_kme} of them refused",
        victim.label(),
        fresh,
        ping_after.as_secs_f64(),
        kme_counter(&kme1, "reserved") - kme_counter(&kme0, "reserved"),
    );
    Phase {
        answers: Recording::of(&heard, victim_mac),
        reissued,
        refused_from_kme,
    }
}

fn restart_and_replay(profile: &'static str, prefix: &str) {
    require_macsec();
    let started = Instant::now();
    let mut spec = LinkSpec::fast(profile);
    if profile == "cak" {
        // A CAK every 6 s instead of 10: the recording then holds the ANNOUNCE of a CAK and
        // INSTALLs of SAKs derived from it.
        spec.key_request_interval = "6s".into();
    }
    // Two keys ahead instead of four: a key's ANNOUNCE and its INSTALL are then a few seconds
    // apart, so the recording holds both for several keys.
    spec.sak_buffer = 2;
    let opts = TestbedOptions {
        wire: Wire::Bridged,
        // Enough to keep every key of the run for the re-serve fault.
        kme_args: vec!["--key-history".into(), "1000".into()],
        ..Default::default()
    };
    let mut run = Running::up(prefix, &opts, &spec, SECURE_TIMEOUT);
    let roles: Vec<String> = Side::BOTH
        .iter()
        .map(|&s| {
            let st = run.bed.agent_status(s).expect("status socket answers");
            st[0]["role"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(roles, ["master", "slave"], "role = auto: sae-a sorts first");
    let (master, slave) = (Side::A, Side::B);
    let mac = Side::BOTH.map(|s| run.bed.lower_mac(s));
    let eve = run.bed.eve.clone().expect("bridged testbed has eve");

    // Eve records both directions over several rollovers, and until she holds the ANNOUNCE
    // and an INSTALL of a few keys: exactly what a restarted slave must never act on.
    let recorder = LldpRecorder::start(&eve, LOWER_IF);
    let base = run.rollovers();
    run.wait_for(
        "rollovers while eve records",
        Duration::from_secs(120),
        |s| s.rollovers[0].min(s.rollovers[1]) >= base + ROLLOVERS_RECORDED,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = Recording::of(&recorder.frames(), mac[master as usize]);
        if r.announced_and_installed() >= KEYS_RECORDED {
            break;
        }
        run.bed.check_agents_alive();
        assert!(
            Instant::now() < deadline,
            "eve recorded the ANNOUNCE and an INSTALL of only {} keys: {:?}",
            r.announced_and_installed(),
            r.kinds
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let recorded = recorder.stop();
    let from_master = Recording::of(&recorded, mac[master as usize]);
    let from_slave = Recording::of(&recorded, mac[slave as usize]);
    eprintln!(
        "eve recorded {} master frames {:?} (ANNOUNCE and INSTALL of {} keys) and {} slave \
         frames {:?}; {} kernel key ids so far",
        from_master.frames.len(),
        from_master.kinds,
        from_master.announced_and_installed(),
        from_slave.frames.len(),
        from_slave.kinds,
        keys_so_far(&run).len()
    );

    // The slave restarts; eve replays the master's frames at it.
    // Both KMEs serve every delivered key again (dec_keys).
    let slave_answers = kill_restart_and_replay(
        &mut run,
        slave,
        &["set", "--reserve-keys", "true"],
        &from_master,
    )
    .answers;
    let refusals: Vec<(NackReason, KeyId)> = slave_answers
        .frames
        .iter()
        .filter_map(|f| match decode(f)?.body {
            Body::Nack { key_id, reason, .. }
                if from_master.key_ids.contains(&key_id)
                    && matches!(reason, NackReason::Retired | NackReason::UnknownKey) =>
            {
                Some((reason, key_id))
            }
            _ => None,
        })
        .collect();
    let refused_keys: HashSet<KeyId> = refusals.iter().map(|(_, k)| *k).collect();
    eprintln!(
        "the restarted slave sent {:?}; {} NACKs (retired / unknown key) of {} replayed key_IDs",
        slave_answers.kinds,
        refusals.len(),
        refused_keys.len()
    );
    assert!(
        !refusals.is_empty(),
        "the restarted slave never refused a replayed key_ID on the wire (it sent {:?})\n{}",
        slave_answers.kinds,
        diagnostics(&run)
    );

    // The master restarts; eve replays everything the slave sent, in both of its lives.
    let mut slave_frames = from_slave.frames.clone();
    slave_frames.extend(slave_answers.frames.iter().cloned());
    let replay = Recording {
        frames: slave_frames,
        key_ids: HashSet::new(),
        kinds: BTreeMap::new(),
        announced: HashSet::new(),
        installed: HashSet::new(),
    };
    // And the master's KME rewinds: enc_keys hands out every key delivered so far once more.
    let phase = kill_restart_and_replay(
        &mut run,
        master,
        &["set", "--reissue-keys", "true", "--kme", "a"],
        &replay,
    );
    // The master's KME handed it old key_IDs (it starts with the oldest, which was installed
    // long ago): the ledger must have turned them away, and the log says so.
    assert!(
        phase.reissued > 0 && phase.refused_from_kme > 0,
        "the restarted master was handed {} old key_IDs and refused {} of them (expected both \
         above 0: the first one it gets is the run's first key)\n{}",
        phase.reissued,
        phase.refused_from_kme,
        diagnostics(&run)
    );
    eprintln!(
        "{profile}: restart + replay, both roles, in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn restart_and_replay_never_put_an_old_key_on_a_new_sa_sak() {
    restart_and_replay("sak", "rpls");
}

#[test]
fn restart_and_replay_never_put_an_old_key_on_a_new_sa_cak() {
    restart_and_replay("cak", "rplc");
}

/// Not key reuse but liveness, found by the test above: a KME that hands the master a key_ID
/// the master still holds (confirmed, waiting in its buffer) must not stop key delivery. The
/// master used to announce the key a second time; when the held copy was then used and
/// retired, the second announcement was dropped without a `KeyLost`, so the key supply counted
/// a request as outstanding for ever. With `sak.buffer` such leaks the master never fetched again
/// and the link stalled for good (seen in the VM: no key request for 60 s and more, both agents
/// idle). Now a key_ID known to the master is refused at once (keyx unit test
/// `a_key_id_known_here_is_never_announced_twice`).
#[test]
fn a_kme_that_reissues_a_held_key_never_stops_key_delivery() {
    require_macsec();
    let mut spec = LinkSpec::fast("sak");
    // One key ahead: one leaked request is then enough to stop delivery.
    spec.sak_buffer = 1;
    // Keys that stay fetchable for a minute: the second announcement of a held key then
    // outlives the held copy (used within seconds, retired at the next rollover) instead of
    // timing out first, which is what makes the leak certain rather than a race. The KME
    // walks through its old keys (one refused request per 2 s) faster than rollovers use
    // keys up (one per 3 s), so it always reaches the key in use or the one held.
    spec.availability_window = "60s".into();
    let opts = TestbedOptions {
        kme_args: ["--key-history", "1000", "--availability-timeout-ms", "0"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let mut run = Running::up("reiss", &opts, &spec, SECURE_TIMEOUT);
    // Rewind kme-a: every key delivered so far comes back once, the master's held ones too.
    let st = run
        .bed
        .kme_ctl(&["set", "--reissue-keys", "true", "--kme", "a"]);
    assert_eq!(st["faults_a"]["reissue_keys"], true, "{st}");
    let base = run.rollovers();
    // A SAK rolls every 3 s: once the old key_IDs are used up (one refused request a second),
    // fresh keys must carry the link on.
    run.wait_for(
        "rollovers after kme-a handed out its old keys again",
        Duration::from_secs(120),
        |s| s.rollovers[0].min(s.rollovers[1]) >= base + 15,
    );
    let st = run.bed.kme_ctl(&["show"]);
    eprintln!(
        "kme-a handed out {} old key_IDs again; 15 rollovers since",
        kme_counter(&st, "reissued")
    );
}
