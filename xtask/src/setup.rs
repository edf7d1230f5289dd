//! `cargo xtask setup`: everything the project needs on a Debian 12 machine, each step idempotent.
//!
//! Steps: apt packages, Rust toolchains, bpf-linker, the VM kernel (Debian's generic kernel, whose
//! version is resolved from `apt-cache depends linux-image-amd64` at set-up time), the VM
//! initramfs. Everything for the VM lives under the cache dir (`.cache/vm/<kernel version>/`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::util::{self, cmd, secs};

/// Userspace toolchain (rust-toolchain.toml pins the same).
pub const STABLE: &str = "1.99.0";
/// eBPF toolchain: its LLVM major (22) must equal bpf-linker's.
pub const NIGHTLY: &str = "nightly-2026-07-01";

/// Debian packages the project needs, with why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("build-essential", "C linker for Rust"),
    ("llvm-22-dev", "bpf-linker links libLLVM 22"),
    ("qemu-system-x86", "the MACsec test VM"),
    ("busybox-static", "the VM initramfs"),
    ("kmod", "depmod for the VM kernel modules"),
    ("iproute2", "test scaffolding (ip netns/link/macsec)"),
    ("iputils-ping", "test traffic"),
    (
        "openssl",
        "etsi_tls test: TLS 1.1-only and self-signed KME servers",
    ),
    ("tcpdump", "debugging captures"),
    ("xz-utils", "unpacking the VM kernel for a fast direct boot"),
    (
        "systemd",
        "systemd-analyze verify of the packaged unit (host_package)",
    ),
    (
        "man-db",
        "systemd-analyze verify checks the unit's man: Documentation link",
    ),
];

/// Kernel modules loaded in the VM (dependencies are added from modules.dep). MACsec with gcm(aes)
/// and the crypto accelerators; veth/dummy for test links; TC clsact and cls_bpf for the egress
/// program; virtio 9p and overlay to share the host's root filesystem.
pub const VM_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
    "dummy",
    "macsec",
    "aesni_intel",
    "ghash_clmulni_intel",
    "ghash_generic",
    "gcm",
    "ctr",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    // The bridged test wire (testbed Wire::Bridged: a third namespace injects forged LLDP).
    "bridge",
    // The chaos soak (`cargo xtask soak`) drops, delays, reorders and duplicates LLDP on the
    // wire's bridge ports: a prio qdisc, a matchall filter for EtherType 0x88CC and netem.
    "sch_prio",
    "sch_netem",
    "cls_matchall",
];

/// The VM's /init; see [`build_initramfs`] for what it is given.
const INIT_SCRIPT: &str = include_str!("vm_init.sh");

#[derive(Default)]
pub struct Options {
    pub force_initramfs: bool,
}

/// What the VM needs, all under the cache dir.
#[derive(Clone, Debug)]
pub struct VmImage {
    pub kernel_version: String,
    /// The compressed kernel as Debian ships it.
    pub vmlinuz: PathBuf,
    /// The same kernel uncompressed (ELF with a PVH entry): qemu boots it directly, which skips
    /// about 6 s of XZ decompression under TCG. Booted when present.
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// The unpacked `lib/modules/<version>` tree (linked into the guest's /lib/modules).
    pub module_tree: PathBuf,
}

/// Runs one set-up step with a progress line; a failure names the step and what to do.
fn step<T>(name: &str, hint: &str, f: impl FnOnce() -> Result<(T, String)>) -> Result<T> {
    let t = Instant::now();
    eprintln!("[setup] {name} ...");
    match f() {
        Ok((v, note)) => {
            eprintln!("[setup] {name}: {note} ({})", secs(t));
            Ok(v)
        }
        Err(e) => {
            eprintln!("[setup] {name}: FAILED after {}", secs(t));
            Err(e.context(format!("setup step `{name}` failed; {hint}")))
        }
    }
}

