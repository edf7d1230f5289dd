//! The ledger of QKD keys this gateway has put into the kernel, per link, kept across restarts
//! and reboots.
//!
//! A key that protected traffic once must never do so again: a second SA with the same key
//! starts at PN 1 with the same SCI (or SSCI and salt), so AES-GCM would reuse its nonces. In
//! memory the key exchange refuses retired keys, but that memory dies with the process, and an
//! independent KME may serve a key_ID again (to `dec_keys` after a replayed ANNOUNCE, or even to
//! `enc_keys`). So before a key's first SA is installed its key_ID is appended here and synced
//! to disk; a restarted agent loads the ledger and treats every key_ID in it as retired (never
//! fetched, announced or installed again, in either profile: a CAK of an earlier life is
//! replaced, not re-derived from, since its last KN died with that life).
//!
//! The file holds key_IDs only, never key bytes. It lives in `global.ledger_dir`, which must
//! survive reboots (a KME does not forget keys when a gateway reboots), and is read and written
//! only through [`super::statefile`]. It keeps the newest [`CAPACITY`] key_IDs: at one QKD key a
//! minute that is more than four months, at the sak profile's pace of one key per rollover
//! longer. Format: one header line, then one canonical UUID per line.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use super::statefile::{self, StateError};
use crate::keyx::KeyId;

/// Key_IDs remembered; older ones are dropped when the file is compacted.
pub const CAPACITY: usize = 200_000;
const HEADER: &str =
    "# qkd-macsec-agent ledger v1: key_IDs this gateway has installed; never again";

/// What can go wrong; a link does not start, and no key is installed, without its ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path} line {line}: {detail}; the ledger was changed by something other than this agent: check it, and delete it only if no earlier key of this link can come back from the KMEs")]
    Malformed {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

/// The used key_IDs of one link.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    name: String,
    used: HashSet<KeyId>,
    /// In file order, for compaction.
    order: VecDeque<KeyId>,
}

impl Ledger {
    /// Loads the ledger called `name` (the agent uses the link's SAE pair; an empty ledger
    /// when there is none yet).
    pub fn open(dir: &Path, link: &str) -> Result<Ledger, LedgerError> {
        let name = format!(
            "{}.used-keys",
            link.chars()
                .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                })
                .collect::<String>()
        );
        let mut l = Ledger {
            dir: dir.to_owned(),
            name,
            used: HashSet::new(),
            order: VecDeque::new(),
        };
        let Some(body) = statefile::read(dir, &l.name)? else {
            return Ok(l);
        };
        let text = String::from_utf8_lossy(&body);
        // A crash can only tear the last append, and a torn append never had its key installed
        // (installation waits for the sync): the unterminated tail is ignored.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        for (i, line) in complete.lines().enumerate() {
            if i == 0 {
                if line != HEADER {
                    return Err(l.malformed(1, "not a qkd-macsec ledger header".into()));
                }
                continue;
            }
            let id: KeyId = line
                .parse()
                .map_err(|e: crate::keyx::KeyIdParseError| l.malformed(i + 1, e.to_string()))?;
            if l.used.insert(id) {
                l.order.push_back(id);
            }
        }
        if l.order.len() > CAPACITY {
            l.compact()?;
        }
        Ok(l)
    }

    fn malformed(&self, line: usize, detail: String) -> LedgerError {
        LedgerError::Malformed {
            path: self.dir.join(&self.name),
            line,
            detail,
        }
    }

    /// Every key_ID on record.
    pub fn used(&self) -> Vec<KeyId> {
        self.order.iter().copied().collect()
    }

    pub fn contains(&self, key_id: &KeyId) -> bool {
        self.used.contains(key_id)
    }

    /// Records `key_id` as used, on disk, before its first SA is installed. Recording a key
    /// twice (a CAK's next SAK) costs nothing.
    pub fn record(&mut self, key_id: KeyId) -> Result<(), LedgerError> {
        if self.used.contains(&key_id) {
            return Ok(());
        }
        if self.order.is_empty() && statefile::read(&self.dir, &self.name)?.is_none() {
            statefile::write_atomic(&self.dir, &self.name, format!("{HEADER}\n").as_bytes())?;
        }
        statefile::append(&self.dir, &self.name, format!("{key_id}\n").as_bytes())?;
        self.used.insert(key_id);
        self.order.push_back(key_id);
        if self.order.len() >= 2 * CAPACITY {
            self.compact()?;
        }
        Ok(())
    }

    /// Keeps the newest [`CAPACITY`] key_IDs (rewritten atomically).
    fn compact(&mut self) -> Result<(), LedgerError> {
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.used.remove(&old);
            }
        }
        let mut body = format!("{HEADER}\n");
        for k in &self.order {
            body.push_str(&format!("{k}\n"));
        }
        statefile::write_atomic(&self.dir, &self.name, body.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::statefile::tests::TmpDir;

    fn kid(n: u8) -> KeyId {
        KeyId([n; 16])
    }

    #[test]
    fn keys_recorded_in_one_life_are_known_to_the_next() {
        let t = TmpDir::new("ledger-rt");
        let mut l = Ledger::open(&t.0, "gw/a").unwrap();
        assert!(l.used().is_empty());
        l.record(kid(1)).unwrap();
        l.record(kid(2)).unwrap();
        l.record(kid(1)).unwrap();
        drop(l);
        let l = Ledger::open(&t.0, "gw/a").unwrap();
        assert_eq!(l.used(), vec![kid(1), kid(2)]);
        assert!(l.contains(&kid(2)) && !l.contains(&kid(3)));
        // Another link's ledger is its own.
        assert!(Ledger::open(&t.0, "gw/b").unwrap().used().is_empty());
        let text = std::fs::read_to_string(t.0.join("gw_a.used-keys")).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_tampering_is_an_error() {
        let t = TmpDir::new("ledger-bad");
        let mut l = Ledger::open(&t.0, "l").unwrap();
        l.record(kid(1)).unwrap();
        statefile::append(&t.0, "l.used-keys", b"0202").unwrap();
        let l = Ledger::open(&t.0, "l").unwrap();
        assert_eq!(l.used(), vec![kid(1)]);
        statefile::append(&t.0, "l.used-keys", b"\nnot-a-uuid\n").unwrap();
        let e = Ledger::open(&t.0, "l").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("not a UUID"), "{e}");
        statefile::write_atomic(&t.0, "l.used-keys", b"something else\n").unwrap();
        let e = Ledger::open(&t.0, "l").unwrap_err().to_string();
        assert!(e.contains("header"), "{e}");
    }

    #[test]
    fn compaction_keeps_the_newest() {
        let t = TmpDir::new("ledger-cap");
        let mut body = format!("{HEADER}\n");
        let ids: Vec<KeyId> = (0..CAPACITY + 5)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                KeyId(b)
            })
            .collect();
        for k in &ids {
            body.push_str(&format!("{k}\n"));
        }
        statefile::write_atomic(&t.0, "l.used-keys", body.as_bytes()).unwrap();
        let l = Ledger::open(&t.0, "l").unwrap();
        assert_eq!(l.used().len(), CAPACITY);
        assert!(!l.contains(&ids[4]) && l.contains(&ids[5]));
        assert!(l.contains(ids.last().unwrap()));
        assert_eq!(Ledger::open(&t.0, "l").unwrap().used().len(), CAPACITY);
    }
}
