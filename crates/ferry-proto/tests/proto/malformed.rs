//! Malformed input: each kind of damage gets its own error, and nothing panics or allocates
//! from an untrusted length. Invalid messages are refused on the way out too.

use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::{
    decode, encode, Chunking, Encoding, Entry, EntryKind, Message, ProtoError, FRAME_HEADER_LEN,
    MAX_ANNOUNCE_ENTRIES, MAX_CHUNK_LEN, MAX_PAYLOAD_LEN, MAX_STRING_LEN, MAX_WANTED,
};

use crate::samples::{id, small_messages, TRANSFER};
use crate::{encode_one, raw_frame};

const KNOWN_TYPES: [u8; 23] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x20,
    0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28,
];

fn decode_error(frame: &[u8]) -> ProtoError {
    decode(&mut BytesMut::from(frame)).expect_err("decoding should fail")
}

/// `msg`'s frame with the payload byte at `payload_offset` replaced.
fn patched(msg: &Message, payload_offset: usize, byte: u8) -> BytesMut {
    let mut frame = encode_one(msg);
    frame[FRAME_HEADER_LEN + payload_offset] = byte;
    frame
}

/// Encoding must fail with the decoder's error and leave the output buffer as it was.
fn encode_error(msg: &Message) -> ProtoError {
    let mut out = BytesMut::from(&b"earlier frames"[..]);
    let err = encode(msg, &mut out).expect_err("encoding should fail");
    assert_eq!(
        &out[..],
        b"earlier frames",
        "a failed encode wrote into the buffer"
    );
    err
}

#[test]
fn every_cut_of_a_frame_waits_for_more_bytes() {
    for msg in small_messages() {
        let frame = encode_one(&msg);
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            match decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf.len(), cut, "{} cut at {cut} consumed bytes", msg.kind())
                }
                other => panic!("{} cut at {cut} of {}: {other:?}", msg.kind(), frame.len()),
            }
        }
    }
}

/// A frame whose declared length matches a cut-short payload: every field boundary and every
/// point inside a field must be reported as truncation, never decoded as some other message.
#[test]
fn every_cut_of_a_payload_is_truncated() {
    for msg in small_messages() {
        let frame = encode_one(&msg);
        let payload = &frame[FRAME_HEADER_LEN..];
        for cut in 0..payload.len() {
            match decode_error(&raw_frame(frame[0], &payload[..cut])) {
                ProtoError::Truncated { message, .. } => assert_eq!(message, msg.kind()),
                other => panic!("{} payload cut at {cut}: {other}", msg.kind()),
            }
        }
    }
}

#[test]
fn trailing_bytes_in_a_payload_are_rejected() {
    for msg in small_messages() {
        let frame = encode_one(&msg);
        for extra in [1, 3] {
            let mut payload = frame[FRAME_HEADER_LEN..].to_vec();
            payload.extend(std::iter::repeat_n(0, extra));
            match decode_error(&raw_frame(frame[0], &payload)) {
                ProtoError::TrailingBytes {
                    message,
                    extra: reported,
                } => {
                    assert_eq!((message, reported), (msg.kind(), extra));
                }
                other => panic!("{} with {extra} trailing bytes: {other}", msg.kind()),
            }
        }
    }
}

#[test]
fn unknown_types_are_rejected_from_the_first_byte() {
    for type_byte in (0..=u8::MAX).filter(|b| !KNOWN_TYPES.contains(b)) {
        for frame in [vec![type_byte], raw_frame(type_byte, &[0; 8]).to_vec()] {
            match decode_error(&frame) {
                ProtoError::UnknownMessageType {
                    type_byte: reported,
                } => assert_eq!(reported, type_byte),
                other => panic!("type 0x{type_byte:02x}: {other}"),
            }
        }
    }
    assert_eq!(
        decode_error(&[0x00]).to_string(),
        "unknown message type 0x00"
    );
    assert_eq!(
        decode_error(&[0xfe]).to_string(),
        "unknown message type 0xfe"
    );
}

