//! `cargo xtask package`: a Debian package of the agent, built with dpkg-deb.
//!
//! Contents: /usr/sbin/qkd-macsec-agent, the systemd unit (packaging/), a sample config at
//! /etc/qkd-macsec/agent.toml.sample (a conffile; the real config is the operator's
//! /etc/qkd-macsec/agent.toml), /usr/lib/modules-load.d/qkd-macsec.conf (loads `macsec` at
//! boot, since the unit forbids module loading), man pages generated from the clap definition,
//! and the documentation under /usr/share/doc/qkd-macsec-agent.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::util;

pub const UNIT: &str = "qkd-macsec-agent.service";

/// Where the package goes: target/package/qkd-macsec-agent_<version>_<arch>.deb.
pub fn out_dir() -> PathBuf {
    util::repo_root().join("target/package")
}

fn version() -> Result<String> {
    // The workspace version, from the agent's own report so there is one source of truth.
    let toml = fs::read_to_string(util::repo_root().join("Cargo.toml"))?;
    let in_pkg = toml
        .split("[workspace.package]")
        .nth(1)
        .context("Cargo.toml has no [workspace.package]")?;
    let line = in_pkg
        .lines()
        .find(|l| l.trim_start().starts_with("version"))
        .context("[workspace.package] has no version")?;
    Ok(line
        .split('=')
        .nth(1)
        .context("malformed version line")?
        .trim()
        .trim_matches('"')
        .to_owned())
}

fn put(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let p = root.join(rel.trim_start_matches('/'));
    fs::create_dir_all(p.parent().expect("has parent"))?;
    fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds the agent (`release` or `debug` profile) and the .deb; returns its path.
pub fn run(release: bool) -> Result<PathBuf> {
    let root_dir = util::repo_root();
    let mut build = util::cmd("cargo", &["build", "-p", "qkd-macsec-agent", "--bins"]);
    if release {
        build.arg("--release");
    }
    util::run(build.current_dir(&root_dir))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir.join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("qkd-macsec-agent");
    let version = version()?;
    let arch = util::stdout(&mut util::cmd("dpkg", &["--print-architecture"]))?
        .trim()
        .to_owned();
    let out = out_dir();
    let stage = out.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(&stage)?;

    put(
        &stage,
        "/usr/sbin/qkd-macsec-agent",
        &fs::read(&bin)?,
        0o755,
    )?;
    put(
        &stage,
        &format!("/lib/systemd/system/{UNIT}"),
        &fs::read(root_dir.join("packaging").join(UNIT))?,
        0o644,
    )?;
    put(
        &stage,
        "/etc/qkd-macsec/agent.toml.sample",
        &fs::read(root_dir.join("docs/sample-config.toml"))?,
        0o644,
    )?;
    fs::set_permissions(
        stage.join("etc/qkd-macsec"),
        fs::Permissions::from_mode(0o750),
    )?;
    put(
        &stage,
        "/usr/lib/modules-load.d/qkd-macsec.conf",
        b"# Kernel MACsec for qkd-macsec-agent (its unit may not load modules itself).\nmacsec\n",
        0o644,
    )?;

    // Man pages from the clap definition, gzipped as Debian policy wants.
    let man_tmp = out.join("man");
    if man_tmp.exists() {
        fs::remove_dir_all(&man_tmp)?;
    }
    let mut gen = util::cmd(bin.to_str().context("path")?, &["gen-man", "--out"]);
    gen.arg(&man_tmp);
    let listed = util::stdout(&mut gen)?;
    if !listed.contains("qkd-macsec-agent.8") {
        bail!("gen-man wrote no qkd-macsec-agent.8:\n{listed}");
    }
    let man_dir = stage.join("usr/share/man/man8");
    fs::create_dir_all(&man_dir)?;
    for e in fs::read_dir(&man_tmp)? {
        let p = e?.path();
        let mut gz = util::cmd("gzip", &["-9", "-n", "-c"]);
        gz.arg(&p);
        let o = util::output(&mut gz)?;
        let name = format!("{}.gz", p.file_name().unwrap().to_string_lossy());
        put(
            &stage,
            &format!("/usr/share/man/man8/{name}"),
            &o.stdout,
            0o644,
        )?;
    }

    let doc = "/usr/share/doc/qkd-macsec-agent";
    put(
        &stage,
        &format!("{doc}/README.md"),
        &fs::read(root_dir.join("README.md"))?,
        0o644,
    )?;
    for e in fs::read_dir(root_dir.join("docs"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "md" || x == "toml") {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            put(&stage, &format!("{doc}/{name}"), &fs::read(&p)?, 0o644)?;
        }
    }
    put(
        &stage,
        &format!("{doc}/copyright"),
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: qkd-macsec\nFiles: *\nLicense: Apache-2.0\n On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;

    let installed_kib: u64 = du_kib(&stage)?;
    let control = format!(
        "Package: qkd-macsec-agent\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: qkd-macsec maintainers <qkd-macsec@example.invalid>\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6 (>= 2.36), adduser\n\
         Recommends: iproute2\n\
         Section: net\n\
         Priority: optional\n\
         Description: QKD-keyed Linux kernel MACsec agent\n \
         Fetches keys from a QKD Key Management Entity over ETSI GS QKD 014 (mutual TLS),\n \
         exchanges key IDs with the peer gateway in an LLDP TLV, installs them into kernel\n \
         MACsec and stalls traffic when the active key lifetime runs out.\n"
    );
    put(&stage, "/DEBIAN/control", control.as_bytes(), 0o644)?;
    put(
        &stage,
        "/DEBIAN/conffiles",
        b"/etc/qkd-macsec/agent.toml.sample\n",
        0o644,
    )?;
    // No auto-enable: the service needs the operator's config first. DPKG_ROOT is set when
    // installing into another root (dpkg --root ... --force-script-chrootless): then there
    // is no systemd to tell.
    put(
        &stage,
        "/DEBIAN/postinst",
        b"#!/bin/sh\nset -e\nif [ \"$1\" = configure ] && [ -z \"$DPKG_ROOT\" ]; then\n    # The status socket's group (the unit's SupplementaryGroups).\n    getent group qkd-macsec >/dev/null || addgroup --system qkd-macsec\n    if [ -d /run/systemd/system ]; then\n        systemctl daemon-reload || true\n    fi\nfi\nexit 0\n",
        0o755,
    )?;
    put(
        &stage,
        "/DEBIAN/postrm",
        b"#!/bin/sh\nset -e\nif [ -z \"$DPKG_ROOT\" ] && [ -d /run/systemd/system ]; then\n    systemctl daemon-reload || true\nfi\nexit 0\n",
        0o755,
    )?;

    let deb = out.join(format!("qkd-macsec-agent_{version}_{arch}.deb"));
    let mut b = util::cmd("dpkg-deb", &["--root-owner-group", "-Zxz", "--build"]);
    b.arg(&stage).arg(&deb);
    util::run(&mut b)?;
    eprintln!("[package] {}", deb.display());
    Ok(deb)
}

fn du_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_dir() {
            if e.file_name() != "DEBIAN" {
                total += du_kib(&e.path())?;
            }
        } else {
            total += m.len().div_ceil(1024);
        }
    }
    Ok(total)
}
