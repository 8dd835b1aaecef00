//! Frames: `u8 type | u32 big-endian payload length | payload`, and the tokio-util codec.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::ProtoError;
use crate::limits::{FRAME_HEADER_LEN, MAX_PAYLOAD_LEN};
use crate::message::{Message, MessageType};
use crate::payload;
use crate::wire::wire_len;

/// Appends `msg` as one frame to `out`.
///
/// Fails, leaving `out` untouched, if the message breaks a limit the decoder enforces (a string
/// over [`MAX_STRING_LEN`](crate::MAX_STRING_LEN), too many entries, an oversized chunk, …):
/// writing it would only make the peer drop the connection.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), ProtoError> {
    payload::validate(msg)?;
    let payload_len = payload::payload_len(msg);
    // Unreachable with today's messages (a full Chunk is the largest and fits), but it is what
    // keeps a future message type from producing frames every peer refuses.
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: payload_len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    // One reservation up front, so a chunk's data is copied once (by put_slice) and never again
    // by a buffer growing under it.
    out.reserve(FRAME_HEADER_LEN + payload_len);
    let start = out.len();
    out.put_u8(msg.type_code());
    out.put_u32(payload_len as u32);
    payload::write_payload(msg, out);
    debug_assert_eq!(
        out.len() - start,
        FRAME_HEADER_LEN + payload_len,
        "payload_len is wrong for {}",
        msg.kind()
    );
    Ok(())
}

/// Takes one frame off the front of `buf` and decodes it.
///
/// Returns `Ok(None)`, consuming nothing, while `buf` holds less than a whole frame (and
/// reserves room for the rest once the header is in). An unknown type or an oversized length
/// is reported as soon as the header shows it, without waiting for or allocating the payload.
/// A `Chunk`'s data shares `buf`'s memory: it is split off, not copied.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
    let Some(&type_byte) = buf.first() else {
        return Ok(None);
    };
    let message_type =
        MessageType::from_code(type_byte).ok_or(ProtoError::UnknownMessageType { type_byte })?;
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let payload_len = wire_len(u32::from_be_bytes([
        header[1], header[2], header[3], header[4],
    ]));
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: payload_len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let frame_len = FRAME_HEADER_LEN + payload_len;
    if buf.len() < frame_len {
        // Bounded by MAX_PAYLOAD_LEN, checked above.
        buf.reserve(frame_len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    let payload = buf.split_to(payload_len).freeze();
    payload::read_payload(message_type, payload).map(Some)
}

/// The tokio-util codec for ferry frames: `Framed::new(stream, FrameCodec::default())`.
///
/// Stateless: each call to `decode` re-reads the 5-byte header, which is cheaper than keeping
/// state in step with the buffer.
///
/// It encodes both `Message` and `&Message` (the latter lets a sender keep a message, e.g. for
/// a retry, without cloning its chunk). The price: calling `SinkExt::flush` or `close` directly
/// on a `Framed` needs the item type named, as in `SinkExt::<Message>::close(&mut framed)`;
/// `send(msg)` and a `SplitSink<_, Message>` infer it.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        decode(src)
    }

    /// Like the default, but with an error that says what happened: the peer closed the
    /// stream in the middle of a frame.
    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        match decode(buf)? {
            Some(msg) => Ok(Some(msg)),
            None if buf.is_empty() => Ok(None),
            None => Err(ProtoError::UnexpectedEof {
                buffered: buf.len(),
            }),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode(&msg, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode(msg, dst)
    }
}
