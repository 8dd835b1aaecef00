//! Measuring the path on new warm connections. A new TCP connection starts at ten segments and
//! doubles its window each round trip: at 200 ms on a 1 Gbit/s link that ramp takes about two
//! seconds, the larger part of a transfer that could otherwise take three. Before a pool's
//! connections carry their first session they send filler, all at once, until BBR (their
//! congestion control) estimates the link's rate for them together, or leaves its start-up
//! phase on a slower path. BBR keeps what it measured while a connection idles, so the first
//! session starts at the path's rate, as later sessions on returned connections do. The cost is
//! WAN traffic of about two bandwidth-delay products when a pool connects, never during a
//! session.
use crate::session::BoxStream;
use crate::warm::IdleConn;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ferry_proto::Message;
use ferry_transfer::wire::Conn;
use futures::{SinkExt, StreamExt};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

static FILLER: [u8; 256 << 10] = [0; 256 << 10];

/// While filler flows the socket takes little more than this beyond what is in flight, so
/// filler stops within a round trip of the estimate reaching its goal: with the whole 4 MiB
/// send buffer queued, every connection would send 4 MiB more than the measure needs.
const FILLER_QUEUE: libc::c_int = 512 << 10;

/// `TCP_NOTSENT_LOWAT`; 0 restores the system's default.
fn set_unsent_limit(fd: RawFd, bytes: libc::c_int) {
    // SAFETY: an int option on the connection's own socket.
    unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, (&bytes as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
}

/// What the probe of a pool's new connections found.
pub struct PathMeasure {
    /// The sum of the connections' rate estimates, bit/s.
    pub rate_bps: u64,
    pub filler_bytes: u64,
    pub took: Duration,
}

/// Sends filler on every connection at once (they share the path as a session's connections
/// do) until together they have found the rate. `None` where BBR is not in use: other
/// congestion controls fall back to slow start after idle time, so filler would buy nothing.
pub async fn measure(conns: &mut [IdleConn], rtt: Duration, link_rate_bps: u64) -> Result<Option<PathMeasure>> {
    if conns.is_empty() || conns.iter().any(|c| crate::bbr::info(c.fd).is_none()) {
        return Ok(None);
    }
    let t = Instant::now();
    let share = link_rate_bps / 8 / conns.len() as u64;
    // Start-up overshoots its share for a few round trips before it settles: the budget is a
    // bound for a path slower than configured, not the expected cost.
    let budget = (share as f64 * rtt.as_secs_f64() * 8.0) as u64 + (4 << 20);
    let until = t + (rtt * 40).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let estimates: Vec<AtomicU64> = conns.iter().map(|_| AtomicU64::new(0)).collect();
    let goal = Goal { estimates: &estimates, rate: link_rate_bps / 8 * 9 / 10 };
    let ramps = conns.iter_mut().enumerate().map(|(i, c)| ramp(&mut c.conn, c.fd, &goal, i, budget, until));
    let mut measure = PathMeasure { rate_bps: 0, filler_bytes: 0, took: Duration::ZERO };
    for r in futures::future::join_all(ramps).await {
        let (sent, bw) = r?;
        measure.filler_bytes += sent;
        measure.rate_bps += bw * 8;
    }
    measure.took = t.elapsed();
    Ok(Some(measure))
}

/// When the connections have measured enough: together they reach the link's rate. Each one's
/// share of it is uneven while they ramp, and waiting for every one to settle (BBR leaves
/// start-up after three round trips without growth) would send that much more filler.
struct Goal<'a> {
    estimates: &'a [AtomicU64],
    rate: u64,
}

impl Goal<'_> {
    fn reached(&self, index: usize, estimate: u64) -> bool {
        self.estimates[index].store(estimate, Relaxed);
        self.estimates.iter().map(|e| e.load(Relaxed)).sum::<u64>() >= self.rate
    }
}

/// One connection's ramp; returns the filler it sent and its rate estimate (bytes/s) once the
/// filler has crossed.
async fn ramp(conn: &mut Conn<BoxStream>, fd: RawFd, goal: &Goal<'_>, index: usize, budget: u64, until: Instant) -> Result<(u64, u64)> {
    let nonce = index as u64;
    const STALL: Duration = Duration::from_secs(5);
    let filler = Message::Filler { data: Bytes::from_static(&FILLER) };
    let mut sent = 0u64;
    set_unsent_limit(fd, FILLER_QUEUE);
    let sending = async {
        while sent < budget && Instant::now() < until {
            tokio::time::timeout(STALL, conn.send(filler.clone())).await.context("filler stalled: link cut?")??;
            sent += FILLER.len() as u64;
            let info = crate::bbr::info(fd).context("congestion control changed")?;
            if !info.starting_up() || goal.reached(index, info.bw()) {
                break;
            }
        }
        anyhow::Ok(())
    };
    let sent_all = sending.await;
    set_unsent_limit(fd, 0);
    sent_all?;
    // The answer follows the filler: once it is here, so is every byte of filler.
    conn.send(Message::Ping { nonce }).await?;
    loop {
        match tokio::time::timeout(STALL, conn.next()).await.context("no answer after the filler: link cut?")? {
            Some(Ok(Message::Pong { nonce: n })) if n == nonce => break,
            Some(Ok(Message::Pong { .. } | Message::Ping { .. })) => {}
            Some(Ok(other)) => bail!("unexpected {} while measuring the path", other.kind()),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the peer closed the connection while it was measured"),
        }
    }
    Ok((sent, crate::bbr::info(fd).map_or(0, |i| i.bw())))
}
