//! The destination side: the first MIGRATE_OPEN of a migration starts the VM's QEMU waiting for
//! its state; batches arrive on every connection, are put back in order, rebuilt into QEMU's
//! exact stream (references resolved from the page store) and written to QEMU; its return path
//! goes back to the source. The VM counts as moved once QEMU reports it running. If the session
//! ends before that, QEMU is killed: the source still runs the VM.
use super::batch::{decode, DecodeStats};
use super::disks::DiskWriter;
use super::page_id;
use crate::pages::{PageId, PageStore};
use crate::vm::{process_alive, Vms};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ferry_proto::{Encoding, Message, MigrationId, MAX_CHUNK_LEN};
use ferry_transfer::wire::{self, Conn};
use futures::StreamExt;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OnceCell};

/// How long the destination waits for a page it asked the source for.
const FETCH_WITHIN: Duration = Duration::from_secs(30);

pub struct Shared {
    pub vms: Arc<Vms>,
    pub store: Arc<Mutex<PageStore>>,
    pub tenant_key: [u8; 32],
    migrations: Mutex<HashMap<MigrationId, Arc<Incoming>>>,
}

impl Shared {
    pub fn new(vms: Arc<Vms>, store: Arc<Mutex<PageStore>>, tenant_key: [u8; 32]) -> Arc<Shared> {
        Arc::new(Shared { vms, store, tenant_key, migrations: Mutex::default() })
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub running: bool,
    pub message: String,
}

struct Incoming {
    id: MigrationId,
    vm: String,
    /// The source site, as its certificate proves it.
    peer: String,
    ready: OnceCell<std::result::Result<Bytes, String>>,
    reorder: tokio::sync::Mutex<Reorder>,
    /// Writers of the migration's connections: the return path and the outcome use the first
    /// that still works.
    outs: Mutex<Vec<mpsc::Sender<Message>>>,
    live_connections: AtomicUsize,
    outcome: watch::Sender<Option<Outcome>>,
    /// Pages the source sent on request, for the thread writing the stream.
    fetched: Mutex<Option<std::sync::mpsc::Sender<(PageId, Bytes)>>>,
    ended_at: Mutex<Option<Instant>>,
    /// Which stream into QEMU is current: a resumed post-copy's is a new one, and what the
    /// earlier one's threads and connections still do must not reach it (see `resume.rs`).
    generation: AtomicU32,
    /// The last resumption asked for, and how it went: every connection of its session asks.
    resumed: tokio::sync::Mutex<(u32, Option<std::result::Result<Bytes, String>>)>,
    /// A post-copy's connection to QEMU's out-of-band monitor, made while QEMU could still
    /// negotiate it (see `resume_incoming`).
    oob: tokio::sync::Mutex<Option<crate::qmp::Qmp>>,
}

/// How long this site may take to have its QEMU listen for a resumed post-copy.
const RESUME_WITHIN: Duration = Duration::from_secs(20);

/// How long an ended migration is remembered for a source that asks how it ended.
const KEEP_ENDED: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Reorder {
    /// The stream generation these batches belong to (checked under the lock: a connection of
    /// an earlier session may read a batch just before the resumption and deliver it after).
    generation: u32,
    next: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    end: Option<u64>,
    /// Unbounded: what may be outstanding is bounded by the source's stream window, and a
    /// connection must never stall here while the stream writer waits for a page it asked for
    /// (the answer may be behind it on the same connection).
    to_qemu: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

impl Incoming {
    fn outcome_now(&self) -> Option<Outcome> {
        self.outcome.borrow().clone()
    }

    /// Records how the migration ended (the first word stands) and tells the source.
    fn finish(&self, running: bool, message: String) {
        let mut first = false;
        self.outcome.send_if_modified(|o| {
            if o.is_none() {
                *o = Some(Outcome { running, message: message.clone() });
                first = true;
            }
            first
        });
        if first {
            *self.ended_at.lock().unwrap() = Some(Instant::now());
            tracing::info!(vm = %self.vm, running, %message, "incoming migration ended");
            self.tell_source(Message::MigrateOutcome { migration: self.id, running, message });
        }
    }

    fn tell_source(&self, msg: Message) {
        let outs = self.outs.lock().unwrap().clone();
        Self::try_each(outs, msg);
    }

    /// `tell_source`, from a thread of stream generation `generation` (see
    /// `tell_source_blocking_in`).
    fn tell_source_in(&self, generation: u32, msg: Message) {
        if let Some(outs) = self.outs_in(generation) {
            Self::try_each(outs, msg);
        }
    }

    /// The session's writers, unless a resumption replaced stream generation `generation`
    /// (checked under the writers' lock, which a resumption takes to clear them only after it
    /// moved the generation on).
    fn outs_in(&self, generation: u32) -> Option<Vec<mpsc::Sender<Message>>> {
        let outs = self.outs.lock().unwrap();
        (self.generation.load(Relaxed) == generation).then(|| outs.clone())
    }

    fn try_each(outs: Vec<mpsc::Sender<Message>>, msg: Message) {
        for out in outs {
            if out.try_send(msg.clone()).is_ok() {
                return;
            }
        }
    }

    async fn deliver(&self, generation: u32, seq: u64, raw: Vec<u8>) -> Result<()> {
        let mut r = self.reorder.lock().await;
        if r.generation != generation {
            bail!("a batch of a session that was resumed in another");
        }
        if seq < r.next || r.pending.contains_key(&seq) {
            bail!("batch {seq} arrived twice");
        }
        r.pending.insert(seq, raw);
        loop {
            let next = r.next;
            let Some(b) = r.pending.remove(&next) else { break };
            let Some(tx) = r.to_qemu.clone() else { bail!("batch {seq} arrived after the stream's end") };
            tx.send(b).map_err(|_| anyhow::anyhow!("the destination QEMU's stream writer stopped"))?;
            r.next += 1;
        }
        if r.end == Some(r.next) {
            r.to_qemu = None;
        }
        Ok(())
    }

    async fn end(&self, generation: u32, batches: u64) {
        let mut r = self.reorder.lock().await;
        if r.generation != generation {
            return;
        }
        r.end = Some(batches);
        if r.next == batches {
            r.to_qemu = None;
        }
    }
}

/// Serves one connection of a migration session; `open` is its first message.
pub async fn serve(conn: Conn<crate::session::BoxStream>, open: Message, shared: Arc<Shared>, peer: String) -> Result<()> {
    let Message::MigrateOpen { migration, vm, spec } = open else { bail!("not a migration") };
    let resume = if spec.is_empty() { 0 } else { serde_json::from_slice::<super::Arrival>(&spec).map_or(0, |a| a.resume) };
    if resume > 0 {
        return serve_resumed(conn, migration, resume, shared, peer).await;
    }
    // A source that lost its session (or its agent) asks how the migration ended by opening it
    // again with an empty spec. Answered from what is known; it must never register anything.
    if spec.is_empty() {
        let (sink, stream) = conn.split();
        let (out, _writer) = wire::spawn_writer(sink);
        wire::queue(&out, answer_query(&shared, migration, &vm).await).await?;
        return drain(stream).await;
    }
    let inc = {
        let mut map = shared.migrations.lock().unwrap();
        // Ended migrations are kept a while for sources that ask how they ended.
        map.retain(|_, m| m.ended_at.lock().unwrap().is_none_or(|t| t.elapsed() < KEEP_ENDED));
        map.entry(migration)
            .or_insert_with(|| {
                Arc::new(Incoming {
                    id: migration,
                    vm: vm.clone(),
                    peer: peer.clone(),
                    ready: OnceCell::new(),
                    reorder: Default::default(),
                    outs: Mutex::default(),
                    live_connections: AtomicUsize::new(0),
                    outcome: watch::channel(None).0,
                    fetched: Mutex::default(),
                    ended_at: Mutex::default(),
                    generation: AtomicU32::new(0),
                    resumed: Default::default(),
                    oob: Default::default(),
                })
            })
            .clone()
    };
    let (sink, stream) = conn.split();
    let (out, _writer) = wire::spawn_writer(sink);
    if let Some(o) = inc.outcome_now() {
        wire::queue(&out, Message::MigrateOutcome { migration, running: o.running, message: o.message }).await?;
        return drain(stream).await;
    }
    let ready = inc.ready.get_or_init(|| async { start_incoming(&shared, &inc, &spec).await.map_err(|e| format!("{e:#}")) }).await.clone();
    let held = match ready {
        Err(reason) => {
            wire::queue(&out, Message::MigrateReady { migration, accepted: false, reason, held: Bytes::new() }).await?;
            return drain(stream).await;
        }
        Ok(held) => held,
    };
    carry(out, stream, &inc, &shared, held, peer).await
}

/// A connection of a session that resumes a post-copy whose session was lost.
async fn serve_resumed(conn: Conn<crate::session::BoxStream>, migration: MigrationId, attempt: u32, shared: Arc<Shared>, peer: String) -> Result<()> {
    let (sink, stream) = conn.split();
    let (out, _writer) = wire::spawn_writer(sink);
    let inc = shared.migrations.lock().unwrap().get(&migration).cloned();
    let held = match &inc {
        None => Err("this site knows no such migration (its agent restarted?)".to_string()),
        Some(inc) if inc.peer != peer => Err(format!("the migration came from {}, not {peer}", inc.peer)),
        Some(inc) => {
            tracing::info!(vm = %inc.vm, attempt, "the source resumes post-copy");
            // The session's first connection resumes; the others take its word.
            let mut resumed = inc.resumed.lock().await;
            if resumed.0 != attempt || resumed.1.is_none() {
                let r = match tokio::time::timeout(RESUME_WITHIN, resume_incoming(&shared, inc)).await {
                    Ok(r) => r.map_err(|e| format!("{e:#}")),
                    Err(_) => Err(format!("resuming took longer than {} s here", RESUME_WITHIN.as_secs())),
                };
                if let Err(e) = &r {
                    tracing::warn!(vm = %inc.vm, attempt, "post-copy cannot resume here: {e}");
                }
                *resumed = (attempt, Some(r));
            }
            resumed.1.clone().unwrap_or_else(|| Err("no resumption".into()))
        }
    };
    match (inc, held) {
        (Some(inc), Ok(held)) => carry(out, stream, &inc, &shared, held, peer).await,
        (_, held) => {
            let reason = held.err().unwrap_or_default();
            wire::queue(&out, Message::MigrateReady { migration, accepted: false, reason, held: Bytes::new() }).await?;
            drain(stream).await
        }
    }
}

/// Joins the connection to the migration's stream until it ends; if the session ends before
/// the VM runs here, the migration is aborted.
async fn carry<S, E>(out: mpsc::Sender<Message>, mut stream: S, inc: &Arc<Incoming>, shared: &Arc<Shared>, held: Bytes, peer: String) -> Result<()>
where
    S: futures::Stream<Item = std::result::Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let migration = inc.id;
    let generation = inc.generation.load(Relaxed);
    let first = {
        let mut outs = inc.outs.lock().unwrap();
        outs.push(out.clone());
        outs.len() == 1
    };
    wire::queue(&out, Message::MigrateReady { migration, accepted: true, reason: String::new(), held: if first { held } else { Bytes::new() } }).await?;
    inc.live_connections.fetch_add(1, Relaxed);
    let keepalive = {
        let out = out.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(wire::KEEPALIVE).await;
                wire::ping(&out);
            }
        })
    };
    let result = receive(&mut stream, inc, &out, generation).await;
    keepalive.abort();
    if inc.live_connections.fetch_sub(1, Relaxed) == 1 {
        let running = inc.outcome_now().is_some_and(|o| o.running);
        if !running {
            let why = match &result {
                Err(e) => format!("the session from {peer} ended before the VM ran: {e:#}"),
                Ok(()) => format!("the session from {peer} ended before the VM ran"),
            };
            abort(shared, inc, why).await;
        }
    }
    result
}

