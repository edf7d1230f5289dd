//! Wire format of the key-ID exchange payload (version 2). See docs/protocol.md for the
//! rationale; the layout is fixed so the decoder can be strict about every byte.
//!
//! ```text
//! off  len  field
//!   0    1  version (2)
//!   1    1  type: 1 ANNOUNCE, 2 INSTALL, 3 ACK, 4 NACK, 5 HELLO
//!   2    1  key role: 0 none, 1 CAK, 2 SAK
//!   3    1  AN 0..=3, 0xFF none
//!   4    1  code: ACK = type acknowledged (1|2); NACK = reason; HELLO = keys held; else 0
//!   5    1  nonce length N: 0, 16 or 32
//!   6    1  sender SAE-ID length S: 1..=64
//!   7    1  reserved, 0
//!   8    8  sequence number, big-endian
//!  16    4  key number KN, big-endian
//!  20   16  key_ID (UUID bytes; zero = none)
//!  36   16  auth key_ID: the key whose ICK made the tag (zero = unauthenticated)
//!  52    8  sender SCI: MAC address of the sender's MACsec lower interface and port, as in a
//!           SecTAG (never zero)
//!  60    8  incarnation: random per start of the sending agent (never zero)
//!  68    8  echo: the peer's incarnation this message answers or is bound to (ACK, NACK: the
//!           request's; INSTALL: the slave's that confirmed the key); zero in ANNOUNCE, and in
//!           HELLO when the sender knows none
//!  76    N  nonce (KS-nonce)
//! 76+N   S  sender SAE-ID (ASCII)
//!   ..  16  tag: AES-CMAC(ICK, every preceding byte); zero when unauthenticated
//! ```

use std::fmt;

use super::KeyId;

/// Protocol version this module speaks. Version 1 lacked the sender SCI, incarnation and echo
/// (docs/protocol.md, "Version history"); its messages are refused.
pub const VERSION: u8 = 2;
/// Fixed part before the nonce.
pub const HEADER_LEN: usize = 76;
/// Length of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Largest payload an organizationally specific TLV can carry after OUI and subtype
/// (511-byte TLV information string minus 3 + 1).
pub const MAX_PAYLOAD: usize = 507;
/// Longest sender SAE-ID on the wire: it travels in every TLV, which has 507 bytes in all (the
/// config refuses longer SAE-IDs).
pub const MAX_SENDER_LEN: usize = 64;
/// Smallest valid payload: header, one-byte SAE-ID, tag.
pub const MIN_PAYLOAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// AN value meaning "none".
const AN_NONE: u8 = 0xFF;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    Announce = 1,
    Install = 2,
    Ack = 3,
    Nack = 4,
    Hello = 5,
}

impl MsgType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Announce,
            2 => Self::Install,
            3 => Self::Ack,
            4 => Self::Nack,
            5 => Self::Hello,
            _ => return None,
        })
    }
}

/// What a QKD key is used as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRole {
    Cak = 1,
    Sak = 2,
}

impl KeyRole {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Cak),
            2 => Some(Self::Sak),
            _ => None,
        }
    }
}

/// Which request an ACK answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckOf {
    /// "I fetched the announced key from my KME and hold it."
    Announce,
    /// "I installed the key at the AN (RX, and TX when I am the slave)."
    Install,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackReason {
    /// The KME does not have the key (never had it, already delivered, or expired): the
    /// master must issue a different key.
    KeyGone = 1,
    /// The KME could not be reached or failed; the request may be repeated.
    KmeUnavailable = 2,
    /// The KME refused this SAE (401): the key was issued to someone else.
    Unauthorized = 3,
    /// Installing into the kernel failed.
    InstallFailed = 4,
    /// INSTALL named a key the receiver does not hold (yet).
    UnknownKey = 5,
    /// The key was already retired and will never be used again.
    Retired = 6,
}

impl NackReason {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::KeyGone,
            2 => Self::KmeUnavailable,
            3 => Self::Unauthorized,
            4 => Self::InstallFailed,
            5 => Self::UnknownKey,
            6 => Self::Retired,
            _ => return None,
        })
    }
}

