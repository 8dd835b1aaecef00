//! How much of QEMU's stream may be on its way between the two QEMUs. QEMU decides when to stop
//! the VM from how fast its socket drains; bytes parked in queues (a page reference is 33 bytes
//! on the wire for 4096 of stream) would make it think the path is faster than it is, and then
//! everything parked must drain while the VM is stopped. So the source lets out only what the
//! destination has nearly caught up with: a little over one round trip of the rate at which the
//! destination QEMU actually takes the stream: the best rate of a round trip in the last half
//! second. (The rate over the whole half second lagged: the window starts at 16 MiB, which is
//! 84 MB/s at 200 ms, and each step of its growth waited for the slower past to leave the
//! measure. The last round trip's alone dips with every stall and shuts the window with it.)
//!
//! Growing by a quarter per round trip from 16 MiB took five round trips to reach the rate the
//! agents carry (logged at 200 ms: 1.2 s to reach 230 MB/s of stream), and the first rate came
//! a round trip late when the first window's acknowledgements arrived together. So the window
//! starts as TCP's slow start does: every acknowledged byte lets two more go, which doubles the
//! window each round trip, until a round trip's best rate grows by less than a quarter over the
//! one before; from then on it is the quarter's margin over the best rate. A large window costs
//! nothing at the start: QEMU cannot switch over before its first pass is done.
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Never less than this in flight: enough for full speed on a short path.
const FLOOR: u64 = 16 << 20;
/// The window over the measured rate × RTT: room to grow when the window was the limit.
const GROWTH: f64 = 1.25;
/// A tightened window's margin over one round trip of the rate (see `tighten`).
const TIGHT_MARGIN: u64 = 1 << 20;
/// How far back the best rate counts.
const SPAN: Duration = Duration::from_millis(500);
/// What one rate is measured over, at least: one round trip, but not so short that a burst of
/// acknowledgements reads as a rate.
const MIN_SPAN: Duration = Duration::from_millis(50);

pub struct StreamWindow {
    state: Mutex<State>,
    changed: Condvar,
    rtt: Duration,
}

struct State {
    sent: u64,
    written: u64,
    limit: u64,
    closed: bool,
    samples: VecDeque<(Instant, u64)>,
    /// Rates measured over a round trip each, and when.
    rates: VecDeque<(Instant, f64)>,
    start: Option<Start>,
    tight: bool,
}

/// The window's start: the best rate of the round trip before and of this one, which began at
/// `since`.
struct Start {
    since: Option<Instant>,
    before: f64,
    best: f64,
}

impl StreamWindow {
    pub fn new(rtt: Duration) -> StreamWindow {
        StreamWindow { state: Mutex::new(State { sent: 0, written: 0, limit: FLOOR, closed: false, samples: VecDeque::new(), rates: VecDeque::new(), start: Some(Start { since: None, before: 0.0, best: 0.0 }), tight: false }), changed: Condvar::new(), rtt: rtt.max(Duration::from_millis(10)) }
    }

    /// Waits until `len` more stream bytes may go; false once the window is closed. A batch
    /// always goes when nothing is outstanding, however large.
    pub fn acquire(&self, len: u64) -> bool {
        let mut s = self.state.lock().unwrap();
        while !s.closed && s.sent > s.written && s.sent + len - s.written > s.limit {
            s = self.changed.wait(s).unwrap();
        }
        s.sent += len;
        !s.closed
    }

    /// The destination has written `written` stream bytes into its QEMU.
    pub fn acked(&self, written: u64) {
        let mut s = self.state.lock().unwrap();
        if written <= s.written {
            return;
        }
        let acked = written - s.written;
        s.written = written;
        if s.start.is_some() {
            s.limit += acked;
        }
        let now = Instant::now();
        s.samples.push_back((now, written));
        let round_trip = self.rtt.max(MIN_SPAN);
        while s.samples.len() > 2 && now - s.samples[1].0 >= round_trip {
            s.samples.pop_front();
        }
        let (t0, w0) = s.samples[0];
        let span = (now - t0).as_secs_f64();
        if span >= MIN_SPAN.as_secs_f64() {
            let rate = (written - w0) as f64 / span;
            s.rates.push_back((now, rate));
            while s.rates.front().is_some_and(|(at, _)| now - *at > SPAN) {
                s.rates.pop_front();
            }
            let started = match s.start.as_mut() {
                None => true,
                Some(st) => {
                    let since = *st.since.get_or_insert(now);
                    if now - since < round_trip {
                        st.best = st.best.max(rate);
                        false
                    } else if st.best < st.before * GROWTH {
                        true
                    } else {
                        *st = Start { since: Some(now), before: st.best, best: rate };
                        false
                    }
                }
            };
            if started {
                s.start = None;
                s.limit = self.settled_limit(&s);
            }
        }
        self.changed.notify_all();
    }