/// A source asks how a migration ended (see doubt.rs): what this site knows of it, or, if it
/// does not know it (its agent restarted), whether it runs a VM of that name.
async fn answer_query(shared: &Arc<Shared>, migration: MigrationId, vm: &str) -> Message {
    let known = shared.migrations.lock().unwrap().get(&migration).cloned();
    if let Some(inc) = known {
        return match inc.outcome_now() {
            Some(o) => Message::MigrateOutcome { migration, running: o.running, message: o.message },
            None => Message::Error { code: super::doubt::UNDECIDED, message: "the migration is still under way here".into() },
        };
    }
    let running = match shared.vms.qmp(vm).await {
        Ok(mut q) => q.status().await.is_ok_and(|s| s == "running"),
        Err(_) => false,
    };
    let message = if running { String::new() } else { format!("this site does not run {vm}") };
    Message::MigrateOutcome { migration, running, message }
}

async fn drain<S: futures::Stream + Unpin>(mut stream: S) -> Result<()> {
    // Keep the connection until the source closes it, so what was queued reaches it.
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while stream.next().await.is_some() {} }).await;
    Ok(())
}

async fn receive<S, E>(stream: &mut S, inc: &Incoming, out: &mpsc::Sender<Message>, generation: u32) -> Result<()>
where
    S: futures::Stream<Item = std::result::Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    loop {
        let msg = wire::next(stream).await?;
        // A connection of a session that post-copy has gone on without: its batches number
        // from 0 like the new session's, and must not be taken for them.
        if inc.generation.load(Relaxed) != generation {
            bail!("a connection of a session that was resumed in another");
        }
        match msg {
            Message::StreamData { seq, encoding, raw_len, data, .. } => {
                let raw = match encoding {
                    Encoding::Raw => data.to_vec(),
                    Encoding::Zstd => tokio::task::spawn_blocking(move || ferry_transfer::compress::decompress_owned(&data, raw_len as usize)).await?.context("a batch does not decompress")?,
                };
                if raw.len() != raw_len as usize {
                    bail!("batch {seq} is {} bytes, announced {raw_len}", raw.len());
                }
                inc.deliver(generation, seq, raw).await?;
            }
            Message::StreamEnd { batches, .. } => inc.end(generation, batches).await,
            Message::PageData { id, data, .. } => {
                if let Some(tx) = inc.fetched.lock().unwrap().as_ref() {
                    let _ = tx.send((id, data));
                }
            }
            Message::Ping { nonce } => {
                let _ = out.try_send(Message::Pong { nonce });
            }
            Message::Pong { .. } => {}
            Message::Error { message, .. } => bail!("the source failed: {message}"),
            other => bail!("unexpected {} during a migration", other.kind()),
        }
        if inc.outcome_now().is_some_and(|o| !o.running) {
            bail!("the migration failed here");
        }
    }
}

