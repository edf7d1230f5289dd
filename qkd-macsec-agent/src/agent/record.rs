//! The per-link record of the active key, so that a restarted agent can adopt the kernel's SAs.
//!
//! The kernel keeps transmitting with its SAs while no agent runs (that is what makes a restart
//! hitless), but it cannot tell a new agent how old the key is, and key bytes cannot be read
//! back. Without the age the new agent cannot vouch for the key's lifetime and must stall
//! (confidentiality first). The record holds what is needed to vouch for it and nothing secret:
//! key_ID, KN, AN, the kernel's key identifier of the TX SA (to check the record describes the SA
//! the kernel actually uses), the peer's MAC and when the key became active on the
//! `CLOCK_BOOTTIME` clock (which counts suspend and never jumps with the wall clock, so an age
//! computed from it is never too small).
//!
//! The file lives in `global.state_dir`, which belongs on a tmpfs: a reboot clears the kernel's
//! SAs and must clear the record with them. Whoever could write it could extend an adopted key's
//! lifetime, so it is read and written only through [`super::statefile`] (private directory, no
//! symlinks, no file that others own or may write).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::core::Adoption;
use super::statefile::{self, StateError};
use crate::keyx::KeyId;
use crate::watchdog::KeyRef;

/// Version of the record's layout; a record of another version is ignored (and the link stalls
/// until re-keyed, which is safe).
const VERSION: u32 = 1;

/// What a restarted agent needs to adopt the running key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub version: u32,
    pub link: String,
    pub key_id: String,
    pub kn: u32,
    pub an: u8,
    /// The kernel's 16-byte key identifier of our TX SA at `an`, hex.
    pub kernel_key_id: String,
    pub peer_mac: [u8; 6],
    /// `CLOCK_BOOTTIME` in milliseconds when the key became active.
    pub active_since_boot_ms: u64,
}

/// Errors reading or writing a record (never fatal: without a record the link re-keys).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: not a key record ({detail}); delete it, the link re-keys without it")]
    Malformed { path: PathBuf, detail: String },
}

/// `CLOCK_BOOTTIME` now.
pub fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_BOOTTIME exists on every kernel this
    // agent supports (since 2.6.39).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The record file of a link (the label is checked by the config to be a plain name).
pub fn path(dir: &Path, link: &str) -> PathBuf {
    dir.join(file_name(link))
}

fn file_name(link: &str) -> String {
    let safe: String = link
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.key.json")
}

impl KeyRecord {
    pub fn new(
        link: &str,
        key: KeyRef,
        an: u8,
        kernel_key_id: [u8; 16],
        peer_mac: [u8; 6],
        active_since_boot: Duration,
    ) -> Self {
        Self {
            version: VERSION,
            link: link.to_owned(),
            key_id: key.key_id.to_string(),
            kn: key.kn,
            an,
            kernel_key_id: hex(&kernel_key_id),
            peer_mac,
            active_since_boot_ms: active_since_boot.as_millis() as u64,
        }
    }

