//! Key profiles: what a QKD key becomes (a CAK that SAKs are derived from, or a SAK itself), and
//! the IEEE 802.1X-2010 KDF they rely on.

pub mod kdf;
