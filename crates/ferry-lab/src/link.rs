//! The model of one direction of an emulated WAN link, as mahimahi's mm-link + mm-delay apply it:
//! random loss, a drop-tail queue in front of a serialiser of fixed rate, then a fixed one-way
//! propagation delay (plus optional jitter that never reorders). Pure arithmetic on instants, so
//! it is tested without sockets and the forwarder only moves bytes.
use crate::units::QueueLimit;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The largest packet the lab carries (the TUN devices' MTU).
pub const MTU: usize = 1500;
/// A queue never holds fewer packets than this (about a switch port's buffer), so a 0 ms link
/// still absorbs a TCP burst.
const MIN_QUEUE_PACKETS: u64 = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    pub rtt: Duration,
    pub rate_bps: u64,
    pub loss: f64,
    pub jitter: Duration,
    pub queue: QueueLimit,
}

impl LinkParams {
    pub fn one_way_delay(&self) -> Duration {
        self.rtt / 2
    }

    /// The drop-tail limit in bytes (for `Packets`, the packet count is checked as well).
    pub fn queue_limit_bytes(&self) -> u64 {
        let floor = MIN_QUEUE_PACKETS * MTU as u64;
        let bytes_in = |d: Duration| (self.rate_bps as f64 / 8.0 * d.as_secs_f64()) as u64;
        match self.queue {
            QueueLimit::Bdp => bytes_in(self.rtt).max(floor),
            QueueLimit::Delay(d) => bytes_in(d).max(MTU as u64),
            QueueLimit::Packets(n) => n as u64 * MTU as u64,
        }
    }

