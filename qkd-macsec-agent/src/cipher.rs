//! The MACsec cipher suites (IEEE 802.1AE-2018 table 14-1) as plain data: key length, PN space,
//! XPN, the suite identifier. Shared by the config schema, the kernel layer ([`crate::macsec`])
//! and the sans-IO logic (profiles, watchdog), none of which owns it, so that config and kernel
//! can never disagree on a suite's key length, PN space or identifier. Config names are
//! `ip macsec`'s.

/// The four cipher suites Linux MACsec implements (IEEE 802.1AE-2018 table 14-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
pub enum Cipher {
    #[serde(rename = "gcm-aes-128")]
    GcmAes128,
    #[serde(rename = "gcm-aes-256")]
    GcmAes256,
    #[serde(rename = "gcm-aes-xpn-128")]
    GcmAesXpn128,
    #[serde(rename = "gcm-aes-xpn-256")]
    GcmAesXpn256,
}

impl Cipher {
    pub const ALL: [Cipher; 4] = [
        Cipher::GcmAes128,
        Cipher::GcmAes256,
        Cipher::GcmAesXpn128,
        Cipher::GcmAesXpn256,
    ];

    /// The 64-bit cipher suite identifier the kernel takes in IFLA_MACSEC_CIPHER_SUITE.
    pub fn id(self) -> u64 {
        match self {
            Cipher::GcmAes128 => 0x0080_C200_0100_0001,
            Cipher::GcmAes256 => 0x0080_C200_0100_0002,
            Cipher::GcmAesXpn128 => 0x0080_C200_0100_0003,
            Cipher::GcmAesXpn256 => 0x0080_C200_0100_0004,
        }
    }

    /// Maps a kernel cipher id back; the kernel also reports the pre-2018 GCM-AES-128 id.
    pub fn from_id(id: u64) -> Option<Self> {
        match id {
            0x0080_C200_0100_0001 | 0x0080_0200_0100_0001 => Some(Cipher::GcmAes128),
            0x0080_C200_0100_0002 => Some(Cipher::GcmAes256),
            0x0080_C200_0100_0003 => Some(Cipher::GcmAesXpn128),
            0x0080_C200_0100_0004 => Some(Cipher::GcmAesXpn256),
            _ => None,
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            Cipher::GcmAes128 | Cipher::GcmAesXpn128 => 16,
            Cipher::GcmAes256 | Cipher::GcmAesXpn256 => 32,
        }
    }

    /// Extended packet numbering: 64-bit PNs, needs an SSCI and a salt per SA.
    pub fn is_xpn(self) -> bool {
        matches!(self, Cipher::GcmAesXpn128 | Cipher::GcmAesXpn256)
    }

    /// The highest PN an SA of this suite can send; the SA stops after it.
    pub fn max_pn(self) -> u64 {
        if self.is_xpn() {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }

    /// The name `ip macsec` uses.
    pub fn ip_name(self) -> &'static str {
        match self {
            Cipher::GcmAes128 => "gcm-aes-128",
            Cipher::GcmAes256 => "gcm-aes-256",
            Cipher::GcmAesXpn128 => "gcm-aes-xpn-128",
            Cipher::GcmAesXpn256 => "gcm-aes-xpn-256",
        }
    }
}
