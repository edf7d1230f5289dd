//! Files the agent keeps from one life to the next: the key record (`record`) and the ledger of
//! used keys (`ledger`).
//!
//! Whoever can write them can make a restarted agent adopt a key past its lifetime (a record
//! with a later activation time) or forget that a key was used (a shortened ledger). So they are
//! kept only in a directory that nobody but root or the agent's own user can change, along a
//! path nobody else can change either, and they are opened without following symlinks: a file
//! that another user owns, that group or others may write, or that is not a regular file is
//! refused with an error that names it and the fix. No key bytes are ever in them.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// What can go wrong; each message names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is owned by uid {owner}, neither root nor this agent (uid {euid}); that user could rewrite the agent's state: run `chown root {path}`")]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("{path} has mode {mode:04o}, which lets group or other users write it; the agent's state must be private: run `chmod go-w {path}`")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} is not a {want} (a symlink or another kind of file); remove it, the agent recreates it")]
    Kind { path: PathBuf, want: &'static str },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

fn check_owner(path: &Path, md: &std::fs::Metadata) -> Result<(), StateError> {
    let me = euid();
    if md.uid() != 0 && md.uid() != me {
        return Err(StateError::Owner {
            path: path.to_owned(),
            owner: md.uid(),
            euid: me,
        });
    }
    Ok(())
}

/// Creates `dir` (mode 0700) when missing and checks it: a real directory, owned by root or us,
/// not writable by group or others; and every directory above it owned by root or us and not
/// writable by group or others unless sticky (as /tmp is: others may add entries there but not
/// rename or remove ours).
pub fn private_dir(dir: &Path) -> Result<(), StateError> {
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        Err(e) => return Err(io(dir)(e)),
    }
    let md = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !md.file_type().is_dir() {
        return Err(StateError::Kind {
            path: dir.to_owned(),
            want: "directory",
        });
    }
    check_owner(dir, &md)?;
    if md.mode() & 0o022 != 0 {
        return Err(StateError::Writable {
            path: dir.to_owned(),
            mode: md.mode() & 0o7777,
        });
    }
    let real = std::fs::canonicalize(dir).map_err(io(dir))?;
    for up in real.ancestors().skip(1) {
        let md = std::fs::metadata(up).map_err(io(up))?;
        check_owner(up, &md)?;
        let sticky = md.mode() & 0o1000 != 0;
        if md.mode() & 0o022 != 0 && !sticky {
            return Err(StateError::Writable {
                path: up.to_owned(),
                mode: md.mode() & 0o7777,
            });
        }
    }
    Ok(())
}

/// Checks an open state file: a regular file, owned by root or us, not writable by others.
fn check_file(path: &Path, f: &File) -> Result<(), StateError> {
    let md = f.metadata().map_err(io(path))?;
    if !md.file_type().is_file() {
        return Err(StateError::Kind {
            path: path.to_owned(),
            want: "regular file",
        });
    }
    check_owner(path, &md)?;
    if md.mode() & 0o022 != 0 {
        return Err(StateError::Writable {
            path: path.to_owned(),
            mode: md.mode() & 0o7777,
        });
    }
    Ok(())
}

/// A symlink in the last component makes `open` fail with ELOOP under O_NOFOLLOW: say so.
fn open_error(path: &Path, e: std::io::Error) -> StateError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        StateError::Kind {
            path: path.to_owned(),
            want: "regular file",
        }
    } else {
        io(path)(e)
    }
}

/// Reads `dir/name` (after [`private_dir`] on `dir`); `None` when it does not exist.
pub fn read(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StateError> {
    private_dir(dir)?;
    let path = dir.join(name);
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(open_error(&path, e)),
    };
    check_file(&path, &f)?;
    let mut body = Vec::new();
    f.read_to_end(&mut body).map_err(io(&path))?;
    Ok(Some(body))
}

