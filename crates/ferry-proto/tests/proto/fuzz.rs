//! Random and damaged input: `decode` never panics, and whatever it does accept is exactly what
//! it read (the encoding is canonical, so re-encoding a decoded frame gives back its bytes — a
//! decoder that misread a field would fail this).

use bytes::BytesMut;
use ferry_proto::{decode, encode};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::encode_one;
use crate::strategies::{self, apply};

const KNOWN_TYPES: [u8; 13] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
];

/// Decodes frames off `bytes` until it needs more or fails; every accepted frame must re-encode
/// to the bytes it was decoded from.
fn decode_checked(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    let mut offset = 0;
    loop {
        let before = buf.len();
        match decode(&mut buf) {
            Ok(Some(msg)) => {
                let consumed = before - buf.len();
                prop_assert!(consumed > 0);
                prop_assert_eq!(
                    &encode_one(&msg)[..],
                    &bytes[offset..offset + consumed],
                    "{:?}",
                    msg
                );
                offset += consumed;
            }
            Ok(None) => {
                prop_assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return Ok(());
            }
            Err(_) => return Ok(()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn random_bytes(bytes in vec(any::<u8>(), 0..512)) {
        decode_checked(&bytes)?;
    }

    /// A known type and an honest length, so the payload decoder itself gets random input
    /// (random bytes alone mostly stop at the header).
    #[test]
    fn random_payloads(type_byte in proptest::sample::select(&KNOWN_TYPES[..]), payload in vec(any::<u8>(), 0..256)) {
        decode_checked(&crate::raw_frame(type_byte, &payload))?;
    }

    #[test]
    fn mutated_frames(
        messages in vec(strategies::message(), 1..4),
        mutations in vec(strategies::mutation(), 1..6),
    ) {
        let mut stream = BytesMut::new();
        for msg in &messages {
            encode(msg, &mut stream).unwrap();
        }
        let mut bytes = stream.to_vec();
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        decode_checked(&bytes)?;
    }
}
