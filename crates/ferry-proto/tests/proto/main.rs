//! ferry-proto's tests, through the public API only. One test binary (modules below) to keep
//! link time down.

mod framed;
mod fuzz;
mod golden;
mod malformed;
mod roundtrip;
mod samples;
mod strategies;
mod version;

use bytes::{BufMut, BytesMut};
use ferry_proto::{decode, encode, Message, ProtoError};

/// One message's frame.
pub fn encode_one(msg: &Message) -> BytesMut {
    let mut out = BytesMut::new();
    encode(msg, &mut out).unwrap_or_else(|e| panic!("encoding {msg:?}: {e}"));
    out
}

/// Decodes every whole frame in `bytes`; returns the messages and how many bytes are left over.
pub fn decode_all(bytes: &[u8]) -> Result<(Vec<Message>, usize), ProtoError> {
    let mut buf = BytesMut::from(bytes);
    let mut messages = Vec::new();
    while let Some(msg) = decode(&mut buf)? {
        messages.push(msg);
    }
    Ok((messages, buf.len()))
}

/// A frame with an arbitrary type byte and payload, declared length = payload length.
pub fn raw_frame(type_byte: u8, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(type_byte);
    out.put_u32(u32::try_from(payload.len()).unwrap());
    out.put_slice(payload);
    out
}

/// Decodes a buffer expected to hold exactly one frame and nothing else.
pub fn decode_exactly_one(bytes: &[u8]) -> Result<Message, ProtoError> {
    let mut buf = BytesMut::from(bytes);
    let msg = decode(&mut buf)?.expect("a whole frame was given");
    assert!(buf.is_empty(), "{} bytes left after one frame", buf.len());
    Ok(msg)
}