/// The 16- or 32-byte KS-nonce of CAK-profile SAK derivation (public, like MKA's).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Nonce(Vec<u8>);

impl Nonce {
    /// Accepts 16 or 32 bytes (a SAK's length).
    pub fn new(bytes: &[u8]) -> Option<Self> {
        matches!(bytes.len(), 16 | 32).then(|| Self(bytes.to_vec()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The active key a HELLO reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub key_id: KeyId,
    pub role: KeyRole,
    pub kn: u32,
    pub an: u8,
}

/// The type-specific part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Master → slave: fetch this key (dec_keys) and acknowledge.
    Announce {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
    },
    /// Master → slave: install the SAK (role SAK: the key itself; role CAK: derived from the
    /// CAK `key_id` with `nonce` and `kn`) at `an`.
    Install {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        an: u8,
        nonce: Option<Nonce>,
    },
    Ack {
        of: AckOf,
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        /// The AN installed (ACK of INSTALL only).
        an: Option<u8>,
    },
    Nack {
        key_id: KeyId,
        role: KeyRole,
        kn: u32,
        reason: NackReason,
    },
    /// Periodic status: what the sender transmits with, and how many confirmed keys it holds.
    Hello { active: Option<Active>, held: u8 },
}

impl Body {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Body::Announce { .. } => MsgType::Announce,
            Body::Install { .. } => MsgType::Install,
            Body::Ack { .. } => MsgType::Ack,
            Body::Nack { .. } => MsgType::Nack,
            Body::Hello { .. } => MsgType::Hello,
        }
    }
}

/// A decoded (or to-be-encoded) message without its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub seq: u64,
    /// The sender's SAE-ID.
    pub sender: String,
    /// The SCI the sender transmits MACsec frames with (its lower interface's MAC and port).
    /// Covered by the tag, so once authenticated it says where the peer is; the Ethernet
    /// source address of the frame that carried the message says nothing.
    pub sci: u64,
    /// Random per start of the sending agent, never zero.
    pub incarnation: u64,
    /// The peer's incarnation this message answers or is bound to; zero = none.
    pub echo: u64,
    /// The key whose ICK authenticates the message; `None` = unauthenticated.
    pub auth: Option<KeyId>,
    pub body: Body,
}

