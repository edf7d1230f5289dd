//! Privileged host tests of the support library itself: namespaces appear and disappear, veth pairs
//! carry traffic, and `enter` really switches (and restores) the thread's network namespace.

use std::fs;

use qkd_macsec_tests::{add_ipv4, ip_bin, require_root, veth_pair, NetNs};

fn netns_names() -> String {
    String::from_utf8_lossy(&qkd_macsec_tests::run(&[ip_bin(), "netns", "list"]).stdout)
        .into_owned()
}

#[test]
fn netns_is_created_and_deleted_on_drop() {
    require_root("network namespaces");
    let ns = NetNs::new("qmt-life");
    let name = ns.name().to_owned();
    assert!(
        netns_names()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "{name} missing from `ip netns list`"
    );
    drop(ns);
    assert!(
        !netns_names()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "{name} still listed after drop"
    );
}

#[test]
fn veth_pair_carries_ping_and_has_fixed_macs() {
    require_root("network namespaces");
    let a = NetNs::new("qmt-a");
    let b = NetNs::new("qmt-b");
    let pair = veth_pair(&a, "va", &b, "vb");
    assert_ne!(pair.a_mac, pair.b_mac);
    let shown = a.exec_stdout(&["cat", "/sys/class/net/va/address"]);
    assert_eq!(shown.trim(), pair.a_mac.to_string());
    let shown = b.exec_stdout(&["cat", "/sys/class/net/vb/address"]);
    assert_eq!(shown.trim(), pair.b_mac.to_string());
    add_ipv4(&a, "va", "10.201.0.1/24");
    add_ipv4(&b, "vb", "10.201.0.2/24");
    a.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.201.0.2"]);
}

#[test]
fn failing_exec_reports_command_and_stderr() {
    require_root("network namespaces");
    let ns = NetNs::new("qmt-fail");
    let out = ns.try_exec(&[ip_bin(), "link", "show", "does-not-exist"]);
    assert!(!out.status.success());
    let err = std::panic::catch_unwind(|| {
        ns.exec(&[ip_bin(), "link", "show", "does-not-exist"]);
    })
    .expect_err("exec of a failing command must panic");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("does-not-exist"),
        "panic message lacks the command: {msg}"
    );
    assert!(msg.contains("stderr"), "panic message lacks stderr: {msg}");
}

#[test]
fn enter_switches_thread_namespace_and_restores_it() {
    require_root("network namespaces");
    let before = fs::read_link("/proc/thread-self/ns/net").unwrap();
    let ns = NetNs::new("qmt-enter");
    ns.ip(&[
        "link", "add", "marker0", "type", "veth", "peer", "name", "marker1",
    ]);
    {
        let _guard = ns.enter();
        let inside = fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(inside, before);
        // Only visible from inside the namespace.
        assert!(fs::metadata("/proc/thread-self/net/dev").is_ok());
        let dev = fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        assert!(
            dev.contains("marker0"),
            "marker0 not visible after enter: {dev}"
        );
        // Threads spawned while entered inherit the namespace.
        let child_ns = std::thread::spawn(|| fs::read_link("/proc/thread-self/ns/net").unwrap())
            .join()
            .unwrap();
        assert_eq!(child_ns, inside);
    }
    let after = fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_eq!(after, before);
    let dev = fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    assert!(!dev.contains("marker0"));
}

#[test]
fn veth_names_that_prefix_ip_keywords_work() {
    require_root("network namespaces");
    // "ma" is a prefix of ip's "master" keyword, "li" of "link": both must still be names.
    let a = NetNs::new("qmt-kw-a");
    let b = NetNs::new("qmt-kw-b");
    let pair = veth_pair(&a, "ma", &b, "li");
    assert_eq!(
        a.exec_stdout(&["cat", "/sys/class/net/ma/address"]).trim(),
        pair.a_mac.to_string()
    );
    assert_eq!(
        b.exec_stdout(&["cat", "/sys/class/net/li/address"]).trim(),
        pair.b_mac.to_string()
    );
}
