//! Warm connections: an agent keeps mutually authenticated connections open to each peer site
//! it knows, so a transfer starts on connections whose TCP and TLS handshakes are already done
//! (as an IPsec tunnel is set up before traffic flows). Idle connections are pinged so neither
//! side's idle limit closes them; a connection that fails is replaced.
use crate::config::AgentConfig;
use crate::session::{connections_for, dial, BoxStream, CounterSlot, Identity};
use ferry_proto::{FrameCodec, Message};
use ferry_transfer::wire::{self, Conn};
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::codec::Framed;

pub struct IdleConn {
    pub conn: Conn<BoxStream>,
    pub counter: Arc<CounterSlot>,
    /// The TCP socket under `conn` (valid while it lives), for its congestion control.
    pub fd: RawFd,
    /// When the peer last answered on it. Over a cut link a ping is still "sent" (into the
    /// socket's buffer) for minutes: only answers show the connection works.
    pub heard: std::time::Instant,
}

impl IdleConn {
    pub fn new(conn: Conn<BoxStream>, counter: Arc<CounterSlot>, fd: RawFd) -> IdleConn {
        IdleConn { conn, counter, fd, heard: std::time::Instant::now() }
    }
}

/// An idle connection unanswered this long (pings go every second) is dropped, not handed out.
const STALE: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct PeerPool {
    idle: tokio::sync::Mutex<Vec<IdleConn>>,
    /// The smallest TCP handshake time seen: the path's RTT.
    rtt: Mutex<Option<Duration>>,
    /// The path's rate as the last probe of new connections found it (bit/s).
    rate_bps: Mutex<Option<u64>>,
    /// How many connections the pool keeps ready.
    target: std::sync::atomic::AtomicUsize,
    /// Taken by sessions that may give them back: the pool does not replace those meanwhile.
    leased: std::sync::atomic::AtomicUsize,
    refill: tokio::sync::Notify,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub ready: usize,
    pub wanted: usize,
    pub rtt_ms: Option<f64>,
    /// The rate the connections' congestion control measured (see `path_probe`).
    #[serde(default)]
    pub rate_mbps: Option<f64>,
}

pub struct Warm {
    peers: BTreeMap<String, Arc<PeerPool>>,
}

impl Warm {
    /// Starts keeping connections to every configured peer.
    pub fn start(cfg: Arc<AgentConfig>, identity: Arc<Identity>) -> Arc<Warm> {
        let peers: BTreeMap<String, Arc<PeerPool>> = cfg.peers.keys().map(|p| (p.clone(), Arc::new(PeerPool::default()))).collect();
        for (site, pool) in &peers {
            tokio::spawn(maintain(cfg.clone(), identity.clone(), site.clone(), pool.clone()));
        }
        Arc::new(Warm { peers })
    }

    /// Up to `n` ready connections to `site` (fewer, or none, if the pool has not filled).
    pub async fn take(&self, site: &str, n: usize) -> (Vec<IdleConn>, Option<Duration>) {
        let Some(pool) = self.peers.get(site) else { return (Vec::new(), None) };
        let taken: Vec<IdleConn> = {
            let mut idle = pool.idle.lock().await;
            let k = idle.len().min(n);
            idle.drain(..k).collect()
        };
        for c in &taken {
            crate::bbr::restart(c.fd);
        }
        pool.refill.notify_one();
        (taken, *pool.rtt.lock().unwrap())
    }

    /// The pool of `site`, for a lease on connections taken from it (see `PeerPool::lease`).
    pub fn pool(&self, site: &str) -> Option<Arc<PeerPool>> {
        self.peers.get(site).cloned()
    }

    pub fn rtt(&self, site: &str) -> Option<Duration> {
        self.peers.get(site).and_then(|p| *p.rtt.lock().unwrap())
    }

    /// The path's rate to `site` as its last probe measured it (bit/s).
    pub fn rate_bps(&self, site: &str) -> Option<u64> {
        self.peers.get(site).and_then(|p| *p.rate_bps.lock().unwrap())
    }

    /// Ready connections per peer site, and how many the path calls for.
    pub async fn status(&self, link_rate_bps: u64) -> BTreeMap<String, PeerStatus> {
        let mut out = BTreeMap::new();
        for (site, pool) in &self.peers {
            let rtt = *pool.rtt.lock().unwrap();
            let ready = pool.idle.lock().await.len();
            let rate_mbps = pool.rate_bps.lock().unwrap().map(|r| r as f64 / 1e6);
            out.insert(site.clone(), PeerStatus { ready, wanted: rtt.map_or(0, |r| pool_size(link_rate_bps, r)), rtt_ms: rtt.map(|r| r.as_secs_f64() * 1e3), rate_mbps });
        }
        out
    }
}

/// Connections out on a session that may bring them back: while it runs the pool does not dial
/// replacements (their handshakes would compete with the transfer, and the pool would then hold
/// more than it wants). Ending the lease without giving them back has the pool refill.
pub struct PoolLease {
    pool: Arc<PeerPool>,
    count: usize,
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        self.pool.leased.fetch_sub(self.count, std::sync::atomic::Ordering::Relaxed);
        self.pool.refill.notify_one();
    }
}

impl PoolLease {
    /// Connections the session is done with, first in line for the next (see
    /// `session::Lease`). The pool keeps no more than it wants: the connections that never
    /// carried a session go first.
    pub async fn give_back(&self, conns: Vec<IdleConn>) {
        let mut idle = self.pool.idle.lock().await;
        let target = idle.len().max(self.pool.target.load(std::sync::atomic::Ordering::Relaxed));
        idle.splice(0..0, conns);
        idle.truncate(target);
    }
}