/// Every way a payload can be malformed. Values shown are header fields, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {len} bytes is shorter than the minimum {min}")]
    TooShort { len: usize, min: usize },
    #[error("payload of {len} bytes exceeds the TLV maximum of {MAX_PAYLOAD}")]
    TooLong { len: usize },
    #[error("protocol version {0} is not supported (this agent speaks {VERSION})")]
    Version(u8),
    #[error("message type {0} is unknown")]
    MsgType(u8),
    #[error("{ty:?}: key role {value} is invalid")]
    Role { ty: MsgType, value: u8 },
    #[error("{ty:?}: AN {value} is invalid")]
    An { ty: MsgType, value: u8 },
    #[error("{ty:?}: code {value} is invalid")]
    Code { ty: MsgType, value: u8 },
    #[error("{ty:?}: nonce length {value} is invalid")]
    NonceLength { ty: MsgType, value: u8 },
    #[error("sender SAE-ID length {0} is outside 1..={MAX_SENDER_LEN}")]
    SenderLength(u8),
    #[error("sender SAE-ID is not printable ASCII")]
    SenderCharset,
    #[error("reserved byte is {0:#04x}, must be 0")]
    Reserved(u8),
    #[error("header declares {declared} bytes but the payload has {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("{ty:?}: key_ID is missing")]
    MissingKeyId { ty: MsgType },
    #[error("{ty:?}: field {field} must be empty for this message type")]
    UnexpectedField { ty: MsgType, field: &'static str },
    #[error("unauthenticated message carries a non-zero tag")]
    TagWithoutAuth,
    #[error("{ty:?}: field {field} must not be zero")]
    MissingField { ty: MsgType, field: &'static str },
}

/// Errors building a message (programming errors in the caller, reported not panicked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("sender SAE-ID of {0} bytes is outside 1..={MAX_SENDER_LEN} or not printable ASCII")]
    Sender(usize),
    #[error("AN {0} is outside 0..=3")]
    An(u8),
    #[error("message names auth key {0} but no ICK was given, or an ICK without an auth key")]
    AuthMismatch(KeyId),
    #[error("a CAK-role INSTALL needs a nonce and a SAK-role INSTALL must not have one")]
    Nonce,
    #[error("{0} must not be zero here (or must be zero in an ANNOUNCE's echo)")]
    Binding(&'static str),
}

fn role_byte(r: KeyRole) -> u8 {
    r as u8
}

/// The authentication key of the exchange (derived in `keyx::auth`).
pub trait Signer {
    fn tag(&self, signed: &[u8]) -> [u8; TAG_LEN];
}

impl Message {
    /// Serialises the message. `signer` must be given exactly when `self.auth` is set.
    pub fn encode(&self, signer: Option<&dyn Signer>) -> Result<Vec<u8>, EncodeError> {
        let s = self.sender.as_bytes();
        if s.is_empty() || s.len() > MAX_SENDER_LEN || !s.iter().all(|b| b.is_ascii_graphic()) {
            return Err(EncodeError::Sender(s.len()));
        }
        if self.auth.is_some() != signer.is_some() {
            return Err(EncodeError::AuthMismatch(self.auth.unwrap_or(KeyId::NIL)));
        }
        if self.sci == 0 {
            return Err(EncodeError::Binding("sci"));
        }
        if self.incarnation == 0 {
            return Err(EncodeError::Binding("incarnation"));
        }
        match (echo_rule(self.body.msg_type()), self.echo) {
            (Echo::Zero, 0) | (Echo::Any, _) => {}
            (Echo::Required, e) if e != 0 => {}
            _ => return Err(EncodeError::Binding("echo")),
        }
        let (role, an, code, kn, key_id, nonce): (u8, u8, u8, u32, KeyId, &[u8]) = match &self.body
        {
            Body::Announce { key_id, role, kn } => {
                (role_byte(*role), AN_NONE, 0, *kn, *key_id, &[])
            }
            Body::Install {
                key_id,
                role,
                kn,
                an,
                nonce,
            } => {
                if *an > 3 {
                    return Err(EncodeError::An(*an));
                }
                let n: &[u8] = match (role, nonce) {
                    (KeyRole::Cak, Some(n)) => n.as_bytes(),
                    (KeyRole::Sak, None) => &[],
                    _ => return Err(EncodeError::Nonce),
                };
                (role_byte(*role), *an, 0, *kn, *key_id, n)
            }
            Body::Ack {
                of,
                key_id,
                role,
                kn,
                an,
            } => {
                let an = match (of, an) {
                    (AckOf::Install, Some(a)) if *a <= 3 => *a,
                    (AckOf::Install, Some(a)) => return Err(EncodeError::An(*a)),
                    (AckOf::Install, None) => return Err(EncodeError::An(AN_NONE)),
                    (AckOf::Announce, _) => AN_NONE,
                };
                let code = match of {
                    AckOf::Announce => 1,
                    AckOf::Install => 2,
                };
                (role_byte(*role), an, code, *kn, *key_id, &[])
            }
            Body::Nack {
                key_id,
                role,
                kn,
                reason,
            } => (role_byte(*role), AN_NONE, *reason as u8, *kn, *key_id, &[]),
            Body::Hello { active, held } => match active {
                Some(a) => {
                    if a.an > 3 {
                        return Err(EncodeError::An(a.an));
                    }
                    (role_byte(a.role), a.an, *held, a.kn, a.key_id, &[])
                }
                None => (0, AN_NONE, *held, 0, KeyId::NIL, &[]),
            },
        };
        let mut out = Vec::with_capacity(HEADER_LEN + nonce.len() + s.len() + TAG_LEN);
        out.push(VERSION);
        out.push(self.body.msg_type() as u8);
        out.push(role);
        out.push(an);
        out.push(code);
        // Both lengths are bounded above (32 and 64), so the casts cannot truncate.
        out.push(nonce.len() as u8);
        out.push(s.len() as u8);
        out.push(0);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&kn.to_be_bytes());
        out.extend_from_slice(key_id.as_bytes());
        out.extend_from_slice(self.auth.unwrap_or(KeyId::NIL).as_bytes());
        out.extend_from_slice(&self.sci.to_be_bytes());
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        out.extend_from_slice(&self.echo.to_be_bytes());
        out.extend_from_slice(nonce);
        out.extend_from_slice(s);
        let tag = signer.map_or([0u8; TAG_LEN], |sg| sg.tag(&out));
        out.extend_from_slice(&tag);
        debug_assert!(out.len() <= MAX_PAYLOAD);
        Ok(out)
    }

    /// Strictly parses a payload. The tag is not checked here (that needs the key the message
    /// names in `auth`); use [`signed_part`] and [`tag_of`] with `keyx::auth`.
    pub fn decode(p: &[u8]) -> Result<Message, DecodeError> {
        if p.len() < MIN_PAYLOAD {
            return Err(DecodeError::TooShort {
                len: p.len(),
                min: MIN_PAYLOAD,
            });
        }
        if p.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLong { len: p.len() });
        }
        if p[0] != VERSION {
            return Err(DecodeError::Version(p[0]));
        }
        let ty = MsgType::from_u8(p[1]).ok_or(DecodeError::MsgType(p[1]))?;
        let (role_b, an_b, code, nlen, slen) = (p[2], p[3], p[4], p[5], p[6]);
        if p[7] != 0 {
            return Err(DecodeError::Reserved(p[7]));
        }
        if !matches!(nlen, 0 | 16 | 32) {
            return Err(DecodeError::NonceLength { ty, value: nlen });
        }
        if slen == 0 || usize::from(slen) > MAX_SENDER_LEN {
            return Err(DecodeError::SenderLength(slen));
        }
        let declared = HEADER_LEN + usize::from(nlen) + usize::from(slen) + TAG_LEN;
        if declared != p.len() {
            return Err(DecodeError::LengthMismatch {
                declared,
                actual: p.len(),
            });
        }
        let seq = u64::from_be_bytes(p[8..16].try_into().expect("8 bytes"));
        let kn = u32::from_be_bytes(p[16..20].try_into().expect("4 bytes"));
        let key_id = KeyId(p[20..36].try_into().expect("16 bytes"));
        let auth_id = KeyId(p[36..52].try_into().expect("16 bytes"));
        let sci = u64::from_be_bytes(p[52..60].try_into().expect("8 bytes"));
        let incarnation = u64::from_be_bytes(p[60..68].try_into().expect("8 bytes"));
        let echo = u64::from_be_bytes(p[68..76].try_into().expect("8 bytes"));
        let nonce = &p[HEADER_LEN..HEADER_LEN + usize::from(nlen)];
        let sender_b =
            &p[HEADER_LEN + usize::from(nlen)..HEADER_LEN + usize::from(nlen) + usize::from(slen)];
        let tag = &p[p.len() - TAG_LEN..];
        if !sender_b.iter().all(|b| b.is_ascii_graphic()) {
            return Err(DecodeError::SenderCharset);
        }
        let auth = (!auth_id.is_nil()).then_some(auth_id);
        if auth.is_none() && tag.iter().any(|&b| b != 0) {
            return Err(DecodeError::TagWithoutAuth);
        }
        if sci == 0 {
            return Err(DecodeError::MissingField { ty, field: "sci" });
        }
        if incarnation == 0 {
            return Err(DecodeError::MissingField {
                ty,
                field: "incarnation",
            });
        }
        match (echo_rule(ty), echo) {
            (Echo::Zero, 0) | (Echo::Any, _) => {}
            (Echo::Required, e) if e != 0 => {}
            (Echo::Required, _) => return Err(DecodeError::MissingField { ty, field: "echo" }),
            (Echo::Zero, _) => return Err(DecodeError::UnexpectedField { ty, field: "echo" }),
        }
        let role = || KeyRole::from_u8(role_b).ok_or(DecodeError::Role { ty, value: role_b });
        let need_key = || {
            if key_id.is_nil() {
                Err(DecodeError::MissingKeyId { ty })
            } else {
                Ok(key_id)
            }
        };
        let an_none = || {
            if an_b == AN_NONE {
                Ok(())
            } else {
                Err(DecodeError::An { ty, value: an_b })
            }
        };
        let an_some = || {
            if an_b <= 3 {
                Ok(an_b)
            } else {
                Err(DecodeError::An { ty, value: an_b })
            }
        };
        let no_nonce = || {
            if nlen == 0 {
                Ok(())
            } else {
                Err(DecodeError::UnexpectedField { ty, field: "nonce" })
            }
        };
        let zero_code = || {
            if code == 0 {
                Ok(())
            } else {
                Err(DecodeError::Code { ty, value: code })
            }
        };
        let body = match ty {
            MsgType::Announce => {
                an_none()?;
                zero_code()?;
                no_nonce()?;
                Body::Announce {
                    key_id: need_key()?,
                    role: role()?,
                    kn,
                }
            }
            MsgType::Install => {
                zero_code()?;
                let role = role()?;
                let nonce = match role {
                    KeyRole::Cak if nlen != 0 => Some(Nonce(nonce.to_vec())),
                    KeyRole::Cak => return Err(DecodeError::NonceLength { ty, value: nlen }),
                    KeyRole::Sak => {
                        no_nonce()?;
                        None
                    }
                };
                Body::Install {
                    key_id: need_key()?,
                    role,
                    kn,
                    an: an_some()?,
                    nonce,
                }
            }
            MsgType::Ack => {
                no_nonce()?;
                let (of, an) = match code {
                    1 => {
                        an_none()?;
                        (AckOf::Announce, None)
                    }
                    2 => (AckOf::Install, Some(an_some()?)),
                    v => return Err(DecodeError::Code { ty, value: v }),
                };
                Body::Ack {
                    of,
                    key_id: need_key()?,
                    role: role()?,
                    kn,
                    an,
                }
            }
            MsgType::Nack => {
                no_nonce()?;
                an_none()?;
                Body::Nack {
                    key_id: need_key()?,
                    role: role()?,
                    kn,
                    reason: NackReason::from_u8(code)
                        .ok_or(DecodeError::Code { ty, value: code })?,
                }
            }
            MsgType::Hello => {
                no_nonce()?;
                let active = if key_id.is_nil() {
                    if role_b != 0 {
                        return Err(DecodeError::Role { ty, value: role_b });
                    }
                    an_none()?;
                    if kn != 0 {
                        return Err(DecodeError::UnexpectedField { ty, field: "kn" });
                    }
                    None
                } else {
                    Some(Active {
                        key_id,
                        role: role()?,
                        kn,
                        an: an_some()?,
                    })
                };
                Body::Hello { active, held: code }
            }
        };
        Ok(Message {
            seq,
            // Checked printable ASCII above, so this cannot fail.
            sender: String::from_utf8_lossy(sender_b).into_owned(),
            sci,
            incarnation,
            echo,
            auth,
            body,
        })
    }
}

