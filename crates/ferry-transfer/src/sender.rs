//! The sending side: scan the object into rounds of blocks, ANNOUNCE each round on one of the
//! session's connections, answer WANT with compressed chunks, count ACKs; then DONE with the
//! object digest and wait for COMMITTED. Many rounds are in flight on every connection.
use crate::compress::Compressor;
use crate::manifest::ObjectDigest;
use crate::progress::Progress;
use crate::scan::{scan_first, Block, ChunkHasher, Chunker};
use crate::wire::{self, Conn};
use anyhow::{bail, Context, Result};
use ferry_proto::{Encoding, Message};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};

/// Blocks per round: 256 × 64 KiB = 16 MiB of object per ANNOUNCE (about 11 KB of IDs).
pub const ROUND_BLOCKS: usize = 256;
/// Rounds announced ahead of their ACK, per connection. IDs are cheap; this keeps the WANTs
/// coming for a full RTT on a fast link.
const ROUNDS_IN_FLIGHT: usize = 32;
/// Compressed chunks waiting for a connection with room: enough to keep every socket fed,
/// small enough that memory stays bounded (about 64 × 64 KiB).
const CHUNK_QUEUE: usize = 64;

#[derive(Clone, Debug)]
pub struct SendSpec {
    pub source: PathBuf,
    pub dest_path: String,
    pub base: Option<String>,
    pub chunker: Chunker,
    pub zstd_level: i32,
    pub transfer: [u8; 16],
    pub tenant_key: [u8; 32],
    /// The source changes while it is sent (a running VM's disk, whose changes something else
    /// tracks): a block that no longer matches its announced ID goes as it is now, under its
    /// new ID, instead of failing the transfer.
    pub live: bool,
    /// Byte ranges (start, length) whose blocks go before the rest (fixed blocks only): those
    /// the caller wants at the receiver soonest.
    pub first: Vec<(u64, u64)>,
    /// Told how the send goes (see `SendObserver`).
    pub observer: Option<Observer>,
}

/// Learns, as a send goes, what the receiver holds: a caller that refers to the object's
/// blocks elsewhere (a live disk's pages in a VM's memory) may do so once they are there.
pub trait SendObserver: Send + Sync {
    /// The receiver accepted the object (its staging file exists).
    fn opened(&self, _transfer: &[u8; 16]) {}
    /// A block of `round` goes out as `data`: what the receiver will hold at `offset`.
    fn sent(&self, _round: u64, _offset: u64, _data: &[u8]) {}
    /// The receiver holds every block of `round` (written to its staging file).
    fn acked(&self, _round: u64) {}
}

