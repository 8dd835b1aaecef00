//! Each message's payload layout: validation, exact size, writing and reading.
//!
//! The four functions below mirror each other field by field; the round-trip tests (and the
//! `debug_assert` in `encode` comparing `payload_len` with what was written) keep them in step.
//! Message-level rules live in the `check_*` functions, called by both `validate` (before
//! encoding) and the readers, so a peer never sends what this crate would refuse.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtoError;
use crate::limits::{MAX_ANNOUNCE_ENTRIES, MAX_CHUNK_LEN, MAX_WANTED};
use crate::message::{Chunking, Encoding, Entry, EntryKind, Message, MessageType};
use crate::wire::{
    check_count, check_string_len, put_bool, put_count, put_string, string_len, wire_len, Reader,
};

const CHUNKING_FIXED: u8 = 0;
const CHUNKING_CDC: u8 = 1;
const ENTRY_DATA: u8 = 0;
const ENTRY_ZERO: u8 = 1;
const ENCODING_RAW: u8 = 0;
const ENCODING_ZSTD: u8 = 1;

/// `offset u64 | len u32 | kind tag`: a `Zero` entry, the smallest.
const ENTRY_MIN_LEN: usize = 8 + 4 + 1;
/// A `Data` entry: the minimum plus its chunk ID.
const ENTRY_DATA_LEN: usize = ENTRY_MIN_LEN + 32;
/// `transfer | round | index | id | encoding | raw_len | data length`: everything but the data.
const CHUNK_FIELDS_LEN: usize = 16 + 8 + 4 + 32 + 1 + 4 + 4;

/// Checks what the decoder would refuse, so that nothing invalid is ever written.
pub(crate) fn validate(msg: &Message) -> Result<(), ProtoError> {
    let kind = msg.kind();
    let check_string = |field, text: &str| check_string_len(kind, field, text.len());
    match msg {
        Message::Hello { site, .. } | Message::HelloAck { site, .. } => check_string("site", site),
        Message::Open { path, base, .. } => {
            check_string("path", path)?;
            base.as_deref()
                .map_or(Ok(()), |base| check_string("base", base))
        }
        Message::OpenAck { reason, .. } => check_string("reason", reason),
        Message::Announce { entries, .. } => {
            check_count(kind, "entries", entries.len(), MAX_ANNOUNCE_ENTRIES)?;
            entries
                .iter()
                .enumerate()
                .try_for_each(|(index, entry)| check_entry(index, entry))
        }
        Message::Want { wanted, .. } => check_count(kind, "wanted", wanted.len(), MAX_WANTED),
        Message::Chunk {
            encoding,
            raw_len,
            data,
            ..
        } => check_chunk(*encoding, *raw_len, data.len()),
        Message::Committed { message, .. }
        | Message::Error { message, .. }
        | Message::MigrateOutcome { message, .. } => check_string("message", message),
        Message::MigrateOpen { vm, spec, .. } => {
            check_string("vm", vm)?;
            check_blob(spec.len())
        }
        Message::MigrateReady { reason, held, .. } => {
            check_string("reason", reason)?;
            check_blob(held.len())
        }
        Message::StreamData {
            encoding,
            raw_len,
            data,
            ..
        } => check_chunk(*encoding, *raw_len, data.len()),
        Message::StreamBack { data, .. } => check_blob(data.len()),
        Message::StreamEnd { .. } | Message::StreamAck { .. } | Message::PageWant { .. } => Ok(()),
        Message::PageData { data, .. } | Message::Filler { data } => check_blob(data.len()),
        Message::Ack { .. }
        | Message::Done { .. }
        | Message::Ping { .. }
        | Message::Pong { .. } => Ok(()),
    }
}

fn check_entry(index: usize, entry: &Entry) -> Result<(), ProtoError> {
    if entry.len == 0 {
        return Err(ProtoError::ZeroLengthEntry { index });
    }
    // A data entry is sent as one Chunk whose raw_len is the entry's length; a longer one could
    // never be sent. Zero entries (holes) are never sent, so they may be as long as a u32 allows.
    if matches!(entry.kind, EntryKind::Data(_)) && wire_len(entry.len) > MAX_CHUNK_LEN {
        return Err(ProtoError::DataEntryTooLarge {
            index,
            len: entry.len,
            max: MAX_CHUNK_LEN,
        });
    }
    Ok(())
}