/// Starts QEMU waiting for the stream, connects to it, and starts the threads that write the
/// stream and read the return path. Returns the page-ID prefixes this site holds.
async fn start_incoming(shared: &Arc<Shared>, inc: &Arc<Incoming>, spec: &[u8]) -> Result<Bytes> {
    let super::Arrival { mut spec, cold, staged, postcopy, .. } = serde_json::from_slice(spec).context("the VM's spec")?;
    // Its disks are under this site's data dir: complete, or (`staged`) in the staging files
    // their bulk pass is filling, which become those paths when it commits. QEMU reads its
    // disks only once it runs, after the pass and every record that follows it.
    super::disks::arrive(&mut spec, shared.vms.data_dir());
    let opened: Vec<std::path::PathBuf> = if staged.is_empty() {
        spec.disks.iter().map(|d| d.path.clone()).collect()
    } else {
        if staged.len() != spec.disks.len() {
            bail!("{} staging files named for {} disks", staged.len(), spec.disks.len());
        }
        let mut paths = Vec::new();
        for (d, t) in spec.disks.iter().zip(&staged) {
            paths.push(super::disks::live_link(&d.path, &ferry_transfer::staging::staging_path(&d.path, t))?);
        }
        paths
    };
    if spec.name != inc.vm {
        bail!("the spec names VM {:?}, the migration {:?}", spec.name, inc.vm);
    }
    // An earlier attempt whose session died may still hold the name: it is abandoned.
    let stale: Vec<Arc<Incoming>> = shared.migrations.lock().unwrap().values().filter(|o| o.vm == spec.name && o.id != inc.id && o.live_connections.load(Relaxed) == 0 && o.outcome_now().is_none()).cloned().collect();
    for o in stale {
        abort(shared, &o, "a newer migration of the same VM replaced it".into()).await;
    }
    if shared.vms.pid(&spec.name).is_some_and(process_alive) {
        bail!("a VM named {:?} already runs on this site", spec.name);
    }
    if cold {
        // Its disks arrived whole and verified: it boots, and that is the whole move (a qcow2
        // image only if it holds all of its guest's bytes).
        let checked = spec.disks.iter().filter(|d| d.format == "qcow2").try_for_each(|d| super::disk_view::refuse_external_files(&d.path));
        if let Err(e) = checked {
            inc.finish(false, format!("{e:#}"));
            return Err(e);
        }
        if let Err(e) = shared.vms.start(&spec, false).await {
            inc.finish(false, format!("{e:#}"));
            return Err(e);
        }
        inc.finish(true, String::new());
        return Ok(Bytes::new());
    }
    // A live move's bulk pass carried each disk's guest bytes: a qcow2 disk is made one again.
    if !staged.is_empty() && spec.disks.iter().any(|d| d.format != "raw") {
        bail!("a qcow2 disk cannot be opened while its bulk pass fills it");
    }
    // (Made already, by an earlier try of this setup, when the raw file is gone.) A retry after
    // a failure finds the image as the older copy of the disk (`disks::older_copy`).
    let data_dir = shared.vms.data_dir().to_path_buf();
    for d in spec.disks.iter().filter(|d| d.format == "qcow2") {
        let landing = super::disks::landing_name(&spec.name, d);
        let (raw, path) = (data_dir.join(&landing), d.path.clone());
        if !raw.exists() {
            continue;
        }
        tokio::task::spawn_blocking(move || super::disk_view::raw_to_qcow2(&raw, &path)).await??;
        ferry_transfer::catalog::forget(&data_dir, &landing);
        ferry_transfer::catalog::forget(&data_dir, &super::disks::object_name(&spec.name, d));
    }
    shared.vms.start_with_disks(&spec, true, Some(&opened)).await?;
    let setup = async {
        let mut qmp = shared.vms.qmp(&spec.name).await?;
        // A bulk pass still under way: the source holds back this QEMU's go-ahead to switch
        // over until it is committed (both QEMUs must have the capability).
        // Post-copy must be allowed here before the stream starts; its blocktime (how long
        // vCPUs waited for pages they faulted on) is the figure that says what it cost the guest.
        qmp.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "return-path", "state": true}, {"capability": "switchover-ack", "state": !staged.is_empty()}, {"capability": "postcopy-ram", "state": postcopy}, {"capability": "postcopy-blocktime", "state": postcopy}]})).await?;
        if postcopy {
            *inc.oob.lock().await = Some(crate::qmp::Qmp::connect_oob(&shared.vms.dir(&spec.name).join(crate::vm::OOB_MONITOR), Duration::from_secs(10)).await?);
        }
        let path = shared.vms.dir(&spec.name).join("migrate-in.sock");
        let _ = std::fs::remove_file(&path);
        qmp.execute("migrate-incoming", json!({"uri": format!("unix:{}", path.display())})).await?;
        connect_to_qemu(&path).await.context("the destination QEMU does not listen for the stream")
    };
    let sock = match setup.await {
        Ok(s) => s,
        Err(e) => {
            shared.vms.kill(&spec.name).await;
            return Err(e);
        }
    };
    // The records are the guest's bytes: a qcow2 disk takes them through its QEMU, which
    // exports it as a plain file (and so takes the image over before the switchover, as an NBD
    // export for a mirror would).
    let mut opened = opened;
    if let Err(e) = export_views(shared, &spec, &mut opened).await {
        shared.vms.kill(&spec.name).await;
        return Err(e);
    }
    let disks = match DiskWriter::open(&opened) {
        Ok(d) => d,
        Err(e) => {
            shared.vms.kill(&spec.name).await;
            return Err(e);
        }
    };
    // Fault injection for the lab tests: the names QEMU opened its disks by vanish, so that it
    // loads the VM but cannot take its disks over (it opens them again by name then).
    if !staged.is_empty() && std::env::var("FERRY_FAULT").is_ok_and(|f| f == "disk-name-lost") {
        tracing::error!("FERRY_FAULT=disk-name-lost: the destination QEMU's disk names are removed");
        for p in &opened {
            let _ = std::fs::remove_file(p);
        }
    }
    attach_stream(shared, inc, sock, disks).await?;
    tokio::spawn(watch_qemu(shared.clone(), inc.clone()));
    let held = shared.store.lock().unwrap().prefixes(MAX_CHUNK_LEN / 8, &inc.peer);
    Ok(Bytes::from(held))
}

