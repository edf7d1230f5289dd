//! ETSI GS QKD 014 answer decoding: status, key containers (enc_keys by count, dec_keys by
//! key_ID) and error bodies, exactly as the client decodes a KME's answer.
//! Properties: no panic; an error's text never contains a key (any `key` string of the input that
//! looks like base64, 12+ characters, and appears nowhere else in the input); a decoded key is the
//! base64 decoding of its entry, of the requested size, with a UUID key_ID; Debug of decoded keys
//! shows no key material.
#![no_main]

use std::time::Instant;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use qkd_macsec_agent::etsi014::client::{
    decode_error_body, decode_key_container, decode_status, Expect,
};
use serde_json::Value;
use uuid::Uuid;
use zeroize::Zeroizing;

const URL: &str = "https://kme.test:8443/api/v1/keys/sae-b/enc_keys";
const IDS: [&str; 2] = [
    "6a3c7a4e-5f19-4e8b-9a0c-1b2d3e4f5a6b",
    "0b9e8d7c-6a5b-4c3d-8e2f-1a0b9c8d7e6f",
];

/// `(secrets, other strings)` of a JSON value: values of fields named "key", everything else.
fn strings(v: &Value, under_key: bool, secrets: &mut Vec<String>, other: &mut Vec<String>) {
    match v {
        Value::String(s) if under_key => secrets.push(s.clone()),
        Value::String(s) => other.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, false, secrets, other)),
        Value::Object(o) => {
            for (k, x) in o {
                other.push(k.clone());
                strings(x, k == "key", secrets, other);
            }
        }
        _ => {}
    }
}

fn base64ish(s: &str) -> bool {
    s.len() >= 12
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

fn assert_no_secret(text: &str, body: &[u8]) {
    let Ok(v) = serde_json::from_str::<Value>(&String::from_utf8_lossy(body)) else {
        return;
    };
    let (mut secrets, mut other) = (Vec::new(), Vec::new());
    strings(&v, false, &mut secrets, &mut other);
    for s in secrets.iter().filter(|s| base64ish(s)) {
        let elsewhere = URL.contains(s.as_str()) || other.iter().any(|o| o.contains(s.as_str()));
        assert!(
            elsewhere || !text.contains(s.as_str()),
            "key {s:?} leaked into {text:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let ids: Vec<Uuid> = IDS.iter().map(|s| Uuid::parse_str(s).unwrap()).collect();
    let size_bits = match (mode >> 2) & 3 {
        0 => None,
        1 => Some(128),
        2 => Some(256),
        _ => Some(8),
    };
    match mode & 3 {
        0 => match decode_status(URL, body) {
            Ok(s) => assert!(format!("{s:?}").contains(&s.status.slave_sae_id)),
            Err(e) => assert_no_secret(&e.to_string(), body),
        },
        1 | 2 => {
            let expect = if mode & 3 == 1 {
                Expect::Count(usize::from(mode >> 4) % 3 + 1)
            } else {
                let n = usize::from(mode >> 4) % 2 + 1;
                Expect::Ids(&ids[..n])
            };
            let count = match &expect {
                Expect::Count(n) => Some(*n),
                Expect::Ids(i) => Some(i.len()),
            };
            match decode_key_container(
                URL,
                Zeroizing::new(body.to_vec()),
                Instant::now(),
                expect,
                size_bits,
            ) {
                Ok(keys) => {
                    assert_eq!(Some(keys.len()), count);
                    // serde_json skips ignored (unknown) fields without validating their UTF-8,
                    // so a body the decoder took may not parse as a whole Value: compare the
                    // fields that matter on a lossy copy.
                    let v: Value = serde_json::from_str(&String::from_utf8_lossy(body))
                        .expect("decoded, so JSON apart from ignored fields");
                    let entries = v["keys"].as_array().expect("decoded, so keys array");
                    let debug = format!("{keys:?}");
                    for (k, e) in keys.iter().zip(entries) {
                        assert_eq!(
                            e["key_ID"].as_str().map(|s| Uuid::parse_str(s).ok()),
                            Some(Some(k.id))
                        );
                        let b64 = e["key"].as_str().expect("decoded, so key string");
                        let want = base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(b64.trim_end_matches('='))
                            .expect("decoded, so base64");
                        assert_eq!(k.material.expose(), &want[..]);
                        if let Some(bits) = size_bits {
                            assert_eq!(want.len() * 8, bits as usize);
                        }
                        if b64.len() >= 4 {
                            assert!(!debug.contains(b64), "Debug shows key {b64}");
                        }
                    }
                }
                Err(e) => assert_no_secret(&e.to_string(), body),
            }
        }
        _ => {
            let (message, details) = decode_error_body(body, mode & 4 != 0);
            assert!(!message.is_empty() || serde_json::from_slice::<Value>(body).is_ok());
            // details_text caps the JSON at 512 bytes plus the wrapper.
            assert!(
                details.len() <= 512 + 3 + " (details: )".len(),
                "{}",
                details.len()
            );
        }
    }
});