fn check_blob(len: usize) -> Result<(), ProtoError> {
    if len > MAX_CHUNK_LEN {
        return Err(ProtoError::ChunkDataTooLarge {
            len,
            max: MAX_CHUNK_LEN,
        });
    }
    Ok(())
}

fn put_blob(out: &mut BytesMut, data: &Bytes) {
    put_count(out, data.len());
    out.put_slice(data);
}

fn read_blob(r: &mut Reader, field: &'static str) -> Result<Bytes, ProtoError> {
    let len = wire_len(r.u32(field)?);
    check_blob(len)?;
    r.take(field, len)
}

fn put_encoding(out: &mut BytesMut, encoding: Encoding) {
    out.put_u8(match encoding {
        Encoding::Raw => ENCODING_RAW,
        Encoding::Zstd => ENCODING_ZSTD,
    });
}

fn read_encoding(r: &mut Reader) -> Result<Encoding, ProtoError> {
    match r.u8("encoding")? {
        ENCODING_RAW => Ok(Encoding::Raw),
        ENCODING_ZSTD => Ok(Encoding::Zstd),
        tag => Err(r.invalid_tag("encoding", tag)),
    }
}

fn check_chunk(encoding: Encoding, raw_len: u32, data_len: usize) -> Result<(), ProtoError> {
    if data_len > MAX_CHUNK_LEN {
        return Err(ProtoError::ChunkDataTooLarge {
            len: data_len,
            max: MAX_CHUNK_LEN,
        });
    }
    if wire_len(raw_len) > MAX_CHUNK_LEN {
        return Err(ProtoError::ChunkRawLenTooLarge {
            raw_len,
            max: MAX_CHUNK_LEN,
        });
    }
    if encoding == Encoding::Raw && data_len != wire_len(raw_len) {
        return Err(ProtoError::RawLengthMismatch { data_len, raw_len });
    }
    Ok(())
}

/// The exact number of bytes `write_payload` produces.
pub(crate) fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Hello { site, .. } => 2 + 2 + string_len(site) + 16 + 2 + 2,
        Message::HelloAck { site, .. } => 2 + string_len(site),
        Message::Open {
            path,
            chunking,
            base,
            ..
        } => {
            let chunking_len = match chunking {
                Chunking::Fixed { .. } => 1 + 4,
                Chunking::Cdc { .. } => 1 + 3 * 4,
            };
            16 + string_len(path) + 8 + chunking_len + 1 + base.as_deref().map_or(0, string_len)
        }
        Message::OpenAck { reason, .. } => 16 + 1 + string_len(reason),
        Message::Announce { entries, .. } => {
            let entries_len: usize = entries
                .iter()
                .map(|entry| match entry.kind {
                    EntryKind::Data(_) => ENTRY_DATA_LEN,
                    EntryKind::Zero => ENTRY_MIN_LEN,
                })
                .sum();
            16 + 8 + 4 + entries_len
        }
        Message::Want { wanted, .. } => 16 + 8 + 4 + 4 * wanted.len(),
        Message::Chunk { data, .. } => CHUNK_FIELDS_LEN + data.len(),
        Message::Ack { .. } => 16 + 8 + 4 + 4,
        Message::Done { .. } => 16 + 8 + 32,
        Message::Committed { message, .. } => 16 + 1 + 32 + string_len(message),
        Message::Error { message, .. } => 2 + string_len(message),
        Message::Ping { .. } | Message::Pong { .. } => 8,
        Message::Filler { data } => 4 + data.len(),
        Message::MigrateOpen { vm, spec, .. } => 16 + string_len(vm) + 4 + spec.len(),
        Message::MigrateReady { reason, held, .. } => 16 + 1 + string_len(reason) + 4 + held.len(),
        Message::StreamData { data, .. } => 16 + 8 + 1 + 4 + 4 + data.len(),
        Message::StreamBack { data, .. } => 16 + 4 + data.len(),
        Message::StreamEnd { .. } | Message::StreamAck { .. } => 16 + 8,
        Message::PageWant { .. } => 16 + 32,
        Message::PageData { data, .. } => 16 + 32 + 4 + data.len(),
        Message::MigrateOutcome { message, .. } => 16 + 1 + string_len(message),
    }
}

