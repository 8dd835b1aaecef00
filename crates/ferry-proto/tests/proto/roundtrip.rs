//! Encoding then decoding gives back the same message, alone or in a stream.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use ferry_proto::{decode, encode, Encoding, Message, FRAME_HEADER_LEN};
use proptest::prelude::*;

use crate::samples::{edge_messages, id, small_messages, TRANSFER};
use crate::{decode_all, decode_exactly_one, encode_one, strategies};

fn assert_round_trips(msg: &Message) {
    let frame = encode_one(msg);
    assert_eq!(
        frame.len(),
        msg.encoded_len(),
        "encoded_len of {}",
        msg.kind()
    );
    assert_eq!(frame[0], msg.type_code());
    assert_eq!(
        usize::try_from(u32::from_be_bytes(frame[1..5].try_into().unwrap())).unwrap(),
        frame.len() - FRAME_HEADER_LEN
    );
    let decoded =
        decode_exactly_one(&frame).unwrap_or_else(|e| panic!("decoding {}: {e}", msg.kind()));
    assert_eq!(&decoded, msg);
}

#[test]
fn samples_cover_every_message_type() {
    let codes: BTreeSet<u8> = small_messages().iter().map(Message::type_code).collect();
    assert_eq!(
        codes,
        BTreeSet::from([
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
            0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28
        ])
    );
    let kinds: BTreeSet<&str> = small_messages().iter().map(Message::kind).collect();
    assert_eq!(
        kinds.len(),
        codes.len(),
        "each type has its own name: {kinds:?}"
    );
}

#[test]
fn small_messages_round_trip() {
    for msg in small_messages() {
        assert_round_trips(&msg);
    }
}

#[test]
fn edge_messages_round_trip() {
    for msg in edge_messages() {
        assert_round_trips(&msg);
    }
}

#[test]
fn a_stream_of_messages_decodes_in_order() {
    let messages = small_messages();
    let mut stream = BytesMut::new();
    for msg in &messages {
        encode(msg, &mut stream).unwrap();
    }
    let (decoded, left_over) = decode_all(&stream).unwrap();
    assert_eq!(decoded, messages);
    assert_eq!(left_over, 0);
}

#[test]
fn encode_appends_after_existing_bytes() {
    let mut out = BytesMut::from(&b"already here"[..]);
    encode(&Message::Ping { nonce: 1 }, &mut out).unwrap();
    assert_eq!(&out[..12], b"already here");
    assert_eq!(
        decode_exactly_one(&out[12..]).unwrap(),
        Message::Ping { nonce: 1 }
    );
}

#[test]
fn want_with_duplicate_and_out_of_range_indices_is_left_to_the_receiver() {
    assert_round_trips(&Message::Want {
        transfer: TRANSFER,
        round: 0,
        wanted: vec![5, 5, 5, u32::MAX],
    });
}

/// The chunk's data must be a view into the read buffer, not a copy of it.
#[test]
fn decoded_chunk_data_shares_the_read_buffer() {
    let msg = Message::Chunk {
        transfer: TRANSFER,
        round: 1,
        index: 0,
        id: id(0),
        encoding: Encoding::Raw,
        raw_len: 64 * 1024,
        data: Bytes::from(vec![7; 64 * 1024]),
    };
    let mut buf = encode_one(&msg);
    let buffer_range = buf.as_ptr_range();
    let decoded = decode(&mut buf).unwrap().unwrap();
    let Message::Chunk { data, .. } = &decoded else {
        panic!("decoded {decoded:?}")
    };
    let data_range = data.as_ptr_range();
    assert!(
        buffer_range.start <= data_range.start && data_range.end == buffer_range.end,
        "chunk data {data_range:?} is not the tail of the read buffer {buffer_range:?}"
    );
    assert_eq!(decoded, msg);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_messages_round_trip(msg in strategies::message()) {
        let frame = encode_one(&msg);
        prop_assert_eq!(frame.len(), msg.encoded_len());
        prop_assert_eq!(decode_exactly_one(&frame).unwrap(), msg);
    }

    /// Several messages back to back, fed in arbitrary pieces, as a socket would deliver them.
    #[test]
    fn arbitrary_streams_decode_from_arbitrary_pieces(
        messages in proptest::collection::vec(strategies::message(), 0..8),
        piece_lens in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let mut stream = BytesMut::new();
        for msg in &messages {
            encode(msg, &mut stream).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut pieces = piece_lens.iter().cycle();
        while !stream.is_empty() {
            let piece = (*pieces.next().unwrap()).min(stream.len());
            buf.extend_from_slice(&stream.split_to(piece));
            while let Some(msg) = decode(&mut buf).unwrap() {
                decoded.push(msg);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, messages);
    }
}
