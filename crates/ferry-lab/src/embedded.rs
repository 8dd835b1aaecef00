//! Binaries built with ferry and carried inside it.

/// The static guest workload (crate ferry-guest), put into guest initramfs images.
pub const GUEST_WORKLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest-workload"));