/// Writes a validated message's payload (no frame header).
pub(crate) fn write_payload(msg: &Message, out: &mut BytesMut) {
    match msg {
        Message::Hello {
            version,
            min_version,
            site,
            session,
            connection_index,
            connection_count,
        } => {
            out.put_u16(*version);
            out.put_u16(*min_version);
            put_string(out, site);
            out.put_slice(session);
            out.put_u16(*connection_index);
            out.put_u16(*connection_count);
        }
        Message::HelloAck { version, site } => {
            out.put_u16(*version);
            put_string(out, site);
        }
        Message::Open {
            transfer,
            path,
            size,
            chunking,
            base,
        } => {
            out.put_slice(transfer);
            put_string(out, path);
            out.put_u64(*size);
            match *chunking {
                Chunking::Fixed { block } => {
                    out.put_u8(CHUNKING_FIXED);
                    out.put_u32(block);
                }
                Chunking::Cdc { min, avg, max } => {
                    out.put_u8(CHUNKING_CDC);
                    out.put_u32(min);
                    out.put_u32(avg);
                    out.put_u32(max);
                }
            }
            match base {
                None => out.put_u8(0),
                Some(base) => {
                    out.put_u8(1);
                    put_string(out, base);
                }
            }
        }
        Message::OpenAck {
            transfer,
            accepted,
            reason,
        } => {
            out.put_slice(transfer);
            put_bool(out, *accepted);
            put_string(out, reason);
        }
        Message::Announce {
            transfer,
            round,
            entries,
        } => {
            out.put_slice(transfer);
            out.put_u64(*round);
            put_count(out, entries.len());
            for entry in entries {
                out.put_u64(entry.offset);
                out.put_u32(entry.len);
                match &entry.kind {
                    EntryKind::Data(id) => {
                        out.put_u8(ENTRY_DATA);
                        out.put_slice(id);
                    }
                    EntryKind::Zero => out.put_u8(ENTRY_ZERO),
                }
            }
        }
        Message::Want {
            transfer,
            round,
            wanted,
        } => {
            out.put_slice(transfer);
            out.put_u64(*round);
            put_count(out, wanted.len());
            for index in wanted {
                out.put_u32(*index);
            }
        }
        Message::Chunk {
            transfer,
            round,
            index,
            id,
            encoding,
            raw_len,
            data,
        } => {
            out.put_slice(transfer);
            out.put_u64(*round);
            out.put_u32(*index);
            out.put_slice(id);
            out.put_u8(match encoding {
                Encoding::Raw => ENCODING_RAW,
                Encoding::Zstd => ENCODING_ZSTD,
            });
            out.put_u32(*raw_len);
            put_count(out, data.len());
            // The one copy of the chunk on the way out (the caller reserved room for it).
            out.put_slice(data);
        }
        Message::Ack {
            transfer,
            round,
            reused,
            received,
        } => {
            out.put_slice(transfer);
            out.put_u64(*round);
            out.put_u32(*reused);
            out.put_u32(*received);
        }
        Message::Done {
            transfer,
            size,
            digest,
        } => {
            out.put_slice(transfer);
            out.put_u64(*size);
            out.put_slice(digest);
        }
        Message::Committed {
            transfer,
            ok,
            digest,
            message,
        } => {
            out.put_slice(transfer);
            put_bool(out, *ok);
            out.put_slice(digest);
            put_string(out, message);
        }
        Message::Error { code, message } => {
            out.put_u16(*code);
            put_string(out, message);
        }
        Message::Ping { nonce } | Message::Pong { nonce } => out.put_u64(*nonce),
        Message::Filler { data } => put_blob(out, data),
        Message::MigrateOpen { migration, vm, spec } => {
            out.put_slice(migration);
            put_string(out, vm);
            put_blob(out, spec);
        }
        Message::MigrateReady {
            migration,
            accepted,
            reason,
            held,
        } => {
            out.put_slice(migration);
            put_bool(out, *accepted);
            put_string(out, reason);
            put_blob(out, held);
        }
        Message::StreamData {
            migration,
            seq,
            encoding,
            raw_len,
            data,
        } => {
            out.put_slice(migration);
            out.put_u64(*seq);
            put_encoding(out, *encoding);
            out.put_u32(*raw_len);
            put_blob(out, data);
        }
        Message::StreamBack { migration, data } => {
            out.put_slice(migration);
            put_blob(out, data);
        }
        Message::StreamEnd { migration, batches } => {
            out.put_slice(migration);
            out.put_u64(*batches);
        }
        Message::StreamAck { migration, written } => {
            out.put_slice(migration);
            out.put_u64(*written);
        }
        Message::PageWant { migration, id } => {
            out.put_slice(migration);
            out.put_slice(id);
        }
        Message::PageData { migration, id, data } => {
            out.put_slice(migration);
            out.put_slice(id);
            put_blob(out, data);
        }
        Message::MigrateOutcome {
            migration,
            running,
            message,
        } => {
            out.put_slice(migration);
            put_bool(out, *running);
            put_string(out, message);
        }
    }
}