#[derive(Clone)]
pub struct Observer(pub Arc<dyn SendObserver>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// Blocks of a live source that changed after they were announced: (round, index) → new ID.
type Changed = std::sync::Mutex<HashMap<(u64, u32), crate::scan::ChunkId>>;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SendOutcome {
    pub size: u64,
    pub digest: String,
    pub rounds: u64,
    pub seconds: f64,
}

struct Round {
    number: u64,
    blocks: Vec<Block>,
}

/// Sends one object over the session's connections. Rounds are announced on any connection;
/// the chunks the receiver wants are read and compressed by a small worker pool into one
/// queue that every connection drains as fast as its socket takes them, so a connection that
/// got the data-heavy rounds never becomes the tail. OPEN and the first ANNOUNCEs go out
/// without waiting for the answers (the receiver handles them in order), so the first WANT comes
/// back one round trip after the connections are up.
///
/// Returns the connections too, each with nothing left to read of this send, for the next.
pub async fn send<S>(conns: Vec<Conn<S>>, spec: SendSpec, progress: Arc<Progress>) -> Result<(SendOutcome, Vec<Conn<S>>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    anyhow::ensure!(!conns.is_empty(), "a session needs at least one connection");
    let file = Arc::new(File::open(&spec.source).with_context(|| format!("opening {}", spec.source.display()))?);
    let size = file.metadata()?.len();
    let n = conns.len();
    let (round_tx, round_rx) = mpsc::channel::<Round>(ROUNDS_IN_FLIGHT);
    let scanner = {
        let (file, progress, hasher) = (file.clone(), progress.clone(), ChunkHasher::new(spec.tenant_key));
        let (chunker, live, first) = (spec.chunker, spec.live, spec.first.clone());
        tokio::task::spawn_blocking(move || at_priority(live, || scan_into_rounds(&file, size, chunker, &first, &hasher, &progress, round_tx, live)))
    };
    let changed: Arc<Changed> = Arc::default();
    let (chunk_tx, chunk_rx) = mpsc::channel::<Message>(CHUNK_QUEUE);
    let (want_tx, want_rx) = std::sync::mpsc::channel::<WantJob>();
    let want_rx = Arc::new(std::sync::Mutex::new(want_rx));
    let workers: Vec<_> = (0..compression_workers())
        .map(|_| {
            let (rx, out, file, progress, transfer, level) = (want_rx.clone(), chunk_tx.clone(), file.clone(), progress.clone(), spec.transfer, spec.zstd_level);
            let (urgent, live) = (spec.live, spec.live.then(|| (ChunkHasher::new(spec.tenant_key), changed.clone())));
            let observer = spec.observer.clone();
            tokio::task::spawn_blocking(move || at_priority(urgent, || serve_wants(&rx, &out, &file, &progress, transfer, level, live, observer)))
        })
        .collect();
    drop(chunk_tx);
    let (finished_tx, finished_rx) = tokio::sync::watch::channel(false);
    let committed: Arc<std::sync::Mutex<Option<Message>>> = Arc::default();
    let shared = Arc::new(Shared {
        rounds: Mutex::new(round_rx),
        window: Arc::new(tokio::sync::Semaphore::new(ROUNDS_IN_FLIGHT * n)),
        in_flight: std::sync::Mutex::new(InFlight::default()),
        chunks: Mutex::new(chunk_rx),
        wants: want_tx,
        progress: progress.clone(),
        transfer: spec.transfer,
        finished: finished_tx,
        all_answered: tokio::sync::watch::Sender::new(false),
        committed: committed.clone(),
        observer: spec.observer.clone(),
    });
    let open = Message::Open {
        transfer: spec.transfer,
        path: spec.dest_path.clone(),
        size,
        chunking: spec.chunker.to_wire(),
        base: spec.base.clone(),
    };
    // DONE goes out as soon as every round has its WANT, ahead of the chunks still to come, so
    // the seal costs no round trip of its own; a live source's digest is known only once its
    // last block was read, so its DONE waits for the ACKs.
    let early_done = !spec.live;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Message>();
    let mut done_rx = early_done.then_some(done_rx);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let first = (i == 0).then(|| open.clone());
        let done = if i == 0 { done_rx.take() } else { None };
        tasks.spawn(run_connection(i, conn, shared.clone(), finished_rx.clone(), first, done));
    }
    let join_connections = async {
        let mut conns: Vec<Option<Conn<S>>> = (0..n).map(|_| None).collect();
        let mut done_sent = false;
        while let Some(joined) = tasks.join_next().await {
            // The first connection to fail fails the attempt; the JoinSet aborts the others.
            let (i, conn, sent) = joined.context("connection task panicked")??;
            conns[i] = Some(conn);
            done_sent |= sent;
        }
        Ok::<_, anyhow::Error>((conns, done_sent))
    };
    let announce_done = {
        let shared = shared.clone();
        async move {
            let scanned = scanner.await.context("scanner panicked")??;
            if let (true, Scanned::Digest(digest)) = (early_done, &scanned.0) {
                let _ = shared.all_answered.subscribe().wait_for(|a| *a).await;
                let _ = done_tx.send(Message::Done { transfer: spec.transfer, size, digest: *digest });
            }
            Ok::<_, anyhow::Error>(scanned)
        }
    };
    let ((mut conns, done_sent), (scanned, round_count)) = tokio::try_join!(join_connections, announce_done)?;
    drop(shared);
    for w in workers {
        w.await.context("compression worker panicked")??;
    }
    let digest = match scanned {
        Scanned::Digest(digest) => digest,
        Scanned::Blocks(mut blocks) => {
            // The digest names what was placed: a changed block under its new ID.
            for ((round, index), id) in changed.lock().unwrap().drain() {
                if let Some(b) = blocks.get_mut(round as usize * ROUND_BLOCKS + index as usize) {
                    b.id = Some(id);
                }
            }
            digest_in_order(&spec.chunker, size, blocks)
        }
    };
    let control = conns[0].as_mut().expect("connection 0 returned");
    if !done_sent {
        control.send(Message::Done { transfer: spec.transfer, size, digest }).await?;
    }
    // The receiver verifies and syncs a large file before it answers, pinging meanwhile.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let early = committed.lock().unwrap().take();
        let msg = match early {
            Some(m) => m,
            None => tokio::time::timeout_at(deadline.into(), wire::next(control)).await.context("no COMMITTED from the destination")??,
        };
        match msg {
            Message::Ping { .. } | Message::Pong { .. } => continue,
            Message::Committed { ok: true, digest: theirs, .. } if theirs == digest => break,
            Message::Committed { ok: true, .. } => bail!("the destination committed a different digest"),
            Message::Committed { message, .. } => bail!("the destination did not commit: {message}"),
            other => bail!("expected COMMITTED, got {}", other.kind()),
        }
    }
    let outcome = SendOutcome { size, digest: hex(&digest), rounds: round_count, seconds: started.elapsed().as_secs_f64() };
    Ok((outcome, conns.into_iter().flatten().collect()))
}

