//! qkd-macsec-agent: keys Linux kernel MACsec from ETSI GS QKD 014 KMEs.
//!
//! One module per outside world, with the key lifecycle as pure logic in the middle:
//! - [`etsi014`]: the ETSI GS QKD 014 REST client (mutual TLS) and its wire types.
//! - [`kmesim`]: a pair of simulated KMEs sharing a simulated QKD link.
//! - [`certs`]: certificate creation for the 014 interface and the `doctor` diagnostics.
//! - [`macsec`]: kernel MACsec over rtnetlink (links) and the `macsec` generic netlink family (keys).
//! - [`dataplane`]: loading the XDP/TC programs, their maps and ring-buffer events.
//! - [`lldp`]: the project's LLDP TLV and LLDPDU codec, and the AF_PACKET sender.
//! - [`keyx`], [`watchdog`], [`profile`]: key exchange, the AKL watchdog and key profiles as sans-IO
//!   state machines with the clock injected; [`kdf`] and [`cipher`]: the IEEE 802.1X KDF and the
//!   802.1AE cipher suites they share. None of them knows the config schema, netlink or `ops`:
//!   [`config`] translates its schema into their parameter types at the edge.
//! - [`config`], [`agent`]: the gateway config and the IO loop that joins everything.
//! - [`secret`], [`zalloc`]: key material in zeroizing types, and the allocator that wipes what
//!   other crates free.

pub mod agent;
pub mod certs;
pub mod cipher;
pub mod config;
pub mod dataplane;
pub mod etsi014;
pub mod kdf;
pub mod keyx;
pub mod kmesim;
pub mod lldp;
pub mod macsec;
pub mod ops;
pub mod privs;
pub mod profile;
pub mod secret;
pub mod watchdog;
pub mod zalloc;

/// The production eBPF object built by build.rs (aya-build), embedded so the binary is
/// self-contained: `qkd_xdp` and `qkd_tc` and their maps (docs/dataplane.md).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qkd-macsec"));

/// The test object (`qkd-macsec-ebpf/src/bin/test_programs.rs`): the harness's `probe` and the
/// benchmark baselines `qkd_xdp_pass` and `qkd_tc_pass`. The daemon never loads it; only the
/// host tests and the `ebpf` benchmark (`qkd-macsec-bench-ebpf`) refer to it, so the linker
/// leaves it out of the agent binary.
pub static EBPF_TEST_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qkd-macsec-test"));
