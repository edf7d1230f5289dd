//! Userspace SecTAG decoder (qkd_macsec_common::sectag). Properties: a decoded SecTAG re-encodes
//! to the frame's own header bytes, and every accepted frame satisfies the 802.1AE length rule
//! the decoder claims to enforce (checked here from first principles, not with its code).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qkd_macsec_common::sectag::{parse, ETH_HLEN};
use qkd_macsec_common::{MACSEC_ICV_LEN, TCI_SC, TCI_V};

fuzz_target!(|data: &[u8]| {
    // Half the inputs get the MACsec EtherType forced in, so the fuzzer spends its time on the
    // SecTAG rather than on finding 0x88E5.
    let mut frame = data.to_vec();
    if frame.first().is_some_and(|b| b & 1 == 1) && frame.len() >= ETH_HLEN {
        frame[12..14].copy_from_slice(&[0x88, 0xE5]);
    }
    for icv in [MACSEC_ICV_LEN, 8] {
        match parse(&frame, icv) {
            Ok(t) => {
                let mut hdr = [0u8; 16];
                let n = t.encode(&mut hdr).expect("16 bytes hold any SecTAG");
                assert_eq!(
                    &hdr[..n],
                    &frame[12..12 + n],
                    "encode(parse(x)) != header of x"
                );
                assert_eq!(frame[14] & TCI_V, 0);
                let sc = frame[14] & TCI_SC != 0;
                let secure =
                    frame.len() as isize - 12 - 2 - 6 - if sc { 8 } else { 0 } - icv as isize;
                if t.short_len == 0 {
                    assert!(
                        secure >= 48,
                        "SL 0 accepted with {secure} bytes of secure data"
                    );
                } else {
                    // The kernel accepts SL 48..=63 when the length matches; so do we.
                    assert_eq!(secure, isize::from(t.short_len));
                }
                assert_eq!(t.an(), frame[14] & 3);
                let _ = t.sci(Some([1; 8]));
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
