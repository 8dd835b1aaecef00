//! The source side: QEMU migrates into a local socket; a pump thread splits its stream into
//! batches (pages the destination holds become references), a pool compresses them, every
//! connection of the session drains one shared queue, and the destination's return path is
//! written back to QEMU.
//!
//! Queues are small on purpose: QEMU measures its bandwidth by how fast its socket drains, and
//! decides when to stop the VM from that figure, so nothing between QEMU and the WAN may soak
//! up more than a few hundred KiB (see `session::NOTSENT_LOWAT` for the sockets' share).
use super::batch::BatchEncoder;
use super::disks::{DiskMove, PumpInput};
use super::doubt;
use super::readiness::Readiness;
use super::window::StreamWindow;
use super::{page_id, MigrateRequest, MigrateSummary};
use crate::config::AgentConfig;
use crate::control::Event;
use crate::pages::{prefix, PageId, PageStore, PAGE};
use crate::session::{self, BoxStream, Identity, WireCounter};
use crate::vm::Vms;
use crate::warm::Warm;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ferry_migrate::{Piece, Splitter, StreamEvent};
use ferry_proto::{Encoding, Message, MigrationId};
use ferry_transfer::wire::{self, Conn};
use futures::stream::{FuturesOrdered, SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Stream bytes per batch: large enough to compress well, small enough that the last batch
/// before the pause is not held back long.
const BATCH: usize = 256 << 10;
/// Batches between the pump and the compressors, and messages waiting for a connection.
const RAW_QUEUE: usize = 4;
const SEND_QUEUE: usize = 8;
const COMPRESSORS: usize = 2;
/// How often the source asks its QEMU how the migration goes.
const TICK: Duration = Duration::from_millis(100);
/// Measured on the bench guest: level 2 sends 3 % fewer bytes than 1 at no measurable cost in
/// time; 3 saves 2 % more but costs about 10 % more time. 1 MiB batches compress no better.
const ZSTD_LEVEL: i32 = 2;

/// What the pump has seen, shared with the task that reports progress.
#[derive(Default)]
pub(super) struct PumpState {
    stream_bytes: AtomicU64,
    pages_sent: AtomicU64,
    pages_referenced: AtomicU64,
    /// Pages sent as a place on a disk the destination was sent.
    pages_from_disk: AtomicU64,
    pages_zero: AtomicU64,
    /// Zero pages QEMU itself sent as one-byte records.
    qemu_zero_pages: AtomicU64,
    literal_bytes: AtomicU64,
    /// Batches as encoded (pages the destination holds already references), and as they went
    /// on the wire: what a page that must be sent costs there.
    encoded_bytes: AtomicU64,
    compressed_bytes: AtomicU64,
    /// The RAM section's END went by: the source VM has stopped.
    ram_end: AtomicBool,
    opaque: Mutex<Option<String>>,
    /// Seconds into the move when the source switched to post-copy.
    postcopy_at: Mutex<Option<f64>>,
    /// Sessions post-copy went on in after its session was lost (see `resume.rs`).
    pub(super) resumes: std::sync::atomic::AtomicU32,
    /// The stream's parser between pumps: a resumed post-copy stream goes on where it was.
    splitter: Mutex<Option<Splitter>>,
    /// Every page the destination holds by the end of the stream (left by the pump at EOF).
    sent: Mutex<Option<HashSet<PageId>>>,
}

/// What the destination holds, as far as the source knows: pages sent in this migration, those
/// the destination listed when it accepted, and those its copies of the VM's disks hold.
struct Dedup {
    key: [u8; 32],
    sent: HashSet<PageId>,
    ready: Arc<Readiness>,
    on_disk: super::disks::DiskPages,
}

impl Dedup {
    /// The store is locked only around an insert: the pump must never hold it while it waits
    /// for the window, or a page the destination asks for could not be read to answer it.
    fn page(&mut self, data: &[u8], enc: &mut BatchEncoder, store: &Mutex<PageStore>, st: &PumpState) -> Result<()> {
        if ferry_transfer::scan::is_zero(data) {
            enc.zero_page();
            st.pages_zero.fetch_add(1, Relaxed);
            return Ok(());
        }
        let id = page_id(&self.key, data);
        if self.sent.contains(&id) {
            enc.page_ref(&id);
            st.pages_referenced.fetch_add(1, Relaxed);
        } else if self.ready.holds(prefix(&id)) {
            // Kept here, so that the destination can still be given the page should the
            // prefix have matched some other page of its.
            store.lock().unwrap().insert(&id, data)?;
            enc.page_ref(&id);
            st.pages_referenced.fetch_add(1, Relaxed);
        } else if let Some(&(disk, offset)) = self.on_disk.get(&id) {
            // Kept here as well: the guest may have written the block again since, and then
            // the destination asks for the page.
            store.lock().unwrap().insert(&id, data)?;
            enc.disk_page_ref(disk, offset, &id);
            self.sent.insert(id);
            st.pages_from_disk.fetch_add(1, Relaxed);
        } else {
            enc.page(data);
            self.sent.insert(id);
            // Kept here too: should the VM come back, this site offers its pages.
            store.lock().unwrap().insert(&id, data)?;
            st.pages_sent.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

/// Reads QEMU's stream until QEMU closes it, handing batches on in stream order; disk records
/// go between QEMU's writes, in the order they come. The parser outlives the pump: post-copy
/// resumed in a new session goes on with it.
#[allow(clippy::too_many_arguments)] // QEMU's stream, what the destination holds, and where batches go
fn pump(qemu: UnixStream, dedup: Dedup, store: Arc<Mutex<PageStore>>, out: mpsc::Sender<Vec<u8>>, window: Arc<StreamWindow>, st: Arc<PumpState>, disk: Option<std::sync::mpsc::Receiver<PumpInput>>, feed: Option<super::disks::PageFeed>) -> Result<()> {
    let mut splitter = match st.splitter.lock().unwrap().take() {
        Some(mut resumed) => {
            resumed.resume();
            resumed
        }
        None => Splitter::new(),
    };
    let result = pump_with(&mut splitter, qemu, dedup, store, out, window, &st, disk, feed);
    *st.splitter.lock().unwrap() = Some(splitter);
    result
}

#[allow(clippy::too_many_arguments)]
fn pump_with(splitter: &mut Splitter, mut qemu: UnixStream, mut dedup: Dedup, store: Arc<Mutex<PageStore>>, out: mpsc::Sender<Vec<u8>>, window: Arc<StreamWindow>, st: &PumpState, mut disk: Option<std::sync::mpsc::Receiver<PumpInput>>, feed: Option<super::disks::PageFeed>) -> Result<()> {
    // Disk records stand for no stream bytes: they wait for no room in the window (the last
    // ones go while the VM stands still).
    let send = |b: Vec<u8>, stream_len: usize| -> Result<()> {
        if (stream_len > 0 && !window.acquire(stream_len as u64)) || out.blocking_send(b).is_err() {
            bail!("the session ended");
        }
        Ok(())
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut enc = BatchEncoder::default();
    let mut failed: Option<anyhow::Error> = None;
    loop {
        // Disk records go between QEMU's writes as they come (QEMU's socket is rarely quiet while
        // the window is full), and while QEMU is quiet, as soon as they come (always so while it
        // waits before the switchover, when the last ones must pass).
        let mut waited = false;
        while let Some(rx) = &disk {
            if waited && more_within(&qemu, 5) {
                break;
            }
            waited = true;
            loop {
                match rx.try_recv() {
                    Ok(PumpInput::Records(records, pages)) => {
                        if !enc.is_empty() {
                            let (b, len) = enc.take();
                            send(b, len)?;
                        }
                        send(records, 0)?;
                        dedup.on_disk.extend(pages);
                    }
                    Ok(PumpInput::Flush(done)) => {
                        let _ = done.send(());
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        disk = None;
                        break;
                    }
                }
            }
        }
        if let Some(feed) = &feed {
            let mut fresh = feed.lock().unwrap();
            if !fresh.is_empty() {
                dedup.on_disk.extend(fresh.drain(..));
            }
        }
        let n = match qemu.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading QEMU's migration stream"),
        };
        st.stream_bytes.fetch_add(n as u64, Relaxed);
        let mut on_piece = |piece: Piece<'_>| {
            if failed.is_some() {
                return;
            }
            match piece {
                Piece::Literal(b) => {
                    enc.literal(b);
                    st.literal_bytes.fetch_add(b.len() as u64, Relaxed);
                }
                Piece::Page { data, .. } => {
                    if let Err(e) = dedup.page(data, &mut enc, &store, st) {
                        failed = Some(e);
                    }
                }
                Piece::Event(StreamEvent::RamEnd) => st.ram_end.store(true, Relaxed),
                Piece::Event(StreamEvent::Opaque(reason)) => {
                    tracing::warn!("carrying the rest of the migration stream opaque: {reason}");
                    *st.opaque.lock().unwrap() = Some(reason);
                }
                Piece::Event(_) => {}
            }
            if enc.stream_len >= BATCH {
                let (b, len) = enc.take();
                if let Err(e) = send(b, len) {
                    failed = Some(e);
                }
            }
        };
        if n == 0 {
            splitter.finish(&mut on_piece);
        } else {
            splitter.feed(&buf[..n], &mut on_piece);
        }
        if let Some(e) = failed.take() {
            return Err(e);
        }
        st.qemu_zero_pages.store(splitter.stats().zero_pages, Relaxed);
        // QEMU writes in pieces of a few tens of KiB: while more follows at once, keep filling
        // the batch (a batch per piece would cost a message, a compression and an ack each).
        // Once QEMU pauses, whatever it wrote goes out: near the stop, every millisecond held
        // back here is downtime.
        if n > 0 && enc.stream_len < BATCH && more_within(&qemu, 1) {
            continue;
        }
        if !enc.is_empty() {
            let (b, len) = enc.take();
            send(b, len)?;
        }
        if n == 0 {
            *st.sent.lock().unwrap() = Some(std::mem::take(&mut dedup.sent));
            return Ok(());
        }
    }
}

/// Whether the socket has data to read within `ms` milliseconds.
fn more_within(sock: &UnixStream, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    unsafe { libc::poll(&mut fds, 1, ms) > 0 }
}

fn encode_batch(migration: MigrationId, seq: u64, raw: Vec<u8>) -> Message {
    let raw_len = raw.len() as u32;
    if raw.len() >= 512 {
        thread_local! {
            static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
        }
        let compressed = COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
            }
            c.as_mut().map(|c| c.compress(&raw))
        });
        if let Some(Ok(z)) = compressed {
            if z.len() * 100 <= raw.len() * 97 {
                return Message::StreamData { migration, seq, encoding: Encoding::Zstd, raw_len, data: Bytes::from(z) };
            }
        }
    }
    Message::StreamData { migration, seq, encoding: Encoding::Raw, raw_len, data: Bytes::from(raw) }
}