/// Starts the threads that write the stream into QEMU's socket and carry its return path
/// back, for the current generation of the stream.
async fn attach_stream(shared: &Arc<Shared>, inc: &Arc<Incoming>, sock: UnixStream, disks: DiskWriter) -> Result<()> {
    let generation = inc.generation.load(Relaxed);
    let (to_qemu, from_session) = mpsc::unbounded_channel();
    inc.reorder.lock().await.to_qemu = Some(to_qemu);
    let (fetched_tx, fetched) = std::sync::mpsc::channel();
    *inc.fetched.lock().unwrap() = Some(fetched_tx);
    {
        let (sock, store, key, inc) = (sock.try_clone()?, shared.store.clone(), shared.tenant_key, inc.clone());
        std::thread::spawn(move || {
            let r = write_stream(sock, from_session, fetched, &store, &key, &inc, &disks, generation);
            match r {
                Ok(stats) => tracing::info!(vm = %inc.vm, ?stats, "the whole stream is written to the destination QEMU"),
                Err(e) => inc.finish(false, format!("{e:#}")),
            }
        });
    }
    {
        let (mut sock, inc) = (sock, inc.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = sock.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if !inc.tell_source_blocking_in(generation, Message::StreamBack { migration: inc.id, data: Bytes::copy_from_slice(&buf[..n]) }) {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Connects to the socket QEMU was just told to listen on (it may take a moment to appear).
async fn connect_to_qemu(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Post-copy lost its session and the source resumes it: this QEMU pauses (if it has not
/// noticed yet), listens again (`migrate-recover`), and a new stream generation is attached.
/// Returns the page-ID prefixes this site holds.
async fn resume_incoming(shared: &Arc<Shared>, inc: &Arc<Incoming>) -> Result<Bytes> {
    if !inc.outcome_now().is_some_and(|o| o.running) {
        bail!("the VM does not run here: there is no post-copy to resume");
    }
    // Out of band: a vCPU or a device that waits for a page the lost session holds can block
    // QEMU's main loop, and with it every ordinary command (`query-migrate` too).
    let mut oob = inc.oob.lock().await;
    let qmp = oob.as_mut().context("this site has no out-of-band monitor on the VM's QEMU")?;
    // A QEMU whose stream still looks open (the session died, not its socket) pauses now; one
    // that noticed has paused already and refuses.
    if let Err(e) = qmp.execute_oob("migrate-pause", json!({})).await {
        tracing::debug!(vm = %inc.vm, "post-copy pauses by itself here: {e:#}");
    }
    // A new generation: the old stream's writer loses its input and ends; what the old
    // session's connections and threads still do goes nowhere.
    let generation = inc.generation.fetch_add(1, Relaxed) + 1;
    *inc.reorder.lock().await = Reorder { generation, ..Reorder::default() };
    inc.outs.lock().unwrap().clear();
    let path = shared.vms.dir(&inc.vm).join("migrate-in.sock");
    let _ = std::fs::remove_file(&path);
    let uri = json!({"uri": format!("unix:{}", path.display())});
    let deadline = Instant::now() + Duration::from_secs(10);
    // Refused until QEMU has finished pausing.
    while let Err(e) = qmp.execute_oob("migrate-recover", uri.clone()).await {
        if Instant::now() > deadline {
            return Err(e.context("the destination QEMU would not listen to resume"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::debug!(vm = %inc.vm, "QEMU listens to resume");
    let sock = connect_to_qemu(&path).await.context("the destination QEMU does not listen to resume")?;
    attach_stream(shared, inc, sock, DiskWriter::open(&[])?).await?;
    tracing::info!(vm = %inc.vm, "post-copy resumes in a new session");
    Ok(Bytes::from(shared.store.lock().unwrap().prefixes(MAX_CHUNK_LEN / 8, &inc.peer)))
}

impl Incoming {
    /// From a thread of stream generation `generation`, which must not lose a byte of the
    /// return path: waits for room rather than drop. Sends nothing once a resumed session
    /// replaced the generation (`outs_in`), and then says false.
    fn tell_source_blocking_in(&self, generation: u32, msg: Message) -> bool {
        let Some(outs) = self.outs_in(generation) else { return false };
        for out in outs {
            if out.blocking_send(msg.clone()).is_ok() {
                break;
            }
        }
        true
    }
}

/// Stream bytes written between acknowledgements while batches are waiting (when none wait,
/// every write is acknowledged: the source should know at once that it may send more).
const ACK_EVERY: u64 = 1 << 20;
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

#[allow(clippy::too_many_arguments)] // the stream, where its pages come from, where disk writes go, and which generation it is
fn write_stream(
    mut sock: UnixStream,
    mut batches: mpsc::UnboundedReceiver<Vec<u8>>,
    fetched: std::sync::mpsc::Receiver<(PageId, Bytes)>,
    store: &Mutex<PageStore>,
    key: &[u8; 32],
    inc: &Incoming,
    disks: &DiskWriter,
    generation: u32,
) -> Result<DecodeStats> {
    let mut out = Vec::with_capacity(2 << 20);
    let mut stats = DecodeStats::default();
    let (mut written, mut acked) = (0u64, 0u64);
    // The stream waits for the page: a round trip, which only a false match in the list of
    // held pages (or a store that lost pages) costs.
    let mut fetch = |id: &PageId| -> Result<Vec<u8>> {
        tracing::info!(vm = %inc.vm, "asking the source for a page this site does not hold");
        if !inc.tell_source_blocking_in(generation, Message::PageWant { migration: inc.id, id: *id }) {
            bail!("the stream was resumed in another session");
        }
        let deadline = Instant::now() + FETCH_WITHIN;
        loop {
            let left = deadline.checked_duration_since(Instant::now()).context("the source did not send a page it was asked for")?;
            let (got, data) = fetched.recv_timeout(left).context("the source did not send a page it was asked for")?;
            if &got == id {
                return Ok(data.to_vec());
            }
        }
    };
    // Where the writer's time goes, logged (at debug) every PROGRESS_EVERY.
    let (mut decoding, mut writing, mut told) = (Duration::ZERO, Duration::ZERO, Instant::now());
    while let Some(b) = batches.blocking_recv() {
        let t0 = Instant::now();
        out.clear();
        decode(&b, store, &inc.peer, |p| page_id(key, p), &mut fetch, &mut |w| disks.apply(w), &mut out, &mut stats)?;
        if !out.is_empty() {
            disks.sync_if_written()?;
        }
        let t1 = Instant::now();
        sock.write_all(&out).context("writing the stream to the destination QEMU")?;
        let t2 = Instant::now();
        (decoding, writing) = (decoding + (t1 - t0), writing + (t2 - t1));
        if t2 - told >= PROGRESS_EVERY {
            tracing::debug!(vm = %inc.vm, written_mb = written as f64 / 1e6, decoding_ms = decoding.as_millis() as u64, writing_ms = writing.as_millis() as u64, batches_waiting = batches.len(), "writing the stream to QEMU");
            (decoding, writing, told) = (Duration::ZERO, Duration::ZERO, t2);
        }
        written += out.len() as u64;
        if written - acked >= ACK_EVERY || batches.is_empty() {
            inc.tell_source_in(generation, Message::StreamAck { migration: inc.id, written });
            acked = written;
        }
    }
    store.lock().unwrap().flush()?;
    disks.sync()?;
    Ok(stats)
}

/// Waits until QEMU runs the VM (the migration succeeded) or exits (it failed).
async fn watch_qemu(shared: Arc<Shared>, inc: Arc<Incoming>) {
    let pid = shared.vms.pid(&inc.vm);
    let mut loaded_at: Option<Instant> = None;
    loop {
        if inc.outcome_now().is_some() {
            return;
        }
        if !pid.is_some_and(process_alive) {
            inc.finish(false, format!("the destination QEMU exited: {}", qemu_log(&shared, &inc.vm)));
            shared.vms.kill(&inc.vm).await;
            return;
        }
        let status = match shared.vms.qmp(&inc.vm).await {
            Ok(mut q) => match q.status().await {
                // Loaded, yet not started: QEMU may report the load completed a moment before
                // it starts the VM, but one that could not take over its disks stays so (it
                // says why in its log).
                Ok(s) if (s == "inmigrate" || s == "paused") && q.migration().await.is_ok_and(|m| m["status"] == "completed") => Ok("loaded-not-started".to_string()),
                other => other,
            },
            Err(e) => Err(e),
        };
        // An error means QEMU is exiting: the next round sees it gone.
        if status.as_ref().is_ok_and(|s| s == "running") {
            inc.finish(true, String::new());
            unexport_views(&shared, &inc.vm).await;
            if let (Ok(spec), Ok(mut qmp)) = (shared.vms.spec(&inc.vm), shared.vms.qmp(&inc.vm).await) {
                super::disks::record_writes(&mut qmp, &inc.vm, spec.disks.len()).await;
            }
            return;
        }
        if !status.as_ref().is_ok_and(|s| s == "loaded-not-started") {
            loaded_at = None;
        } else if loaded_at.get_or_insert_with(Instant::now).elapsed() >= NOT_STARTED_AFTER {
            inc.finish(false, format!("the destination QEMU loaded the VM but did not start it: {}", qemu_log(&shared, &inc.vm)));
            shared.vms.kill(&inc.vm).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each qcow2 disk's path for the disk writer becomes its QEMU's plain-file export of it.
async fn export_views(shared: &Shared, spec: &crate::vm::VmSpec, opened: &mut [std::path::PathBuf]) -> Result<()> {
    if spec.disks.iter().all(|d| d.format != "qcow2") {
        return Ok(());
    }
    let pid = shared.vms.pid(&spec.name).context("the destination QEMU is gone")?;
    let mut qmp = shared.vms.qmp(&spec.name).await?;
    let blocks = qmp.execute("query-block", json!({})).await?;
    for (i, d) in spec.disks.iter().enumerate() {
        if d.format != "qcow2" {
            continue;
        }
        opened[i] = super::disk_view::export(&mut qmp, pid, &shared.vms.dir(&spec.name), i as u8, &blocks, true).await?;
    }
    Ok(())
}

/// The VM runs: its qcow2 disks' exports, which took the records, go.
async fn unexport_views(shared: &Shared, vm: &str) {
    let Ok(spec) = shared.vms.spec(vm) else { return };
    if spec.disks.iter().all(|d| d.format != "qcow2") {
        return;
    }
    let Ok(mut qmp) = shared.vms.qmp(vm).await else { return };
    for (i, d) in spec.disks.iter().enumerate() {
        if d.format == "qcow2" {
            super::disk_view::unexport(&mut qmp, &shared.vms.dir(vm), i as u8).await;
        }
    }
}

/// What the VM's QEMU wrote to its log (why it failed, when it did).
fn qemu_log(shared: &Shared, vm: &str) -> String {
    std::fs::read_to_string(shared.vms.dir(vm).join("qemu.log")).unwrap_or_default().trim().to_string()
}

/// How long a QEMU may have loaded the VM without starting it before that counts as failure.
const NOT_STARTED_AFTER: Duration = Duration::from_secs(3);

/// The migration cannot complete here: QEMU goes (unless it already runs the VM).
async fn abort(shared: &Arc<Shared>, inc: &Arc<Incoming>, why: String) {
    if inc.outcome_now().is_some_and(|o| o.running) {
        return;
    }
    // The watcher polls: look again before killing a VM that may have just started.
    if let Ok(mut q) = shared.vms.qmp(&inc.vm).await {
        if q.status().await.is_ok_and(|s| s == "running") {
            inc.finish(true, String::new());
            return;
        }
    }
    inc.finish(false, why);
    shared.vms.kill(&inc.vm).await;
}