#[test]
fn oversized_declared_length_is_rejected_without_allocating() {
    for type_byte in KNOWN_TYPES {
        for declared in [MAX_PAYLOAD_LEN as u32 + 1, u32::MAX] {
            let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN);
            buf.put_u8(type_byte);
            buf.put_u32(declared);
            let capacity_before = buf.capacity();
            match decode(&mut buf) {
                Err(ProtoError::FrameTooLarge { len, max }) => {
                    assert_eq!((len, max), (declared as usize, MAX_PAYLOAD_LEN))
                }
                other => panic!("type 0x{type_byte:02x}, length {declared}: {other:?}"),
            }
            assert_eq!(
                buf.capacity(),
                capacity_before,
                "the buffer grew for a rejected frame"
            );
        }
    }
}

#[test]
fn the_largest_allowed_length_waits_for_its_payload() {
    let mut buf = BytesMut::new();
    buf.put_u8(0x14);
    buf.put_u32(MAX_PAYLOAD_LEN as u32);
    assert!(decode(&mut buf).unwrap().is_none());
    assert_eq!(buf.len(), FRAME_HEADER_LEN);
}

#[test]
fn bad_enum_option_and_bool_tags() {
    let open = Message::Open {
        transfer: TRANSFER,
        path: "p".into(),
        size: 0,
        chunking: Chunking::Fixed { block: 1 },
        base: None,
    };
    let announce = Message::Announce {
        transfer: TRANSFER,
        round: 0,
        entries: vec![Entry {
            offset: 0,
            len: 1,
            kind: EntryKind::Zero,
        }],
    };
    let chunk = Message::Chunk {
        transfer: TRANSFER,
        round: 0,
        index: 0,
        id: id(0),
        encoding: Encoding::Raw,
        raw_len: 1,
        data: Bytes::from_static(b"x"),
    };
    let open_ack = Message::OpenAck {
        transfer: TRANSFER,
        accepted: true,
        reason: String::new(),
    };
    let committed = Message::Committed {
        transfer: TRANSFER,
        ok: true,
        digest: id(0),
        message: String::new(),
    };
    // (message, payload offset of the tag, field named in the error)
    let cases = [
        (&open, 16 + 3 + 8, "chunking"),
        (&open, 16 + 3 + 8 + 5, "base"),
        (&announce, 16 + 8 + 4 + 8 + 4, "entry kind"),
        (&chunk, 16 + 8 + 4 + 32, "encoding"),
        (&open_ack, 16, "accepted"),
        (&committed, 16, "ok"),
    ];
    for (msg, offset, expected_field) in cases {
        for bad_tag in [2, 0x80, 0xff] {
            match decode_error(&patched(msg, offset, bad_tag)) {
                ProtoError::InvalidTag {
                    message,
                    field,
                    tag,
                } => {
                    assert_eq!((message, field, tag), (msg.kind(), expected_field, bad_tag));
                }
                other => panic!("{} with tag {bad_tag} at {offset}: {other}", msg.kind()),
            }
        }
    }
}

#[test]
fn invalid_utf8_is_rejected() {
    let error = Message::Error {
        code: 1,
        message: "ab".into(),
    };
    let hello_ack = Message::HelloAck {
        version: 1,
        site: "é".into(),
    };
    // (frame, field): a lone 0xff; a two-byte sequence cut short by ASCII.
    let cases = [
        (patched(&error, 4, 0xff), "message"),
        (patched(&hello_ack, 5, b'('), "site"),
    ];
    for (frame, expected_field) in cases {
        match decode_error(&frame) {
            ProtoError::InvalidUtf8 { field, .. } => assert_eq!(field, expected_field),
            other => panic!("{other}"),
        }
    }
}