/// Compresses batches in parallel and queues them in order, then the end marker.
async fn compress_in_order(migration: MigrationId, mut raw: mpsc::Receiver<Vec<u8>>, out: mpsc::Sender<Message>, st: Arc<PumpState>) -> Result<()> {
    let mut pending: FuturesOrdered<tokio::task::JoinHandle<Message>> = FuturesOrdered::new();
    let mut seq = 0u64;
    let mut input_done = false;
    while !(input_done && pending.is_empty()) {
        tokio::select! {
            Some(done) = pending.next(), if !pending.is_empty() => {
                let msg: Message = done.context("compressor panicked")?;
                if let Message::StreamData { raw_len, data, .. } = &msg {
                    st.encoded_bytes.fetch_add(*raw_len as u64, Relaxed);
                    st.compressed_bytes.fetch_add(data.len() as u64, Relaxed);
                }
                out.send(msg).await.map_err(|_| anyhow::anyhow!("the session ended"))?;
            }
            b = raw.recv(), if !input_done && pending.len() < COMPRESSORS => match b {
                Some(b) => {
                    let s = seq;
                    pending.push_back(tokio::task::spawn_blocking(move || encode_batch(migration, s, b)));
                    seq += 1;
                }
                None => input_done = true,
            },
        }
    }
    out.send(Message::StreamEnd { migration, batches: seq }).await.map_err(|_| anyhow::anyhow!("the session ended"))?;
    Ok(())
}