/// Decodes one payload of a known type. The payload must be consumed exactly.
pub(crate) fn read_payload(
    message_type: MessageType,
    payload: Bytes,
) -> Result<Message, ProtoError> {
    let mut r = Reader::new(message_type.name(), payload);
    let msg = match message_type {
        MessageType::Hello => Message::Hello {
            version: r.u16("version")?,
            min_version: r.u16("min_version")?,
            site: r.string("site")?,
            session: r.array("session")?,
            connection_index: r.u16("connection_index")?,
            connection_count: r.u16("connection_count")?,
        },
        MessageType::HelloAck => Message::HelloAck {
            version: r.u16("version")?,
            site: r.string("site")?,
        },
        MessageType::Open => Message::Open {
            transfer: r.array("transfer")?,
            path: r.string("path")?,
            size: r.u64("size")?,
            chunking: read_chunking(&mut r)?,
            base: r.option("base", |r| r.string("base"))?,
        },
        MessageType::OpenAck => Message::OpenAck {
            transfer: r.array("transfer")?,
            accepted: r.bool("accepted")?,
            reason: r.string("reason")?,
        },
        MessageType::Announce => Message::Announce {
            transfer: r.array("transfer")?,
            round: r.u64("round")?,
            entries: read_entries(&mut r)?,
        },
        MessageType::Want => Message::Want {
            transfer: r.array("transfer")?,
            round: r.u64("round")?,
            wanted: {
                let count = r.count("wanted", MAX_WANTED, 4)?;
                let mut wanted = Vec::with_capacity(count);
                for _ in 0..count {
                    wanted.push(r.u32("wanted index")?);
                }
                wanted
            },
        },
        MessageType::Chunk => read_chunk(&mut r)?,
        MessageType::Ack => Message::Ack {
            transfer: r.array("transfer")?,
            round: r.u64("round")?,
            reused: r.u32("reused")?,
            received: r.u32("received")?,
        },
        MessageType::Done => Message::Done {
            transfer: r.array("transfer")?,
            size: r.u64("size")?,
            digest: r.array("digest")?,
        },
        MessageType::Committed => Message::Committed {
            transfer: r.array("transfer")?,
            ok: r.bool("ok")?,
            digest: r.array("digest")?,
            message: r.string("message")?,
        },
        MessageType::Error => Message::Error {
            code: r.u16("code")?,
            message: r.string("message")?,
        },
        MessageType::Ping => Message::Ping {
            nonce: r.u64("nonce")?,
        },
        MessageType::Pong => Message::Pong {
            nonce: r.u64("nonce")?,
        },
        MessageType::Filler => Message::Filler {
            data: read_blob(&mut r, "data")?,
        },
        MessageType::MigrateOpen => Message::MigrateOpen {
            migration: r.array("migration")?,
            vm: r.string("vm")?,
            spec: read_blob(&mut r, "spec")?,
        },
        MessageType::MigrateReady => Message::MigrateReady {
            migration: r.array("migration")?,
            accepted: r.bool("accepted")?,
            reason: r.string("reason")?,
            held: read_blob(&mut r, "held")?,
        },
        MessageType::StreamData => {
            let migration = r.array("migration")?;
            let seq = r.u64("seq")?;
            let encoding = read_encoding(&mut r)?;
            let raw_len = r.u32("raw_len")?;
            let data = read_blob(&mut r, "data")?;
            check_chunk(encoding, raw_len, data.len())?;
            Message::StreamData {
                migration,
                seq,
                encoding,
                raw_len,
                data,
            }
        }
        MessageType::StreamBack => Message::StreamBack {
            migration: r.array("migration")?,
            data: read_blob(&mut r, "data")?,
        },
        MessageType::StreamEnd => Message::StreamEnd {
            migration: r.array("migration")?,
            batches: r.u64("batches")?,
        },
        MessageType::PageWant => Message::PageWant {
            migration: r.array("migration")?,
            id: r.array("id")?,
        },
        MessageType::PageData => Message::PageData {
            migration: r.array("migration")?,
            id: r.array("id")?,
            data: read_blob(&mut r, "data")?,
        },
        MessageType::StreamAck => Message::StreamAck {
            migration: r.array("migration")?,
            written: r.u64("written")?,
        },
        MessageType::MigrateOutcome => Message::MigrateOutcome {
            migration: r.array("migration")?,
            running: r.bool("running")?,
            message: r.string("message")?,
        },
    };
    r.finish()?;
    Ok(msg)
}

