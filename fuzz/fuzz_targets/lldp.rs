//! LLDPDU decoder (what XDP and the packet socket hand the agent) and the project TLV check.
//! Properties: whatever decodes re-encodes, and the re-encoding decodes to the same value; the
//! TLV payload check returns exactly the bytes after OUI and subtype; a payload that decodes as a
//! key-exchange message came through unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qkd_macsec_agent::keyx::wire::Message;
use qkd_macsec_agent::lldp::{project_payload, LldpFrame};
use qkd_macsec_common::{LLDP_OUI, LLDP_SUBTYPE};

fuzz_target!(|data: &[u8]| {
    match LldpFrame::parse_frame(data, LLDP_OUI, LLDP_SUBTYPE) {
        Ok(f) => {
            let src: [u8; 6] = data[6..12].try_into().unwrap();
            let enc = f
                .encode_frame(src, LLDP_OUI, LLDP_SUBTYPE)
                .unwrap_or_else(|e| panic!("decoded LLDPDU {f:?} does not re-encode: {e}"));
            let back = LldpFrame::parse_frame(&enc, LLDP_OUI, LLDP_SUBTYPE)
                .unwrap_or_else(|e| panic!("re-encoded LLDPDU does not decode: {e}"));
            assert_eq!(back, f, "decode(encode(x)) != x");
            // The payload goes on to the key-exchange decoder; it must not care where it came from.
            let _ = Message::decode(&f.payload);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // The same bytes as a TLV information string from the XDP event.
    match project_payload(data, LLDP_OUI, LLDP_SUBTYPE) {
        Ok(p) => {
            assert_eq!(&data[..3], &LLDP_OUI);
            assert_eq!(data[3], LLDP_SUBTYPE);
            assert_eq!(p, &data[4..]);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