type Sink = SplitSink<Conn<BoxStream>, Message>;
type Source = SplitStream<Conn<BoxStream>>;

/// One connection's writer: takes the next message from the shared queue, pinging while idle.
async fn write_loop(mut sink: Sink, queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Message>>>) -> Result<()> {
    let mut keepalive = tokio::time::interval(wire::KEEPALIVE);
    let mut drained = false;
    loop {
        let msg = tokio::select! {
            m = async { queue.lock().await.recv().await }, if !drained => match m {
                Some(m) => m,
                None => { drained = true; continue }
            },
            _ = keepalive.tick() => Message::Ping { nonce: 0 },
        };
        sink.send(msg).await.context("sending to the destination")?;
    }
}

enum FromDest {
    Outcome { running: bool, message: String },
}

async fn read_loop(mut stream: Source, ready: Arc<Readiness>, back: std::sync::mpsc::Sender<Bytes>, events: mpsc::Sender<FromDest>, window: Arc<StreamWindow>, answers: mpsc::Sender<Message>, store: Arc<Mutex<PageStore>>) -> Result<()> {
    loop {
        match wire::next(&mut stream).await? {
            Message::MigrateReady { accepted: false, reason, .. } => {
                ready.refused();
                bail!("the destination refused the VM: {reason}");
            }
            Message::MigrateReady { held, .. } => ready.accepted(&held),
            Message::PageWant { migration, id } => {
                let store = store.clone();
                let data = tokio::task::spawn_blocking(move || {
                    let mut page = vec![0u8; PAGE];
                    match store.lock().unwrap().read(&id, &mut page) {
                        Ok(true) => page,
                        _ => Vec::new(),
                    }
                })
                .await?;
                answers.send(Message::PageData { migration, id, data: Bytes::from(data) }).await.map_err(|_| anyhow::anyhow!("the session ended"))?;
            }
            Message::StreamAck { written, .. } => window.acked(written),
            Message::Ping { .. } | Message::Pong { .. } | Message::HelloAck { .. } => {}
            Message::StreamBack { data, .. } => {
                let _ = back.send(data);
            }
            Message::MigrateOutcome { running, message, .. } => {
                let _ = events.send(FromDest::Outcome { running, message }).await;
            }
            Message::Error { message, .. } => bail!("the destination failed: {message}"),
            other => bail!("unexpected {} from the destination", other.kind()),
        }
    }
}

pub struct SourceContext<'a> {
    pub cfg: &'a AgentConfig,
    pub identity: &'a Identity,
    pub warm: &'a Warm,
    pub vms: &'a Vms,
    pub store: Arc<Mutex<PageStore>>,
}

const SETUP_ATTEMPTS: u32 = 3;

/// The destination said no (it runs a VM of that name, it cannot resume a post-copy, ...):
/// trying again changes nothing.
#[derive(Debug)]
pub(super) struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// QEMU's `downtime-limit` budgets only the copy of what is left; the client also waits the
/// one-way delay for the last bytes to arrive. So QEMU gets the operator's target less that,
/// but never less than QEMU can plan with.
fn downtime_limit_ms(target_ms: u32, rtt: Duration) -> u64 {
    (target_ms as f64 - rtt.as_secs_f64() * 1e3 / 2.0).max(MIN_DOWNTIME_LIMIT_MS as f64) as u64
}

const MIN_DOWNTIME_LIMIT_MS: u64 = 20;
/// A migration that has not stopped the VM by then is not converging (the guest dirties memory
/// faster than it moves): the limit doubles every so often, as libvirt's `--timeout` would act.
const CONVERGE_AFTER: Duration = Duration::from_secs(20);
const MAX_DOWNTIME_LIMIT_MS: u64 = 2000;

/// Opens the session and has the destination start the VM's QEMU waiting for the stream.
/// The session's connections, the RTT, the pages the destination holds, and the lease that
/// keeps the warm pool from dialling replacements (handshakes and a path probe beside the
/// move) until it is dropped.
pub(super) async fn prepare(ctx: &SourceContext<'_>, req: &MigrateRequest, migration: MigrationId, spec_json: &Bytes, counter: &Arc<WireCounter>) -> Result<(Vec<Conn<BoxStream>>, Duration, HashSet<u64>, session::Lease)> {
    let (mut conns, rtt, lease) = ask(ctx, req, migration, spec_json, counter).await?;
    let mut held = HashSet::new();
    for c in conns.iter_mut() {
        loop {
            match wire::next(c).await.context("waiting for the destination to start the VM's QEMU")? {
                Message::MigrateReady { accepted: false, reason, .. } => return Err(Refused(format!("{} refused the VM: {reason}", req.to)).into()),
                Message::MigrateReady { held: h, .. } => {
                    held.extend(super::readiness::held_prefixes(&h));
                    break;
                }
                // A connection that opened after a cold move's VM already booted there.
                Message::MigrateOutcome { running: true, .. } => break,
                Message::Ping { .. } | Message::Pong { .. } | Message::HelloAck { .. } => {}
                other => bail!("unexpected {} from {} before it was ready", other.kind(), req.to),
            }
        }
    }
    Ok((conns, rtt, held, lease))
}

/// Opens the session and asks the destination to start the VM's QEMU, without waiting for it.
async fn ask(ctx: &SourceContext<'_>, req: &MigrateRequest, migration: MigrationId, spec_json: &Bytes, counter: &Arc<WireCounter>) -> Result<(Vec<Conn<BoxStream>>, Duration, session::Lease)> {
    let (mut conns, rtt, lease) = session::open_leased(ctx.cfg, ctx.identity, ctx.warm, &req.to, counter.clone()).await?;
    for c in conns.iter_mut() {
        c.send(Message::MigrateOpen { migration, vm: req.vm.clone(), spec: spec_json.clone() }).await?;
    }
    Ok((conns, rtt, lease))
}

