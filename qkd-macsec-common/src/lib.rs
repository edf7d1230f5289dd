//! Types and constants shared by the eBPF programs (`qkd-macsec-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the verifier rejects map keys with
//! uninitialised padding bytes, and both sides must agree on the layout byte for byte.
#![no_std]

/// EtherType of LLDP (IEEE 802.1AB).
pub const ETH_P_LLDP: u16 = 0x88CC;
/// EtherType of MACsec (IEEE 802.1AE).
pub const ETH_P_MACSEC: u16 = 0x88E5;
/// EtherType of EAPOL / MKA (IEEE 802.1X).
pub const ETH_P_PAE: u16 = 0x888E;

/// Name of the counter map for the harness's first XDP test.
pub const MAP_PROBE_COUNTERS: &str = "PROBE_COUNTERS";

/// Index into the probe counter array: frames by class.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeClass {
    Other = 0,
    Lldp = 1,
    Macsec = 2,
    Ipv4 = 3,
}

/// Number of entries in the probe counter array.
pub const PROBE_CLASSES: u32 = 4;
