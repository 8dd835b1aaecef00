//! ferry's wire protocol: typed, versioned messages for a receiver-driven, content-addressed
//! transfer, framed for TLS 1.3 streams.
//!
//! # Conversation
//!
//! Each connection of a session opens with `Hello` / `HelloAck` (version negotiation, see
//! [`negotiate`]). A transfer then runs as:
//!
//! 1. sender `Open`s it (path, size, chunking, optional base); the receiver answers `OpenAck`;
//! 2. per round, the sender `Announce`s a batch of entries (offset, length, chunk ID or hole);
//!    the receiver answers `Want` with the indices of the entries it lacks;
//! 3. the sender sends those as `Chunk`s (raw or zstd); the receiver verifies each against its ID
//!    and `Ack`s the round. A `Chunk` whose ID differs from its announcement says the block
//!    changed at a live source (a running VM's disk) after it was announced: the receiver places
//!    it if it matches its own ID, and the object digest follows the IDs actually placed;
//! 4. `Done` carries the whole object's digest; `Committed` answers it.
//!
//! `Ping` / `Pong` keep idle connections observable; `Filler` (before any session) lets a warm
//! connection's congestion control measure the path; `Error` reports a fatal condition.
//!
//! ```no_run
//! use ferry_proto::{FrameCodec, Message};
//! use futures_util::{SinkExt, StreamExt};
//! use tokio_util::codec::Framed;
//!
//! # async fn example(tls_stream: tokio::io::DuplexStream) -> Result<(), ferry_proto::ProtoError> {
//! let mut conn = Framed::new(tls_stream, FrameCodec::default());
//! conn.send(Message::Ping { nonce: 7 }).await?;
//! while let Some(msg) = conn.next().await {
//!     match msg? {
//!         Message::Pong { nonce } => println!("pong {nonce}"),
//!         other => println!("unexpected {}", other.kind()),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Framing
//!
//! ```text
//! u8 type | u32 big-endian payload length | payload
//! ```
//!
//! The payload length is at most [`MAX_PAYLOAD_LEN`] (16 MiB for a chunk plus 4 KiB for its
//! fields); a larger declared length is rejected before anything is allocated. Inside a
//! payload all integers are big-endian; strings are `u16 length | UTF-8` (at most
//! [`MAX_STRING_LEN`] bytes); vectors are `u32 count | items`; optionals are `u8 0/1 | value`;
//! booleans are `u8 0/1`; enums are `u8 tag | fields`. A payload must be consumed exactly:
//! trailing bytes are an error, so every message has exactly one encoding.
//!
//! # Message type codes
//!
//! | code   | message     | payload                                                                   |
//! |--------|-------------|---------------------------------------------------------------------------|
//! | `0x01` | `Hello`     | version u16, min_version u16, site str, session \[16], connection_index u16, connection_count u16 |
//! | `0x02` | `HelloAck`  | version u16, site str                                                     |
//! | `0x03` | `Error`     | code u16, message str                                                     |
//! | `0x04` | `Ping`      | nonce u64                                                                 |
//! | `0x05` | `Pong`      | nonce u64                                                                 |
//! | `0x06` | `Filler`    | data (u32 len + bytes, ≤ 16 MiB), discarded                              |
//! | `0x10` | `Open`      | transfer \[16], path str, size u64, chunking, base opt str                |
//! | `0x11` | `OpenAck`   | transfer \[16], accepted bool, reason str                                 |
//! | `0x12` | `Announce`  | transfer \[16], round u64, entries vec (≤ 65536) of entry                 |
//! | `0x13` | `Want`      | transfer \[16], round u64, wanted vec (≤ 65536) of u32                    |
//! | `0x14` | `Chunk`     | transfer \[16], round u64, index u32, id \[32], encoding, raw_len u32, data (u32 len + bytes, ≤ 16 MiB) |
//! | `0x15` | `Ack`       | transfer \[16], round u64, reused u32, received u32                       |
//! | `0x16` | `Done`      | transfer \[16], size u64, digest \[32]                                    |
//! | `0x17` | `Committed` | transfer \[16], ok bool, digest \[32], message str                        |
//! | `0x20` | `MigrateOpen` | migration \[16], vm str, spec (u32 len + bytes)                         |
//! | `0x21` | `MigrateReady` | migration \[16], accepted bool, reason str, held (u32 len + bytes)     |
//! | `0x22` | `StreamData` | migration \[16], seq u64, encoding, raw_len u32, data (u32 len + bytes, ≤ 16 MiB) |
//! | `0x23` | `StreamBack` | migration \[16], data (u32 len + bytes)                                  |
//! | `0x24` | `StreamEnd` | migration \[16], batches u64                                             |
//! | `0x25` | `MigrateOutcome` | migration \[16], running bool, message str                           |
//! | `0x26` | `StreamAck` | migration \[16], written u64                                             |
//! | `0x27` | `PageWant` | migration \[16], id \[32]                                                 |
//! | `0x28` | `PageData` | migration \[16], id \[32], data (u32 len + bytes)                         |
//!
//! `0x00` is never a valid type, so a zero-filled buffer is caught at its first byte.
//! Session-level messages use `0x0_`, transfer-level ones `0x1_`, live-migration ones `0x2_`.
//!
//! Enum tags: chunking `0` = `Fixed { block u32 }`, `1` = `Cdc { min u32, avg u32, max u32 }`;
//! entry kind `0` = `Data(id [32])`, `1` = `Zero`; encoding `0` = `Raw`, `1` = `Zstd`.
//! An entry is `offset u64 | len u32 | kind`.
//!
//! # What the codec checks, and what it leaves to the session
//!
//! The codec rejects anything that is malformed or would make a peer allocate or process more
//! than the limits allow (see [`ProtoError`]): entries of length 0, data entries and chunks
//! over [`MAX_CHUNK_LEN`], raw chunks whose data length differs from `raw_len`. It does not
//! check meaning against session state — `Want` indices against the round's entries, entry
//! ranges against the object's size, chunking parameters — because the receiver can answer
//! those with `OpenAck { accepted: false }` or `Error` instead of a dropped connection.
//!
//! Any decode error leaves the stream at an unknown position: the connection must be closed.
//!
//! # Versions
//!
//! This crate speaks [`PROTOCOL_VERSION`]. The `Hello`, `HelloAck` and `Error` layouts and type
//! codes must never change, so that peers of any version can negotiate and say why they can't.

mod codec;
mod error;
mod limits;
mod message;
mod payload;
mod version;
mod wire;

pub use codec::{decode, encode, FrameCodec};
pub use error::ProtoError;
pub use limits::{
    FRAME_HEADER_LEN, MAX_ANNOUNCE_ENTRIES, MAX_CHUNK_LEN, MAX_PAYLOAD_LEN, MAX_STRING_LEN,
    MAX_WANTED,
};
pub use message::{ChunkId, Chunking, Encoding, Entry, EntryKind, Message, MigrationId, SessionId, TransferId};
pub use version::{negotiate, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
