//! Sessions between agents: several mutually authenticated TLS connections per session, as many
//! as the path's bandwidth-delay product needs (a single connection's window must never be the
//! limit), grouped on the receiving side by the session ID each HELLO carries.
use crate::config::AgentConfig;
use anyhow::{bail, Context, Result};
use ferry_proto::{FrameCodec, Message, PROTOCOL_VERSION};
use ferry_transfer::receiver::{self, ReceiverConfig};
use ferry_transfer::wire::{self, Conn};
use futures::SinkExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

struct Counted {
    inner: TcpStream,
    counter: Arc<WireCounter>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.counter.received.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counter.sent.fetch_add(*n as u64, Relaxed);
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
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {to_site} at {addr}: timed out"))?
        .with_context(|| format!("connecting to {to_site} at {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn secure(identity: &Identity, to_site: &str, tcp: TcpStream, counter: &Arc<WireCounter>) -> Result<BoxStream> {
    let counted = Counted { inner: tcp, counter: counter.clone() };
    match &identity.client {
        None => Ok(Box::new(counted)),
        Some(cfg) => {
            let (tls, _peer) = ferry_pki::connect(cfg.clone(), to_site, counted).await?;
            Ok(Box::new(tls))
        }
    }
}

/// Opens a session to `to_site`. The first TCP handshake measures the RTT (a SYN and its
/// answer: one round trip, at no extra cost); the connections the bandwidth-delay product needs
/// are then dialled at once, and every connection's TLS handshake and HELLO run in parallel, so
/// a session costs the same few round trips however many connections it has.
pub async fn open(cfg: &AgentConfig, identity: &Identity, to_site: &str, counter: Arc<WireCounter>) -> Result<(Vec<Conn<BoxStream>>, Duration)> {
    let addr = cfg.peer(to_site)?;
    let session: [u8; 16] = rand_bytes();
    let t = Instant::now();
    let first = tcp_connect(to_site, addr).await?;
    let rtt = t.elapsed();
    let n = connections_for(cfg.link_rate_bps, rtt);
    tracing::info!(to = to_site, rtt_ms = rtt.as_secs_f64() * 1e3, connections = n, "session planned");
    let counter = &counter;
    let first = hello(identity, to_site, first, counter, session, 0);
    let more = (1..n).map(|i| async move {
        let tcp = tcp_connect(to_site, addr).await?;
        hello(identity, to_site, tcp, counter, session, i as u16).await
    });
    let (first, more) = futures::future::try_join(first, futures::future::try_join_all(more)).await?;
    let mut conns = vec![first];
    conns.extend(more);
    Ok((conns, rtt))
}

/// Sends HELLO and hands the connection over at once: its HELLO-ACK (or refusal) is read with
/// whatever the peer answers next, so the first request follows HELLO without a round trip.
async fn hello(identity: &Identity, to_site: &str, tcp: TcpStream, counter: &Arc<WireCounter>, session: [u8; 16], index: u16) -> Result<Conn<BoxStream>> {
    let stream = secure(identity, to_site, tcp, counter).await?;
    let mut conn = Framed::new(stream, FrameCodec::default());
    conn.send(Message::Hello { version: PROTOCOL_VERSION, min_version: PROTOCOL_VERSION, site: identity.site.clone(), session, connection_index: index, connection_count: 0 }).await?;
    Ok(conn)
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).expect("/dev/urandom");
    b
}

/// Accepts sessions from other sites until the listener fails.
pub async fn serve(cfg: Arc<AgentConfig>, identity: Arc<Identity>) -> Result<()> {
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let receiver_cfg = Arc::new(ReceiverConfig { data_dir: cfg.data_dir.clone(), tenant_key: cfg.tenant_key()? });
    let sessions: Arc<Mutex<HashMap<[u8; 16], Weak<receiver::Session>>>> = Arc::default();
    tracing::info!(site = %cfg.site, listen = %cfg.listen, "agent accepting sessions");
    loop {
        let (tcp, from) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (identity, receiver_cfg, sessions) = (identity.clone(), receiver_cfg.clone(), sessions.clone());
        tokio::spawn(async move {
            if let Err(e) = accept_one(tcp, from, &identity, receiver_cfg, sessions).await {
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
    let mut conn = Framed::new(stream, FrameCodec::default());
    let Message::Hello { version, min_version, session, connection_index, .. } = wire::next(&mut conn).await? else {
        bail!("{peer} did not start with HELLO");
    };
    let agreed = match ferry_proto::negotiate((PROTOCOL_VERSION, PROTOCOL_VERSION), (min_version, version)) {
        Ok(v) => v,
        Err(e) => {
            conn.send(Message::Error { code: 1, message: e.to_string() }).await?;
            bail!("{peer}: {e}");
        }
    };
    conn.send(Message::HelloAck { version: agreed, site: identity.site.clone() }).await?;
    let shared = {
        let mut map = sessions.lock().unwrap();
        map.retain(|_, s| s.strong_count() > 0);
        match map.get(&session).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = receiver::Session::new(receiver_cfg);
                map.insert(session, Arc::downgrade(&s));
                s
            }
        }
    };
    tracing::debug!(%from, %peer, connection_index, "session connection accepted");
    receiver::serve(conn, shared).await
}
