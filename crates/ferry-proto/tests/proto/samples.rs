//! Hand-written example messages.

use bytes::Bytes;
use ferry_proto::{
    Chunking, Encoding, Entry, EntryKind, Message, MAX_ANNOUNCE_ENTRIES, MAX_CHUNK_LEN,
    MAX_STRING_LEN, MAX_WANTED,
};

pub const TRANSFER: [u8; 16] = *b"transfer-id-0001";
pub const SESSION: [u8; 16] = [0x5e; 16];

pub fn id(seed: u8) -> [u8; 32] {
    std::array::from_fn(|i| seed.wrapping_add(i as u8))
}

/// Exactly MAX_STRING_LEN bytes, of multi-byte characters so a byte/char mix-up shows.
pub fn max_string() -> String {
    let text = "é".repeat(MAX_STRING_LEN / 2);
    assert_eq!(text.len(), MAX_STRING_LEN);
    text
}

/// Small messages, at least one of every type: cheap enough to cut at every byte.
pub fn small_messages() -> Vec<Message> {
    vec![
        Message::Hello {
            version: 1,
            min_version: 1,
            site: "lyon-1".into(),
            session: SESSION,
            connection_index: 2,
            connection_count: 4,
        },
        Message::HelloAck {
            version: 1,
            site: "oslo".into(),
        },
        Message::Open {
            transfer: TRANSFER,
            path: "images/db.qcow2".into(),
            size: 10 << 30,
            chunking: Chunking::Fixed { block: 4 << 20 },
            base: Some("images/db-yesterday.qcow2".into()),
        },
        Message::Open {
            transfer: TRANSFER,
            path: "vm/disk".into(),
            size: 0,
            chunking: Chunking::Cdc {
                min: 1 << 16,
                avg: 1 << 20,
                max: 1 << 22,
            },
            base: None,
        },
        Message::OpenAck {
            transfer: TRANSFER,
            accepted: false,
            reason: "no space left on pool".into(),
        },
        Message::Announce {
            transfer: TRANSFER,
            round: 3,
            entries: vec![
                Entry {
                    offset: 0,
                    len: 4 << 20,
                    kind: EntryKind::Data(id(1)),
                },
                Entry {
                    offset: 4 << 20,
                    len: u32::MAX,
                    kind: EntryKind::Zero,
                },
                Entry {
                    offset: u64::MAX,
                    len: 1,
                    kind: EntryKind::Data(id(2)),
                },
            ],
        },
        Message::Want {
            transfer: TRANSFER,
            round: 3,
            wanted: vec![0, 2, 2, u32::MAX],
        },
        Message::Chunk {
            transfer: TRANSFER,
            round: 3,
            index: 2,
            id: id(2),
            encoding: Encoding::Raw,
            raw_len: 5,
            data: Bytes::from_static(b"hello"),
        },
        Message::Chunk {
            transfer: TRANSFER,
            round: 3,
            index: 0,
            id: id(1),
            encoding: Encoding::Zstd,
            raw_len: 4 << 20,
            data: Bytes::from_static(&[0x28, 0xb5, 0x2f, 0xfd, 0, 1, 2]),
        },
        Message::Ack {
            transfer: TRANSFER,
            round: 3,
            reused: 1,
            received: 2,
        },
        Message::Done {
            transfer: TRANSFER,
            size: 10 << 30,
            digest: id(9),
        },
        Message::Committed {
            transfer: TRANSFER,
            ok: true,
            digest: id(9),
            message: String::new(),
        },
        Message::Error {
            code: 7,
            message: "digest mismatch".into(),
        },
        Message::Ping { nonce: 42 },
        Message::Filler { data: Bytes::from_static(&[0; 32]) },
        Message::Pong { nonce: 42 },
        Message::MigrateOpen {
            migration: TRANSFER,
            vm: "web1".into(),
            spec: Bytes::from_static(b"{\"name\":\"web1\"}"),
        },
        Message::MigrateReady {
            migration: TRANSFER,
            accepted: true,
            reason: String::new(),
            held: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
        },
        Message::StreamData {
            migration: TRANSFER,
            seq: 7,
            encoding: Encoding::Raw,
            raw_len: 3,
            data: Bytes::from_static(b"QEV"),
        },
        Message::StreamBack {
            migration: TRANSFER,
            data: Bytes::from_static(&[0, 1, 0, 4, 0, 0, 0, 0]),
        },
        Message::StreamEnd {
            migration: TRANSFER,
            batches: 9,
        },
        Message::StreamAck {
            migration: TRANSFER,
            written: 1 << 20,
        },
        Message::PageWant {
            migration: TRANSFER,
            id: id(4),
        },
        Message::PageData {
            migration: TRANSFER,
            id: id(4),
            data: Bytes::from_static(&[0; 16]),
        },
        Message::MigrateOutcome {
            migration: TRANSFER,
            running: true,
            message: String::new(),
        },
    ]
}

