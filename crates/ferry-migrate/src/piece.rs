//! What the splitter hands out.
use std::fmt;

/// A run of the migration stream, in stream order. Concatenating [`Piece::bytes`] of every
/// piece gives the stream back, byte for byte.
#[derive(Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes carried verbatim (headers, record words, device state, anything not understood).
    Literal(&'a [u8]),
    /// One RAM page's content bytes (only the content; the record word and block name before it
    /// are [`Piece::Literal`]). `data.len() == PAGE_SIZE`.
    Page {
        block: &'a str,
        offset: u64,
        data: &'a [u8],
    },
    /// A point in the stream worth knowing about; carries no bytes.
    Event(StreamEvent),
}

impl<'a> Piece<'a> {
    /// The stream bytes this piece stands for (empty for an event).
    pub fn bytes(&self) -> &'a [u8] {
        match *self {
            Piece::Literal(bytes) => bytes,
            Piece::Page { data, .. } => data,
            Piece::Event(_) => &[],
        }
    }
}

// Page contents would drown any assertion message; show lengths instead.
impl fmt::Debug for Piece<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Piece::Literal(bytes) => write!(f, "Literal({} bytes)", bytes.len()),
            Piece::Page {
                block,
                offset,
                data,
            } => write!(f, "Page({block}@{offset:#x}, {} bytes)", data.len()),
            Piece::Event(event) => write!(f, "Event({event:?})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// The RAM section's START header: RAM records follow.
    RamStart,
    /// The RAM section's END header: the source VM has stopped.
    RamEnd,
    /// The first device-state (FULL) section; from here on everything is literal.
    DeviceState,
    /// The end-of-stream marker. Seen in place when it follows the RAM section directly; after
    /// device state (whose bodies have no lengths) it is recognised only by `finish`, when the
    /// stream stopped right after EOF + a complete device description.
    Eof,
    /// The splitter stopped understanding the stream; everything after is literal.
    Opaque(String),
}
