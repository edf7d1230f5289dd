//! Config loading from TOML text (Config::parse: TOML, serde, validation).
//! Properties: no panic; a config that parses validates again (validation is a pure function of
//! the parsed value) and every derived value the agent computes from it is computable; an error
//! names its origin and a field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qkd_macsec_agent::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(cfg) => {
            assert!(
                cfg.validate().is_ok(),
                "parse accepted what validate rejects"
            );
            assert!(!cfg.link.is_empty(), "a config without links was accepted");
            for l in &cfg.link {
                let _ = (l.label(), l.role(), l.lldp.oui_bytes());
                assert!(l.akl.effective_max_pn(l.cipher) > 0);
            }
            let _ = format!("{cfg:?}");
        }
        Err(e) => {
            let s = e.to_string();
            assert!(
                s.starts_with("fuzz.toml"),
                "error does not name the file: {s}"
            );
            if !matches!(e, ConfigError::Read { .. }) {
                assert!(!e.field().is_empty(), "error names no field: {s}");
            }
        }
    }
});