/// A live source's pass holds its VM's switchover back, so it runs at the priority of the
/// migration stream beside it (at background priority the RAM's first pass was done 0.8-1.6 s
/// before it, and waited); any other send yields to the agent's latency-bound work.
fn at_priority<T>(live: bool, work: impl FnOnce() -> T) -> T {
    if live {
        work()
    } else {
        crate::priority::background(work)
    }
}

/// Reading and compressing is the sender's CPU work; more workers than cores only adds threads.
fn compression_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a scan leaves for DONE: the object digest, or, for a live source, every block in the
/// order scanned (their IDs may still change before they are sent, so the digest waits).
enum Scanned {
    Digest([u8; 32]),
    Blocks(Vec<Block>),
}

/// Scans the object into rounds; returns what DONE needs and the number of rounds.
#[allow(clippy::too_many_arguments)] // the object, how it is cut and in which order, and where rounds go
fn scan_into_rounds(file: &File, size: u64, chunker: Chunker, first: &[(u64, u64)], hasher: &ChunkHasher, progress: &Progress, tx: mpsc::Sender<Round>, live: bool) -> Result<(Scanned, u64)> {
    // The digest takes the blocks in the object's order: blocks scanned out of order, or a live
    // source's, are kept and digested at the end.
    let keep = live || !first.is_empty();
    let mut digest = ObjectDigest::new(&chunker, size);
    let mut all = Vec::new();
    let mut current = Vec::with_capacity(ROUND_BLOCKS);
    let mut number = 0u64;
    scan_first(file, size, chunker, first, hasher, |b| {
        if keep {
            all.push(b);
        } else {
            digest.add(&b);
        }
        progress.scanned.fetch_add(b.len as u64, Relaxed);
        if b.id.is_none() {
            progress.zero.fetch_add(b.len as u64, Relaxed);
        }
        current.push(b);
        if current.len() == ROUND_BLOCKS {
            let blocks = std::mem::replace(&mut current, Vec::with_capacity(ROUND_BLOCKS));
            tx.blocking_send(Round { number, blocks }).map_err(|_| anyhow::anyhow!("transfer aborted"))?;
            number += 1;
        }
        Ok(())
    })?;
    if !current.is_empty() {
        tx.blocking_send(Round { number, blocks: current }).map_err(|_| anyhow::anyhow!("transfer aborted"))?;
        number += 1;
    }
    let scanned = match (live, keep) {
        (true, _) => Scanned::Blocks(all),
        (false, true) => Scanned::Digest(digest_in_order(&chunker, size, all)),
        (false, false) => Scanned::Digest(digest.finish()),
    };
    Ok((scanned, number))
}

/// The object digest of blocks in any order.
fn digest_in_order(chunker: &Chunker, size: u64, mut blocks: Vec<Block>) -> [u8; 32] {
    blocks.sort_unstable_by_key(|b| b.offset);
    let mut d = ObjectDigest::new(chunker, size);
    blocks.iter().for_each(|b| d.add(b));
    d.finish()
}

struct WantJob {
    round: u64,
    blocks: Arc<Vec<Block>>,
    wanted: Vec<u32>,
}

/// A round's blocks, its bytes still owed, and its place in the window.
type RoundInFlight = (Arc<Vec<Block>>, u64, Option<tokio::sync::OwnedSemaphorePermit>);

#[derive(Default)]
struct InFlight {
    /// Announced, not yet acknowledged: the blocks, the bytes wanted, the window permit.
    rounds: HashMap<u64, RoundInFlight>,
    /// Announced, no WANT yet.
    unanswered: std::collections::HashSet<u64>,
    scan_done: bool,
}

