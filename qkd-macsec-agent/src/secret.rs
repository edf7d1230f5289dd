//! Key material: zeroized on drop, never shown by Debug, never serialised by accident.
//!
//! What [`SecretBytes`] wipes: its own heap buffer, when it is dropped, spare capacity included
//! (the zeroize crate clears the whole allocation). Moving it copies no key byte (only the
//! pointer moves), and it has no method that grows (and so reallocates) the buffer.
//!
//! What it cannot wipe: the source of [`SecretBytes::from_slice`] (the caller wipes it), copies
//! made from [`SecretBytes::expose`] (a cipher's key schedule, a KDF's state; the netlink request
//! that carries a key to the kernel is zeroizing, docs/macsec.md), buffers the key passed through
//! before it got here (the ETSI 014 client's module docs trace those), and stack temporaries. In
//! the agent binary the global allocator ([`crate::zalloc`]) wipes every heap block when it is
//! freed, so a heap copy nobody wiped is gone at the latest when its owner frees it; while it
//! lives, `run` keeps it out of core dumps and swap ([`crate::privs::protect_key_memory`]).

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret byte string (a QKD key, a CAK, a SAK, a derived key).
///
/// Debug prints only the length. There is deliberately no Display, no Serialize and no Clone
/// derive: copying key material must be an explicit [`SecretBytes::duplicate`] call.
#[derive(Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Takes ownership of `bytes`; the caller's buffer is moved, not copied.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies out of a slice that the caller then wipes itself.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// The key bytes, for writing into the kernel or a KDF.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// An explicit copy, so every duplication of key material is visible in review.
    pub fn duplicate(&self) -> Self {
        Self(self.0.clone())
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes, redacted)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let s = SecretBytes::new(vec![0xAB; 32]);
        let shown = format!("{s:?}");
        assert_eq!(shown, "SecretBytes(32 bytes, redacted)");
        assert!(!shown.to_lowercase().contains("ab"));
    }

    #[test]
    fn duplicate_is_equal_and_independent() {
        let a = SecretBytes::from_slice(&[1, 2, 3]);
        let b = a.duplicate();
        assert_eq!(a, b);
        assert_eq!(b.expose(), &[1, 2, 3]);
    }
}
