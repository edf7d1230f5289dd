//! The key-ID exchange: how the master tells the slave which QKD key to fetch, and when to
//! install it, inside the project's organizationally specific LLDP TLV.
//!
//! - [`wire`]: the versioned payload format and its strict decoder.
//! - [`auth`]: the per-key authentication key (ICK) and tag verification.
//! - [`machine`]: the sans-IO state machine (delivery, install, retransmission, replay window,
//!   rate limit).
//!
//! docs/protocol.md describes format, state machine and threat model.

pub mod auth;
pub mod machine;
pub mod wire;

use std::fmt;
use std::str::FromStr;

/// The resolved role of this gateway on a link: the master fetches keys with `enc_keys` and
/// announces them, the slave fetches them by key_ID with `dec_keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Slave,
}

/// An ETSI GS QKD 014 key_ID: a UUID, kept as its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// The all-zero UUID, used on the wire for "no key".
    pub const NIL: KeyId = KeyId([0; 16]);

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

/// A key_ID string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key_ID {0:?} is not a UUID (expected 8-4-4-4-12 hex digits)")]
pub struct KeyIdParseError(pub String);

impl FromStr for KeyId {
    type Err = KeyIdParseError;
    /// Parses the canonical 8-4-4-4-12 form, case-insensitively (ETSI 014 key_IDs).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || KeyIdParseError(s.chars().take(64).collect());
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(err());
        }
        let mut out = [0u8; 16];
        let mut j = 0;
        let mut i = 0;
        while i < 36 {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b[i] != b'-' {
                    return Err(err());
                }
                i += 1;
                continue;
            }
            let hi = (b[i] as char).to_digit(16).ok_or_else(err)?;
            let lo = (b[i + 1] as char).to_digit(16).ok_or_else(err)?;
            // Two hex digits make one byte; the value is below 256 by construction.
            out[j] = (hi * 16 + lo) as u8;
            j += 1;
            i += 2;
        }
        Ok(KeyId(out))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A key_ID is public (it travels in clear in ETSI 014 and in the TLV).
        write!(f, "KeyId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip_and_case() {
        let s = "550e8400-e29b-41d4-a716-446655440000";
        let k: KeyId = s.parse().unwrap();
        assert_eq!(k.to_string(), s);
        let upper: KeyId = s.to_uppercase().parse().unwrap();
        assert_eq!(upper, k);
        assert_eq!(k.0[0], 0x55);
        assert_eq!(k.0[15], 0x00);
        assert!(!k.is_nil());
        assert!(KeyId::NIL.is_nil());
    }

    #[test]
    fn uuid_rejects_malformed() {
        for bad in [
            "",
            "550e8400e29b41d4a716446655440000",
            "550e8400-e29b-41d4-a716-44665544000",
            "550e8400-e29b-41d4-a716-4466554400000",
            "550e8400-e29b-41d4-a716_446655440000",
            "550e8400-e29b-41d4-a716-44665544000g",
            "+50e8400-e29b-41d4-a716-446655440000",
            "550e8400-e29b-41d4-a716-4466554400é",
        ] {
            let e = bad.parse::<KeyId>().unwrap_err();
            assert!(e.to_string().contains("not a UUID"), "{bad}");
        }
    }
}
