//! What the two eBPF objects of this crate share and what the host side may know about them.
//! The programs themselves are the binaries: `src/main.rs` (`qkd-macsec`, the production object
//! the agent loads) and `src/bin/test_programs.rs` (`qkd-macsec-test`, the probe and the benchmark
//! baselines, embedded only by tests and benchmarks).
//!
//! This library is also compiled for the host (the agent's build script depends on the crate so
//! that cargo rebuilds the objects when these sources change), so it holds no maps, no programs
//! and no panic handler.
#![no_std]

/// The licence the objects declare to the kernel (their `license` ELF section): the crate's own
/// `license` field, so the two cannot drift apart.
///
/// That is the workspace's Apache-2.0. The objects contain code of this crate, of
/// qkd-macsec-common (Apache-2.0) and of aya-ebpf and aya-log-ebpf (MIT OR Apache-2.0), so
/// Apache-2.0 is what the object as a whole can honestly be said to be under. The kernel does not
/// count it as GPL-compatible (include/linux/license.h lists "GPL", "GPL v2", "GPL and additional
/// rights", "Dual BSD/GPL", "Dual MIT/GPL" and "Dual MPL/GPL"); that only matters for helpers
/// and kfuncs marked `gpl_only`, and none of the helpers the programs call is (map lookups and
/// updates, `bpf_ktime_get_ns`, `bpf_xdp_load_bytes`, `bpf_skb_pull_data`, the ring-buffer
/// helpers; aya-log uses only the ring buffer). A program that calls a GPL-only helper (e.g.
/// `bpf_probe_read_kernel`, `bpf_trace_printk`) fails to load with "cannot call GPL-restricted
/// function from non-GPL compatible program": that would need this crate and qkd-macsec-common
/// relicensed (e.g. `MIT OR GPL-2.0-only`), and this string mapped to the kernel's spelling,
/// "Dual MIT/GPL". Until 2026-12 the object declared "Dual MIT/GPL" while the crate said
/// Apache-2.0.
pub const LICENSE: [u8; LICENSE_LEN] = nul_terminated(env!("CARGO_PKG_LICENSE"));

/// Length of [`LICENSE`] including its NUL.
pub const LICENSE_LEN: usize = env!("CARGO_PKG_LICENSE").len() + 1;

const fn nul_terminated<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < b.len() {
        out[i] = b[i];
        i += 1;
    }
    out
}
