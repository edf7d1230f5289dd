//! Builds the eBPF object with the pinned nightly so that a plain `cargo build` never runs against a
//! stale object (the aya-template way). The object lands in OUT_DIR/qkd-macsec.

use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Nightly whose LLVM major (22) matches bpf-linker's; see ../shared/docs/toolchain.md and README.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("agent crate has no parent directory")?
        .join("qkd-macsec-ebpf");
    let root_dir = ebpf_dir.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "qkd-macsec-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` (pinned nightly with rust-src, bpf-linker on LLVM 22)")
}
