//! The bandwidth QEMU plans its switchover with. QEMU stops the VM once what it has left to send
//! would take `downtime-limit` at the rate its socket drained lately. Through ferry that rate is
//! not the WAN's: a page the destination holds drains as a 33-byte reference, so a stream rich
//! in references (a return trip) reads as several times the link. What is left at the stop is
//! the pages the guest dirtied last — new content, which must cross whole, compressed. So QEMU
//! is told the rate such pages cross at: the path's rate over what a batch costs on the wire
//! per byte encoded.

/// Until this much has been encoded, batches are taken to cost their size on the wire.
const MEASURED_AFTER: u64 = 8 << 20;
/// Compression never counts for more than this (a guest of zeros would otherwise claim an
/// unbounded rate).
const MIN_WIRE_SHARE: f64 = 0.1;
/// A new figure is told to QEMU only when it moved by more than this share.
const RETELL: f64 = 0.1;

/// Stream bytes per second that pages the destination lacks cross at, on a path of `path_bps`
/// bits per second, given the batches encoded and compressed so far.
pub fn rate(path_bps: u64, encoded: u64, compressed: u64) -> u64 {
    let share = if encoded < MEASURED_AFTER { 1.0 } else { (compressed as f64 / encoded as f64).clamp(MIN_WIRE_SHARE, 1.0) };
    (path_bps as f64 / 8.0 / share) as u64
}

/// Whether `new` differs enough from what QEMU was told last to tell it again.
pub fn worth_telling(told: Option<u64>, new: u64) -> bool {
    told.is_none_or(|t| (new as f64 - t as f64).abs() > RETELL * t as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cross_at_the_path_rate_over_their_wire_share() {
        // Nothing measured yet: the path's rate, in bytes.
        assert_eq!(rate(1_000_000_000, 0, 0), 125_000_000);
        // Batches compressed to 62.5 %: 200 MB/s of stream on a 1 Gbit/s path.
        assert_eq!(rate(1_000_000_000, 400 << 20, 250 << 20), 200_000_000);
        // Batches that do not compress cross at the path's rate.
        assert_eq!(rate(1_000_000_000, 100 << 20, 101 << 20), 125_000_000);
        // A guest of zeros cannot claim more than ten times the path.
        assert_eq!(rate(1_000_000_000, 100 << 20, 1 << 20), 1_250_000_000);
    }

    #[test]
    fn qemu_is_told_again_only_when_the_figure_moved() {
        assert!(worth_telling(None, 100));
        assert!(!worth_telling(Some(100), 105));
        assert!(worth_telling(Some(100), 120));
        assert!(worth_telling(Some(100), 80));
    }
}
