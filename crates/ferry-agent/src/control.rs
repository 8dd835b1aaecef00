//! The agent's local control socket: the CLI sends one JSON request line; the agent answers with
//! JSON lines (progress while it works, then a final summary or an error).
use crate::config::AgentConfig;
use crate::session::{self, Identity, WireCounter};
use crate::warm::Warm;
use anyhow::{Context, Result};
use ferry_transfer::progress::{Progress, ProgressSnapshot};
use ferry_transfer::scan::Chunker;
use ferry_transfer::sender::{self, SendSpec};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Send(SendRequest),
    /// Starts a VM from its spec.
    VmStart { spec: crate::vm::VmSpec },
    VmList,
    /// Stops a VM: ACPI power-down with `grace_ms` to honour it, then QEMU quits.
    VmStop { name: String, grace_ms: u64 },
    /// The last lines of a VM's serial console.
    VmConsole { name: String, lines: usize },
    /// Moves a running VM to another site.
    Migrate(crate::migrate::MigrateRequest),
    /// Ready (warm) connections per peer site.
    Status,
    /// Adds an object already under the data directory to the content store.
    Index { object: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendRequest {
    pub source: PathBuf,
    pub to: String,
    pub dest_path: String,
    pub base: Option<String>,
    /// Fixed blocks of this size; with `cdc`, content-defined chunks instead.
    pub block: u32,
    #[serde(default)]
    pub cdc: bool,
    pub zstd_level: i32,
    /// Attempts after a failure (cut link, peer restart) before giving up; each resumes.
    pub retries: u32,
    /// The source is a running VM's disk (see `SendSpec::live`).
    #[serde(default)]
    pub live: bool,
    /// Byte ranges whose blocks go first (`SendSpec::first`).
    #[serde(default)]
    pub first: Vec<(u64, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Started { size: u64, connections: usize, rtt_ms: f64, attempt: u32 },
    Progress { progress: ProgressSnapshot, wire_sent: u64, seconds: f64 },
    Retrying { attempt: u32, error: String },
    Done(SendSummary),
    Failed { error: String },
    Status { peers: std::collections::BTreeMap<String, crate::warm::PeerStatus> },
    MigrateProgress { status: String, stream_bytes: u64, remaining: u64, wire_sent: u64, seconds: f64 },
    Migrated(crate::migrate::MigrateSummary),
    Vms { vms: Vec<crate::vm::VmInfo> },
    Console { text: String },
    Ok { message: String },
}

impl Event {
    /// The answer that ends a request (the rest report progress).
    pub fn is_final(&self) -> bool {
        matches!(self, Event::Done(_) | Event::Failed { .. } | Event::Status { .. } | Event::Migrated(_) | Event::Vms { .. } | Event::Console { .. } | Event::Ok { .. })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendSummary {
    pub source: PathBuf,
    pub to: String,
    pub dest_path: String,
    pub size: u64,
    pub seconds: f64,
    /// Every byte the session's sockets sent and received (TLS records, headers, all attempts).
    pub wire_sent: u64,
    pub wire_received: u64,
    pub progress: ProgressSnapshot,
    pub connections: usize,
    pub rtt_ms: f64,
    pub attempts: u32,
    pub digest: String,
    pub encrypted: bool,
}

/// What a control request can reach: the agent's settings, its sessions and its VMs.
pub struct Agent {
    pub cfg: Arc<AgentConfig>,
    pub identity: Arc<Identity>,
    pub warm: Arc<Warm>,
    pub vms: Arc<crate::vm::Vms>,
    pub store: Arc<std::sync::Mutex<crate::pages::PageStore>>,
}

impl Agent {
    /// What the source side of a migration works with.
    fn source_context(&self) -> crate::migrate::source::SourceContext<'_> {
        crate::migrate::source::SourceContext { cfg: &self.cfg, identity: &self.identity, warm: &self.warm, vms: &self.vms, store: self.store.clone() }
    }
}

pub async fn serve(agent: Arc<Agent>) -> Result<()> {
    let cfg = agent.cfg.clone();
    {
        let agent = agent.clone();
        tokio::spawn(async move {
            crate::migrate::doubt::settle_all(&agent.source_context()).await;
        });
    }
    let path = cfg.control_socket();
    std::fs::create_dir_all(path.parent().unwrap())?;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &agent).await {
                tracing::warn!("control request failed: {e:#}");
            }
        });
    }
}

