//! Version negotiation.

use ferry_proto::{negotiate, ProtoError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

#[test]
fn picks_the_highest_common_version() {
    assert_eq!(negotiate((1, 1), (1, 1)).unwrap(), 1);
    assert_eq!(negotiate((1, 5), (3, 9)).unwrap(), 5);
    assert_eq!(negotiate((3, 9), (1, 5)).unwrap(), 5);
    assert_eq!(negotiate((2, 4), (1, 9)).unwrap(), 4);
    assert_eq!(negotiate((0, u16::MAX), (7, 7)).unwrap(), 7);
    assert_eq!(
        negotiate((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (1, 1)).unwrap(),
        1
    );
}

#[test]
fn disjoint_ranges_fail_naming_both() {
    let err = negotiate((1, 2), (3, 4)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::NoCommonVersion {
            ours_min: 1,
            ours_max: 2,
            theirs_min: 3,
            theirs_max: 4
        }
    ));
    assert_eq!(
        err.to_string(),
        "no common protocol version: we support 1..=2, the peer supports 3..=4"
    );
    assert!(negotiate((3, 4), (1, 2)).is_err());
}

#[test]
fn an_inverted_range_supports_nothing() {
    assert!(negotiate((1, 5), (4, 2)).is_err());
    assert!(negotiate((5, 1), (1, 5)).is_err());
}
