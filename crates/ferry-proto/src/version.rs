//! Protocol version negotiation.

use crate::error::ProtoError;

/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Picks the highest version both sides support, given each side's inclusive `(min, max)` range.
///
/// An inverted range (`min > max`) supports nothing, so it never matches.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16, ProtoError> {
    let lowest_common = ours.0.max(theirs.0);
    let highest_common = ours.1.min(theirs.1);
    if lowest_common <= highest_common {
        Ok(highest_common)
    } else {
        Err(ProtoError::NoCommonVersion {
            ours_min: ours.0,
            ours_max: ours.1,
            theirs_min: theirs.0,
            theirs_max: theirs.1,
        })
    }
}
