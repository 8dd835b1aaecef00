//! QEMU's outgoing migration stream, split so ferry can carry RAM pages by reference.
//!
//! [`Splitter`] follows a QEMU 10 pre-copy stream (no multifd, XBZRLE or compression; the
//! return-path capability is fine) and hands out [`Piece`]s: each RAM page's content on its
//! own, everything else as literal bytes. Concatenating every piece's bytes in order gives the
//! stream back exactly, whatever the splitter understood of it.
//!
//! ```
//! use ferry_migrate::{Piece, Splitter};
//!
//! # let stream: &[u8] = b"QEVM\0\0\0\x03";
//! let mut splitter = Splitter::new();
//! let mut rebuilt = Vec::new();
//! let mut carry = |piece: Piece<'_>| match piece {
//!     // A page travels by its content hash when the other side has it already.
//!     Piece::Page { data, .. } => rebuilt.extend_from_slice(data),
//!     Piece::Literal(bytes) => rebuilt.extend_from_slice(bytes),
//!     Piece::Event(event) => println!("{event:?}"),
//! };
//! for chunk in stream.chunks(64 << 10) {
//!     splitter.feed(chunk, &mut carry);
//! }
//! splitter.finish(&mut carry);
//! assert_eq!(rebuilt, stream);
//! ```
pub mod format;
mod piece;
mod split;
mod stats;

pub use format::PAGE_SIZE;
pub use piece::{Piece, StreamEvent};
pub use split::Splitter;
pub use stats::SplitStats;

#[cfg(test)]
mod tests;
