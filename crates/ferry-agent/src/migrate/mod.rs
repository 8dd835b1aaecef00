//! Live migration of a running VM to another site. The source QEMU migrates into a local socket
//! of the source agent; the agents carry the stream over the session's mutual-TLS connections,
//! RAM pages by content ID; the destination agent rebuilds the exact stream for its QEMU, which
//! waits with `-incoming`. QEMU's return path is relayed back, so the source QEMU completes only
//! once the destination has loaded everything and runs.
pub mod batch;
pub mod cold;
pub mod disk_view;
pub mod disks;
pub mod doubt;
pub mod incoming;
pub mod postcopy;
pub mod readiness;
pub mod resume;
pub mod source;
pub mod switchover;
pub mod window;

use crate::pages::PageId;
use serde::{Deserialize, Serialize};

/// A page's content ID: keyed per tenant, since guest memory is attacker-controlled.
pub fn page_id(key: &[u8; 32], page: &[u8]) -> PageId {
    *blake3::keyed_hash(key, page).as_bytes()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub vm: String,
    pub to: String,
    /// The longest pause the operator accepts; QEMU's `downtime-limit` is derived from it and
    /// the measured RTT.
    pub downtime_ms: u32,
    /// Shut the guest down, move its disks, boot it at the destination (see `cold.rs`).
    #[serde(default)]
    pub cold: bool,
    /// How long a cold move waits for the guest to power off before QEMU is quit.
    #[serde(default)]
    pub grace_ms: u32,
    /// Hash every disk at both sites during the switchover pause (see `disks.rs`).
    #[serde(default)]
    pub verify_disks: bool,
    /// The RAM migration runs beside the disks' bulk pass, not after it (raw disks only; the
    /// CLI asks for it unless told `--disks-first`).
    #[serde(default)]
    pub overlap_disks: bool,
    /// Switch to post-copy when pre-copy does not converge (see `postcopy.rs`).
    #[serde(default)]
    pub postcopy: bool,
}

/// What MIGRATE_OPEN carries: the VM's spec, and whether the destination boots it (a cold
/// move) or waits for its live state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Arrival {
    pub spec: crate::vm::VmSpec,
    #[serde(default)]
    pub cold: bool,
    /// Per disk, the transfer whose staging file the destination's QEMU opens: the bulk pass
    /// still fills it (empty: the disks are complete at their place).
    #[serde(default)]
    pub staged: Vec<[u8; 16]>,
    /// The source may switch to post-copy: the destination's QEMU must be ready for it.
    #[serde(default)]
    pub postcopy: bool,
    /// Not 0: a post-copy that lost its session goes on in this one (its nth resumption).
    #[serde(default)]
    pub resume: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrateSummary {
    pub vm: String,
    pub to: String,
    pub seconds: f64,
    /// QEMU's own figure for the pause (source side, up to the destination's go-ahead).
    pub qemu_downtime_ms: Option<f64>,
    pub qemu_total_ms: Option<f64>,
    pub rtt_ms: f64,
    pub connections: usize,
    /// Every byte the session's sockets sent and received.
    pub wire_sent: u64,
    pub wire_received: u64,
    /// The stream QEMU wrote, and how it travelled.
    pub stream_bytes: u64,
    pub pages_sent: u64,
    pub pages_referenced: u64,
    /// Pages sent as a place on a disk the destination was sent (the guest's page cache).
    #[serde(default)]
    pub pages_from_disk: u64,
    pub pages_zero: u64,
    pub literal_bytes: u64,
    /// Set when ferry stopped understanding the stream and carried the rest opaque.
    pub opaque: Option<String>,
    pub encrypted: bool,
    /// How the VM's local disks moved, if it has any.
    #[serde(default)]
    pub disks: Option<disks::DiskSummary>,
    #[serde(default)]
    pub cold: bool,
    /// Seconds into the move when it switched to post-copy, if it did.
    #[serde(default)]
    pub postcopy_after_s: Option<f64>,
    /// Pages the destination's QEMU asked for after the switch (each a fault that waited at
    /// least a round trip), and the bytes the source QEMU sent after it.
    #[serde(default)]
    pub postcopy_requests: u64,
    #[serde(default)]
    pub postcopy_bytes: u64,
    /// Sessions the post-copy went on in after one was lost.
    #[serde(default)]
    pub postcopy_resumes: u32,
}
