//! Counters kept while splitting.
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitStats {
    /// Pages handed out as [`crate::Piece::Page`].
    pub pages: u64,
    /// ZERO records (their bytes are literal).
    pub zero_pages: u64,
    /// Bytes handed out as [`crate::Piece::Literal`].
    pub literal_bytes: u64,
    /// Bytes handed out as [`crate::Piece::Page`].
    pub page_bytes: u64,
    /// Why the splitter switched to opaque mode, if it did.
    pub opaque_reason: Option<String>,
    /// RAM blocks announced by the RAM section's MEM_SIZE list: name → used length in bytes.
    pub ram_blocks: BTreeMap<String, u64>,
    /// Whether the end of the stream was recognised (see [`crate::StreamEvent::Eof`]).
    pub eof: bool,
}

impl SplitStats {
    /// Every byte handed out so far.
    pub fn stream_bytes(&self) -> u64 {
        self.literal_bytes + self.page_bytes
    }
}
