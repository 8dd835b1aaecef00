//! Everything that can go wrong encoding, decoding or negotiating.
//!
//! Decode errors name the message kind and field, because the reader of the log is usually
//! debugging a peer of another version or build, and "truncated" alone says nothing.

/// A protocol error. Any decode error is fatal to the connection it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The frame's type byte names no message of this protocol version.
    #[error("unknown message type 0x{type_byte:02x}")]
    UnknownMessageType { type_byte: u8 },

    /// The frame header declares (or an encoder would produce) a payload over the limit.
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },

    /// The payload ends before a field does.
    #[error("truncated {message} payload: {field} needs {needed} bytes, only {available} left")]
    Truncated {
        message: &'static str,
        field: &'static str,
        needed: usize,
        available: usize,
    },

    /// The payload goes on after its last field.
    #[error("{extra} trailing bytes after the last field of a {message} payload")]
    TrailingBytes { message: &'static str, extra: usize },

    /// An enum, option or boolean tag has a value with no meaning.
    #[error("invalid tag {tag} for {field} in a {message} payload")]
    InvalidTag {
        message: &'static str,
        field: &'static str,
        tag: u8,
    },

    /// A string is not UTF-8.
    #[error("{field} in a {message} payload is not valid UTF-8: {source}")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
        source: std::str::Utf8Error,
    },

    /// A string is longer than [`MAX_STRING_LEN`](crate::MAX_STRING_LEN) bytes.
    #[error("{field} in a {message} payload is {len} bytes long, over the maximum of {max}")]
    StringTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },

    /// A vector has more items than its message allows.
    #[error("{field} in a {message} payload has {count} items, over the maximum of {max}")]
    TooManyItems {
        message: &'static str,
        field: &'static str,
        count: usize,
        max: usize,
    },

    /// A chunk's data is over [`MAX_CHUNK_LEN`](crate::MAX_CHUNK_LEN).
    #[error("chunk data of {len} bytes exceeds the maximum of {max}")]
    ChunkDataTooLarge { len: usize, max: usize },

    /// A chunk claims to decompress to more than [`MAX_CHUNK_LEN`](crate::MAX_CHUNK_LEN): refused
    /// here so that no receiver sizes a decompression buffer from it.
    #[error("chunk raw length of {raw_len} bytes exceeds the maximum of {max}")]
    ChunkRawLenTooLarge { raw_len: u32, max: usize },

    /// A raw (uncompressed) chunk whose data is not `raw_len` bytes long.
    #[error("raw chunk carries {data_len} bytes but declares raw_len {raw_len}")]
    RawLengthMismatch { data_len: usize, raw_len: u32 },

    /// An announced entry covers no bytes.
    #[error("announce entry {index} has length 0")]
    ZeroLengthEntry { index: usize },

    /// An announced data entry is longer than any chunk can be.
    #[error("announce entry {index} is a data chunk of {len} bytes, over the maximum of {max}")]
    DataEntryTooLarge { index: usize, len: u32, max: usize },

    /// The connection closed in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    UnexpectedEof { buffered: usize },

    /// The two sides' supported version ranges do not overlap.
    #[error(
        "no common protocol version: we support {ours_min}..={ours_max}, the peer supports {theirs_min}..={theirs_max}"
    )]
    NoCommonVersion {
        ours_min: u16,
        ours_max: u16,
        theirs_min: u16,
        theirs_max: u16,
    },

    /// Reading from or writing to the underlying stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