/// What a message type's echo field must hold.
enum Echo {
    /// ANNOUNCE: it starts an exchange and answers nothing.
    Zero,
    /// INSTALL, ACK, NACK: bound to the incarnation of the peer they answer or address, so that
    /// nothing recorded from an earlier life of either agent is accepted by the current one.
    Required,
    /// HELLO: the peer incarnation the sender knows, or zero; informative only.
    Any,
}

fn echo_rule(ty: MsgType) -> Echo {
    match ty {
        MsgType::Announce => Echo::Zero,
        MsgType::Install | MsgType::Ack | MsgType::Nack => Echo::Required,
        MsgType::Hello => Echo::Any,
    }
}

/// The MAC address part of an SCI (its upper 48 bits).
pub fn sci_mac(sci: u64) -> [u8; 6] {
    let b = sci.to_be_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// The bytes a tag covers: everything but the trailing tag. Only for payloads that decoded.
pub fn signed_part(payload: &[u8]) -> &[u8] {
    &payload[..payload.len().saturating_sub(TAG_LEN)]
}

/// The trailing tag of a payload that decoded.
pub fn tag_of(payload: &[u8]) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    if payload.len() >= TAG_LEN {
        t.copy_from_slice(&payload[payload.len() - TAG_LEN..]);
    }
    t
}

#[cfg(test)]
mod tests;
