//! The messages and the types they carry.

use bytes::Bytes;

/// A chunk's content address: the BLAKE3 hash of its uncompressed bytes.
pub type ChunkId = [u8; 32];

/// Names one transfer (one object) within a session; chosen by the sender.
pub type TransferId = [u8; 16];

/// Names one live migration; chosen by the source.
pub type MigrationId = [u8; 16];

/// Names a session, so the receiver can group a session's parallel connections.
pub type SessionId = [u8; 16];

/// How the sender cuts the object into chunks; the receiver needs it to chunk its base the
/// same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Chunking {
    /// Fixed-size blocks of `block` bytes (the last may be shorter).
    Fixed { block: u32 },
    /// Content-defined chunks between `min` and `max` bytes, `avg` on average.
    Cdc { min: u32, avg: u32, max: u32 },
}

/// One announced range of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Where the range starts in the object.
    pub offset: u64,
    /// How many bytes it covers; never 0.
    pub len: u32,
    /// What the range holds.
    pub kind: EntryKind,
}

/// What an announced range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A chunk with this ID; the receiver wants it unless it already holds it.
    Data(ChunkId),
    /// All zeroes: the receiver leaves a hole and never wants it.
    Zero,
}

/// How a chunk's data is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The chunk's bytes as they are.
    Raw,
    /// A zstd frame that decompresses to `raw_len` bytes.
    Zstd,
}

/// One protocol message. See the crate docs for the conversation and the wire layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Opens each connection: the versions the sender speaks (`min_version..=version`), who it
    /// is, and which connection of which session this is.
    Hello {
        version: u16,
        min_version: u16,
        site: String,
        session: SessionId,
        connection_index: u16,
        connection_count: u16,
    },
    /// Accepts a `Hello` with the negotiated version.
    HelloAck { version: u16, site: String },
    /// Starts a transfer of the object at `path`, `size` bytes long, optionally against a base
    /// the receiver already holds.
    Open {
        transfer: TransferId,
        path: String,
        size: u64,
        chunking: Chunking,
        base: Option<String>,
    },
    /// Accepts or refuses an `Open`; `reason` says why when refused.
    OpenAck {
        transfer: TransferId,
        accepted: bool,
        reason: String,
    },
    /// A round's batch of ranges.
    Announce {
        transfer: TransferId,
        round: u64,
        entries: Vec<Entry>,
    },
    /// The indices (into the round's entries) the receiver lacks. Duplicates are not an encoding
    /// error; the receiver checks indices against the round.
    Want {
        transfer: TransferId,
        round: u64,
        wanted: Vec<u32>,
    },
    /// One wanted chunk. `raw_len` is the uncompressed length; `data` is `raw_len` bytes when
    /// `Raw`, a zstd frame when `Zstd`.
    Chunk {
        transfer: TransferId,
        round: u64,
        index: u32,
        id: ChunkId,
        encoding: Encoding,
        raw_len: u32,
        data: Bytes,
    },
    /// The receiver has every chunk of the round: `reused` from what it held, `received` sent.
    Ack {
        transfer: TransferId,
        round: u64,
        reused: u32,
        received: u32,
    },
    /// Every round is sent; the object is `size` bytes with this BLAKE3 digest.
    Done {
        transfer: TransferId,
        size: u64,
        digest: [u8; 32],
    },
    /// The receiver's answer to `Done`: whether it committed the object, and the digest it found.
    Committed {
        transfer: TransferId,
        ok: bool,
        digest: [u8; 32],
        message: String,
    },
    /// A fatal error; the sender closes the connection after it.
    Error { code: u16, message: String },
    /// Asks the destination to receive a running VM: `spec` is the VM's description (JSON) from
    /// which the destination starts the same machine waiting for its state.
    MigrateOpen {
        migration: MigrationId,
        vm: String,
        spec: Bytes,
    },
    /// The destination is ready (its QEMU waits for the stream) or refuses with `reason`.
    /// `held` lists, as packed 8-byte prefixes of page IDs, the RAM pages it already holds, so
    /// the source can send those as references from the first byte.
    MigrateReady {
        migration: MigrationId,
        accepted: bool,
        reason: String,
        held: Bytes,
    },
    /// Batch `seq` of the source QEMU's migration stream, in ferry's batch encoding; batches
    /// travel on any connection and the destination restores their order.
    StreamData {
        migration: MigrationId,
        seq: u64,
        encoding: Encoding,
        raw_len: u32,
        data: Bytes,
    },
    /// Bytes of the destination QEMU's return path, for the source QEMU.
    StreamBack { migration: MigrationId, data: Bytes },
    /// The destination has written the first `written` bytes of the stream into its QEMU. The
    /// source keeps what is in flight beyond that small, so QEMU's own bandwidth estimate (and
    /// with it the moment it stops the VM) reflects what really reaches the destination.
    StreamAck { migration: MigrationId, written: u64 },
    /// The destination lacks a page the source sent by reference (its list of held pages named
    /// it only by a prefix, or its store lost it): the source answers with `PageData`.
    PageWant { migration: MigrationId, id: ChunkId },
    /// A page's content, answering `PageWant`; empty if the source does not hold it either.
    PageData {
        migration: MigrationId,
        id: ChunkId,
        data: Bytes,
    },
    /// The source QEMU closed its stream after `batches` batches.
    StreamEnd { migration: MigrationId, batches: u64 },
    /// How the migration ended at the destination: `running` once the destination VM runs.
    MigrateOutcome {
        migration: MigrationId,
        running: bool,
        message: String,
    },
    /// Liveness probe; answered by a `Pong` with the same nonce.
    Ping { nonce: u64 },
    /// Answer to a `Ping`.
    Pong { nonce: u64 },
    /// Bytes that mean nothing, sent on a warm connection before any session to measure the
    /// path: the congestion control learns the rate it will start the first session at. The
    /// receiver discards them.
    Filler { data: Bytes },
}