fn read_chunking(r: &mut Reader) -> Result<Chunking, ProtoError> {
    match r.u8("chunking")? {
        CHUNKING_FIXED => Ok(Chunking::Fixed {
            block: r.u32("chunking block")?,
        }),
        CHUNKING_CDC => Ok(Chunking::Cdc {
            min: r.u32("chunking min")?,
            avg: r.u32("chunking avg")?,
            max: r.u32("chunking max")?,
        }),
        tag => Err(r.invalid_tag("chunking", tag)),
    }
}

fn read_entries(r: &mut Reader) -> Result<Vec<Entry>, ProtoError> {
    let count = r.count("entries", MAX_ANNOUNCE_ENTRIES, ENTRY_MIN_LEN)?;
    let mut entries = Vec::with_capacity(count);
    for index in 0..count {
        let offset = r.u64("entry offset")?;
        let len = r.u32("entry len")?;
        let kind = match r.u8("entry kind")? {
            ENTRY_DATA => EntryKind::Data(r.array("entry chunk id")?),
            ENTRY_ZERO => EntryKind::Zero,
            tag => return Err(r.invalid_tag("entry kind", tag)),
        };
        let entry = Entry { offset, len, kind };
        check_entry(index, &entry)?;
        entries.push(entry);
    }
    Ok(entries)
}

fn read_chunk(r: &mut Reader) -> Result<Message, ProtoError> {
    let transfer = r.array("transfer")?;
    let round = r.u64("round")?;
    let index = r.u32("index")?;
    let id = r.array("id")?;
    let encoding = match r.u8("encoding")? {
        ENCODING_RAW => Encoding::Raw,
        ENCODING_ZSTD => Encoding::Zstd,
        tag => return Err(r.invalid_tag("encoding", tag)),
    };
    let raw_len = r.u32("raw_len")?;
    let data_len = wire_len(r.u32("data length")?);
    // Check the declared lengths before taking the data, so an oversized chunk is reported as
    // such rather than as a truncated payload.
    check_chunk(encoding, raw_len, data_len)?;
    // Zero-copy: `data` shares the frame's buffer.
    let data = r.take("data", data_len)?;
    Ok(Message::Chunk {
        transfer,
        round,
        index,
        id,
        encoding,
        raw_len,
        data,
    })
}