pub async fn migrate_out(ctx: &SourceContext<'_>, req: MigrateRequest, events: mpsc::UnboundedSender<Event>) -> Result<MigrateSummary> {
    if req.cold {
        return super::cold::move_cold(ctx, req, events).await;
    }
    let started = Instant::now();
    let spec = ctx.vms.spec(&req.vm)?;
    if req.postcopy && !spec.disks.is_empty() {
        bail!("--postcopy moves diskless VMs only: {} has local disks, whose last writes must be at the destination before the VM runs there (it keeps running here)", req.vm);
    }
    let counter = Arc::new(WireCounter::default());
    // Disks: their bulk pass goes through the transfer engine while the VM runs on. With
    // `overlap_disks` (raw disks only) the destination's QEMU opens the files the pass fills,
    // and the RAM migration starts as soon as the destination has opened them and runs beside
    // the rest of the pass; otherwise the RAM migrates once the pass is committed.
    let mut disks = None;
    let mut bulk = None;
    let mut staged = Vec::new();
    if !spec.disks.is_empty() {
        // The question to the destination (a round trip) and the source's own set-up (QMP
        // calls to a QEMU its guest keeps busy) go at once; a refusal undoes the set-up.
        let (refused, begun) = tokio::join!(super::disks::refuse_if_destination_runs(ctx, &req.vm, &req.to), DiskMove::begin(ctx, &spec));
        if let Err(e) = refused {
            if let Ok(mv) = &begun {
                mv.end_with(ctx).await;
            }
            return Err(e);
        }
        let mut mv = begun?;
        mv.verify = req.verify_disks;
        let (opened, mut pass) = mv.bulk(ctx, &req.to, &events);
        // A qcow2 disk's pass carries the guest's bytes, which the destination makes qcow2
        // again only once they are all there: its QEMU cannot open them before.
        let overlap = req.overlap_disks && spec.disks.iter().all(|d| d.format == "raw");
        if req.overlap_disks && !overlap {
            tracing::info!(vm = %req.vm, "a qcow2 disk moves whole before the RAM: the RAM migration cannot run beside its bulk pass");
        }
        let ready = if overlap { staging_opened(opened, &mut pass).await } else { (&mut pass).await.map(|out| (Vec::new(), Some(out))) };
        match ready {
            Ok((ids, None)) => {
                staged = ids;
                bulk = Some(pass);
            }
            // Committed already (small disks): the copies are at their place.
            Ok((_, Some(out))) => mv.bulk_done(out),
            Err(e) => {
                mv.end_with(ctx).await;
                return Err(e.context(format!("the VM {} was not touched and keeps running here", req.vm)));
            }
        }
        disks = Some(mv);
    }
    let spec_json = Bytes::from(serde_json::to_vec(&super::Arrival { spec: spec.clone(), cold: false, staged, postcopy: req.postcopy, resume: 0 })?);
    // Without disks QEMU streams as soon as the destination is asked (see `Readiness`); with
    // disks the destination must have taken them over first.
    let early = disks.is_none();
    // Nothing has happened to the VM before the destination is ready, so setting up may be
    // tried again (connections kept warm across a link flap can turn out dead); a stream that
    // started early is cancelled first, and the VM runs on.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let migration: MigrationId = session::rand_bytes();
        let opened = if early {
            ask(ctx, &req, migration, &spec_json, &counter).await.map(|(conns, rtt, lease)| (Arc::new(Readiness::new(&req.vm, conns.len())), conns, rtt, lease))
        } else {
            prepare(ctx, &req, migration, &spec_json, &counter).await.map(|(conns, rtt, held, lease)| (Arc::new(Readiness::already(&req.vm, conns.len(), held)), conns, rtt, lease))
        };
        let (ready, conns, rtt, _lease) = match opened {
            Ok(o) => o,
            Err(e) if attempt < SETUP_ATTEMPTS && e.downcast_ref::<Refused>().is_none() => {
                tracing::warn!(to = %req.to, "setting up the migration failed, trying again: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => {
                if let Some(mv) = &disks {
                    mv.end_with(ctx).await;
                }
                return Err(e.context(format!("the VM {} was not touched and keeps running here", req.vm)));
            }
        };
        let connections = conns.len();
        let _ = events.send(Event::Started { size: spec.memory_mib as u64 * (1 << 20), connections, rtt_ms: rtt.as_secs_f64() * 1e3, attempt });

        let started_qemu = start_qemu_migration(ctx, &req, migration, rtt, disks.is_some(), bulk.is_some()).await;
        let qemu = match started_qemu {
            Ok(q) => q,
            Err(e) => {
                if let Some(mv) = &disks {
                    mv.end_with(ctx).await;
                }
                return Err(e.context(format!("the VM {} keeps running here", req.vm)));
            }
        };
        tracing::info!(vm = %req.vm, to = %req.to, at_ms = started.elapsed().as_millis() as u64, destination_ready = ready.all(), "QEMU streams");
        let st = Arc::new(PumpState::default());
        let outcome = relay(ctx, &req, migration, conns, rtt, &ready, qemu.try_clone()?, &st, &events, &counter, started, disks.as_mut(), bulk.take(), false).await;
        match outcome {
            Ok(()) => {
                tracing::info!(vm = %req.vm, to = %req.to, at_ms = started.elapsed().as_millis() as u64, "the VM runs at the destination");
                return finish_move(ctx, &req, rtt, connections, &counter, &st, started, &spec, disks).await;
            }
            Err(e) => {
                let _ = qemu.shutdown(std::net::Shutdown::Both);
                if split_status(ctx, &req.vm).await.is_some() {
                    let first = super::resume::First { rtt, connections };
                    return super::resume::resume_postcopy(ctx, &req, migration, &spec, &st, &events, &counter, started, first, e).await;
                }
                let recovered = recover_source(ctx, &req, migration).await;
                doubt::clear(&ctx.vms.dir(&req.vm));
                if !ready.all() && !ready.was_refused() && recovered.runs_here && attempt < SETUP_ATTEMPTS {
                    tracing::warn!(to = %req.to, "the destination did not get ready, trying again: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                if let Some(mv) = &disks {
                    mv.end_with(ctx).await;
                }
                return Err(e.context(format!("migration of {} to {} failed; {}", req.vm, req.to, recovered.state)));
            }
        }
    }
}

/// Waits until the destination has opened every disk's staging file (its QEMU will open them);
/// returns their transfer IDs, and the pass's outcome should it end first.
async fn staging_opened(mut opened: Vec<tokio::sync::watch::Receiver<Option<[u8; 16]>>>, pass: &mut super::disks::BulkPass<'_>) -> Result<(Vec<[u8; 16]>, Option<super::disks::BulkOutcome>)> {
    let ids = |opened: &[tokio::sync::watch::Receiver<Option<[u8; 16]>>]| opened.iter().map(|o| *o.borrow()).collect::<Option<Vec<_>>>();
    let all = async {
        for o in opened.iter_mut() {
            let _ = o.wait_for(|v| v.is_some()).await;
        }
    };
    tokio::select! {
        biased;
        out = pass => {
            let out = out?;
            Ok((ids(&opened).context("the bulk pass ended before the destination opened every disk")?, Some(out)))
        }
        _ = all => Ok((ids(&opened).context("the bulk pass ended before the destination opened every disk")?, None)),
    }
}

/// QEMU's own rate limit (bytes/s of its stream): none that matters; the window paces it.
pub(super) const MAX_BANDWIDTH: u64 = 10 << 30;

/// Points the source QEMU at a socket pair and starts its migration; returns the agent's end.
async fn start_qemu_migration(ctx: &SourceContext<'_>, req: &MigrateRequest, migration: MigrationId, rtt: Duration, with_disks: bool, hold: bool) -> Result<UnixStream> {
    let mut qmp = ctx.vms.qmp(&req.vm).await?;
    // The destination runs the moment it has loaded; the return path tells the source QEMU so.
    // With disks, QEMU waits before the switchover for the last dirty blocks to be on their way.
    // While the disks' bulk pass runs (`hold`), QEMU needs the destination's go-ahead to switch
    // over, which the agent holds back (see `SwitchoverGate`); `downtime-limit` 0 besides.
    qmp.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "return-path", "state": true}, {"capability": "pause-before-switchover", "state": with_disks}, {"capability": "switchover-ack", "state": hold}, {"capability": "postcopy-ram", "state": req.postcopy}]})).await?;
    let downtime_limit = if hold { 0 } else { downtime_limit_ms(req.downtime_ms, rtt) };
    qmp.execute("migrate-set-parameters", json!({"downtime-limit": downtime_limit, "max-bandwidth": MAX_BANDWIDTH, "zero-page-detection": "legacy"})).await?;
    let qemu = give_stream_socket(&mut qmp).await?;
    let dir = ctx.vms.dir(&req.vm);
    doubt::record(&dir, &migration, &req.to)?;
    if let Err(e) = qmp.execute("migrate", json!({"uri": "fd:ferry-mig"})).await {
        let _ = qmp.execute("closefd", json!({ "fdname": doubt::HOLD_FD })).await;
        doubt::clear(&dir);
        return Err(e);
    }
    Ok(qemu)
}

