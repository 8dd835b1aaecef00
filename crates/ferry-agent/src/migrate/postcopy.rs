//! When a move made with `--postcopy` switches to post-copy. Pre-copy sends a page again each
//! time the guest dirties it: once the guest dirties memory about as fast as its pages cross
//! the path, the passes stop shrinking and what is left never fits a short pause. Post-copy
//! stops the VM once, runs it at the destination at once, and sends every page at most once
//! more; a page the guest touches before it arrived is fetched (a round trip, while that vCPU
//! waits).
//!
//! The switch waits for the first full pass: the pages the guest leaves alone are at the
//! destination by then, so only its working set can fault. It also waits for the stream's
//! window to tighten (`StreamWindow::tighten`), so that neither the devices' state nor the
//! pages the destination faults on queue behind a window's worth of pages.
//!
//! What it costs: from the switch until the last page arrives, the VM's state is split between
//! the sites. A cut link then pauses it at both (QEMU's `postcopy-paused`); neither copy may be
//! ended, and the move resumes in a new session (`resume.rs`). A destination QEMU that dies
//! meanwhile takes the VM with it.
use std::time::Duration;

/// The guest dirties at least this share of the rate its pages cross at: each pass shrinks
/// what is left by less than a fifth, and pre-copy would take many more passes to converge.
pub const OUTRUN_SHARE: f64 = 0.8;
/// Pre-copy that has not converged by then switches, whatever the rates say.
pub const AT_MOST: Duration = Duration::from_secs(20);

/// How long the switch waits for what is in flight to drain to the tightened window.
pub const DRAIN_AT_MOST: Duration = Duration::from_secs(1);

/// What the source QEMU's `query-migrate` says, in the units the rule needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Dirty-bitmap syncs so far: the first full pass is done from 2 on.
    pub passes: u64,
    /// Bytes the guest dirties per second, as QEMU measured it at its last sync.
    pub dirty_bytes_per_s: f64,
}

impl Progress {
    pub fn from_query(m: &serde_json::Value) -> Progress {
        let ram = &m["ram"];
        Progress {
            passes: ram["dirty-sync-count"].as_u64().unwrap_or(0),
            dirty_bytes_per_s: ram["dirty-pages-rate"].as_f64().unwrap_or(0.0) * ram["page-size"].as_f64().unwrap_or(4096.0),
        }
    }
}

/// Whether to switch now, given how long pre-copy has been free to converge and the rate (stream
/// bytes per second) at which dirtied pages cross the path (`switchover::rate`).
pub fn due(p: Progress, stream_rate: u64, converging_for: Duration) -> bool {
    p.passes >= 2 && (p.dirty_bytes_per_s >= OUTRUN_SHARE * stream_rate as f64 || converging_for >= AT_MOST)
}

/// The source QEMU's migration status while post-copy is under way: neither copy of the VM
/// is whole, so neither may be ended or restarted.
pub fn split_between_sites(status: &str) -> bool {
    status.starts_with("postcopy")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u64 = 250_000_000;

    #[test]
    fn switches_once_the_first_pass_is_done_and_the_guest_outruns_the_path() {
        let outrunning = Progress { passes: 2, dirty_bytes_per_s: 0.9 * RATE as f64 };
        assert!(due(outrunning, RATE, Duration::from_secs(1)));
        // Still in the first pass: what the guest never touches is not there yet.
        assert!(!due(Progress { passes: 1, ..outrunning }, RATE, Duration::from_secs(1)));
        // A guest that dirties half the rate converges by pre-copy, in a few passes.
        let converging = Progress { passes: 3, dirty_bytes_per_s: 0.5 * RATE as f64 };
        assert!(!due(converging, RATE, Duration::from_secs(5)));
        assert!(due(converging, RATE, AT_MOST), "pre-copy that has not converged by then switches");
    }

    #[test]
    fn reads_the_dirty_rate_in_bytes_from_qemu_pages() {
        let m = serde_json::json!({"ram": {"dirty-sync-count": 3, "dirty-pages-rate": 1000, "page-size": 4096}});
        let p = Progress::from_query(&m);
        assert_eq!(p.passes, 3);
        assert_eq!(p.dirty_bytes_per_s, 4_096_000.0);
        assert!(split_between_sites("postcopy-active") && split_between_sites("postcopy-paused"));
        assert!(!split_between_sites("active") && !split_between_sites("completed"));
    }
}