/// What the connections of one send share.
struct Shared {
    rounds: Mutex<mpsc::Receiver<Round>>,
    window: Arc<tokio::sync::Semaphore>,
    in_flight: std::sync::Mutex<InFlight>,
    chunks: Mutex<mpsc::Receiver<Message>>,
    wants: std::sync::mpsc::Sender<WantJob>,
    progress: Arc<Progress>,
    transfer: [u8; 16],
    finished: tokio::sync::watch::Sender<bool>,
    /// Every round announced so far has its WANT, and the scan is over.
    all_answered: tokio::sync::watch::Sender<bool>,
    /// COMMITTED, when it came before the last ACK (on another connection).
    committed: Arc<std::sync::Mutex<Option<Message>>>,
    observer: Option<Observer>,
}

impl Shared {
    /// The next round to announce, once the window has room; None when the scan is over.
    async fn next_round(&self) -> Option<(u64, Arc<Vec<Block>>)> {
        let permit = self.window.clone().acquire_owned().await.ok()?;
        let round = self.rounds.lock().await.recv().await;
        let mut f = self.in_flight.lock().unwrap();
        match round {
            Some(r) => {
                let blocks = Arc::new(r.blocks);
                f.rounds.insert(r.number, (blocks.clone(), 0, Some(permit)));
                f.unanswered.insert(r.number);
                Some((r.number, blocks))
            }
            None => {
                f.scan_done = true;
                self.check_finished(&f);
                None
            }
        }
    }

    fn want(&self, round: u64, wanted: Vec<u32>) -> Result<()> {
        let blocks = {
            let mut f = self.in_flight.lock().unwrap();
            let entry = f.rounds.get_mut(&round).with_context(|| format!("WANT for unknown round {round}"))?;
            entry.1 += wanted.iter().filter_map(|&i| entry.0.get(i as usize)).map(|b| b.len as u64).sum::<u64>();
            let blocks = entry.0.clone();
            f.unanswered.remove(&round);
            self.check_finished(&f);
            blocks
        };
        if !wanted.is_empty() {
            self.wants.send(WantJob { round, blocks, wanted }).map_err(|_| anyhow::anyhow!("the compression workers stopped"))?;
        }
        Ok(())
    }

    fn ack(&self, round: u64) -> Result<()> {
        let mut f = self.in_flight.lock().unwrap();
        let (blocks, wanted, _permit) = f.rounds.remove(&round).with_context(|| format!("ACK for unknown round {round}"))?;
        f.unanswered.remove(&round);
        let data: u64 = blocks.iter().filter(|b| b.id.is_some()).map(|b| b.len as u64).sum();
        // Data the receiver did not ask for it found locally.
        self.progress.reused.fetch_add(data.saturating_sub(wanted), Relaxed);
        self.progress.acked.fetch_add(blocks.iter().map(|b| b.len as u64).sum(), Relaxed);
        if let Some(Observer(o)) = &self.observer {
            o.acked(round);
        }
        self.check_finished(&f);
        Ok(())
    }

    fn check_finished(&self, f: &InFlight) {
        if f.scan_done && f.unanswered.is_empty() {
            self.all_answered.send_replace(true);
        }
        if f.scan_done && f.rounds.is_empty() {
            let _ = self.finished.send(true);
        }
    }

    async fn next_chunk(&self) -> Option<Message> {
        self.chunks.lock().await.recv().await
    }
}