/// The whole set-up; returns the VM image.
pub fn run(opts: Options) -> Result<VmImage> {
    let t = Instant::now();
    step(
        "apt packages",
        "check network access to the Debian mirror and run `cargo xtask setup` as root",
        || apt_packages().map(|n| ((), n)),
    )?;
    step(
        "rust toolchains",
        "check that rustup is installed and static.rust-lang.org is reachable",
        || toolchains().map(|n| ((), n)),
    )?;
    step(
        "bpf-linker",
        "it needs llvm-22-dev (apt) and crates.io access; see docs/testing.md",
        || bpf_linker().map(|n| ((), n)),
    )?;
    step(
        "cargo-fuzz",
        "it needs crates.io access; see docs/fuzzing.md",
        || cargo_fuzz().map(|n| ((), n)),
    )?;
    let image = vm_image(opts.force_initramfs)?;
    eprintln!("[setup] all done ({})", secs(t));
    Ok(image)
}

/// Only the VM parts (kernel, initramfs): what `vm-run` needs. Quick when already done.
pub fn vm_image(force_initramfs: bool) -> Result<VmImage> {
    let cache = util::vm_cache_dir();
    let (version, root) = step(
        "vm kernel",
        "check that apt can reach the Debian mirror (`apt-get update`) and that dpkg-deb and depmod \
         (package kmod) exist",
        || kernel(&cache),
    )?;
    step(
        "vm initramfs",
        "it needs busybox-static (apt) and the unpacked kernel modules; delete the cache dir to start \
         over",
        || build_initramfs(&cache, &version, &root, force_initramfs),
    )
}

/// The VM image if set-up has already produced it for the recorded kernel version and the current
/// init script; None when something is missing or stale (the caller then runs the set-up steps).
pub fn existing_vm_image() -> Option<VmImage> {
    let cache = util::vm_cache_dir();
    let version = fs::read_to_string(cache.join("current")).ok()?;
    let version = version.trim().to_owned();
    let root = cache.join(&version).join("root");
    let image = image_paths(&cache, &version, &root);
    (image.vmlinuz.is_file()
        && image.initramfs.is_file()
        && image.module_tree.join("modules.dep").is_file())
    .then_some(image)
}

fn image_paths(cache: &Path, version: &str, root: &Path) -> VmImage {
    VmImage {
        kernel_version: version.to_owned(),
        vmlinuz: root.join("boot").join(format!("vmlinuz-{version}")),
        vmlinux: root.join("boot").join(format!("vmlinux-{version}")),
        initramfs: cache
            .join(version)
            .join(format!("initramfs-{:016x}.cpio", initramfs_key(version))),
        module_tree: root.join("lib").join("modules").join(version),
    }
}

/// A key over everything the initramfs is made of, so a change to any of it rebuilds the image:
/// the key is part of the image's file name ([`image_paths`]), so an image built from another
/// init script, kernel or module list is simply not found and gets rebuilt (and the stale one
/// deleted by [`build_initramfs`]).
fn initramfs_key(version: &str) -> u64 {
    initramfs_key_of(INIT_SCRIPT, version, VM_MODULES)
}

fn initramfs_key_of(init_script: &str, version: &str, modules: &[&str]) -> u64 {
    // FNV-1a: stable across Rust releases, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(init_script.as_bytes());
    feed(version.as_bytes());
    for m in modules {
        feed(m.as_bytes());
    }
    h
}

fn apt_packages() -> Result<String> {
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(n, _)| *n).collect();
    let missing = missing_packages(&names)?;
    if missing.is_empty() {
        return Ok(format!("{} packages already installed", names.len()));
    }
    if !util::is_root() {
        bail!(
            "missing packages {}; install them as root: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!(
        "[setup]   missing: {}; running apt-get update",
        missing.join(", ")
    );
    util::run(&mut cmd("apt-get", &["update", "-q"]))?;
    let mut install = cmd(
        "apt-get",
        &["install", "-y", "-q", "--no-install-recommends"],
    );
    install
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut install).with_context(|| {
        format!(
            "installing {} failed (llvm-22-dev comes from Debian bookworm's archive; if your \
             mirror lacks it, add apt.llvm.org's bookworm repository)",
            missing.join(" ")
        )
    })?;
    let still = missing_packages(&names)?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(format!("installed {}", missing.join(", ")))
}

