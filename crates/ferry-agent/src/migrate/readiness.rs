//! What the source hears of the destination getting ready. A diskless move does not wait for
//! it: QEMU's stream starts with the request, and its first round trip crosses while the
//! destination starts its QEMU (the stream waits in the connections meanwhile). The answers
//! come in on the session's connections among everything else; the pages the destination
//! listed as held count from then on (pages before go whole, which costs bytes, never
//! correctness).
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// The page-ID prefixes MIGRATE_READY lists, 8 bytes each.
pub fn held_prefixes(held: &[u8]) -> impl Iterator<Item = u64> + '_ {
    held.chunks_exact(8).map(|p| u64::from_be_bytes(p.try_into().unwrap()))
}

pub struct Readiness {
    vm: String,
    connections: usize,
    ready: AtomicUsize,
    refused: AtomicBool,
    /// Page-ID prefixes the destination holds (one connection's answer carries them).
    held: OnceLock<HashSet<u64>>,
    since: Instant,
}

impl Readiness {
    pub fn new(vm: &str, connections: usize) -> Readiness {
        Readiness { vm: vm.to_string(), connections, ready: AtomicUsize::new(0), refused: AtomicBool::new(false), held: OnceLock::new(), since: Instant::now() }
    }

    /// The destination was ready before the stream started (a move with disks waits for it).
    pub fn already(vm: &str, connections: usize, held: HashSet<u64>) -> Readiness {
        let r = Readiness::new(vm, connections);
        r.ready.store(connections, Relaxed);
        let _ = r.held.set(held);
        r
    }

    /// One connection's answer: accepted, with the prefixes of the pages held.
    pub fn accepted(&self, held: &[u8]) {
        if !held.is_empty() {
            let _ = self.held.set(held_prefixes(held).collect());
        }
        if self.ready.fetch_add(1, Relaxed) + 1 == self.connections {
            tracing::info!(vm = %self.vm, after_ms = self.since.elapsed().as_millis() as u64, held = self.held.get().map_or(0, |h| h.len()), "the destination's QEMU waits for the stream");
        }
    }

    pub fn refused(&self) {
        self.refused.store(true, Relaxed);
    }

    pub fn was_refused(&self) -> bool {
        self.refused.load(Relaxed)
    }

    /// Every connection's answer came, accepting.
    pub fn all(&self) -> bool {
        self.ready.load(Relaxed) >= self.connections
    }

    pub fn holds(&self, prefix: u64) -> bool {
        self.held.get().is_some_and(|h| h.contains(&prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_pages_count_once_listed_and_readiness_once_every_connection_answered() {
        let r = Readiness::new("vm", 2);
        assert!(!r.holds(7) && !r.all());
        r.accepted(&7u64.to_be_bytes());
        assert!(r.holds(7) && !r.holds(8) && !r.all());
        r.accepted(&[]);
        assert!(r.all() && r.holds(7), "an empty list leaves the first one");
        assert!(!r.was_refused());
        let early = Readiness::already("vm", 3, [9].into());
        assert!(early.all() && early.holds(9));
    }
}
