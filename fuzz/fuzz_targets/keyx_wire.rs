//! Key-exchange payload decoder. Property: each decodable payload has exactly one encoding
//! (docs/protocol.md section 2), so decode -> encode (with the tag the payload carried) gives the
//! same bytes back, and the encoder signs exactly the bytes before the tag; errors say something.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qkd_macsec_agent::keyx::wire::{signed_part, tag_of, Message, Signer, TAG_LEN};

/// Replays the tag the input carried (the fuzzer knows no ICK; tags are checked in keyx::auth)
/// and checks that the encoder asks to sign what the receiver will verify.
struct Replay<'a> {
    tag: [u8; TAG_LEN],
    expect_signed: &'a [u8],
}

impl Signer for Replay<'_> {
    fn tag(&self, signed: &[u8]) -> [u8; TAG_LEN] {
        assert_eq!(
            signed, self.expect_signed,
            "encoder signs other bytes than the receiver checks"
        );
        self.tag
    }
}

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok(m) => {
            let replay = Replay {
                tag: tag_of(data),
                expect_signed: signed_part(data),
            };
            let signer: Option<&dyn Signer> = m.auth.is_some().then_some(&replay as &dyn Signer);
            let enc = m
                .encode(signer)
                .unwrap_or_else(|e| panic!("decoded message {m:?} does not re-encode: {e}"));
            assert_eq!(enc, data, "decode -> encode is not the identity for {m:?}");
            assert_eq!(Message::decode(&enc).as_ref(), Ok(&m));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