/// A message's type byte. Kept apart from [`Message`] so the frame decoder can reject an
/// unknown type from the header alone, before the payload has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum MessageType {
    Hello = 0x01,
    HelloAck = 0x02,
    Error = 0x03,
    Ping = 0x04,
    Pong = 0x05,
    Filler = 0x06,
    Open = 0x10,
    OpenAck = 0x11,
    Announce = 0x12,
    Want = 0x13,
    Chunk = 0x14,
    Ack = 0x15,
    Done = 0x16,
    Committed = 0x17,
    MigrateOpen = 0x20,
    MigrateReady = 0x21,
    StreamData = 0x22,
    StreamBack = 0x23,
    StreamEnd = 0x24,
    MigrateOutcome = 0x25,
    StreamAck = 0x26,
    PageWant = 0x27,
    PageData = 0x28,
}

impl MessageType {
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => Self::Hello,
            0x02 => Self::HelloAck,
            0x03 => Self::Error,
            0x04 => Self::Ping,
            0x05 => Self::Pong,
            0x06 => Self::Filler,
            0x10 => Self::Open,
            0x11 => Self::OpenAck,
            0x12 => Self::Announce,
            0x13 => Self::Want,
            0x14 => Self::Chunk,
            0x15 => Self::Ack,
            0x16 => Self::Done,
            0x17 => Self::Committed,
            0x20 => Self::MigrateOpen,
            0x21 => Self::MigrateReady,
            0x22 => Self::StreamData,
            0x23 => Self::StreamBack,
            0x24 => Self::StreamEnd,
            0x25 => Self::MigrateOutcome,
            0x26 => Self::StreamAck,
            0x27 => Self::PageWant,
            0x28 => Self::PageData,
            _ => return None,
        })
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Hello => "Hello",
            Self::HelloAck => "HelloAck",
            Self::Error => "Error",
            Self::Ping => "Ping",
            Self::Pong => "Pong",
            Self::Filler => "Filler",
            Self::Open => "Open",
            Self::OpenAck => "OpenAck",
            Self::Announce => "Announce",
            Self::Want => "Want",
            Self::Chunk => "Chunk",
            Self::Ack => "Ack",
            Self::Done => "Done",
            Self::Committed => "Committed",
            Self::MigrateOpen => "MigrateOpen",
            Self::MigrateReady => "MigrateReady",
            Self::StreamData => "StreamData",
            Self::StreamBack => "StreamBack",
            Self::StreamEnd => "StreamEnd",
            Self::MigrateOutcome => "MigrateOutcome",
            Self::StreamAck => "StreamAck",
            Self::PageWant => "PageWant",
            Self::PageData => "PageData",
        }
    }
}

impl Message {
    pub(crate) fn message_type(&self) -> MessageType {
        match self {
            Self::Hello { .. } => MessageType::Hello,
            Self::HelloAck { .. } => MessageType::HelloAck,
            Self::Open { .. } => MessageType::Open,
            Self::OpenAck { .. } => MessageType::OpenAck,
            Self::Announce { .. } => MessageType::Announce,
            Self::Want { .. } => MessageType::Want,
            Self::Chunk { .. } => MessageType::Chunk,
            Self::Ack { .. } => MessageType::Ack,
            Self::Done { .. } => MessageType::Done,
            Self::Committed { .. } => MessageType::Committed,
            Self::MigrateOpen { .. } => MessageType::MigrateOpen,
            Self::MigrateReady { .. } => MessageType::MigrateReady,
            Self::StreamData { .. } => MessageType::StreamData,
            Self::StreamBack { .. } => MessageType::StreamBack,
            Self::StreamEnd { .. } => MessageType::StreamEnd,
            Self::MigrateOutcome { .. } => MessageType::MigrateOutcome,
            Self::StreamAck { .. } => MessageType::StreamAck,
            Self::PageWant { .. } => MessageType::PageWant,
            Self::PageData { .. } => MessageType::PageData,
            Self::Error { .. } => MessageType::Error,
            Self::Ping { .. } => MessageType::Ping,
            Self::Pong { .. } => MessageType::Pong,
            Self::Filler { .. } => MessageType::Filler,
        }
    }

    /// The message's name, for logs (`"Chunk"`, `"Want"`, …).
    pub fn kind(&self) -> &'static str {
        self.message_type().name()
    }

    /// The message's type byte on the wire (see the table in the crate docs).
    pub fn type_code(&self) -> u8 {
        self.message_type().code()
    }

    /// The size of the message's frame, header included, as [`encode`](crate::encode) writes it.
    /// Lets a sender account for bytes in flight without encoding.
    pub fn encoded_len(&self) -> usize {
        crate::FRAME_HEADER_LEN + crate::payload::payload_len(self)
    }
}
