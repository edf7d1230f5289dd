//! Builds the eBPF objects with the pinned nightly so that a plain `cargo build` never runs against
//! a stale object (the aya-template way). aya-build builds every bin of the eBPF crate into
//! OUT_DIR: `qkd-macsec` (production, `EBPF_OBJECT`) and `qkd-macsec-test` (test and benchmark
//! programs, `EBPF_TEST_OBJECT`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Nightly whose LLVM major (22) matches bpf-linker's; see ../shared/docs/toolchain.md and README.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

/// The objects aya-build writes into OUT_DIR (the eBPF crate's bins).
const OBJECTS: [&str; 2] = ["qkd-macsec", "qkd-macsec-test"];

/// Where llvm-objcopy may be: Debian's llvm-22 package (which bpf-linker needs anyway) first.
const OBJCOPY: [&str; 3] = [
    "llvm-objcopy-22",
    "/usr/lib/llvm-22/bin/llvm-objcopy",
    "llvm-objcopy",
];

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
    .context("building the eBPF programs failed: run `cargo xtask setup` (pinned nightly with rust-src, bpf-linker on LLVM 22)")?;
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        strip_dwarf(Path::new(&std::env::var("OUT_DIR")?));
    }
    Ok(())
}

/// Drops the DWARF sections from the objects the agent embeds. bpf-linker made BTF out of them
/// (`.BTF`, `.BTF.ext`, which aya and the verifier use and which stay); nothing reads the DWARF
/// itself, and aya-log's generic code makes it 1.8 MB of the production object's 2 MB. The
/// unstripped object stays available from `cargo xtask build-ebpf` (target/ebpf/) for
/// `llvm-objdump -S`. Without llvm-objcopy the objects are embedded as they are.
fn strip_dwarf(out_dir: &Path) {
    let Some(objcopy) = OBJCOPY.iter().find_map(|c| which::which(c).ok()) else {
        println!(
            "cargo::warning=llvm-objcopy not found (package llvm-22): the embedded eBPF objects \
             keep their DWARF, about 1.8 MB more"
        );
        return;
    };
    for name in OBJECTS {
        let obj = out_dir.join(name);
        match Command::new(&objcopy)
            .arg("--strip-debug")
            .arg(&obj)
            .status()
        {
            Ok(s) if s.success() => {}
            other => println!(
                "cargo::warning={} --strip-debug {} failed ({other:?}): embedded unstripped",
                objcopy.display(),
                obj.display()
            ),
        }
    }
}