/// A socket pair for QEMU's stream, as `fd:ferry-mig`; the agent keeps the other end. QEMU
/// also keeps a copy of the agent's end, so that the agent's death alone never makes QEMU give
/// up and restart the VM (see doubt.rs).
pub(super) async fn give_stream_socket(qmp: &mut crate::qmp::Qmp) -> Result<UnixStream> {
    let (qemu, for_qemu) = UnixStream::pair()?;
    qmp.give_fd("ferry-mig", std::os::fd::AsFd::as_fd(&for_qemu)).await?;
    qmp.give_fd(doubt::HOLD_FD, std::os::fd::AsFd::as_fd(&qemu)).await?;
    Ok(qemu)
}

/// The destination runs the VM: the source's copy ends, and what the move did is summed up.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish_move(ctx: &SourceContext<'_>, req: &MigrateRequest, rtt: Duration, connections: usize, counter: &Arc<WireCounter>, st: &Arc<PumpState>, started: Instant, spec: &crate::vm::VmSpec, disks: Option<DiskMove>) -> Result<MigrateSummary> {
    let dir = ctx.vms.dir(&req.vm);
    let mut qemu_downtime_ms = None;
    let mut qemu_total_ms = None;
    let (mut postcopy_requests, mut postcopy_bytes) = (0, 0);
    for _ in 0..100 {
        let m = match ctx.vms.qmp(&req.vm).await {
            Ok(mut q) => q.migration().await.unwrap_or_default(),
            Err(_) => break,
        };
        if m["status"] == "completed" {
            qemu_downtime_ms = m["downtime"].as_f64();
            qemu_total_ms = m["total-time"].as_f64();
            postcopy_requests = m["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
            postcopy_bytes = m["ram"]["postcopy-bytes"].as_u64().unwrap_or(0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.vms.kill(&req.vm).await;
    doubt::clear(&dir);
    if disks.is_some() {
        super::disks::index_left_copies(ctx.vms.data_dir().to_path_buf(), spec.clone(), ctx.cfg.tenant_key()?);
    }
    // Only now that the destination runs the VM is every page sent known to be there: the next
    // move between these sites (either way) need not list them.
    if let Some(sent) = st.sent.lock().unwrap().take() {
        let (store, to) = (ctx.store.clone(), req.to.clone());
        tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap();
            for id in &sent {
                if store.note_peer_holds(&to, id).is_err() {
                    break;
                }
            }
            let _ = store.flush();
        });
    }
    let opaque = st.opaque.lock().unwrap().clone();
    Ok(MigrateSummary {
        vm: req.vm.clone(),
        to: req.to.clone(),
        seconds: started.elapsed().as_secs_f64(),
        qemu_downtime_ms,
        qemu_total_ms,
        rtt_ms: rtt.as_secs_f64() * 1e3,
        connections,
        wire_sent: counter.sent.load(Relaxed),
        wire_received: counter.received.load(Relaxed),
        stream_bytes: st.stream_bytes.load(Relaxed),
        pages_sent: st.pages_sent.load(Relaxed),
        pages_referenced: st.pages_referenced.load(Relaxed),
        pages_from_disk: st.pages_from_disk.load(Relaxed),
        pages_zero: st.pages_zero.load(Relaxed) + st.qemu_zero_pages.load(Relaxed),
        literal_bytes: st.literal_bytes.load(Relaxed),
        opaque,
        encrypted: !ctx.cfg.insecure_plaintext,
        disks: disks.map(|d| d.summary),
        cold: false,
        postcopy_after_s: *st.postcopy_at.lock().unwrap(),
        postcopy_requests,
        postcopy_bytes,
        postcopy_resumes: st.resumes.load(Relaxed),
    })
}

/// Carries the stream until the destination reports its VM running; any error before that
/// leaves the source to be recovered by the caller.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay(
    ctx: &SourceContext<'_>,
    req: &MigrateRequest,
    migration: MigrationId,
    conns: Vec<Conn<BoxStream>>,
    rtt: Duration,
    ready: &Arc<Readiness>,
    qemu: UnixStream,
    st: &Arc<PumpState>,
    events: &mpsc::UnboundedSender<Event>,
    counter: &Arc<WireCounter>,
    started: Instant,
    disks: Option<&mut DiskMove>,
    bulk: Option<super::disks::BulkPass<'_>>,
    resumed: bool,
) -> Result<()> {
    let (raw_tx, raw_rx) = mpsc::channel::<Vec<u8>>(RAW_QUEUE);
    let (send_tx, send_rx) = mpsc::channel::<Message>(SEND_QUEUE);
    let (dest_tx, mut dest_rx) = mpsc::channel::<FromDest>(4);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Bytes>();
    let mut tasks = tokio::task::JoinSet::new();
    let queue = Arc::new(tokio::sync::Mutex::new(send_rx));
    let window = Arc::new(StreamWindow::new(rtt));
    for c in conns {
        let (sink, stream) = c.split();
        tasks.spawn(write_loop(sink, queue.clone()));
        tasks.spawn(read_loop(stream, ready.clone(), back_tx.clone(), dest_tx.clone(), window.clone(), send_tx.clone(), ctx.store.clone()));
    }
    drop(back_tx);
    tasks.spawn(compress_in_order(migration, raw_rx, send_tx, st.clone()));
    // Pump and return-path writer are plain threads: QEMU's socket is blocking.
    // Pages exchanged with this destination before count as sent: it does not list them again.
    let store = ctx.store.clone();
    let to = req.to.clone();
    let sent = tokio::task::spawn_blocking(move || store.lock().unwrap().peer_holds(&to)).await??;
    let dedup = Dedup { key: ctx.cfg.tenant_key()?, sent, ready: ready.clone(), on_disk: Default::default() };
    let feed = disks.as_ref().map(|d| d.page_feed());
    let (pump_st, store, pump_sock) = (st.clone(), ctx.store.clone(), qemu.try_clone()?);
    let pump_window = window.clone();
    let (disk_tx, disk_rx) = std::sync::mpsc::sync_channel(super::disks::PUMP_QUEUE);
    let disk_rx = disks.is_some().then_some(disk_rx);
    let pump_thread = tokio::task::spawn_blocking(move || pump(pump_sock, dedup, store, raw_tx, pump_window, pump_st, disk_rx, feed));
    // Polled beside the loop below, never as one of its branches: a branch's body that waits
    // for the VM's QMP would wait forever for a follower holding it, which only the loop polls.
    let limit = downtime_limit_ms(req.downtime_ms, rtt);
    // QEMU may not switch over while the bulk pass runs; the clock of its convergence starts
    // once it may.
    let converging = std::sync::Mutex::new(bulk.is_none().then_some(started));
    let converging = &converging;
    // While the disks' bulk pass runs, the destination's go-ahead to switch over waits here
    // (see `SwitchoverGate`); everything after it on the return path waits behind it.
    let gate = Arc::new(SwitchoverGate::new(bulk.is_none()));
    let follow_gate = gate.clone();
    let follow_gate = &*follow_gate;
    // A move with disks tells QEMU its switchover rate itself, once the bulk pass is done.
    let mut tell_rate = disks.is_none();
    let path_bps = ctx.warm.rate_bps(&req.to).map_or(ctx.cfg.link_rate_bps, |r| r.min(ctx.cfg.link_rate_bps));
    let mut told_rate = None;
    let follow = async move {
        match disks {
            Some(d) => match d.follow(ctx, disk_tx, bulk, limit, converging, follow_gate).await {
                Ok(()) => std::future::pending::<Result<()>>().await,
                Err(e) => Err(e.context("keeping the destination's disks up to date")),
            },
            None => std::future::pending::<Result<()>>().await,
        }
    };
    let mut rp_sock = qemu;
    let die_at_shut = std::env::var("FERRY_FAULT").is_ok_and(|f| f == "source-dies-at-shut");
    let rp_gate = gate.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for data in back_rx {
            // Fault injection for the lab tests: the agent dies just as the destination says
            // it has loaded (and runs) the VM, before the source QEMU hears of it.
            if die_at_shut && data.windows(4).any(|w| w == [0, 1, 0, 4]) {
                tracing::error!("FERRY_FAULT=source-dies-at-shut: the agent dies now");
                std::process::abort();
            }
            held.extend_from_slice(&data);
            let ready = rp_gate.pass(&held);
            if rp_sock.write_all(&held[..ready]).is_err() {
                return;
            }
            held.drain(..ready);
        }
    });
    tokio::pin!(pump_thread);
    let mut pump_done = false;
    let mut tick = tokio::time::interval(TICK);
    let mut last_status = String::new();
    let mut last_view = (0.0, 0.0, 0);
    let mut limit = limit;
    let mut raised_at = Instant::now();
    // Post-copy: when the source switched, and whether the VM runs at the destination since.
    let mut switched = resumed;
    let mut dest_runs = resumed;
    // Post-copy is due: the window tightens first, and the switch waits until what was in
    // flight has drained to the tighter window (the devices' state would queue behind it).
    let mut tightened: Option<Instant> = None;
    let relay_loop = async { loop {
        tokio::select! {
            ev = dest_rx.recv() => match ev {
                Some(FromDest::Outcome { running: true, .. }) if !switched => break Ok(()),
                // Post-copy: the VM runs there, and still fetches from here what it lacks. The
                // move is over once the source QEMU has sent it all (see the tick).
                Some(FromDest::Outcome { running: true, .. }) => {
                    dest_runs = true;
                    tracing::info!(vm = %req.vm, to = %req.to, at_ms = started.elapsed().as_millis() as u64, "the VM runs at the destination; post-copy sends the rest");
                }
                Some(FromDest::Outcome { running: false, message }) => break Err(anyhow::anyhow!("the destination could not run the VM: {message}")),
                None => break Err(anyhow::anyhow!("every connection to {} closed", req.to)),
            },
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Err(e),
                Err(e) => break Err(anyhow::anyhow!("a session task failed: {e}")),
            },
            r = &mut pump_thread, if !pump_done => {
                pump_done = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("the stream pump panicked: {e}")),
                }
            }
            _ = tick.tick() => {
                let m = ctx.vms.qmp(&req.vm).await?.migration().await?;
                let status = m["status"].as_str().unwrap_or("").to_string();
                if status != last_status {
                    // QEMU's view just before: what it still had to send and at what rate it
                    // thought it would go, beside what was still on its way.
                    let (remaining_mb, qemu_mbps, expected_ms) = last_view;
                    tracing::info!(vm = %req.vm, at_ms = started.elapsed().as_millis() as u64, stream_mb = st.stream_bytes.load(Relaxed) / 1_000_000, remaining_mb, qemu_mbps, expected_ms, in_flight_mb = window.in_flight() as f64 / 1e6, told_mbps = told_rate.map_or(0, |r| r * 8 / 1_000_000), "source QEMU: {status}");
                    last_status.clone_from(&status);
                }
                tracing::debug!(vm = %req.vm, at_ms = started.elapsed().as_millis() as u64, %status, passes = m["ram"]["dirty-sync-count"].as_u64().unwrap_or(0), remaining_mb = m["ram"]["remaining"].as_u64().unwrap_or(0) as f64 / 1e6, stream_mb = st.stream_bytes.load(Relaxed) as f64 / 1e6, wire_mb = counter.sent.load(Relaxed) as f64 / 1e6, in_flight_mb = window.in_flight() as f64 / 1e6, window_mb = window.limit() as f64 / 1e6, window_starting = window.starting(), "source QEMU's progress");
                last_view = (m["ram"]["remaining"].as_u64().unwrap_or(0) as f64 / 1e6, m["ram"]["mbps"].as_f64().unwrap_or(0.0), m["expected-downtime"].as_u64().unwrap_or(0));
                if tell_rate && status == "active" {
                    let rate = super::switchover::rate(path_bps, st.encoded_bytes.load(Relaxed), st.compressed_bytes.load(Relaxed));
                    if super::switchover::worth_telling(told_rate, rate) {
                        // A QEMU that refuses the parameter (older than 8.2) migrates on its own
                        // estimate, as before: worse pauses, not a failed move.
                        match ctx.vms.qmp(&req.vm).await?.execute("migrate-set-parameters", json!({"avail-switchover-bandwidth": rate})).await {
                            Ok(_) => {
                                tracing::info!(vm = %req.vm, told_mbps = rate * 8 / 1_000_000, "QEMU plans its switchover at the rate pages cross the path");
                                told_rate = Some(rate);
                            }
                            Err(e) => {
                                tracing::warn!(vm = %req.vm, "QEMU plans its switchover on its own estimate: {e:#}");
                                tell_rate = false;
                            }
                        }
                    }
                }
                if dest_runs && status == "completed" {
                    break Ok(());
                }
                // (While a resumed post-copy's QEMUs shake hands, the source is postcopy-recover.)
                if status == "postcopy-paused" {
                    break Err(anyhow::anyhow!("post-copy paused: the source QEMU's stream broke"));
                }
                if req.postcopy && !switched && status == "active" {
                    let progress = super::postcopy::Progress::from_query(&m);
                    let rate = super::switchover::rate(path_bps, st.encoded_bytes.load(Relaxed), st.compressed_bytes.load(Relaxed));
                    let converging_for = converging.lock().unwrap().map_or(Duration::ZERO, |t| t.elapsed());
                    if tightened.is_none() && super::postcopy::due(progress, rate, converging_for) {
                        window.tighten();
                        tightened = Some(Instant::now());
                    }
                    if tightened.is_some_and(|t| window.in_flight() <= window.limit() || t.elapsed() > super::postcopy::DRAIN_AT_MOST) {
                        ctx.vms.qmp(&req.vm).await?.execute("migrate-start-postcopy", json!({})).await?;
                        switched = true;
                        *st.postcopy_at.lock().unwrap() = Some(started.elapsed().as_secs_f64());
                        tracing::info!(vm = %req.vm, at_ms = started.elapsed().as_millis() as u64, passes = progress.passes, dirty_mbps = progress.dirty_bytes_per_s * 8e-6, path_mbps = rate as f64 * 8e-6, remaining_mb = m["ram"]["remaining"].as_u64().unwrap_or(0) as f64 / 1e6, "pre-copy does not converge: switching to post-copy");
                    }
                }
                if matches!(status.as_str(), "failed" | "cancelled") {
                    break Err(anyhow::anyhow!("the source QEMU's migration {status}: {}", m["error-desc"].as_str().unwrap_or("no reason given")));
                }
                let since = *converging.lock().unwrap();
                if status == "active" && !req.postcopy && since.is_some_and(|t| t.elapsed() > CONVERGE_AFTER) && raised_at.elapsed() > CONVERGE_AFTER / 4 && limit < MAX_DOWNTIME_LIMIT_MS {
                    limit = (limit * 2).min(MAX_DOWNTIME_LIMIT_MS);
                    raised_at = Instant::now();
                    tracing::warn!(vm = %req.vm, limit_ms = limit, "the migration is not converging: allowing a longer pause");
                    ctx.vms.qmp(&req.vm).await?.execute("migrate-set-parameters", json!({"downtime-limit": limit})).await?;
                }
                let _ = events.send(Event::MigrateProgress {
                    status,
                    stream_bytes: st.stream_bytes.load(Relaxed),
                    remaining: m["ram"]["remaining"].as_u64().unwrap_or(0),
                    wire_sent: counter.sent.load(Relaxed),
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
        }
    } };
    let result = {
        tokio::pin!(relay_loop);
        tokio::select! {
            r = &mut relay_loop => r,
            // The follower fails too when the session or the pump dies: the loop's own reason
            // (the destination's word, a closed connection) says more, if it comes at once.
            Err(e) = follow => match tokio::time::timeout(Duration::from_secs(1), &mut relay_loop).await {
                Ok(Err(why)) => Err(why),
                _ => Err(e),
            },
        }
    };
    tasks.abort_all();
    window.close();
    gate.open();
    result
}

