//! Least privilege of a real running agent, in the MACsec VM: once its link is up, every thread
//! of each `qkd-macsec-agent run` holds only CAP_NET_ADMIN and CAP_BPF (effective, permitted and
//! bounding), nothing inheritable or ambient, with no_new_privs; the link keeps working on that
//! (rollovers need MACsec netlink and BPF map updates); and the status socket is not
//! world-writable.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use qkd_macsec_agent::privs::{mask, proc_caps, RUNTIME_CAPS};
use qkd_macsec_tests::require_macsec;
use qkd_macsec_tests::testbed::{LinkSpec, Running, Side, TestbedOptions, SECURE_TIMEOUT};

#[test]
fn running_agent_keeps_only_net_admin_and_bpf() {
    require_macsec();
    let spec = LinkSpec::fast("sak");
    let mut run = Running::up("privs", &TestbedOptions::default(), &spec, SECURE_TIMEOUT);
    let keep = mask(&RUNTIME_CAPS);
    for side in Side::BOTH {
        let pid = run
            .bed
            .agent_pid(side)
            .unwrap_or_else(|| panic!("{}: no agent", side.label()));
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(tasks.len() > 1, "{}: single-threaded agent?", side.label());
        for tid in &tasks {
            let c = proc_caps(&format!("{pid}/task/{tid}")).unwrap();
            assert_eq!(
                (
                    c.effective,
                    c.permitted,
                    c.bounding,
                    c.inheritable,
                    c.ambient
                ),
                (keep, keep, keep, 0, 0),
                "{} agent thread {tid}: {c:?}\n{}",
                side.label(),
                run.bed.logs_tail(30)
            );
            assert!(c.no_new_privs, "{} thread {tid}: {c:?}", side.label());
        }
        let sock = &run.bed.files[match side {
            Side::A => 0,
            Side::B => 1,
        }]
        .status_socket;
        let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o002,
            0,
            "{}: status socket {} is world-writable (mode {mode:03o}): any local user could connect",
            side.label(),
            sock.display()
        );
        eprintln!(
            "{}: {} threads at CapEff {keep:#x}; status socket mode {mode:03o}",
            side.label(),
            tasks.len()
        );
    }
    // With the reduced set the agents still roll keys (genl SA changes, BPF map updates).
    let before = run.rollovers();
    std::thread::sleep(Duration::from_secs(12));
    run.bed.check_agents_alive();
    let after = run.rollovers();
    assert!(
        after > before,
        "no rollover in 12 s after the capability drop ({before} -> {after})\n{}",
        run.bed.logs_tail(40)
    );
}
