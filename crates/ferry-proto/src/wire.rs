//! Primitive readers and writers: big-endian integers, fixed arrays, booleans, option and enum
//! tags, length-prefixed strings and byte strings, vector counts.
//!
//! Reading never trusts a length before checking it against both its limit and the bytes
//! actually left in the payload, so no input makes the decoder panic or allocate beyond the
//! payload it already holds. Writers assume the message was validated first (see
//! `payload::validate`), which is what keeps encoder and decoder limits identical.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtoError;
use crate::limits::MAX_STRING_LEN;

/// A cursor over one frame's payload. Holds it as [`Bytes`] so that byte strings (chunk data)
/// are split off without copying.
pub(crate) struct Reader {
    /// The message being decoded, for error messages.
    message: &'static str,
    rest: Bytes,
}

impl Reader {
    pub(crate) fn new(message: &'static str, payload: Bytes) -> Self {
        Self {
            message,
            rest: payload,
        }
    }

    fn ensure(&self, field: &'static str, needed: usize) -> Result<(), ProtoError> {
        if self.rest.len() < needed {
            return Err(ProtoError::Truncated {
                message: self.message,
                field,
                needed,
                available: self.rest.len(),
            });
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        self.ensure(field, 1)?;
        Ok(self.rest.get_u8())
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        self.ensure(field, 2)?;
        Ok(self.rest.get_u16())
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        self.ensure(field, 4)?;
        Ok(self.rest.get_u32())
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        self.ensure(field, 8)?;
        Ok(self.rest.get_u64())
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], ProtoError> {
        self.ensure(field, N)?;
        let mut array = [0; N];
        self.rest.copy_to_slice(&mut array);
        Ok(array)
    }

    /// `u8` 0 or 1; anything else is an error rather than "true", so each value has one encoding.
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(self.invalid_tag(field, tag)),
        }
    }

    /// `u8` 0 (absent) or 1 followed by the value.
    pub(crate) fn option<T>(
        &mut self,
        field: &'static str,
        read_value: impl FnOnce(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Option<T>, ProtoError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => read_value(self).map(Some),
            tag => Err(self.invalid_tag(field, tag)),
        }
    }

    pub(crate) fn invalid_tag(&self, field: &'static str, tag: u8) -> ProtoError {
        ProtoError::InvalidTag {
            message: self.message,
            field,
            tag,
        }
    }

    /// `u16 length | UTF-8`, at most [`MAX_STRING_LEN`] bytes.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let len = usize::from(self.u16(field)?);
        check_string_len(self.message, field, len)?;
        let raw = self.take(field, len)?;
        match std::str::from_utf8(&raw) {
            Ok(text) => Ok(text.to_owned()),
            Err(source) => Err(ProtoError::InvalidUtf8 {
                message: self.message,
                field,
                source,
            }),
        }
    }

    /// The next `len` bytes, shared with the payload rather than copied.
    pub(crate) fn take(&mut self, field: &'static str, len: usize) -> Result<Bytes, ProtoError> {
        self.ensure(field, len)?;
        Ok(self.rest.split_to(len))
    }

    /// A vector's `u32` count, checked against `max` and against the bytes left: `count` items
    /// of at least `min_item_len` bytes each must still fit. The second check is what lets the
    /// caller size a `Vec` from the count: a tiny frame cannot claim 65536 entries.
    pub(crate) fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_item_len: usize,
    ) -> Result<usize, ProtoError> {
        let count = wire_len(self.u32(field)?);
        check_count(self.message, field, count, max)?;
        // No overflow: count <= max (at most 65536) and items are a few dozen bytes.
        self.ensure(field, count * min_item_len)?;
        Ok(count)
    }

    /// Ends the payload: anything left is an error, so each message has exactly one encoding.
    pub(crate) fn finish(self) -> Result<(), ProtoError> {
        if !self.rest.is_empty() {
            return Err(ProtoError::TrailingBytes {
                message: self.message,
                extra: self.rest.len(),
            });
        }
        Ok(())
    }
}

/// A length or count read from the wire. ferry runs on 32- and 64-bit targets only, where a
/// `u32` always fits a `usize`.
pub(crate) fn wire_len(value: u32) -> usize {
    value as usize
}

pub(crate) fn check_string_len(
    message: &'static str,
    field: &'static str,
    len: usize,
) -> Result<(), ProtoError> {
    if len > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong {
            message,
            field,
            len,
            max: MAX_STRING_LEN,
        });
    }
    Ok(())
}

pub(crate) fn check_count(
    message: &'static str,
    field: &'static str,
    count: usize,
    max: usize,
) -> Result<(), ProtoError> {
    if count > max {
        return Err(ProtoError::TooManyItems {
            message,
            field,
            count,
            max,
        });
    }
    Ok(())
}

/// Encoded size of a string: `u16` length plus its bytes.
pub(crate) fn string_len(text: &str) -> usize {
    2 + text.len()
}

/// Writes a string validated to be at most [`MAX_STRING_LEN`] bytes.
pub(crate) fn put_string(out: &mut BytesMut, text: &str) {
    debug_assert!(
        text.len() <= MAX_STRING_LEN,
        "string not validated before encoding"
    );
    out.put_u16(text.len() as u16);
    out.put_slice(text.as_bytes());
}

pub(crate) fn put_bool(out: &mut BytesMut, value: bool) {
    out.put_u8(u8::from(value));
}

/// Writes a vector count validated to be within its message's limit.
pub(crate) fn put_count(out: &mut BytesMut, count: usize) {
    debug_assert!(
        u32::try_from(count).is_ok(),
        "count not validated before encoding"
    );
    out.put_u32(count as u32);
}
