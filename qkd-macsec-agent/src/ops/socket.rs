//! The status socket's file-system side: a directory that only root (and the status group) can
//! enter, and a socket of mode 0660 owned by root and that group. Connecting to a Unix socket
//! needs write permission on it and search permission on every directory above it, so these
//! two modes are the access control; the brief moment between bind(2) and chmod(2), when the
//! socket has umask permissions, is covered by the directory already being closed.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the status socket.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a directory the agent creates for the socket.
pub const DIR_MODE: u32 = 0o750;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("status socket path {0} has no parent directory")]
    NoParent(PathBuf),
    #[error("status socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("status socket directory {path} is world-writable (mode {mode:o}); anyone could replace the socket. Use a directory such as /run/qkd-macsec-agent (mode 0750)")]
    WorldWritable { path: PathBuf, mode: u32 },
    #[error("status_group {0:?}: no such group; create it (groupadd) or fix global.status_group")]
    NoSuchGroup(String),
    /// Without CAP_CHOWN a process may only hand a file to a group it is a member of.
    #[error("cannot give {path} to status_group (gid {gid}): {source}; the agent must be a member of that group (the packaged unit has SupplementaryGroups=qkd-macsec) or have CAP_CHOWN")]
    Chown {
        path: PathBuf,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("status socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves a group name or numeric gid.
pub fn resolve_group(name: &str) -> Result<u32, SocketError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = CString::new(name).map_err(|_| SocketError::NoSuchGroup(name.to_owned()))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; buf outlives the use of grp's strings (none
    // are read: only gr_gid).
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(SocketError::NoSuchGroup(name.to_owned()));
    }
    Ok(grp.gr_gid)
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Prepares the directory, removes a stale socket, binds, and sets owner and mode.
/// `gid`: the status group, if any. Must be called inside a tokio runtime.
pub fn bind_status_socket(
    path: &Path,
    gid: Option<u32>,
) -> Result<tokio::net::UnixListener, SocketError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| SocketError::NoParent(path.to_owned()))?;
    let derr = |source| SocketError::Dir {
        path: dir.to_owned(),
        source,
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(derr)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(derr)?;
    }
    let meta = std::fs::metadata(dir).map_err(derr)?;
    // The group must be able to enter the directory too (systemd's RuntimeDirectory is
    // root:root). Only a directory of our own is handed over.
    if let Some(g) = gid {
        if meta.uid() == uid && meta.gid() != g {
            chown(dir, uid, g).map_err(|e| chown_err(dir, g, e))?;
        }
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(SocketError::WorldWritable {
            path: dir.to_owned(),
            mode,
        });
    }
    let ioerr = |what| {
        move |source| SocketError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    // A socket left by a previous run would make bind fail with EADDRINUSE.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ioerr("removing the old socket")(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(ioerr("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(ioerr("chmod"))?;
    if let Some(g) = gid {
        chown(path, uid, g).map_err(|e| chown_err(path, g, e))?;
    }
    Ok(listener)
}

fn chown_err(path: &Path, gid: u32, source: std::io::Error) -> SocketError {
    SocketError::Chown {
        path: path.to_owned(),
        gid,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_and_directory_get_their_modes() {
        let base = std::env::temp_dir().join(format!("qkd-ops-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = base.join("run/status.sock");
        // gid of our own group, so the test needs no privileges.
        let gid = unsafe { libc::getegid() };
        let l = bind_status_socket(&path, Some(gid)).unwrap();
        let dm = std::fs::metadata(base.join("run")).unwrap();
        assert_eq!(dm.mode() & 0o7777, DIR_MODE);
        let sm = std::fs::metadata(&path).unwrap();
        assert_eq!(sm.mode() & 0o7777, SOCKET_MODE);
        assert_eq!(sm.gid(), gid);
        drop(l);
        // A stale socket is replaced.
        let _l2 = bind_status_socket(&path, None).unwrap();

        // A world-writable directory is refused.
        let ww = base.join("ww");
        std::fs::create_dir_all(&ww).unwrap();
        std::fs::set_permissions(&ww, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_status_socket(&ww.join("s.sock"), None).unwrap_err();
        assert!(matches!(e, SocketError::WorldWritable { .. }), "{e}");
        assert!(e.to_string().contains("world-writable"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let e = resolve_group("no-such-group-qkd").unwrap_err();
        assert!(e.to_string().contains("no-such-group-qkd"), "{e}");
    }
}