    fn settled_limit(&self, s: &State) -> u64 {
        let best = s.rates.iter().map(|(_, r)| *r).fold(0.0, f64::max);
        let round_trip = best * self.rtt.as_secs_f64();
        if s.tight {
            round_trip as u64 + TIGHT_MARGIN
        } else {
            FLOOR.max((GROWTH * round_trip) as u64 + FLOOR / 4)
        }
    }

    /// For post-copy: a vCPU at the destination that faults on a page waits for it, and the
    /// page queues behind everything in flight (at the switch of a 100 ms move, 33 MB: 0.26 s
    /// of a 1 Gbit/s link). From now on the window is one round trip of the best rate plus
    /// 1 MiB, with neither margin nor floor: the link stays about as busy, and a fault waits
    /// little more than a round trip.
    pub fn tighten(&self) {
        let mut s = self.state.lock().unwrap();
        s.tight = true;
        s.start = None;
        s.limit = self.settled_limit(&s);
        self.changed.notify_all();
    }

    /// Whether the window still grows with every acknowledgement.
    pub fn starting(&self) -> bool {
        self.state.lock().unwrap().start.is_some()
    }

    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.changed.notify_all();
    }

    /// Stream bytes sent that the destination has not yet written into its QEMU.
    pub fn in_flight(&self) -> u64 {
        let s = self.state.lock().unwrap();
        s.sent.saturating_sub(s.written)
    }

    pub fn limit(&self) -> u64 {
        self.state.lock().unwrap().limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_window_holds_the_sender_until_the_destination_catches_up_and_grows_with_the_rate() {
        let w = Arc::new(StreamWindow::new(Duration::from_millis(100)));
        assert!(w.acquire(FLOOR));
        let blocked = {
            let w = w.clone();
            std::thread::spawn(move || w.acquire(1 << 20))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!blocked.is_finished(), "the window is full");
        w.acked(1 << 20);
        assert!(blocked.join().unwrap());
        // 400 MB/s taken by the destination over 100 ms of RTT: the window, still starting,
        // grows by what was taken (16 MiB + 49 MB).
        let start = 1 << 20;
        for i in 1..=6u64 {
            std::thread::sleep(Duration::from_millis(20));
            w.acked(start + i * 8_000_000);
        }
        assert_eq!(w.limit(), FLOOR + start + 48_000_000);
        w.close();
        assert!(!w.acquire(u64::MAX / 4), "a closed window lets the pump stop");
    }

    #[test]
    fn the_window_starts_growing_with_every_acknowledgement_until_the_rate_stops_growing() {
        let w = StreamWindow::new(Duration::from_millis(100));
        let mut written = 0;
        // Round trips at 100, 200 and 400 MB/s: the window takes one byte more for each acknowledged.
        for bytes in [1_000_000u64, 2_000_000, 4_000_000] {
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(10));
                written += bytes;
                w.acked(written);
            }
        }
        assert!(w.starting(), "the rate doubled every round trip");
        assert_eq!(w.limit(), FLOOR + written);
        // Round trips more at 400 MB/s: the start ends, the window is the quarter's margin over
        // the best rate (400 MB/s × 100 ms × 1.25 + 4 MiB, about 54 MB; less where a busy
        // machine's sleeps run long).
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(10));
            written += 4_000_000;
            w.acked(written);
        }
        assert!(!w.starting(), "the rate stopped growing");
        let limit = w.limit();
        assert!(limit > 30_000_000 && limit < 70_000_000, "limit {limit}");
    }

    #[test]
    fn a_tightened_window_is_one_round_trip_of_the_rate_and_a_little() {
        let w = StreamWindow::new(Duration::from_millis(100));
        let mut written = 0;
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(10));
            written += 1_000_000;
            w.acked(written);
        }
        w.tighten();
        assert!(!w.starting());
        // About 100 MB/s × 100 ms + 1 MiB (less where a busy machine's sleeps run long).
        let limit = w.limit();
        assert!(limit > TIGHT_MARGIN && limit < 12_000_000, "limit {limit}");
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(10));
            written += 1_000_000;
            w.acked(written);
        }
        assert!(w.limit() < 12_000_000, "it stays tight: {}", w.limit());
    }

    #[test]
    fn the_window_follows_the_best_round_trip_of_the_last_half_second() {
        let w = StreamWindow::new(Duration::from_millis(100));
        let mut written = 0;
        // Half a second at 100 MB/s, then 150 ms at 400 MB/s.
        for (steps, bytes) in [(25, 2_000_000u64), (15, 8_000_000)] {
            for _ in 0..steps {
                std::thread::sleep(Duration::from_millis(20));
                written += bytes;
                w.acked(written);
            }
        }
        // 400 MB/s × 100 ms × 1.25 + 4 MiB: about 54 MB. Over the half second the rate would
        // read about 220 MB/s, and the window 32 MB.
        let limit = w.limit();
        assert!(limit > 44_000_000, "limit {limit}");
        // A stall of a round trip does not shut the window.
        std::thread::sleep(Duration::from_millis(120));
        w.acked(written + 1_000_000);
        assert!(w.limit() > 44_000_000, "limit {} after a stall", w.limit());
    }
}