fn missing_packages(names: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits non-zero when a package is unknown; its stdout still lists the known ones.
    let out = cmd("dpkg-query", &["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(names)
        .output()
        .context("cannot run dpkg-query (is this a Debian system?)")?;
    let installed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            let status = w.next()?;
            (status == "ii").then(|| name.split(':').next().unwrap_or(name).to_owned())
        })
        .collect();
    Ok(names
        .iter()
        .filter(|n| !installed.contains(**n))
        .map(|n| n.to_string())
        .collect())
}

fn installed_components(toolchain: &str) -> Option<BTreeSet<String>> {
    let out = cmd(
        "rustup",
        &["component", "list", "--installed", "--toolchain", toolchain],
    )
    .output()
    .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                // "rustfmt-x86_64-unknown-linux-gnu" -> "rustfmt"; "rust-src" has no triple.
                l.trim()
                    .trim_end_matches("-x86_64-unknown-linux-gnu")
                    .to_owned()
            })
            .collect(),
    )
}

fn toolchains() -> Result<String> {
    let wanted: [(&str, &[&str]); 2] = [
        (STABLE, &["rustfmt", "clippy"]),
        (NIGHTLY, &["rust-src", "clippy"]),
    ];
    let mut notes = Vec::new();
    for (tc, comps) in wanted {
        let have = installed_components(tc);
        let ok = have
            .as_ref()
            .is_some_and(|h| comps.iter().all(|c| h.contains(*c)));
        if ok {
            notes.push(format!("{tc} present"));
            continue;
        }
        let mut c = cmd(
            "rustup",
            &["toolchain", "install", tc, "--profile", "minimal"],
        );
        for comp in comps {
            c.args(["--component", comp]);
        }
        util::run(&mut c)?;
        notes.push(format!("{tc} installed"));
    }
    Ok(notes.join(", "))
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn bpf_linker() -> Result<String> {
    if let Some(v) = bpf_linker_version() {
        if v.starts_with("bpf-linker 0.13") {
            return Ok(format!("{v} present"));
        }
        eprintln!("[setup]   found `{v}`, want 0.13; reinstalling");
    }
    let llvm = Path::new("/usr/lib/llvm-22");
    if !llvm.join("bin").join("llvm-config").is_file() {
        bail!(
            "{} missing: install llvm-22-dev first (the apt step does)",
            llvm.display()
        );
    }
    // LLVM_PREFIX keeps bpf-linker's build script from picking Debian's default LLVM 14.
    let mut c = cmd(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            "~0.13",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ],
    );
    c.env("LLVM_PREFIX", llvm)
        .env("LLVM_SYS_221_PREFIX", llvm)
        .current_dir(util::repo_root());
    util::run(&mut c)?;
    let v = bpf_linker_version().ok_or_else(|| {
        anyhow!("bpf-linker installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH?")
    })?;
    Ok(format!("{v} installed"))
}

/// cargo-fuzz version `cargo xtask fuzz` is written against (its flags and output layout).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> Result<String> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if let Some(v) = &have {
        if v.ends_with(CARGO_FUZZ_VERSION) {
            return Ok(format!("{v} present"));
        }
        eprintln!("[setup]   found `{v}`, want {CARGO_FUZZ_VERSION}; reinstalling");
    }
    let mut c = cmd(
        "cargo",
        &[
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--force",
        ],
    );
    c.current_dir(util::repo_root());
    util::run(&mut c)?;
    Ok(format!("cargo-fuzz {CARGO_FUZZ_VERSION} installed"))
}

/// The kernel version recorded by an earlier set-up, if apt's package lists have not changed since
/// (then `apt-cache depends` would name the same package; skipping it saves seconds on a busy
/// machine).
fn recorded_kernel_if_apt_unchanged(cache: &Path) -> Option<String> {
    let current = cache.join("current");
    let recorded = fs::metadata(&current).ok()?.modified().ok()?;
    let lists = fs::metadata("/var/lib/apt/lists").ok()?.modified().ok()?;
    if lists >= recorded {
        return None;
    }
    let v = fs::read_to_string(&current).ok()?.trim().to_owned();
    (!v.is_empty()).then_some(v)
}

