//! proptest strategies for arbitrary valid messages.
//!
//! "Valid" means within every limit the codec enforces; sizes stay small so thousands of cases
//! run quickly (the limits themselves are covered by hand-written edge cases).

use bytes::Bytes;
use ferry_proto::{Chunking, Encoding, Entry, EntryKind, Message, MAX_CHUNK_LEN};
use proptest::collection::vec;
use proptest::prelude::*;

/// Any Unicode, including multi-byte characters; at most 32 chars (≤ 128 bytes).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![3 => ".{0,32}", 1 => Just(String::new())]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn chunking() -> impl Strategy<Value = Chunking> {
    prop_oneof![
        any::<u32>().prop_map(|block| Chunking::Fixed { block }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, avg, max)| Chunking::Cdc {
            min,
            avg,
            max
        }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        (any::<u64>(), 1..=MAX_CHUNK_LEN as u32, any::<[u8; 32]>()).prop_map(
            |(offset, len, id)| Entry {
                offset,
                len,
                kind: EntryKind::Data(id)
            }
        ),
        (any::<u64>(), 1..=u32::MAX).prop_map(|(offset, len)| Entry {
            offset,
            len,
            kind: EntryKind::Zero
        }),
    ]
}

fn chunk() -> impl Strategy<Value = Message> {
    let raw = bytes(256).prop_map(|data| (Encoding::Raw, data.len() as u32, data));
    let zstd = (0..=MAX_CHUNK_LEN as u32, bytes(256))
        .prop_map(|(raw_len, data)| (Encoding::Zstd, raw_len, data));
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u32>(),
        any::<[u8; 32]>(),
        prop_oneof![raw, zstd],
    )
        .prop_map(
            |(transfer, round, index, id, (encoding, raw_len, data))| Message::Chunk {
                transfer,
                round,
                index,
                id,
                encoding,
                raw_len,
                data,
            },
        )
}

pub fn message() -> impl Strategy<Value = Message> {
    let transfer = any::<[u8; 16]>;
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            text(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(
                |(version, min_version, site, session, connection_index, connection_count)| {
                    Message::Hello {
                        version,
                        min_version,
                        site,
                        session,
                        connection_index,
                        connection_count,
                    }
                }
            ),
        (any::<u16>(), text()).prop_map(|(version, site)| Message::HelloAck { version, site }),
        (
            transfer(),
            text(),
            any::<u64>(),
            chunking(),
            proptest::option::of(text())
        )
            .prop_map(|(transfer, path, size, chunking, base)| Message::Open {
                transfer,
                path,
                size,
                chunking,
                base
            }),
        (transfer(), any::<bool>(), text()).prop_map(|(transfer, accepted, reason)| {
            Message::OpenAck {
                transfer,
                accepted,
                reason,
            }
        }),
        (transfer(), any::<u64>(), vec(entry(), 0..16)).prop_map(|(transfer, round, entries)| {
            Message::Announce {
                transfer,
                round,
                entries,
            }
        }),
        (transfer(), any::<u64>(), vec(any::<u32>(), 0..32)).prop_map(
            |(transfer, round, wanted)| Message::Want {
                transfer,
                round,
                wanted
            }
        ),
        chunk(),
        (transfer(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(transfer, round, reused, received)| Message::Ack {
                transfer,
                round,
                reused,
                received
            }
        ),
        (transfer(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(transfer, size, digest)| {
            Message::Done {
                transfer,
                size,
                digest,
            }
        }),
        (transfer(), any::<bool>(), any::<[u8; 32]>(), text()).prop_map(
            |(transfer, ok, digest, message)| Message::Committed {
                transfer,
                ok,
                digest,
                message
            }
        ),
        (any::<u16>(), text()).prop_map(|(code, message)| Message::Error { code, message }),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        bytes(256).prop_map(|data| Message::Filler { data }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        migration_message(),
    ]
}

fn migration_message() -> impl Strategy<Value = Message> {
    let migration = any::<[u8; 16]>;
    prop_oneof![
        (migration(), text(), bytes(256))
            .prop_map(|(migration, vm, spec)| Message::MigrateOpen { migration, vm, spec }),
        (migration(), any::<bool>(), text(), bytes(256)).prop_map(
            |(migration, accepted, reason, held)| Message::MigrateReady {
                migration,
                accepted,
                reason,
                held
            }
        ),
        (migration(), any::<u64>(), bytes(256)).prop_map(|(migration, seq, data)| {
            Message::StreamData {
                migration,
                seq,
                encoding: Encoding::Raw,
                raw_len: data.len() as u32,
                data,
            }
        }),
        (migration(), any::<u64>(), 0..=MAX_CHUNK_LEN as u32, bytes(64)).prop_map(
            |(migration, seq, raw_len, data)| Message::StreamData {
                migration,
                seq,
                encoding: Encoding::Zstd,
                raw_len,
                data,
            }
        ),
        (migration(), bytes(256))
            .prop_map(|(migration, data)| Message::StreamBack { migration, data }),
        (migration(), any::<u64>())
            .prop_map(|(migration, batches)| Message::StreamEnd { migration, batches }),
        (migration(), any::<u64>())
            .prop_map(|(migration, written)| Message::StreamAck { migration, written }),
        (migration(), any::<[u8; 32]>()).prop_map(|(migration, id)| Message::PageWant { migration, id }),
        (migration(), any::<[u8; 32]>(), bytes(256))
            .prop_map(|(migration, id, data)| Message::PageData { migration, id, data }),
        (migration(), any::<bool>(), text()).prop_map(|(migration, running, message)| {
            Message::MigrateOutcome {
                migration,
                running,
                message,
            }
        }),
    ]
}

/// A way to damage an encoded frame.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// XOR the byte at (position mod length) with a non-zero mask.
    Flip { position: usize, mask: u8 },
    /// Insert a byte at (position mod (length + 1)).
    Insert { position: usize, byte: u8 },
    /// Delete the byte at (position mod length).
    Delete { position: usize },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=u8::MAX)
            .prop_map(|(position, mask)| Mutation::Flip { position, mask }),
        (any::<usize>(), any::<u8>())
            .prop_map(|(position, byte)| Mutation::Insert { position, byte }),
        any::<usize>().prop_map(|position| Mutation::Delete { position }),
    ]
}

pub fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match *mutation {
        Mutation::Flip { position, mask } if !bytes.is_empty() => {
            let at = position % bytes.len();
            bytes[at] ^= mask;
        }
        Mutation::Insert { position, byte } => bytes.insert(position % (bytes.len() + 1), byte),
        Mutation::Delete { position } if !bytes.is_empty() => {
            bytes.remove(position % bytes.len());
        }
        Mutation::Flip { .. } | Mutation::Delete { .. } => {}
    }
}
