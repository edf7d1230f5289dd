//! ETSI GS QKD 014 V1.1.1 JSON data formats (clause 6), with the standard's exact field names.
//! Shared by the client (deserialising) and the simulator (serialising). Types the client reads
//! from a KME accept unknown fields (forward compatibility with other KMEs); request types the
//! simulator reads deny them, so a typo in a request is a 400 instead of a silent default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// Extension names this project defines (documented in docs/kme-simulator.md).
pub mod ext {
    /// In `status_extension`: how long (ms) after the master fetched a key the slave can still
    /// fetch it; 0 = unlimited. ETSI 014 has no such field, and real KMEs differ (10 s seen).
    pub const AVAILABILITY_TIMEOUT_MS: &str = "qkd_macsec_key_availability_timeout_ms";
    /// In `status_extension`: the simulated link's QBER (fraction, 0.0-1.0).
    pub const QBER: &str = "qkd_macsec_qber";
    /// In `status_extension`: false while the link produces no key (paused or QBER abort).
    pub const LINK_UP: &str = "qkd_macsec_link_up";
    /// In a key's `key_extension` (enc_keys answers): ms from this answer until the slave can no
    /// longer fetch the key. Relative, so the two hosts' clocks need not agree.
    pub const EXPIRES_IN_MS: &str = "qkd_macsec_expires_in_ms";
}

/// Status (clause 6.1), answer to `GET /api/v1/keys/{slave_SAE_ID}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(rename = "source_KME_ID")]
    pub source_kme_id: String,
    #[serde(rename = "target_KME_ID")]
    pub target_kme_id: String,
    #[serde(rename = "master_SAE_ID")]
    pub master_sae_id: String,
    #[serde(rename = "slave_SAE_ID")]
    pub slave_sae_id: String,
    /// Default key size, bits.
    pub key_size: u32,
    pub stored_key_count: u64,
    pub max_key_count: u64,
    pub max_key_per_request: u32,
    /// Bits.
    pub max_key_size: u32,
    /// Bits.
    pub min_key_size: u32,
    /// 0: no multicast (additional slave SAEs) supported.
    #[serde(rename = "max_SAE_ID_count")]
    pub max_sae_id_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<Value>,
}

/// Key request (clause 6.2), body of `POST .../enc_keys`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    /// Bits; must be a multiple of 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    #[serde(
        rename = "additional_slave_SAE_IDs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub additional_slave_sae_ids: Vec<String>,
    /// Each element an object `{name: value}`; a KME that does not support one must answer 400.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension_mandatory: Vec<Map<String, Value>>,
    /// Each element an object `{name: value}`; a KME may ignore them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension_optional: Vec<Map<String, Value>>,
}

/// One entry of a key IDs object (clause 6.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyIdEntry {
    #[serde(rename = "key_ID")]
    pub key_id: String,
    #[serde(
        rename = "key_ID_extension",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key_id_extension: Option<Value>,
}

/// Key IDs (clause 6.4), body of `POST .../dec_keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyIds {
    #[serde(rename = "key_IDs")]
    pub key_ids: Vec<KeyIdEntry>,
    #[serde(
        rename = "key_IDs_extension",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key_ids_extension: Option<Value>,
}

/// One key of a key container (clause 6.3). `key` is base64 and secret: it lives in a zeroizing
/// string, and this type's Debug never shows it.
#[derive(Serialize, Deserialize)]
pub struct KeyEntry {
    #[serde(rename = "key_ID")]
    pub key_id: String,
    #[serde(
        rename = "key_ID_extension",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key_id_extension: Option<Value>,
    pub key: Zeroizing<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_extension: Option<Value>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("key_ID", &self.key_id)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Key container (clause 6.3), answer to enc_keys and dec_keys.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyContainer {
    pub keys: Vec<KeyEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_container_extension: Option<Value>,
}

/// Error (clause 6.5), body of 400/401/503 answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_match_the_standard() {
        let req = KeyRequest {
            number: Some(2),
            size: Some(256),
            additional_slave_sae_ids: vec!["x".into()],
            extension_mandatory: vec![Map::new()],
            extension_optional: vec![],
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"number":2,"size":256,"additional_slave_SAE_IDs":["x"],"extension_mandatory":[{}]})
        );
        let ids: KeyIds =
            serde_json::from_str(r#"{"key_IDs":[{"key_ID":"a","key_ID_extension":{}}]}"#).unwrap();
        assert_eq!(ids.key_ids[0].key_id, "a");
        assert!(serde_json::from_str::<KeyRequest>(r#"{"numbr":1}"#).is_err());
        let st = r#"{"source_KME_ID":"A","target_KME_ID":"B","master_SAE_ID":"m","slave_SAE_ID":"s",
            "key_size":256,"stored_key_count":1,"max_key_count":2,"max_key_per_request":3,
            "max_key_size":1024,"min_key_size":64,"max_SAE_ID_count":0,"vendor_field":true}"#;
        let s: Status = serde_json::from_str(st).unwrap();
        assert_eq!(s.max_sae_id_count, 0);
    }

    #[test]
    fn key_entry_debug_hides_key() {
        let e = KeyEntry {
            key_id: "id".into(),
            key_id_extension: None,
            key: Zeroizing::new("c2VjcmV0LWtleS1ieXRlcw==".into()),
            key_extension: None,
        };
        assert!(!format!("{e:?}").contains("c2VjcmV0"));
    }
}
