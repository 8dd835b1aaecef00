//! Size limits shared by encoder and decoder, so that anything one side can send the other
//! accepts.

/// `u8 type | u32 length`.
pub const FRAME_HEADER_LEN: usize = 5;

/// The largest chunk (raw or compressed) a `Chunk` carries, and the longest `Data` entry.
pub const MAX_CHUNK_LEN: usize = 16 * 1024 * 1024;

/// The largest payload of any frame: a full chunk plus room for its fields. Checked against the
/// declared length before any buffer is grown for it.
pub const MAX_PAYLOAD_LEN: usize = MAX_CHUNK_LEN + 4 * 1024;

/// The longest string, in UTF-8 bytes (paths, site names, reasons, error messages).
pub const MAX_STRING_LEN: usize = 4096;

/// The most entries one `Announce` may carry.
pub const MAX_ANNOUNCE_ENTRIES: usize = 65536;

/// The most indices one `Want` may carry.
pub const MAX_WANTED: usize = 65536;