/// Resolves the generic kernel package (`linux-image-<version>`) from the metapackage.
fn resolve_kernel_package() -> Result<String> {
    let query = || -> Result<Option<String>> {
        let out = util::stdout(&mut cmd("apt-cache", &["depends", "linux-image-amd64"]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
            .map(str::to_owned))
    };
    if let Some(p) = query().ok().flatten() {
        return Ok(p);
    }
    util::run(&mut cmd("apt-get", &["update", "-q"]))?;
    query()?.ok_or_else(|| {
        anyhow!(
            "`apt-cache depends linux-image-amd64` names no linux-image-<version>-amd64 package"
        )
    })
}

/// Downloads and unpacks the kernel (with depmod) unless already done; returns (version, root).
fn kernel(cache: &Path) -> Result<((String, PathBuf), String)> {
    let pkg = match recorded_kernel_if_apt_unchanged(cache) {
        Some(v) => format!("linux-image-{v}"),
        None => resolve_kernel_package()?,
    };
    let version = pkg
        .strip_prefix("linux-image-")
        .expect("checked by resolve_kernel_package")
        .to_owned();
    let dir = cache.join(&version);
    let root = dir.join("root");
    let ready = root.join("lib/modules").join(&version).join("modules.dep");
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if ready.is_file() && vmlinuz.is_file() {
        let vmlinux = root.join("boot").join(format!("vmlinux-{version}"));
        let mut note = format!("{version} present");
        if !vmlinux.is_file() {
            match extract_vmlinux(&vmlinuz, &vmlinux) {
                Ok(()) => note.push_str(", kernel unpacked for direct boot"),
                Err(e) => eprintln!("[setup]   no uncompressed kernel ({e:#}); booting vmlinuz"),
            }
        }
        fs::write(cache.join("current"), &version)?;
        return Ok(((version.clone(), root), note));
    }
    let download = dir.join("download");
    fs::create_dir_all(&download)
        .with_context(|| format!("cannot create {}", download.display()))?;
    // Sandbox user root: _apt cannot write into a directory under /work or /root.
    let get = |d: &Path| {
        util::run(
            cmd(
                "apt-get",
                &["download", "-q", "-o", "APT::Sandbox::User=root", &pkg],
            )
            .current_dir(d),
        )
    };
    if get(&download).is_err() {
        eprintln!("[setup]   download failed; running apt-get update and retrying");
        util::run(&mut cmd("apt-get", &["update", "-q"]))?;
        get(&download)?;
    }
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&pkg) && n.ends_with(".deb"))
        })
        .ok_or_else(|| {
            anyhow!(
                "apt-get download left no {pkg}*.deb in {}",
                download.display()
            )
        })?;
    let tmp = dir.join("root.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    let mut x = Command::new("dpkg-deb");
    x.arg("-x").arg(&deb).arg(&tmp);
    util::run(&mut x)?;
    // The .deb ships no modules.dep.
    let mut d = Command::new("depmod");
    d.arg("-b").arg(&tmp).arg(&version);
    util::run(&mut d)?;
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    let vmlinuz_tmp = tmp.join("boot").join(format!("vmlinuz-{version}"));
    let vmlinux_tmp = tmp.join("boot").join(format!("vmlinux-{version}"));
    if let Err(e) = extract_vmlinux(&vmlinuz_tmp, &vmlinux_tmp) {
        // Not fatal: the compressed kernel boots too, only slower.
        eprintln!("[setup]   no uncompressed kernel ({e:#}); the VM boots the compressed one");
    }
    fs::rename(&tmp, &root)?;
    fs::remove_dir_all(&download)?;
    fs::write(cache.join("current"), &version)?;
    Ok((
        (version.clone(), root),
        format!("{version} downloaded and unpacked"),
    ))
}