/// Holds back the destination's switchover go-ahead (QEMU's `switchover-ack`: without it the
/// source QEMU never stops the VM) until the disks' bulk pass is committed. QEMU would
/// otherwise converge on RAM alone — a guest that dirties little soon leaves nothing pending —
/// and stand still, paused before the switchover, for as long as the pass still runs.
pub struct SwitchoverGate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

/// The return path's message that lets the source switch over (QEMU's MIG_RP_MSG_SWITCHOVER_ACK).
const RP_SWITCHOVER_ACK: u16 = 7;

impl SwitchoverGate {
    fn new(open: bool) -> SwitchoverGate {
        SwitchoverGate { open: std::sync::Mutex::new(open), opened: std::sync::Condvar::new() }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn is_open(&self) -> bool {
        *self.open.lock().unwrap()
    }

    /// How much of `rp` (return-path bytes, from a message boundary) may go to QEMU now: whole
    /// messages before a held go-ahead; at the go-ahead itself the thread waits for the gate.
    fn pass(&self, rp: &[u8]) -> usize {
        let mut at = 0;
        while !self.is_open() && rp.len() - at >= 4 {
            let kind = u16::from_be_bytes([rp[at], rp[at + 1]]);
            let len = u16::from_be_bytes([rp[at + 2], rp[at + 3]]) as usize;
            if kind == RP_SWITCHOVER_ACK {
                let open = self.open.lock().unwrap();
                drop(self.opened.wait_while(open, |open| !*open).unwrap());
                break;
            }
            if rp.len() - at < 4 + len {
                return at;
            }
            at += 4 + len;
        }
        if self.is_open() {
            rp.len()
        } else {
            at
        }
    }
}

/// What a failed move left at the source.
struct Recovered {
    /// QEMU runs the VM here again: the move may be tried afresh.
    runs_here: bool,
    /// The source VM's state, for the operator.
    state: String,
}

/// After a failure: QEMU abandons the migration and, if it had stopped the VM, starts it again.
async fn recover_source(ctx: &SourceContext<'_>, req: &MigrateRequest, migration: MigrationId) -> Recovered {
    let left = |state: String| Recovered { runs_here: false, state };
    let vm = req.vm.as_str();
    if let Some(status) = split_status(ctx, vm).await {
        return left(format!("post-copy was under way (the source QEMU is {status}): the VM runs at {} but lacks pages only this site's QEMU holds, so both QEMUs are kept as they are", req.to));
    }
    if let Ok(mut q) = ctx.vms.qmp(vm).await {
        let _ = q.execute("migrate_cancel", json!({})).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = match ctx.vms.qmp(vm).await {
            Ok(mut q) => q.status().await,
            Err(e) => Err(e),
        };
        match status {
            Ok(s) if s == "running" => {
                if let Ok(mut q) = ctx.vms.qmp(vm).await {
                    let _ = q.execute("closefd", json!({ "fdname": doubt::HOLD_FD })).await;
                }
                return Recovered { runs_here: true, state: "the VM keeps running here".into() };
            }
            // QEMU completed: the destination loaded the VM and may run it. Only its word
            // decides which copy runs.
            Ok(s) if s == "postmigrate" => return left(doubt::settle(ctx, vm, &req.to, migration).await),
            Ok(s) if Instant::now() > deadline => return left(format!("the source VM is {s}")),
            Err(e) => return left(format!("the source QEMU does not answer: {e:#}")),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The source QEMU's migration status if post-copy is under way (the VM's state is split).
pub(super) async fn split_status(ctx: &SourceContext<'_>, vm: &str) -> Option<String> {
    let m = ctx.vms.qmp(vm).await.ok()?.migration().await.ok()?;
    let status = m["status"].as_str()?;
    super::postcopy::split_between_sites(status).then(|| status.to_string())
}

#[allow(dead_code)]
const _: () = assert!(PAGE == ferry_migrate::PAGE_SIZE);

#[cfg(test)]
mod gate_tests {
    use super::*;

    #[test]
    fn the_go_ahead_waits_for_the_gate_and_what_precedes_it_does_not() {
        let gate = Arc::new(SwitchoverGate::new(false));
        // Two return-path messages (a 2-byte one of type 3, then the go-ahead) and half of a third.
        let rp = [0, 3, 0, 2, 0xaa, 0xbb, 0, RP_SWITCHOVER_ACK as u8, 0, 0, 0, 5];
        assert_eq!(gate.pass(&rp[..6]), 6);
        assert_eq!(gate.pass(&rp[..5]), 0, "a message is passed whole");
        let held = Instant::now();
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                gate.open();
            })
        };
        assert_eq!(gate.pass(&rp), rp.len(), "once open, everything goes");
        assert!(held.elapsed() >= Duration::from_millis(100), "the go-ahead went before the gate opened");
        opener.join().unwrap();
    }
}
