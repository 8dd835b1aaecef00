//! Reachability prober: a UDP datagram to an echo service every `interval`; the longest gap
//! between replies is the downtime a client sees (how the research measured it, with pings).
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"FPRB";
/// A gap between replies worth listing (s): five probes unanswered.
const LONG_GAP: f64 = 0.05;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeReport {
    pub target: String,
    pub interval_ms: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub rtt_median_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    /// Longest time between two consecutive replies (after the first reply).
    pub longest_gap_ms: Option<f64>,
    /// When that gap began, seconds after the probe started.
    pub longest_gap_at_s: Option<f64>,
    /// Every gap between replies over 50 ms: (began, seconds after the probe started; length,
    /// ms). Tells a pause at switchover from a guest slowed before it.
    #[serde(default)]
    pub long_gaps: Vec<(f64, f64)>,
}

pub fn run_probe(target: SocketAddr, interval: Duration, duration: Duration) -> Result<ProbeReport> {
    run_probe_until(target, interval, duration, Arc::new(AtomicBool::new(false)))
}

/// Like `run_probe`, but stops sending once `stop` is set (or `duration` is up), waits a second
/// for replies still in flight, and reports what it saw: for probing something whose end is not
/// known in advance, such as a migration.
pub fn run_probe_until(target: SocketAddr, interval: Duration, duration: Duration, stop: Arc<AtomicBool>) -> Result<ProbeReport> {
    let sock = Arc::new(UdpSocket::bind("0.0.0.0:0").context("binding the probe socket")?);
    sock.connect(target)?;
    let start = Instant::now();
    let sender = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || -> u64 {
            crate::sys::tighten_timer_slack();
            let mut seq = 0u64;
            let mut pkt = [0u8; 20];
            pkt[..4].copy_from_slice(MAGIC);
            while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                let due = start + interval * seq as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                pkt[4..12].copy_from_slice(&seq.to_be_bytes());
                pkt[12..20].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
                // Unreachable is expected while the guest moves: keep probing.
                let _ = sock.send(&pkt);
                seq += 1;
            }
            seq
        })
    };
    let mut rtts = Vec::new();
    let mut replies: Vec<f64> = Vec::new();
    let mut buf = [0u8; 64];
    let mut stop_at = start + duration + Duration::from_secs(1);
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    while Instant::now() < stop_at {
        if stop.load(Ordering::Relaxed) {
            stop_at = stop_at.min(Instant::now() + Duration::from_secs(1));
        }
        let Ok(n) = sock.recv(&mut buf) else { continue };
        if n < 20 || &buf[..4] != MAGIC {
            continue;
        }
        let now = start.elapsed();
        let sent_ns = u64::from_be_bytes(buf[12..20].try_into().unwrap());
        rtts.push(now.as_secs_f64() * 1e3 - sent_ns as f64 / 1e6);
        replies.push(now.as_secs_f64());
    }
    let sent = sender.join().expect("probe sender");
    let probed = (interval * sent as u32).min(duration);
    Ok(summarise(target, interval, probed, sent, &rtts, &replies))
}

fn summarise(target: SocketAddr, interval: Duration, duration: Duration, sent: u64, rtts: &[f64], replies: &[f64]) -> ProbeReport {
    let mut sorted = rtts.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let gap = replies.windows(2).map(|w| (w[1] - w[0], w[0])).max_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    ProbeReport {
        target: target.to_string(),
        interval_ms: interval.as_secs_f64() * 1e3,
        duration_s: duration.as_secs_f64(),
        sent,
        received: rtts.len() as u64,
        lost: sent.saturating_sub(rtts.len() as u64),
        rtt_median_ms: sorted.get(sorted.len() / 2).copied(),
        rtt_max_ms: sorted.last().copied(),
        longest_gap_ms: gap.map(|g| g.0 * 1e3),
        longest_gap_at_s: gap.map(|g| g.1),
        long_gaps: replies.windows(2).filter(|w| w[1] - w[0] > LONG_GAP).map(|w| (w[0], (w[1] - w[0]) * 1e3)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_echo_over_loopback_and_a_gap_when_it_pauses() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut buf = [0u8; 64];
            loop {
                let Ok((n, from)) = echo.recv_from(&mut buf) else { return };
                // Silent between 300 and 500 ms: a 200 ms outage.
                let t = started.elapsed();
                if t < Duration::from_millis(300) || t > Duration::from_millis(500) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        });
        let r = run_probe(addr, Duration::from_millis(10), Duration::from_millis(900)).unwrap();
        assert!((85..=92).contains(&r.sent), "sent {}", r.sent);
        assert!(r.lost >= 15 && r.lost <= 25, "about 20 probes fall in the outage: lost {}", r.lost);
        let gap = r.longest_gap_ms.unwrap();
        assert!((190.0..260.0).contains(&gap), "gap {gap} ms");
        assert!(r.rtt_median_ms.unwrap() < 5.0);
    }

    #[test]
    fn stops_early_when_told_and_reports_what_it_saw() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        let r = run_probe_until(addr, Duration::from_millis(10), Duration::from_secs(30), stop).unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!((25..=40).contains(&r.sent), "sent {}", r.sent);
        assert_eq!(r.lost, 0);
        assert!(r.duration_s < 1.0, "{}", r.duration_s);
    }
}