async fn handle(stream: UnixStream, agent: &Agent) -> Result<()> {
    let (cfg, identity, warm) = (&*agent.cfg, &*agent.identity, &*agent.warm);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let failed = |e: anyhow::Error| Event::Failed { error: format!("{e:#}") };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let work: std::pin::Pin<Box<dyn std::future::Future<Output = Event> + Send + '_>> = match serde_json::from_str(&line).context("malformed control request")? {
        Request::Status => return emit(&mut write, &Event::Status { peers: warm.status(cfg.link_rate_bps).await }).await,
        Request::Index { object } => {
            let (data, key) = (cfg.data_dir.clone(), cfg.tenant_key()?);
            let indexed = tokio::task::spawn_blocking(move || {
                let path = ferry_transfer::receiver::resolve(&data, &object)?;
                let n = ferry_transfer::catalog::index_file(&data, &object, &path, &ferry_transfer::scan::ChunkHasher::new(key), 64 << 10)?;
                Ok::<_, anyhow::Error>(format!("{object}: {n} blocks of 64 KiB in the content store"))
            })
            .await?;
            let ev = indexed.map_or_else(|e| Event::Failed { error: format!("{e:#}") }, |message| Event::Ok { message });
            return emit(&mut write, &ev).await;
        }
        Request::Send(req) => Box::pin(async move { run_send(cfg, identity, warm, req, None, tx).await.map_or_else(failed, Event::Done) }),
        Request::VmStart { spec } => Box::pin(async move {
            match agent.vms.start(&spec, false).await {
                Ok(_) => Event::Ok { message: format!("VM {} started (pid {})", spec.name, agent.vms.pid(&spec.name).unwrap_or(0)) },
                Err(e) => failed(e),
            }
        }),
        Request::VmList => Box::pin(async move { Event::Vms { vms: agent.vms.list().await } }),
        Request::VmStop { name, grace_ms } => Box::pin(async move {
            match agent.vms.stop(&name, Duration::from_millis(grace_ms)).await {
                Ok(()) => Event::Ok { message: format!("VM {name} stopped") },
                Err(e) => failed(e),
            }
        }),
        Request::VmConsole { name, lines } => Box::pin(async move { agent.vms.console(&name, lines).map_or_else(failed, |text| Event::Console { text }) }),
        Request::Migrate(req) => Box::pin(async move {
            crate::migrate::source::migrate_out(&agent.source_context(), req, tx).await.map_or_else(failed, Event::Migrated)
        }),
    };
    tokio::pin!(work);
    let mut progress_open = true;
    loop {
        tokio::select! {
            ev = rx.recv(), if progress_open => match ev { Some(ev) => emit(&mut write, &ev).await?, None => progress_open = false },
            ev = &mut work => {
                while let Ok(ev) = rx.try_recv() { emit(&mut write, &ev).await?; }
                emit(&mut write, &ev).await?;
                return Ok(());
            }
        }
    }
}

async fn emit(w: &mut tokio::net::unix::OwnedWriteHalf, ev: &Event) -> Result<()> {
    let mut s = serde_json::to_string(ev)?;
    s.push('\n');
    w.write_all(s.as_bytes()).await?;
    Ok(())
}

