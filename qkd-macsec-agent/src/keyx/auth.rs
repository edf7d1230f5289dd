//! Authentication of exchange messages.
//!
//! Every QKD key K that both gateways hold yields an integrity check key
//! `ICK_K = KDF(K, "QKD-MACsec keyx ICK", key_ID | master SAE-ID | 0x00 | slave SAE-ID, 128)`
//! with the IEEE 802.1X-2010 KDF (the same construction MKA uses for its ICK, with its own label
//! so it can never equal a MACsec or MKA key). A message names the key in its `auth` field and
//! carries `AES-CMAC(ICK_K, payload without tag)`. Binding both SAE-IDs in the derivation means a
//! tag made for one gateway pair is useless on any other pair, and the role order stops a
//! message from being reflected back at its sender as if the peer had sent it (the sender field
//! is checked as well).

use super::wire::{self, Signer, TAG_LEN};
use super::KeyId;
use crate::kdf::{self, KdfError};
use crate::secret::SecretBytes;

const LABEL: &str = "QKD-MACsec keyx ICK";

/// The ICK of one QKD key for one gateway pair.
pub struct Ick {
    key_id: KeyId,
    key: SecretBytes,
}

impl std::fmt::Debug for Ick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ick(for {}, redacted)", self.key_id)
    }
}

impl Ick {
    /// Derives the ICK from a QKD key (16 or 32 bytes).
    pub fn derive(
        qkd_key: &SecretBytes,
        key_id: KeyId,
        master_sae: &str,
        slave_sae: &str,
    ) -> Result<Self, KdfError> {
        let mut ctx = Vec::with_capacity(16 + master_sae.len() + 1 + slave_sae.len());
        ctx.extend_from_slice(key_id.as_bytes());
        ctx.extend_from_slice(master_sae.as_bytes());
        ctx.push(0);
        ctx.extend_from_slice(slave_sae.as_bytes());
        Ok(Self {
            key_id,
            key: kdf::kdf(qkd_key.expose(), LABEL, &ctx, 128)?,
        })
    }

    /// The key this ICK belongs to (what goes in a message's `auth` field).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Checks the tag of a payload that [`wire::Message::decode`] accepted.
    pub fn verify(&self, payload: &[u8]) -> bool {
        let tag = wire::tag_of(payload);
        kdf::aes_cmac_verify(self.key.expose(), &[wire::signed_part(payload)], &tag)
            .unwrap_or(false)
    }
}

impl Signer for Ick {
    fn tag(&self, signed: &[u8]) -> [u8; TAG_LEN] {
        // The ICK is always 16 bytes (derived above), so AES-CMAC cannot fail on its length.
        kdf::aes_cmac(self.key.expose(), &[signed]).unwrap_or([0; TAG_LEN])
    }
}