/// One connection: its reader handles WANT and ACK for any round; its writer sends its own
/// control messages first, then whatever chunk is next in the shared queue.
/// The connection that carried OPEN also carries DONE (`done`, once the sender has it), and
/// says whether it did.
async fn run_connection<S>(index: usize, conn: Conn<S>, shared: Arc<Shared>, mut finished: tokio::sync::watch::Receiver<bool>, open: Option<Message>, mut done: Option<tokio::sync::oneshot::Receiver<Message>>) -> Result<(usize, Conn<S>, bool)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = conn.split();
    let (control_tx, mut control_rx) = mpsc::channel::<Message>(64);
    if let Some(open) = open {
        sink.send(open).await?;
    }
    let writer = {
        let shared = shared.clone();
        let mut finished = finished.clone();
        tokio::spawn(async move {
            let mut chunks_done = false;
            loop {
                let msg = tokio::select! {
                    biased;
                    m = control_rx.recv() => match m { Some(m) => m, None => break },
                    m = shared.next_chunk(), if !chunks_done => match m { Some(m) => m, None => { chunks_done = true; continue } },
                    _ = until_finished(&mut finished), if chunks_done => break,
                };
                sink.feed(msg).await?;
                while let Ok(more) = control_rx.try_recv() {
                    sink.feed(more).await?;
                }
                sink.flush().await?;
            }
            sink.flush().await?;
            Ok::<_, anyhow::Error>(sink)
        })
    };
    let writer = wire::Writer::new(writer);
    let mut keepalive = tokio::time::interval(wire::KEEPALIVE);
    let mut scan_done = false;
    let mut done_sent = false;
    loop {
        tokio::select! {
            _ = until_finished(&mut finished), if done.is_none() => break,
            m = async { done.as_mut().expect("guarded").await }, if done.is_some() => {
                done = None;
                if let Ok(m) = m {
                    wire::queue(&control_tx, m).await?;
                    done_sent = true;
                }
            }
            round = shared.next_round(), if !scan_done => match round {
                Some((number, blocks)) => {
                    let entries = blocks.iter().map(wire::entry_of).collect();
                    wire::queue(&control_tx, Message::Announce { transfer: shared.transfer, round: number, entries }).await?;
                }
                None => scan_done = true,
            },
            msg = wire::next(&mut stream) => match msg? {
                Message::Want { round, wanted, .. } => shared.want(round, wanted)?,
                Message::Ack { round, .. } => shared.ack(round)?,
                // The answers to what was sent without waiting for them.
                Message::HelloAck { .. } => {}
                Message::OpenAck { accepted: true, transfer, .. } => {
                    if let Some(Observer(o)) = &shared.observer {
                        o.opened(&transfer);
                    }
                }
                Message::OpenAck { reason, .. } => bail!("the destination refused the transfer: {reason}"),
                Message::Pong { .. } | Message::Ping { .. } => {}
                Message::Committed { ok: false, message, .. } => bail!("the destination did not commit: {message}"),
                m @ Message::Committed { .. } => *shared.committed.lock().unwrap() = Some(m),
                Message::Error { message, .. } => bail!("the destination reported: {message}"),
                other => bail!("unexpected {} from the destination", other.kind()),
            },
            _ = keepalive.tick() => wire::ping(&control_tx),
        }
    }
    drop(control_tx);
    let sink = writer.finish().await?;
    Ok((index, sink.reunite(stream).expect("halves of one connection"), done_sent))
}

async fn until_finished(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|f| *f).await;
}

/// A compression worker: reads the wanted blocks in the order they were asked for, compresses
/// them (raw where that does not pay) and queues the chunks; the bounded queue is the
/// back-pressure from the sockets.
#[allow(clippy::too_many_arguments)] // the job queue, its sinks, and how each block is treated
fn serve_wants(jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<WantJob>>, out: &mpsc::Sender<Message>, file: &File, progress: &Progress, transfer: [u8; 16], level: i32, live: Option<(ChunkHasher, Arc<Changed>)>, observer: Option<Observer>) -> Result<()> {
    let mut compressor = Compressor::new(level)?;
    let mut buf = Vec::new();
    loop {
        let job = match jobs.lock().unwrap().recv() {
            Ok(j) => j,
            Err(_) => return Ok(()), // the send is over
        };
        for index in job.wanted {
            let b = job.blocks.get(index as usize).with_context(|| format!("WANT index {index} outside round {}", job.round))?;
            let Some(mut id) = b.id else { bail!("WANT for a zero range") };
            buf.resize(b.len as usize, 0);
            file.read_exact_at(&mut buf, b.offset)?;
            if let Some((hasher, changed)) = &live {
                let now = hasher.id(&buf);
                if now != id {
                    id = now;
                    changed.lock().unwrap().insert((job.round, index), now);
                }
            }
            if let Some(Observer(o)) = &observer {
                o.sent(job.round, b.offset, &buf);
            }
            let (encoding, data) = match compressor.compress(&buf)? {
                Some(z) => (Encoding::Zstd, bytes::Bytes::copy_from_slice(z)),
                None => (Encoding::Raw, bytes::Bytes::copy_from_slice(&buf)),
            };
            progress.wanted_raw.fetch_add(b.len as u64, Relaxed);
            progress.sent_payload.fetch_add(data.len() as u64, Relaxed);
            let msg = Message::Chunk { transfer, round: job.round, index, id, encoding, raw_len: b.len, data };
            if out.blocking_send(msg).is_err() {
                return Ok(()); // the connections are gone; their tasks report why
            }
        }
    }
}