/// Messages at the edges: empty and maximal vectors and strings, extreme integers, the largest
/// chunk. Too big to cut at every byte.
pub fn edge_messages() -> Vec<Message> {
    let max_string = max_string();
    vec![
        Message::Hello {
            version: u16::MAX,
            min_version: 0,
            site: max_string.clone(),
            session: [0xff; 16],
            connection_index: u16::MAX,
            connection_count: 0,
        },
        Message::HelloAck {
            version: 0,
            site: String::new(),
        },
        Message::Open {
            transfer: [0; 16],
            path: max_string.clone(),
            size: u64::MAX,
            chunking: Chunking::Cdc {
                min: 0,
                avg: u32::MAX,
                max: u32::MAX,
            },
            base: Some(max_string.clone()),
        },
        Message::Open {
            transfer: [0xff; 16],
            path: String::new(),
            size: 0,
            chunking: Chunking::Fixed { block: 0 },
            base: Some(String::new()),
        },
        Message::OpenAck {
            transfer: [0; 16],
            accepted: true,
            reason: max_string.clone(),
        },
        Message::Announce {
            transfer: TRANSFER,
            round: u64::MAX,
            entries: vec![],
        },
        Message::Announce {
            transfer: TRANSFER,
            round: 0,
            entries: (0..MAX_ANNOUNCE_ENTRIES)
                .map(|i| Entry {
                    offset: u64::MAX - i as u64,
                    len: if i % 2 == 0 {
                        MAX_CHUNK_LEN as u32
                    } else {
                        u32::MAX
                    },
                    kind: if i % 2 == 0 {
                        EntryKind::Data(id(i as u8))
                    } else {
                        EntryKind::Zero
                    },
                })
                .collect(),
        },
        Message::Want {
            transfer: TRANSFER,
            round: u64::MAX,
            wanted: vec![],
        },
        Message::Want {
            transfer: TRANSFER,
            round: 1,
            wanted: (0..MAX_WANTED as u32).rev().collect(),
        },
        Message::Chunk {
            transfer: TRANSFER,
            round: u64::MAX,
            index: u32::MAX,
            id: [0xff; 32],
            encoding: Encoding::Raw,
            raw_len: MAX_CHUNK_LEN as u32,
            data: Bytes::from(vec![0xa5; MAX_CHUNK_LEN]),
        },
        Message::Chunk {
            transfer: TRANSFER,
            round: 0,
            index: 0,
            id: [0; 32],
            encoding: Encoding::Zstd,
            raw_len: MAX_CHUNK_LEN as u32,
            data: Bytes::new(),
        },
        Message::Ack {
            transfer: TRANSFER,
            round: u64::MAX,
            reused: u32::MAX,
            received: u32::MAX,
        },
        Message::Done {
            transfer: TRANSFER,
            size: u64::MAX,
            digest: [0xff; 32],
        },
        Message::Committed {
            transfer: TRANSFER,
            ok: false,
            digest: [0; 32],
            message: max_string.clone(),
        },
        Message::Error {
            code: u16::MAX,
            message: max_string,
        },
        Message::Error {
            code: 0,
            message: String::new(),
        },
        Message::Ping { nonce: u64::MAX },
        Message::Pong { nonce: 0 },
    ]
}