/// Unpacks the kernel ELF from a bzImage: the payload's location comes from the boot protocol
/// header (setup_sects at 0x1f1, payload_offset/payload_length at 0x248); Debian compresses it with
/// XZ, and the payload's last 4 bytes are the uncompressed size, not part of the XZ stream.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let d = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let u32_at = |off: usize| -> Result<usize> {
        let b = d
            .get(off..off + 4)
            .ok_or_else(|| anyhow!("{} too short for a bzImage header", vmlinuz.display()))?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    };
    if d.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} is not a bzImage (no HdrS)", vmlinuz.display());
    }
    let setup_sects = match d[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let len = u32_at(0x24c)?;
    let payload = d
        .get(start..start + len)
        .ok_or_else(|| anyhow!("payload outside {}", vmlinuz.display()))?;
    if !payload.starts_with(b"\xfd7zXZ\x00") || len < 4 {
        bail!("kernel payload is not XZ-compressed");
    }
    let xz_path = out.with_extension("xz");
    fs::write(&xz_path, &payload[..len - 4])?;
    let file = fs::File::create(out)?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(&xz_path)
        .stdout(file)
        .status()
        .context("cannot run xz (package xz-utils)")?;
    fs::remove_file(&xz_path)?;
    let elf = fs::read(out)
        .map(|b| b.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if !status.success() || !elf {
        let _ = fs::remove_file(out);
        bail!("xz could not unpack the kernel payload ({status})");
    }
    Ok(())
}

/// Copies a kernel module without its appended signature. Debian signs its modules; verifying
/// 25 RSA signatures in an emulated CPU costs boot time, and signatures are not enforced.
fn copy_module_unsigned(src: &Path, dst: &Path) -> Result<()> {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    let mut d = fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    if d.ends_with(MAGIC) && d.len() >= MAGIC.len() + 12 {
        // struct module_signature (12 bytes) precedes the magic; its last field is the
        // big-endian signature length.
        let info = d.len() - MAGIC.len() - 12;
        let sig_len =
            u32::from_be_bytes(d[info + 8..info + 12].try_into().expect("4 bytes")) as usize;
        if sig_len <= info {
            d.truncate(info - sig_len);
        }
    }
    fs::write(dst, d).with_context(|| format!("cannot write {}", dst.display()))
}

/// Builds the initramfs (busybox, the modules with their dependencies, /init) unless the current
/// one already matches; returns the image.
fn build_initramfs(
    cache: &Path,
    version: &str,
    root: &Path,
    force: bool,
) -> Result<(VmImage, String)> {
    let image = image_paths(cache, version, root);
    if image.initramfs.is_file() && !force {
        return Ok((image, "up to date".to_owned()));
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("busybox not found: install busybox-static"))?;
    let order = module_load_order(&image.module_tree, VM_MODULES)?;
    let dir = cache.join(version);
    // Per-process names: two concurrent runs may both find the image stale.
    let staging = dir.join(format!("initramfs.staging.{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(staging.join("bin"))?;
    fs::copy(busybox, staging.join("bin/busybox"))
        .with_context(|| format!("cannot copy {}", busybox.display()))?;
    let mut list = String::new();
    for rel in &order {
        let dst = staging.join("modules").join(rel);
        fs::create_dir_all(dst.parent().expect("module path has a parent"))?;
        copy_module_unsigned(&image.module_tree.join(rel), &dst)?;
        list.push_str(rel);
        list.push('\n');
    }
    fs::write(staging.join("modules.list"), list)?;
    let init = staging.join("init");
    fs::write(&init, INIT_SCRIPT)?;
    set_mode(&init, 0o755)?;
    set_mode(&staging.join("bin/busybox"), 0o755)?;
    // `cpio` itself is not installed on Debian by default; busybox's works.
    let tmp_out = image
        .initramfs
        .with_extension(format!("cpio.tmp.{}", std::process::id()));
    let script = format!(
        "cd {} && find . | {} cpio -o -H newc > {}",
        util::sh_quote(&staging.to_string_lossy()),
        util::sh_quote(&busybox.to_string_lossy()),
        util::sh_quote(&tmp_out.to_string_lossy())
    );
    util::output(&mut cmd("sh", &["-c", &script]))?;
    // Drop images made from an older init script or module list.
    for e in fs::read_dir(&dir)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("initramfs-") && name.ends_with(".cpio") && e.path() != image.initramfs
        {
            fs::remove_file(e.path())?;
        }
    }
    fs::rename(&tmp_out, &image.initramfs)?;
    fs::remove_dir_all(&staging)?;
    let size = fs::metadata(&image.initramfs)?.len();
    Ok((
        image,
        format!(
            "built with {} modules, {:.1} MB",
            order.len(),
            size as f64 / 1e6
        ),
    ))
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", p.display()))
}

/// Module name as the kernel knows it: file stem with '-' folded to '_'.
fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Paths (relative to the module tree) of `wanted` and their dependencies, dependencies first.
/// Modules built into the kernel are skipped; unknown names are an error.
pub fn module_load_order(tree: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let dep_file = tree.join("modules.dep");
    let deps_text = fs::read_to_string(&dep_file)
        .with_context(|| format!("cannot read {}", dep_file.display()))?;
    let builtin_text = fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin_text.lines().map(module_name).collect();
    let mut by_name: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in deps_text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(str::to_owned).collect();
        by_name.insert(module_name(path), (path.to_owned(), deps));
    }
    let by_path: BTreeMap<&str, &Vec<String>> =
        by_name.values().map(|(p, d)| (p.as_str(), d)).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for w in wanted {
        let name = w.replace('-', "_");
        match by_name.get(&name) {
            Some((path, _)) => visit_module(path, &by_path, &mut seen, &mut order)?,
            None if builtin.contains(&name) => {}
            None => bail!(
                "kernel module {w} is neither in {} nor built in",
                dep_file.display()
            ),
        }
    }
    if let Some(compressed) = order.iter().find(|p| !p.ends_with(".ko")) {
        bail!(
            "module {compressed} is compressed; the initramfs loads plain .ko files with busybox \
             insmod"
        );
    }
    Ok(order)
}

/// Depth-first, dependencies before dependents.
fn visit_module(
    path: &str,
    by_path: &BTreeMap<&str, &Vec<String>>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(path.to_owned()) {
        return Ok(());
    }
    let deps = by_path
        .get(path)
        .ok_or_else(|| anyhow!("modules.dep names {path} as a dependency but has no entry"))?;
    for d in deps.iter() {
        visit_module(d, by_path, seen, order)?;
    }
    order.push(path.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_key_changes_with_modules_script_and_kernel() {
        let base = initramfs_key_of("#!/bin/sh\n", "6.1.0-56-amd64", &["macsec", "veth"]);
        assert_eq!(
            base,
            initramfs_key_of("#!/bin/sh\n", "6.1.0-56-amd64", &["macsec", "veth"])
        );
        for other in [
            initramfs_key_of(
                "#!/bin/sh\n",
                "6.1.0-56-amd64",
                &["macsec", "veth", "sch_netem"],
            ),
            // Boundaries count: ["ab"] is not ["a", "b"].
            initramfs_key_of("#!/bin/sh\n", "6.1.0-56-amd64", &["macsecveth"]),
            initramfs_key_of("#!/bin/sh\nset -e\n", "6.1.0-56-amd64", &["macsec", "veth"]),
            initramfs_key_of("#!/bin/sh\n", "6.1.0-57-amd64", &["macsec", "veth"]),
        ] {
            assert_ne!(base, other);
        }
        // The image path carries the key: a changed module list names another file, which
        // does not exist yet, so the set-up builds it instead of reporting "up to date".
        let cache = Path::new("/c");
        let p = image_paths(cache, "6.1.0-56-amd64", Path::new("/c/r"));
        assert!(p.initramfs.to_string_lossy().ends_with(&format!(
            "initramfs-{:016x}.cpio",
            initramfs_key("6.1.0-56-amd64")
        )));
        assert!(VM_MODULES.contains(&"sch_netem"));
    }

    #[test]
    fn module_names_fold_dashes() {
        assert_eq!(
            module_name("kernel/arch/x86/crypto/aesni-intel.ko"),
            "aesni_intel"
        );
        assert_eq!(module_name("kernel/fs/9p/9p.ko"), "9p");
    }

    #[test]
    fn load_order_puts_dependencies_first_and_rejects_unknown() {
        let dir = std::env::temp_dir().join(format!("xtask-moddep-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("modules.dep"),
            "k/a.ko: k/b.ko k/c.ko\nk/b.ko: k/c.ko\nk/c.ko:\nk/d-x.ko:\n",
        )
        .unwrap();
        fs::write(dir.join("modules.builtin"), "k/e.ko\n").unwrap();
        let order = module_load_order(&dir, &["a", "d_x", "e"]).unwrap();
        assert_eq!(order, ["k/c.ko", "k/b.ko", "k/a.ko", "k/d-x.ko"]);
        let err = module_load_order(&dir, &["nope"]).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