impl PeerPool {
    pub fn lease(self: &Arc<Self>, count: usize) -> PoolLease {
        self.leased.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        PoolLease { pool: self.clone(), count }
    }
}

/// Two transfers' sets and one more: a live move with disks runs its bulk pass and its RAM
/// stream at once, each on a full set (a connection dialled then starts from TCP's initial
/// window: at 100 ms, four of the stream's five did, and for its first second the RAM hardly
/// moved), and the question a move asks first (does the destination run this VM?) takes none
/// of them.
fn pool_size(link_rate_bps: u64, rtt: Duration) -> usize {
    2 * connections_for(link_rate_bps, rtt) + 1
}

async fn maintain(cfg: Arc<AgentConfig>, identity: Arc<Identity>, site: String, pool: Arc<PeerPool>) {
    let Ok(addr) = cfg.peer(&site) else { return };
    let mut failures = 0u32;
    // Dialled, not yet measured: they join the pool together once it is full.
    let mut fresh: Vec<IdleConn> = Vec::new();
    let mut probe = !cfg.no_path_probe;
    loop {
        let rtt = *pool.rtt.lock().unwrap();
        let target = rtt.map_or(2, |r| pool_size(cfg.link_rate_bps, r));
        pool.target.store(target, std::sync::atomic::Ordering::Relaxed);
        let have = pool.idle.lock().await.len() + pool.leased.load(std::sync::atomic::Ordering::Relaxed) + fresh.len();
        if have < target {
            let dials = (have..target).map(|_| dial(&identity, &site, addr));
            let mut added = 0;
            for r in futures::future::join_all(dials).await {
                match r {
                    Ok((stream, slot, handshake, fd)) => {
                        {
                            let mut best = pool.rtt.lock().unwrap();
                            *best = Some(best.map_or(handshake, |b| b.min(handshake)));
                        }
                        fresh.push(IdleConn::new(Framed::new(stream, FrameCodec), slot, fd));
                        added += 1;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(60) {
                            tracing::warn!(to = %site, "cannot keep a connection ready: {e:#}");
                        }
                    }
                }
            }
            if added > 0 {
                if failures > 0 {
                    tracing::info!(to = %site, "connections to the peer are ready again");
                }
                failures = 0;
                continue; // the RTT may now call for more
            }
        }
        if !fresh.is_empty() {
            // Only a pool starting afresh (the agent started, or the link took every connection)
            // measures the path. A refill after a session that kept its connections (a
            // migration) does not: filler after every move would cost more WAN traffic than
            // the moves' slow starts save.
            let afresh = pool.idle.lock().await.is_empty() && pool.leased.load(std::sync::atomic::Ordering::Relaxed) == 0;
            let measure = probe && afresh;
            probe = !cfg.no_path_probe;
            if measure && !measured(&cfg, &site, &pool, &mut fresh).await {
                // Its connections are gone. The next set goes unmeasured, so that a peer that
                // cannot be measured (one that refuses filler) still gets connections.
                fresh.clear();
                probe = false;
            }
            pool.idle.lock().await.extend(fresh.drain(..));
        }
        let pause = if failures > 0 { Duration::from_secs(2) } else { wire::KEEPALIVE };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = pool.refill.notified() => {}
        }
        keep_alive(&pool).await;
    }
}

/// Has the new connections measure the path (`path_probe`); false if that failed.
async fn measured(cfg: &AgentConfig, site: &str, pool: &PeerPool, fresh: &mut [IdleConn]) -> bool {
    let rtt = pool.rtt.lock().unwrap().unwrap_or_default();
    match crate::path_probe::measure(fresh, rtt, cfg.link_rate_bps).await {
        Ok(m) => {
            if let Some(m) = &m {
                *pool.rate_bps.lock().unwrap() = Some(m.rate_bps);
                tracing::info!(to = %site, connections = fresh.len(), rate_mbps = m.rate_bps / 1_000_000, filler_mb = m.filler_bytes as f64 / 1e6, took_ms = m.took.as_millis() as u64, "path measured");
            }
            // Each answered the ping that followed its filler.
            for c in fresh.iter_mut() {
                c.heard = std::time::Instant::now();
            }
            true
        }
        Err(e) => {
            tracing::warn!(to = %site, "measuring the path failed, the next connections go unmeasured: {e:#}");
            false
        }
    }
}

/// Pings every idle connection and drops the ones that fail or that the peer closed.
async fn keep_alive(pool: &PeerPool) {
    let mut idle = pool.idle.lock().await;
    let mut alive = Vec::with_capacity(idle.len());
    for mut c in idle.drain(..) {
        let sent = tokio::time::timeout(Duration::from_millis(500), c.conn.send(Message::Ping { nonce: 0 })).await;
        if !matches!(sent, Ok(Ok(()))) {
            continue;
        }
        let mut ok = true;
        while let Some(next) = c.conn.next().now_or_never() {
            match next {
                // A returned connection may still get the receiver's last keepalives.
                Some(Ok(Message::Pong { .. } | Message::Ping { .. })) => c.heard = std::time::Instant::now(),
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        if ok && c.heard.elapsed() < STALE + pool.rtt.lock().unwrap().unwrap_or_default() * 2 {
            alive.push(c);
        }
    }
    *idle = alive;
}