    /// Writes the record atomically (a crash leaves the old record or the new, never half of
    /// one), readable by root only.
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let body = serde_json::to_vec_pretty(self).expect("a KeyRecord always serializes");
        Ok(statefile::write_atomic(dir, &file_name(&self.link), &body)?)
    }

    /// The link's record, if there is one.
    pub fn load(dir: &Path, link: &str) -> Result<Option<Self>, RecordError> {
        let p = path(dir, link);
        let Some(body) = statefile::read(dir, &file_name(link))? else {
            return Ok(None);
        };
        let r: KeyRecord = serde_json::from_slice(&body).map_err(|e| RecordError::Malformed {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        if r.version != VERSION || r.link != link {
            return Err(RecordError::Malformed {
                path: p,
                detail: format!("version {} for link {:?}", r.version, r.link),
            });
        }
        Ok(Some(r))
    }

    /// Removes the link's record (the link stalled: there is nothing to adopt).
    pub fn remove(dir: &Path, link: &str) -> Result<(), RecordError> {
        Ok(statefile::remove(dir, &file_name(link))?)
    }

    /// Checks the record against the kernel's TX SA in use (`encoding_an`, whether it is
    /// active, its key identifier and next PN) and the peer's RX SA. Returns why adoption is
    /// refused otherwise, in words for the log.
    pub fn adoption(
        &self,
        encoding_an: u8,
        tx_active: bool,
        tx_kernel_key_id: [u8; 16],
        tx_next_pn: u64,
        peer_rx_active: bool,
        now_boot: Duration,
    ) -> Result<Adoption, String> {
        if !tx_active {
            return Err("the kernel's encoding TX SA is inactive".into());
        }
        if self.an != encoding_an {
            return Err(format!(
                "the record names AN {} but the kernel transmits on AN {encoding_an}",
                self.an
            ));
        }
        if self.kernel_key_id != hex(&tx_kernel_key_id) {
            return Err(format!(
                "the kernel's TX SA carries key identifier {} but the record names {}",
                hex(&tx_kernel_key_id),
                self.kernel_key_id
            ));
        }
        if !peer_rx_active {
            return Err("the peer's RX SA on that AN is missing or inactive".into());
        }
        let key_id: KeyId = self
            .key_id
            .parse()
            .map_err(|e| format!("bad key_ID in the record: {e}"))?;
        let since = Duration::from_millis(self.active_since_boot_ms);
        if since > now_boot {
            // A record from before a reboot whose SAs somehow survived: cannot be aged.
            return Err("the record is from a previous boot".into());
        }
        Ok(Adoption {
            key: KeyRef {
                key_id,
                kn: self.kn,
            },
            an: self.an,
            peer_mac: self.peer_mac,
            age: now_boot - since,
            tx_pn: tx_next_pn,
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::agent::statefile::tests::TmpDir;

    fn rec() -> KeyRecord {
        KeyRecord::new(
            "gw/a link",
            KeyRef {
                key_id: "bae179ae-ec59-4a81-988b-8c3842dda8ec".parse().unwrap(),
                kn: 7,
            },
            2,
            [0xab; 16],
            [2, 0, 0, 0, 0, 2],
            Duration::from_secs(100),
        )
    }

    #[test]
    fn save_load_remove_round_trip_with_private_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = TmpDir::new("record-rt");
        let d = t.0.join("state");
        assert_eq!(KeyRecord::load(&d, "gw/a link").unwrap(), None);
        let r = rec();
        r.save(&d).unwrap();
        let p = path(&d, "gw/a link");
        assert_eq!(p.file_name().unwrap(), "gw_a_link.key.json");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(KeyRecord::load(&d, "gw/a link").unwrap(), Some(r));
        KeyRecord::remove(&d, "gw/a link").unwrap();
        assert_eq!(KeyRecord::load(&d, "gw/a link").unwrap(), None);
        KeyRecord::remove(&d, "gw/a link").unwrap();
    }

    #[test]
    fn garbage_and_foreign_records_are_errors_not_adoptions() {
        let t = TmpDir::new("record-bad");
        let dir = t.0.clone();
        statefile::write_atomic(&dir, &file_name("l"), b"{not json").unwrap();
        let e = KeyRecord::load(&dir, "l").unwrap_err().to_string();
        assert!(e.contains("not a key record"), "{e}");
        let mut r = rec();
        r.link = "other".into();
        statefile::write_atomic(&dir, &file_name("l"), &serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(KeyRecord::load(&dir, "l").is_err());
    }

    /// Issue 17 item 5: a record a local user could have rewritten (say, with a later
    /// activation time, to extend an adopted key's lifetime) is never loaded.
    #[test]
    fn a_record_others_could_have_written_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let t = TmpDir::new("record-perm");
        let r = rec();
        r.save(&t.0).unwrap();
        assert_eq!(KeyRecord::load(&t.0, "gw/a link").unwrap(), Some(r.clone()));
        chmod(&path(&t.0, "gw/a link"), 0o646);
        let e = KeyRecord::load(&t.0, "gw/a link").unwrap_err().to_string();
        assert!(e.contains("chmod go-w"), "{e}");
        chmod(&path(&t.0, "gw/a link"), 0o600);
        chmod(&t.0, 0o733);
        let e = KeyRecord::load(&t.0, "gw/a link").unwrap_err().to_string();
        assert!(e.contains("0733"), "{e}");
        chmod(&t.0, 0o700);
        // A record planted as a symlink to a file of the attacker's choosing.
        let other = t.0.join("planted.json");
        std::fs::rename(path(&t.0, "gw/a link"), &other).unwrap();
        std::os::unix::fs::symlink(&other, path(&t.0, "gw/a link")).unwrap();
        let e = KeyRecord::load(&t.0, "gw/a link").unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
    }

    #[test]
    fn adoption_checks_every_fact_against_the_kernel() {
        let r = rec();
        let now = Duration::from_secs(130);
        let a = r
            .adoption(2, true, [0xab; 16], 555, true, now)
            .expect("matching record");
        assert_eq!(a.age, Duration::from_secs(30));
        assert_eq!((a.an, a.tx_pn, a.key.kn), (2, 555, 7));
        for (an, active, kid, rx, now, want) in [
            (2, false, [0xab; 16], true, now, "inactive"),
            (1, true, [0xab; 16], true, now, "transmits on AN 1"),
            (2, true, [0xac; 16], true, now, "key identifier"),
            (2, true, [0xab; 16], false, now, "RX SA"),
            (
                2,
                true,
                [0xab; 16],
                true,
                Duration::from_secs(50),
                "previous boot",
            ),
        ] {
            let e = r.adoption(an, active, kid, 1, rx, now).unwrap_err();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boottime() > a);
    }
}