/// Replaces `dir/name` atomically with `body` (mode 0600): a crash leaves the old file or the
/// new one, never half of one.
pub fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> Result<(), StateError> {
    private_dir(dir)?;
    let dst = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    // A leftover from a crash; O_EXCL below then never writes through anything planted there.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&tmp)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| open_error(&tmp, e))?;
    f.write_all(body).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    // The rename itself must reach the disk before anything relies on the new content.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Appends `line` to `dir/name` (created 0600) and waits until it is on disk.
pub fn append(dir: &Path, name: &str, line: &[u8]) -> Result<(), StateError> {
    private_dir(dir)?;
    let path = dir.join(name);
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| open_error(&path, e))?;
    check_file(&path, &f)?;
    f.write_all(line).map_err(io(&path))?;
    f.sync_data().map_err(io(&path))
}

/// Removes `dir/name`; a missing file is fine.
pub fn remove(dir: &Path, name: &str) -> Result<(), StateError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path)(e)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A fresh private directory under the system's temporary directory, removed on drop.
    pub struct TmpDir(pub PathBuf);

    impl TmpDir {
        pub fn new(tag: &str) -> TmpDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "qkd-state-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::DirBuilder::new().mode(0o700).create(&p).unwrap();
            TmpDir(p)
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn round_trip_creates_private_directory_and_file() {
        let t = TmpDir::new("rt");
        let d = t.0.join("a").join("state");
        assert_eq!(read(&d, "f").unwrap(), None);
        let md = std::fs::metadata(&d).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        write_atomic(&d, "f", b"one").unwrap();
        assert_eq!(
            std::fs::metadata(d.join("f")).unwrap().mode() & 0o777,
            0o600
        );
        append(&d, "f", b" two").unwrap();
        assert_eq!(read(&d, "f").unwrap().unwrap(), b"one two");
        remove(&d, "f").unwrap();
        remove(&d, "f").unwrap();
        assert_eq!(read(&d, "f").unwrap(), None);
    }

    #[test]
    fn a_directory_others_can_write_is_refused_with_the_fix() {
        let t = TmpDir::new("dirmode");
        let d = t.0.join("state");
        std::fs::create_dir(&d).unwrap();
        chmod(&d, 0o777);
        let e = read(&d, "f").unwrap_err().to_string();
        assert!(e.contains("0777") && e.contains("chmod go-w"), "{e}");
        assert!(e.contains(&d.display().to_string()), "{e}");
        // The same for a parent that is group-writable without the sticky bit.
        chmod(&d, 0o700);
        chmod(&t.0, 0o770);
        let e = write_atomic(&d, "f", b"x").unwrap_err().to_string();
        assert!(
            e.contains(&t.0.display().to_string()) && e.contains("0770"),
            "{e}"
        );
        // Sticky and world-writable (as /tmp) is fine for a parent.
        chmod(&t.0, 0o1777);
        write_atomic(&d, "f", b"x").unwrap();
    }

    #[test]
    fn a_file_others_can_write_is_refused() {
        let t = TmpDir::new("filemode");
        write_atomic(&t.0, "f", b"x").unwrap();
        chmod(&t.0.join("f"), 0o666);
        let e = read(&t.0, "f").unwrap_err().to_string();
        assert!(e.contains("0666"), "{e}");
        let e = append(&t.0, "f", b"y").unwrap_err().to_string();
        assert!(e.contains("0666"), "{e}");
    }

    #[test]
    fn symlinks_are_never_followed() {
        let t = TmpDir::new("symlink");
        let target = t.0.join("elsewhere");
        std::fs::write(&target, b"planted").unwrap();
        chmod(&target, 0o600);
        std::os::unix::fs::symlink(&target, t.0.join("f")).unwrap();
        let e = read(&t.0, "f").unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        let e = append(&t.0, "f", b"x").unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        // A planted temporary file is removed, not written through.
        std::os::unix::fs::symlink(&target, t.0.join("g.tmp")).unwrap();
        write_atomic(&t.0, "g", b"mine").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"planted");
        assert_eq!(read(&t.0, "g").unwrap().unwrap(), b"mine");
        // A symlinked state directory is refused as well.
        let real = t.0.join("real");
        std::fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        std::os::unix::fs::symlink(&real, t.0.join("link")).unwrap();
        let e = read(&t.0.join("link"), "f").unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
    // Files and directories owned by another user need root to set up: tests/tests/host_privs.rs.
}
