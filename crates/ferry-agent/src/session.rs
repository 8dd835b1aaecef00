//! Sessions between agents: several mutually authenticated TLS connections per session, as many
//! as the path's bandwidth-delay product needs (a single connection's window must never be the
//! limit), grouped on the receiving side by the session ID each HELLO carries.
use crate::config::AgentConfig;
use crate::warm::{IdleConn, Warm};
use anyhow::{bail, Context, Result};
use ferry_proto::{FrameCodec, Message, PROTOCOL_VERSION};
use ferry_transfer::receiver::{self, ReceiverConfig};
use ferry_transfer::wire::{self, Conn};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Bytes a TCP socket carried (TLS records and all): the honest "bytes on the wire".
#[derive(Default)]
pub struct WireCounter {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// Which transfer a connection's bytes count toward: a warm connection is made before its
/// transfer exists and is pointed at the transfer's counter when taken.
#[derive(Default)]
pub struct CounterSlot(Mutex<Arc<WireCounter>>);

impl CounterSlot {
    pub fn point_at(&self, counter: &Arc<WireCounter>) {
        *self.0.lock().unwrap() = counter.clone();
    }
    fn get(&self) -> Arc<WireCounter> {
        self.0.lock().unwrap().clone()
    }
}

struct Counted {
    inner: TcpStream,
    counter: Arc<CounterSlot>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.counter.get().received.fetch_add(n, Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counter.get().sent.fetch_add(*n as u64, Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl ferry_pki::PeerAddress for Counted {
    fn peer_address(&self) -> std::io::Result<SocketAddr> {
        self.inner.peer_addr()
    }
}

/// Socket buffers fixed at the system's maximum before the handshake, on both ends. Left to
/// autotuning, the receive window starts at 128 KiB and only doubles each round trip as data
/// is read, so every transfer would ramp up over many round trips however large the
/// congestion window may be.
const SOCKET_BUFFER: u32 = 4 << 20;

fn sized_socket(addr: SocketAddr) -> Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    crate::bbr::prefer(&socket);
    Ok(socket)
}

/// Per-connection TCP window we plan with: the machine's wmem/rmem maximum is 4 MiB, of which
/// TCP uses about three quarters for data.
const WINDOW_PER_CONNECTION: f64 = 3.0 * 1024.0 * 1024.0;
const MAX_CONNECTIONS: usize = 16;

/// How many connections fill a path of `rate_bps` at `rtt`.
pub fn connections_for(rate_bps: u64, rtt: Duration) -> usize {
    let bdp = rate_bps as f64 / 8.0 * rtt.as_secs_f64();
    ((bdp / WINDOW_PER_CONNECTION).ceil() as usize + 1).clamp(2, MAX_CONNECTIONS)
}

pub struct Identity {
    pub site: String,
    client: Option<Arc<ferry_pki::rustls::ClientConfig>>,
    server: Option<Arc<ferry_pki::rustls::ServerConfig>>,
}

impl Identity {
    pub fn load(cfg: &AgentConfig) -> Result<Identity> {
        if cfg.insecure_plaintext {
            tracing::warn!("INSECURE: sessions are plain TCP (debugging only)");
            return Ok(Identity { site: cfg.site.clone(), client: None, server: None });
        }
        let id = ferry_pki::load_identity(&cfg.pki_dir, &cfg.site)?;
        Ok(Identity { site: cfg.site.clone(), client: Some(id.client_config()?), server: Some(id.server_config()?) })
    }
}

async fn tcp_connect(to_site: &str, addr: SocketAddr) -> Result<TcpStream> {
    let socket = sized_socket(addr)?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .with_context(|| format!("connecting to {to_site} at {addr}: timed out"))?
        .with_context(|| format!("connecting to {to_site} at {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn secure(identity: &Identity, to_site: &str, tcp: TcpStream, counter: Arc<CounterSlot>) -> Result<BoxStream> {
    let counted = Counted { inner: tcp, counter };
    match &identity.client {
        None => Ok(Box::new(counted)),
        Some(cfg) => {
            // A handshake across a link that just came back can hang in retransmissions.
            let (tls, _peer) = tokio::time::timeout(Duration::from_secs(10), ferry_pki::connect(cfg.clone(), to_site, counted))
                .await
                .with_context(|| format!("TLS handshake with {to_site} timed out"))??;
            Ok(Box::new(tls))
        }
    }
}

/// A new authenticated connection, its byte-counter slot, its TCP handshake time (one RTT), and
/// the TCP socket's descriptor, valid while the stream lives: its congestion control's state is
/// read and restarted through it (`bbr`).
pub(crate) async fn dial(identity: &Identity, to_site: &str, addr: SocketAddr) -> Result<(BoxStream, Arc<CounterSlot>, Duration, std::os::fd::RawFd)> {
    use std::os::fd::AsRawFd;
    let t = Instant::now();
    let tcp = tcp_connect(to_site, addr).await?;
    let rtt = t.elapsed();
    let fd = tcp.as_raw_fd();
    let slot = Arc::new(CounterSlot::default());
    Ok((secure(identity, to_site, tcp, slot.clone()).await?, slot, rtt, fd))
}

/// Opens a session to `to_site` on the warm connections the agent keeps ready, dialling what
/// the bandwidth-delay product needs beyond them. Without warm connections, the first TCP
/// handshake measures the RTT (one round trip, at no extra cost) and the rest are dialled at
/// once, every TLS handshake in parallel. HELLO goes out without waiting for its answer.
pub async fn open(cfg: &AgentConfig, identity: &Identity, warm: &Warm, to_site: &str, counter: Arc<WireCounter>) -> Result<(Vec<Conn<BoxStream>>, Duration)> {
    open_n(cfg, identity, warm, to_site, counter, None).await.map(|(conns, rtt, _)| (conns, rtt))
}

/// As `open`, with what it takes to give the connections back to the warm pool once the
/// session is over (`Lease::give_back`).
pub async fn open_leased(cfg: &AgentConfig, identity: &Identity, warm: &Warm, to_site: &str, counter: Arc<WireCounter>) -> Result<(Vec<Conn<BoxStream>>, Duration, Lease)> {
    open_n(cfg, identity, warm, to_site, counter, None).await
}

/// A session's hold on the pool's connections (the pool does not replace them meanwhile), and
/// their byte counters, to detach from the session's count when they go back.
pub struct Lease {
    pool: Option<crate::warm::PoolLease>,
    counters: Vec<(Arc<CounterSlot>, std::os::fd::RawFd)>,
}

impl Lease {
    /// The connections of a session that ended cleanly (nothing of it left to read) go back
    /// to the pool: the next session to the site starts on connections whose congestion
    /// control already knows the path.
    pub async fn give_back(self, conns: Vec<Conn<BoxStream>>) {
        let Some(lease) = &self.pool else { return };
        if conns.len() != self.counters.len() {
            return; // which counter is whose is lost: let them close
        }
        let idle = std::iter::zip(conns, self.counters)
            .map(|(conn, (counter, fd))| {
                counter.point_at(&Arc::default());
                IdleConn::new(conn, counter, fd)
            })
            .collect();
        lease.give_back(idle).await;
    }
}

/// A session of one connection, for a question and its answer: it leaves the warm pool to the
/// transfer that follows (a pool it had emptied would make that transfer dial afresh).
pub async fn open_one(cfg: &AgentConfig, identity: &Identity, warm: &Warm, to_site: &str) -> Result<Conn<BoxStream>> {
    let (conns, _, _) = open_n(cfg, identity, warm, to_site, Arc::new(WireCounter::default()), Some(1)).await?;
    conns.into_iter().next().context("no connection")
}

async fn open_n(cfg: &AgentConfig, identity: &Identity, warm: &Warm, to_site: &str, counter: Arc<WireCounter>, limit: Option<usize>) -> Result<(Vec<Conn<BoxStream>>, Duration, Lease)> {
    let addr = cfg.peer(to_site)?;
    let session: [u8; 16] = rand_bytes();
    let wanted = |rtt: Duration| limit.unwrap_or(usize::MAX).min(connections_for(cfg.link_rate_bps, rtt));
    let (mut ready, mut rtt) = match warm.rtt(to_site) {
        Some(r) => warm.take(to_site, wanted(r)).await,
        None => (Vec::new(), None),
    };
    let pool = warm.pool(to_site).map(|p| p.lease(ready.len()));
    let mut first_fresh = None;
    if rtt.is_none() {
        let (stream, slot, handshake, fd) = dial(identity, to_site, addr).await?;
        rtt = Some(handshake);
        first_fresh = Some(IdleConn::new(Framed::new(stream, FrameCodec), slot, fd));
    }
    let rtt = rtt.expect("measured");
    let n = wanted(rtt);
    let warm_count = ready.len();
    ready.extend(first_fresh);
    let fresh = futures::future::try_join_all((ready.len()..n).map(|_| async move {
        let (stream, slot, _, fd) = dial(identity, to_site, addr).await?;
        Ok::<_, anyhow::Error>(IdleConn::new(Framed::new(stream, FrameCodec), slot, fd))
    }))
    .await?;
    ready.extend(fresh);
    tracing::info!(to = to_site, rtt_ms = rtt.as_secs_f64() * 1e3, connections = n, warm = warm_count, "session planned");
    let mut conns = Vec::with_capacity(ready.len());
    let mut counters = Vec::with_capacity(ready.len());
    for (i, mut c) in ready.into_iter().enumerate() {
        c.counter.point_at(&counter);
        c.conn.send(Message::Hello { version: PROTOCOL_VERSION, min_version: PROTOCOL_VERSION, site: identity.site.clone(), session, connection_index: i as u16, connection_count: n as u16 }).await?;
        conns.push(c.conn);
        counters.push((c.counter, c.fd));
    }
    Ok((conns, rtt, Lease { pool, counters }))
}

pub fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).expect("/dev/urandom");
    b
}

/// Accepts sessions from other sites until the listener fails.
pub async fn serve(cfg: Arc<AgentConfig>, identity: Arc<Identity>, migrations: Arc<crate::migrate::incoming::Shared>) -> Result<()> {
    let listener = {
        let socket = sized_socket(cfg.listen)?;
        socket.set_reuseaddr(true)?;
        socket.bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
        socket.listen(1024)?
    };
    let receiver_cfg = Arc::new(ReceiverConfig { older_copy: crate::migrate::disks::older_copy, ..ReceiverConfig::new(cfg.data_dir.clone(), cfg.tenant_key()?) });
    let sessions: Arc<Mutex<HashMap<[u8; 16], Weak<receiver::Session>>>> = Arc::default();
    tracing::info!(site = %cfg.site, listen = %cfg.listen, "agent accepting sessions");
    loop {
        let (tcp, from) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (identity, receiver_cfg, sessions, migrations) = (identity.clone(), receiver_cfg.clone(), sessions.clone(), migrations.clone());
        tokio::spawn(async move {
            if let Err(e) = accept_one(tcp, from, &identity, receiver_cfg, sessions, migrations).await {
                tracing::warn!(%from, "connection refused or failed: {e:#}");
            }
        });
    }
}

async fn accept_one(
    tcp: TcpStream,
    from: SocketAddr,
    identity: &Identity,
    receiver_cfg: Arc<ReceiverConfig>,
    sessions: Arc<Mutex<HashMap<[u8; 16], Weak<receiver::Session>>>>,
    migrations: Arc<crate::migrate::incoming::Shared>,
) -> Result<()> {
    let counted = Counted { inner: tcp, counter: Arc::default() };
    let (stream, peer): (BoxStream, String) = match &identity.server {
        None => (Box::new(counted), "unauthenticated".into()),
        Some(cfg) => {
            let (tls, peer) = tokio::time::timeout(Duration::from_secs(10), ferry_pki::accept(cfg.clone(), counted))
                .await
                .context("TLS handshake timed out")??;
            (Box::new(tls), peer)
        }
    };
    let mut conn = Framed::new(stream, FrameCodec);
    let mut hello = None;
    loop {
        // A warm connection waits, pinged, until a transfer takes it and says HELLO.
        let next = match hello.take() {
            Some(h) => h,
            None => loop {
                match tokio::time::timeout(wire::IDLE_LIMIT, conn.next()).await {
                    Ok(None) => return Ok(()), // the peer's pool had a connection too many
                    Ok(Some(Ok(Message::Ping { nonce }))) => conn.send(Message::Pong { nonce }).await?,
                    Ok(Some(Ok(Message::Filler { .. }))) => {} // the peer measures the path
                    Ok(Some(Ok(m))) => break m,
                    Ok(Some(Err(e))) => return Err(anyhow::Error::new(e).context(format!("reading from {peer}"))),
                    Err(_) => bail!("{peer} sent nothing for {} s: link cut?", wire::IDLE_LIMIT.as_secs()),
                }
            },
        };
        match session_on(conn, next, from, &peer, identity, &receiver_cfg, &sessions, &migrations).await? {
            Some((c, h)) => (conn, hello) = (c, Some(h)),
            None => return Ok(()),
        }
    }
}

/// One session on an accepted connection, from its HELLO; returns the connection and the next
/// session's HELLO when the peer reuses it.
#[allow(clippy::too_many_arguments)] // the connection, its peer, and what its sessions reach
async fn session_on(
    mut conn: Conn<BoxStream>,
    hello: Message,
    from: SocketAddr,
    peer: &str,
    identity: &Identity,
    receiver_cfg: &Arc<ReceiverConfig>,
    sessions: &Mutex<HashMap<[u8; 16], Weak<receiver::Session>>>,
    migrations: &Arc<crate::migrate::incoming::Shared>,
) -> Result<Option<(Conn<BoxStream>, Message)>> {
    let (version, min_version, session, connection_index) = match hello {
        Message::Hello { version, min_version, session, connection_index, .. } => (version, min_version, session, connection_index),
        other => bail!("{peer} did not start with HELLO but {}", other.kind()),
    };
    let agreed = match ferry_proto::negotiate((PROTOCOL_VERSION, PROTOCOL_VERSION), (min_version, version)) {
        Ok(v) => v,
        Err(e) => {
            conn.send(Message::Error { code: 1, message: e.to_string() }).await?;
            bail!("{peer}: {e}");
        }
    };
    conn.send(Message::HelloAck { version: agreed, site: identity.site.clone() }).await?;
    // What the session is for shows in its first message: a migration opens every connection
    // with MIGRATE_OPEN; anything else belongs to a transfer.
    let first = match tokio::time::timeout(wire::IDLE_LIMIT, conn.next()).await {
        Err(_) | Ok(None) => return Ok(None), // a spare connection the sender never needed
        Ok(Some(m)) => m.context("reading from the sender")?,
    };
    if matches!(first, Message::MigrateOpen { .. }) {
        crate::migrate::incoming::serve(conn, first, migrations.clone(), peer.to_string()).await?;
        return Ok(None);
    }
    let shared = {
        let mut map = sessions.lock().unwrap();
        map.retain(|_, s| s.strong_count() > 0);
        match map.get(&session).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = receiver::Session::new(receiver_cfg.clone());
                map.insert(session, Arc::downgrade(&s));
                s
            }
        }
    };
    tracing::debug!(%from, %peer, connection_index, "session connection accepted");
    receiver::serve(conn, shared, Some(first)).await
}
