//! How much of QEMU's stream may be on its way between the two QEMUs. QEMU decides when to stop
//! the VM from how fast its socket drains; bytes parked in queues (a page reference is 33 bytes
//! on the wire for 4096 of stream) would make it think the path is faster than it is, and then
//! everything parked must drain while the VM is stopped. So the source lets out only what the
//! destination has nearly caught up with: a little over one round trip of the rate at which the
//! destination QEMU actually takes the stream.
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Never less than this in flight: enough for full speed on a short path.
const FLOOR: u64 = 16 << 20;
/// The window over the measured rate × RTT: room to grow when the window was the limit.
const GROWTH: f64 = 1.25;
/// How far back the rate is measured.
const SPAN: Duration = Duration::from_millis(500);

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
}

impl StreamWindow {
    pub fn new(rtt: Duration) -> StreamWindow {
        StreamWindow { state: Mutex::new(State { sent: 0, written: 0, limit: FLOOR, closed: false, samples: VecDeque::new() }), changed: Condvar::new(), rtt: rtt.max(Duration::from_millis(10)) }
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
        s.written = written;
        let now = Instant::now();
        s.samples.push_back((now, written));
        while s.samples.len() > 2 && now - s.samples[1].0 >= SPAN {
            s.samples.pop_front();
        }
        let (t0, w0) = s.samples[0];
        let span = (now - t0).as_secs_f64();
        if span >= 0.05 {
            let rate = (written - w0) as f64 / span;
            s.limit = FLOOR.max((GROWTH * rate * self.rtt.as_secs_f64()) as u64 + FLOOR / 4);
        }
        self.changed.notify_all();
    }

    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.changed.notify_all();
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
        // 400 MB/s taken by the destination over 100 ms of RTT: the window follows.
        let start = 1 << 20;
        for i in 1..=6u64 {
            std::thread::sleep(Duration::from_millis(20));
            w.acked(start + i * 8_000_000);
        }
        let limit = w.limit();
        assert!(limit > 40_000_000 && limit < 80_000_000, "limit {limit}");
        w.close();
        assert!(!w.acquire(u64::MAX / 4), "a closed window lets the pump stop");
    }
}