/// Sends with resumption: a failed attempt leaves the destination's staging file, and the next
/// attempt (same transfer ID) sends only what is not there yet.
pub(crate) async fn run_send(cfg: &AgentConfig, identity: &Identity, warm: &Warm, req: SendRequest, observer: Option<ferry_transfer::sender::Observer>, events: tokio::sync::mpsc::UnboundedSender<Event>) -> Result<SendSummary> {
    let meta = std::fs::metadata(&req.source).with_context(|| format!("reading {}", req.source.display()))?;
    let transfer = transfer_id(&cfg.site, &req, meta.len(), meta.modified().ok());
    let progress = Arc::new(Progress::default());
    let counter = Arc::new(WireCounter::default());
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let attempt_progress = Arc::new(Progress::default());
        let result = async {
            let (conns, rtt, lease) = session::open_leased(cfg, identity, warm, &req.to, counter.clone()).await?;
            let connections = conns.len();
            let _ = events.send(Event::Started { size: meta.len(), connections, rtt_ms: rtt.as_secs_f64() * 1e3, attempt });
            let spec = SendSpec { source: req.source.clone(), dest_path: req.dest_path.clone(), base: req.base.clone(), chunker: if req.cdc { Chunker::DEFAULT_CDC } else { Chunker::Fixed { block: req.block } }, zstd_level: req.zstd_level, transfer, tenant_key: cfg.tenant_key()?, live: req.live, first: req.first.clone(), observer: observer.clone() };
            let ticker = {
                let (p, c, ev) = (attempt_progress.clone(), counter.clone(), events.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        let snap = p.snapshot();
                        if ev.send(Event::Progress { progress: snap, wire_sent: c.sent.load(Relaxed), seconds: started.elapsed().as_secs_f64() }).is_err() {
                            return;
                        }
                    }
                })
            };
            let outcome = sender::send(conns, spec, attempt_progress.clone()).await;
            ticker.abort();
            let (outcome, conns) = outcome?;
            lease.give_back(conns).await;
            Ok::<_, anyhow::Error>((outcome, connections, rtt))
        }
        .await;
        accumulate(&progress, &attempt_progress);
        match result {
            Ok((outcome, connections, rtt)) => {
                return Ok(SendSummary {
                    source: req.source.clone(),
                    to: req.to.clone(),
                    dest_path: req.dest_path.clone(),
                    size: outcome.size,
                    seconds: started.elapsed().as_secs_f64(),
                    wire_sent: counter.sent.load(Relaxed),
                    wire_received: counter.received.load(Relaxed),
                    progress: progress.snapshot(),
                    connections,
                    rtt_ms: rtt.as_secs_f64() * 1e3,
                    attempts: attempt,
                    digest: outcome.digest,
                    encrypted: !cfg.insecure_plaintext,
                });
            }
            Err(e) if attempt <= req.retries => {
                let _ = events.send(Event::Retrying { attempt, error: format!("{e:#}") });
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(4))).await;
            }
            Err(e) => return Err(e.context(format!("after {attempt} attempt(s)"))),
        }
    }
}

fn accumulate(total: &Progress, attempt: &Progress) {
    let s = attempt.snapshot();
    total.wanted_raw.fetch_add(s.wanted_raw, Relaxed);
    total.sent_payload.fetch_add(s.sent_payload, Relaxed);
    // What the object is made of is the same every attempt: keep the last attempt's view.
    total.scanned.store(s.scanned, Relaxed);
    total.zero.store(s.zero, Relaxed);
    total.acked.store(s.acked, Relaxed);
    total.reused.store(s.reused, Relaxed);
}

fn transfer_id(site: &str, req: &SendRequest, size: u64, mtime: Option<std::time::SystemTime>) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    let mtime_ns = mtime.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    h.update(site.as_bytes()).update(&[0]).update(req.to.as_bytes()).update(&[0]).update(req.dest_path.as_bytes()).update(&[0]);
    h.update(req.source.as_os_str().as_encoded_bytes()).update(&size.to_be_bytes()).update(&mtime_ns.to_be_bytes());
    h.finalize().as_bytes()[..16].try_into().unwrap()
}

/// The CLI side: sends a request to the local agent and hands each event to `on_event`.
pub async fn request(socket: &std::path::Path, req: &Request, mut on_event: impl FnMut(&Event)) -> Result<Event> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("no local agent answers on {} (start one with `ferry agent`)", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(l) = lines.next_line().await? {
        let ev: Event = serde_json::from_str(&l).context("malformed event from the agent")?;
        if ev.is_final() {
            return Ok(ev);
        }
        on_event(&ev);
    }
    anyhow::bail!("the agent closed the control connection without a result")
}
