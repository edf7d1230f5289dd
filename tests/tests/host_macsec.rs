//! On a kernel without MACsec (the host), opening the control plane must say so in a typed error
//! with the remedy, instead of failing later with a bare errno. iproute2 is the independent judge
//! of whether this kernel has MACsec.

use qkd_macsec_agent::macsec::{Macsec, MacsecError};
use qkd_macsec_tests::{ip_bin, require_root, NetNs};

#[test]
fn open_reports_missing_kernel_macsec_as_typed_error() {
    require_root("creating a network namespace to probe for MACsec");
    let ns = NetNs::new("nomacsec");
    // veth as the lower device: the host kernel has veth but not even `dummy`.
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    let probe = ns.try_exec(&[
        ip_bin(),
        "link",
        "add",
        "link",
        "v0",
        "m0",
        "type",
        "macsec",
    ]);
    let kernel_has_macsec = probe.status.success();

    let opened = {
        let _inside = ns.enter();
        Macsec::open()
    };
    match (kernel_has_macsec, opened) {
        (false, Err(e @ MacsecError::NoKernelSupport { .. })) => {
            let msg = e.to_string();
            assert!(msg.contains("\"macsec\" not found"), "{msg}");
            assert!(
                msg.contains("modprobe macsec"),
                "the error names the remedy: {msg}"
            );
        }
        (false, other) => panic!(
            "iproute2 says this kernel has no MACsec ({}), but Macsec::open gave {other:?}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ),
        (true, Ok(_)) => {}
        (true, Err(e)) => panic!("this kernel has MACsec but Macsec::open failed: {e}"),
    }
}
