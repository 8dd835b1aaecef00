//! Counters a transfer updates as it goes, read by progress bars and the final summary.
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the object scanned (read or skipped as holes).
    pub scanned: AtomicU64,
    /// Bytes the receiver confirmed as placed (acknowledged rounds).
    pub acked: AtomicU64,
    /// Raw bytes of chunks the receiver asked for.
    pub wanted_raw: AtomicU64,
    /// Bytes of chunk payload put on the wire (after compression).
    pub sent_payload: AtomicU64,
    /// Bytes the receiver found locally (its older copy, a base, or a cut transfer's staging).
    pub reused: AtomicU64,
    /// Bytes that are holes or zeros.
    pub zero: AtomicU64,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ProgressSnapshot {
    pub scanned: u64,
    pub acked: u64,
    pub wanted_raw: u64,
    pub sent_payload: u64,
    pub reused: u64,
    pub zero: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            scanned: self.scanned.load(Relaxed),
            acked: self.acked.load(Relaxed),
            wanted_raw: self.wanted_raw.load(Relaxed),
            sent_payload: self.sent_payload.load(Relaxed),
            reused: self.reused.load(Relaxed),
            zero: self.zero.load(Relaxed),
        }
    }
}
