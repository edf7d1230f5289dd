//! Refuse to start with a private key other users can read or a config other users can change.
//!
//! - The KME client key (`kme.key`): no access at all for group or other (mode 600 or stricter),
//!   since it is this SAE's identity towards the KME: whoever reads it can fetch our keys.
//! - The config file: no write access for group or other. It holds no secret (paths, URLs,
//!   SAE-IDs, timings), so reading is harmless, but whoever can change it can point the agent at
//!   a KME or key of their choosing or switch the AKL off. The fix we name is still `chmod 600`.
//! - Both must belong to root or to the agent's own user: another user owning the file can
//!   change its mode or content whenever they like.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use super::PrivsError;

fn check(
    what: &'static str,
    path: &Path,
    forbidden: u32,
    access: &'static str,
) -> Result<(), PrivsError> {
    let md = std::fs::metadata(path).map_err(|source| PrivsError::Stat {
        what,
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != 0 && md.uid() != euid {
        return Err(PrivsError::FileOwner {
            what,
            path: path.to_owned(),
            owner: md.uid(),
            euid,
        });
    }
    let mode = md.mode() & 0o7777;
    if mode & forbidden != 0 {
        let who = match (mode & forbidden & 0o070 != 0, mode & forbidden & 0o007 != 0) {
            (true, true) => "group and other users",
            (true, false) => "the group",
            _ => "other users",
        };
        return Err(PrivsError::FileMode {
            what,
            path: path.to_owned(),
            mode,
            who,
            access,
            fix: 0o600,
        });
    }
    Ok(())
}

/// The KME client's private key: owned by root or us, no group/other bits at all.
pub fn check_private_key_file(path: &Path) -> Result<(), PrivsError> {
    check("private key", path, 0o077, "read or write")
}

/// The config file: owned by root or us, not writable by group or other.
pub fn check_config_file(path: &Path) -> Result<(), PrivsError> {
    check("config file", path, 0o022, "write")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn file(mode: u32) -> (tempdir::Dir, std::path::PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("f");
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (d, p)
    }

    mod tempdir {
        /// A directory removed on drop (no tempfile dependency for two tests).
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "qkd-privs-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn private_key_must_be_0600_or_stricter() {
        for ok in [0o600, 0o400] {
            let (_d, p) = file(ok);
            check_private_key_file(&p).unwrap();
        }
        for (bad, who) in [
            (0o640, "the group"),
            (0o604, "other users"),
            (0o644, "group and other users"),
            (0o620, "the group"),
        ] {
            let (_d, p) = file(bad);
            let e = check_private_key_file(&p).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains(&format!("{bad:04o}")), "{e}");
            assert!(e.contains(who), "{e}");
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        }
    }

    #[test]
    fn config_must_not_be_writable_by_others() {
        for ok in [0o600, 0o644, 0o640] {
            let (_d, p) = file(ok);
            check_config_file(&p).unwrap();
        }
        for bad in [0o664, 0o646, 0o666] {
            let (_d, p) = file(bad);
            let e = check_config_file(&p).unwrap_err().to_string();
            assert!(e.contains("config file") && e.contains("write"), "{e}");
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        }
    }

    #[test]
    fn missing_file_is_named() {
        let e = check_private_key_file(Path::new("/nonexistent/kme.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kme.key"), "{e}");
    }
    // Ownership by another user needs root to set up (chown): tests/tests/host_privs.rs.
}