#[test]
fn over_long_strings_are_rejected_both_ways() {
    for declared in [MAX_STRING_LEN + 1, usize::from(u16::MAX)] {
        let mut payload = BytesMut::new();
        payload.put_u16(0);
        payload.put_u16(declared as u16);
        payload.put_bytes(b'a', declared);
        match decode_error(&raw_frame(0x03, &payload)) {
            ProtoError::StringTooLong {
                message: "Error",
                field: "message",
                len,
                max: MAX_STRING_LEN,
            } => {
                assert_eq!(len, declared)
            }
            other => panic!("{other}"),
        }
        // Refused from the length alone, before the bytes arrive.
        let header_only = &payload[..4];
        assert!(matches!(
            decode_error(&raw_frame(0x03, header_only)),
            ProtoError::StringTooLong { .. }
        ));
    }

    let too_long = "a".repeat(MAX_STRING_LEN + 1);
    let cases = [
        (
            Message::Error {
                code: 0,
                message: too_long.clone(),
            },
            "message",
        ),
        (
            Message::HelloAck {
                version: 1,
                site: too_long.clone(),
            },
            "site",
        ),
        (
            Message::Open {
                transfer: TRANSFER,
                path: "ok".into(),
                size: 1,
                chunking: Chunking::Fixed { block: 1 },
                base: Some(too_long.clone()),
            },
            "base",
        ),
        (
            Message::OpenAck {
                transfer: TRANSFER,
                accepted: false,
                reason: too_long,
            },
            "reason",
        ),
    ];
    for (msg, expected_field) in cases {
        match encode_error(&msg) {
            ProtoError::StringTooLong { field, len, .. } => {
                assert_eq!((field, len), (expected_field, MAX_STRING_LEN + 1))
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn over_long_vectors_are_rejected_both_ways() {
    // (type, item cap): the count alone must be refused, with no items following.
    for (type_byte, max) in [(0x12, MAX_ANNOUNCE_ENTRIES), (0x13, MAX_WANTED)] {
        for count in [max as u32 + 1, u32::MAX] {
            let mut payload = BytesMut::new();
            payload.put_slice(&TRANSFER);
            payload.put_u64(0);
            payload.put_u32(count);
            match decode_error(&raw_frame(type_byte, &payload)) {
                ProtoError::TooManyItems {
                    count: reported,
                    max: reported_max,
                    ..
                } => {
                    assert_eq!((reported, reported_max), (count as usize, max))
                }
                other => panic!("type 0x{type_byte:02x}, count {count}: {other}"),
            }
        }
    }

    let want = Message::Want {
        transfer: TRANSFER,
        round: 0,
        wanted: vec![0; MAX_WANTED + 1],
    };
    assert!(matches!(
        encode_error(&want),
        ProtoError::TooManyItems {
            field: "wanted",
            ..
        }
    ));
    let entry = Entry {
        offset: 0,
        len: 1,
        kind: EntryKind::Zero,
    };
    let announce = Message::Announce {
        transfer: TRANSFER,
        round: 0,
        entries: vec![entry; MAX_ANNOUNCE_ENTRIES + 1],
    };
    assert!(matches!(
        encode_error(&announce),
        ProtoError::TooManyItems {
            field: "entries",
            ..
        }
    ));
}

/// A count within its cap but larger than the payload could hold is refused before a vector is
/// sized from it.
#[test]
fn counts_beyond_the_payload_are_truncation() {
    let mut payload = BytesMut::new();
    payload.put_slice(&TRANSFER);
    payload.put_u64(0);
    payload.put_u32(MAX_ANNOUNCE_ENTRIES as u32);
    payload.put_bytes(0, 12);
    match decode_error(&raw_frame(0x12, &payload)) {
        ProtoError::Truncated {
            field: "entries",
            needed,
            available: 12,
            ..
        } => assert_eq!(needed, MAX_ANNOUNCE_ENTRIES * 13),
        other => panic!("{other}"),
    }
}

fn chunk_payload(encoding_tag: u8, raw_len: u32, declared_data_len: u32, data: &[u8]) -> BytesMut {
    let mut payload = BytesMut::new();
    payload.put_slice(&TRANSFER);
    payload.put_u64(1);
    payload.put_u32(0);
    payload.put_slice(&id(0));
    payload.put_u8(encoding_tag);
    payload.put_u32(raw_len);
    payload.put_u32(declared_data_len);
    payload.put_slice(data);
    payload
}

#[test]
fn oversized_chunks_are_rejected_both_ways() {
    let over = MAX_CHUNK_LEN as u32 + 1;
    // Declared data length over the cap, within a frame small enough to be accepted.
    match decode_error(&raw_frame(0x14, &chunk_payload(1, 1, over, b""))) {
        ProtoError::ChunkDataTooLarge { len, max } => {
            assert_eq!((len, max), (over as usize, MAX_CHUNK_LEN))
        }
        other => panic!("{other}"),
    }
    match decode_error(&raw_frame(0x14, &chunk_payload(1, over, 3, b"abc"))) {
        ProtoError::ChunkRawLenTooLarge { raw_len, .. } => assert_eq!(raw_len, over),
        other => panic!("{other}"),
    }

    let big = Message::Chunk {
        transfer: TRANSFER,
        round: 0,
        index: 0,
        id: id(0),
        encoding: Encoding::Zstd,
        raw_len: 1,
        data: Bytes::from(vec![0; MAX_CHUNK_LEN + 1]),
    };
    assert!(matches!(
        encode_error(&big),
        ProtoError::ChunkDataTooLarge { .. }
    ));
    let inflated = Message::Chunk {
        transfer: TRANSFER,
        round: 0,
        index: 0,
        id: id(0),
        encoding: Encoding::Zstd,
        raw_len: u32::MAX,
        data: Bytes::from_static(b"abc"),
    };
    assert!(matches!(
        encode_error(&inflated),
        ProtoError::ChunkRawLenTooLarge { .. }
    ));
}

#[test]
fn raw_chunk_length_must_match_raw_len() {
    match decode_error(&raw_frame(0x14, &chunk_payload(0, 4, 5, b"hello"))) {
        ProtoError::RawLengthMismatch {
            data_len: 5,
            raw_len: 4,
        } => {}
        other => panic!("{other}"),
    }
    // The same lengths are fine compressed.
    assert!(
        decode(&mut raw_frame(0x14, &chunk_payload(1, 4, 5, b"hello")))
            .unwrap()
            .is_some()
    );

    let mismatched = Message::Chunk {
        transfer: TRANSFER,
        round: 0,
        index: 0,
        id: id(0),
        encoding: Encoding::Raw,
        raw_len: 6,
        data: Bytes::from_static(b"hello"),
    };
    assert!(matches!(
        encode_error(&mismatched),
        ProtoError::RawLengthMismatch {
            data_len: 5,
            raw_len: 6
        }
    ));
}

#[test]
fn bad_entries_are_rejected_both_ways() {
    let good = Entry {
        offset: 0,
        len: 1,
        kind: EntryKind::Zero,
    };
    let empty = Entry {
        offset: 8,
        len: 0,
        kind: EntryKind::Data(id(1)),
    };
    let too_long = Entry {
        offset: 8,
        len: MAX_CHUNK_LEN as u32 + 1,
        kind: EntryKind::Data(id(1)),
    };
    for (bad, expect_zero_length) in [(empty, true), (too_long, false)] {
        let msg = Message::Announce {
            transfer: TRANSFER,
            round: 0,
            entries: vec![good, bad],
        };
        // Encode the bad entry as a good one of the same size, then patch its length field.
        let valid = Message::Announce {
            transfer: TRANSFER,
            round: 0,
            entries: vec![good, Entry { len: 1, ..bad }],
        };
        let mut frame = encode_one(&valid);
        let len_at = FRAME_HEADER_LEN + 16 + 8 + 4 + 13 + 8;
        frame[len_at..len_at + 4].copy_from_slice(&bad.len.to_be_bytes());
        for err in [decode_error(&frame), encode_error(&msg)] {
            match (err, expect_zero_length) {
                (ProtoError::ZeroLengthEntry { index: 1 }, true) => {}
                (ProtoError::DataEntryTooLarge { index: 1, len, .. }, false) => {
                    assert_eq!(len, bad.len)
                }
                (other, _) => panic!("{bad:?}: {other}"),
            }
        }
    }
}

#[test]
fn errors_say_what_went_wrong() {
    let cut = Message::Ping { nonce: 1 };
    let frame = encode_one(&cut);
    let err = decode_error(&raw_frame(
        frame[0],
        &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 3],
    ));
    assert_eq!(
        err.to_string(),
        "truncated Ping payload: nonce needs 8 bytes, only 3 left"
    );
    let err = decode_error(&raw_frame(0x14, &chunk_payload(0, 4, 5, b"hello")));
    assert_eq!(
        err.to_string(),
        "raw chunk carries 5 bytes but declares raw_len 4"
    );
}