    pub fn serialisation_time(&self, bytes: usize) -> Duration {
        Duration::from_nanos((bytes as u64 * 8 * 1_000_000_000) / self.rate_bps)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver to the far side at this instant.
    Deliver(Instant),
    DropLoss,
    DropQueue,
}

/// One direction's queue state. `admit` is called in arrival order.
pub struct LinkModel {
    params: LinkParams,
    limit_bytes: u64,
    limit_packets: Option<u64>,
    /// When the serialiser finishes the last admitted packet.
    busy_until: Instant,
    /// Finish times of the packets still waiting to be serialised (the queue proper).
    backlog: VecDeque<(Instant, u32)>,
    backlog_bytes: u64,
    last_delivery: Instant,
    rng: SmallRng,
}

impl LinkModel {
    pub fn new(params: LinkParams, seed: u64, now: Instant) -> Self {
        let limit_packets = match params.queue {
            QueueLimit::Packets(n) => Some(n as u64),
            _ => None,
        };
        LinkModel {
            limit_bytes: params.queue_limit_bytes(),
            limit_packets,
            params,
            busy_until: now,
            backlog: VecDeque::with_capacity(4096),
            backlog_bytes: 0,
            last_delivery: now,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn admit(&mut self, len: usize, now: Instant) -> Verdict {
        self.retire(now);
        if self.params.loss > 0.0 && self.rng.random::<f64>() < self.params.loss {
            return Verdict::DropLoss;
        }
        let over_bytes = self.backlog_bytes + len as u64 > self.limit_bytes;
        let over_packets = self.limit_packets.is_some_and(|n| self.backlog.len() as u64 >= n);
        if over_bytes || over_packets {
            return Verdict::DropQueue;
        }
        let start = self.busy_until.max(now);
        let finish = start + self.params.serialisation_time(len);
        self.busy_until = finish;
        self.backlog.push_back((finish, len as u32));
        self.backlog_bytes += len as u64;
        let mut delivery = finish + self.params.one_way_delay();
        if !self.params.jitter.is_zero() {
            let j = self.params.jitter.as_secs_f64();
            let offset = self.rng.random_range(-j..=j);
            delivery = if offset >= 0.0 {
                delivery + Duration::from_secs_f64(offset)
            } else {
                delivery.checked_sub(Duration::from_secs_f64(-offset)).unwrap_or(delivery).max(finish)
            };
        }
        // A real path does not reorder one flow's packets; jitter only stretches gaps.
        delivery = delivery.max(self.last_delivery);
        self.last_delivery = delivery;
        Verdict::Deliver(delivery)
    }

    /// Packets and bytes waiting to be serialised at `now`.
    pub fn queue_depth(&mut self, now: Instant) -> (u64, u64) {
        self.retire(now);
        (self.backlog.len() as u64, self.backlog_bytes)
    }

    fn retire(&mut self, now: Instant) {
        while let Some(&(finish, len)) = self.backlog.front() {
            if finish > now {
                break;
            }
            self.backlog.pop_front();
            self.backlog_bytes -= len as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rtt_ms: u64, rate_bps: u64, queue: QueueLimit) -> LinkParams {
        LinkParams { rtt: Duration::from_millis(rtt_ms), rate_bps, loss: 0.0, jitter: Duration::ZERO, queue }
    }

    #[test]
    fn idle_link_delivers_after_serialisation_plus_half_rtt() {
        let t0 = Instant::now();
        let mut link = LinkModel::new(params(100, 1_000_000_000, QueueLimit::Bdp), 1, t0);
        let Verdict::Deliver(at) = link.admit(1500, t0) else { panic!() };
        assert_eq!(at - t0, Duration::from_micros(12) + Duration::from_millis(50));
    }

    #[test]
    fn back_to_back_packets_are_spaced_by_the_rate() {
        let t0 = Instant::now();
        let mut link = LinkModel::new(params(0, 8_000_000, QueueLimit::Bdp), 1, t0);
        let mut last = t0;
        for i in 0..10 {
            let Verdict::Deliver(at) = link.admit(1000, t0) else { panic!() };
            assert_eq!(at - t0, Duration::from_millis(i + 1), "1000 B at 8 Mbit/s take 1 ms each");
            assert!(at >= last);
            last = at;
        }
        assert_eq!(link.queue_depth(t0), (10, 10_000));
        assert_eq!(link.queue_depth(t0 + Duration::from_millis(4)), (6, 6_000));
    }

    #[test]
    fn drop_tail_caps_the_backlog_at_the_limit() {
        let t0 = Instant::now();
        let mut link = LinkModel::new(params(0, 1_000_000, QueueLimit::Packets(5)), 1, t0);
        let verdicts: Vec<_> = (0..8).map(|_| link.admit(1500, t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| matches!(v, Verdict::Deliver(_))).count(), 5);
        assert_eq!(verdicts[5..], [Verdict::DropQueue; 3]);
        // Once the serialiser drained the queue, packets are admitted again.
        assert!(matches!(link.admit(1500, t0 + Duration::from_secs(1)), Verdict::Deliver(_)));
    }

    #[test]
    fn bdp_queue_is_rate_times_rtt_with_a_floor() {
        assert_eq!(params(120, 1_000_000_000, QueueLimit::Bdp).queue_limit_bytes(), 15_000_000);
        assert_eq!(params(0, 1_000_000_000, QueueLimit::Bdp).queue_limit_bytes(), 256 * 1500);
        let fifty_ms = params(0, 1_000_000_000, QueueLimit::Delay(Duration::from_millis(50)));
        assert_eq!(fifty_ms.queue_limit_bytes(), 6_250_000);
    }

    #[test]
    fn loss_rate_matches_configuration() {
        let t0 = Instant::now();
        let mut p = params(0, 100_000_000_000, QueueLimit::Packets(1_000_000));
        p.loss = 0.05;
        let mut link = LinkModel::new(p, 7, t0);
        let n = 200_000;
        let lost = (0..n).filter(|i| link.admit(100, t0 + Duration::from_micros(*i)) == Verdict::DropLoss).count();
        let expected = n as f64 * 0.05;
        let sigma = (n as f64 * 0.05 * 0.95).sqrt();
        assert!((lost as f64 - expected).abs() < 5.0 * sigma, "lost {lost} of {n}");
    }

    #[test]
    fn jitter_never_reorders_and_stays_in_bounds() {
        let t0 = Instant::now();
        let mut p = params(20, 1_000_000_000, QueueLimit::Bdp);
        p.jitter = Duration::from_millis(2);
        let mut link = LinkModel::new(p, 3, t0);
        let mut last = t0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            let Verdict::Deliver(at) = link.admit(100, now) else { panic!() };
            assert!(at >= last);
            assert!(at - now <= Duration::from_millis(12) + Duration::from_micros(2));
            last = at;
        }
    }
}
