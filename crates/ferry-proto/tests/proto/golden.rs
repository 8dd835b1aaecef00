//! Byte-exact encodings, written out by hand from the format in the crate docs. These pin the
//! wire format: a change that round-trips but alters the bytes breaks peers of other builds.

use bytes::Bytes;
use ferry_proto::{Chunking, Encoding, Entry, EntryKind, Message};

use crate::{decode_exactly_one, encode_one};

fn assert_golden(msg: Message, expected: &[u8]) {
    assert_eq!(
        &encode_one(&msg)[..],
        expected,
        "encoding of {}",
        msg.kind()
    );
    assert_eq!(decode_exactly_one(expected).unwrap(), msg);
}

#[test]
fn ping_and_pong() {
    assert_golden(
        Message::Ping {
            nonce: 0x0102_0304_0506_0708,
        },
        &[0x04, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
    );
    assert_golden(
        Message::Pong { nonce: 0xff },
        &[0x05, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0xff],
    );
}

#[test]
fn hello_and_hello_ack() {
    let mut hello = vec![0x01, 0, 0, 0, 29, 0, 2, 0, 1, 0, 3, b's', b'i', b't'];
    hello.extend([0xab; 16]);
    hello.extend([0, 5, 0, 8]);
    assert_golden(
        Message::Hello {
            version: 2,
            min_version: 1,
            site: "sit".into(),
            session: [0xab; 16],
            connection_index: 5,
            connection_count: 8,
        },
        &hello,
    );
    assert_golden(
        Message::HelloAck {
            version: 1,
            site: "ab".into(),
        },
        &[0x02, 0, 0, 0, 6, 0, 1, 0, 2, b'a', b'b'],
    );
}

#[test]
fn error() {
    assert_golden(
        Message::Error {
            code: 0x0102,
            message: "no".into(),
        },
        &[0x03, 0, 0, 0, 6, 1, 2, 0, 2, b'n', b'o'],
    );
}

#[test]
fn open_with_cdc_and_base() {
    let mut expected = vec![0x10, 0, 0, 0, 44];
    expected.extend([0x22; 16]);
    expected.extend([0, 1, b'p']);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 9]);
    expected.extend([1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
    expected.extend([1, 0, 1, b'b']);
    assert_golden(
        Message::Open {
            transfer: [0x22; 16],
            path: "p".into(),
            size: 9,
            chunking: Chunking::Cdc {
                min: 1,
                avg: 2,
                max: 3,
            },
            base: Some("b".into()),
        },
        &expected,
    );
}

#[test]
fn open_with_fixed_blocks_and_no_base() {
    let mut expected = vec![0x10, 0, 0, 0, 32];
    expected.extend([0x22; 16]);
    expected.extend([0, 0]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend([0, 0, 0x10, 0, 0]);
    expected.extend([0]);
    assert_golden(
        Message::Open {
            transfer: [0x22; 16],
            path: String::new(),
            size: 0,
            chunking: Chunking::Fixed { block: 0x10_0000 },
            base: None,
        },
        &expected,
    );
}

#[test]
fn open_ack() {
    let mut expected = vec![0x11, 0, 0, 0, 20];
    expected.extend([0x22; 16]);
    expected.extend([1, 0, 1, b'k']);
    assert_golden(
        Message::OpenAck {
            transfer: [0x22; 16],
            accepted: true,
            reason: "k".into(),
        },
        &expected,
    );
}

#[test]
fn announce_with_data_and_zero_entries() {
    let mut expected = vec![0x12, 0, 0, 0, 86];
    expected.extend([0x11; 16]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 2]);
    expected.extend([0, 0, 0, 2]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0]);
    expected.extend([0xcc; 32]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 5, 1]);
    assert_golden(
        Message::Announce {
            transfer: [0x11; 16],
            round: 2,
            entries: vec![
                Entry {
                    offset: 0x10,
                    len: 0x20,
                    kind: EntryKind::Data([0xcc; 32]),
                },
                Entry {
                    offset: 0x30,
                    len: 5,
                    kind: EntryKind::Zero,
                },
            ],
        },
        &expected,
    );
}

#[test]
fn want() {
    let mut expected = vec![0x13, 0, 0, 0, 36];
    expected.extend([0x11; 16]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 2]);
    expected.extend([0, 0, 0, 2, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
    assert_golden(
        Message::Want {
            transfer: [0x11; 16],
            round: 2,
            wanted: vec![7, u32::MAX],
        },
        &expected,
    );
}

#[test]
fn chunk() {
    let mut expected = vec![0x14, 0, 0, 0, 72];
    expected.extend([0x33; 16]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 1]);
    expected.extend([0, 0, 0, 2]);
    expected.extend([0x44; 32]);
    expected.extend([1, 0, 0, 0, 100, 0, 0, 0, 3, b'x', b'y', b'z']);
    assert_golden(
        Message::Chunk {
            transfer: [0x33; 16],
            round: 1,
            index: 2,
            id: [0x44; 32],
            encoding: Encoding::Zstd,
            raw_len: 100,
            data: Bytes::from_static(b"xyz"),
        },
        &expected,
    );
}

#[test]
fn ack_done_committed() {
    let mut ack = vec![0x15, 0, 0, 0, 32];
    ack.extend([0x11; 16]);
    ack.extend([0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5]);
    assert_golden(
        Message::Ack {
            transfer: [0x11; 16],
            round: 3,
            reused: 4,
            received: 5,
        },
        &ack,
    );

    let mut done = vec![0x16, 0, 0, 0, 56];
    done.extend([0x11; 16]);
    done.extend([1, 0, 0, 0, 0, 0, 0, 0]);
    done.extend([0x66; 32]);
    assert_golden(
        Message::Done {
            transfer: [0x11; 16],
            size: 1 << 56,
            digest: [0x66; 32],
        },
        &done,
    );

    let mut committed = vec![0x17, 0, 0, 0, 51];
    committed.extend([0; 16]);
    committed.extend([1]);
    committed.extend([0x55; 32]);
    committed.extend([0, 0]);
    assert_golden(
        Message::Committed {
            transfer: [0; 16],
            ok: true,
            digest: [0x55; 32],
            message: String::new(),
        },
        &committed,
    );
}
