//! The receiving side: for each announced round, place what it already holds (the cut
//! transfer's staging, its older copy, a base, any committed object) and WANT the rest; verify
//! every arriving chunk against its ID before writing it; ACK a round when all of it is in
//! place; at DONE, check the object digest and only then commit by rename.
use crate::catalog;
use crate::compress::with_decompressed;
use crate::local::LocalChunks;
use crate::manifest::ObjectDigest;
use crate::progress::Progress;
use crate::scan::{Block, ChunkHasher, Chunker};
use crate::staging::Staging;
use crate::wire::{self, block_of, Conn};
use anyhow::{bail, Context, Result};
use ferry_proto::{Chunking, Encoding, Message};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use crate::priority::background;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

pub struct ReceiverConfig {
    pub data_dir: PathBuf,
    pub tenant_key: [u8; 32],
    /// Where an older copy of the object bound for a path may be when not at that path (a site
    /// that lands some objects beside their place, as a raw file it turns into another format).
    pub older_copy: fn(&Path) -> Option<PathBuf>,
}

impl ReceiverConfig {
    pub fn new(data_dir: PathBuf, tenant_key: [u8; 32]) -> ReceiverConfig {
        ReceiverConfig { data_dir, tenant_key, older_copy: |_| None }
    }
}

/// What the connections of one session share.
pub struct Session {
    cfg: Arc<ReceiverConfig>,
    transfer: tokio::sync::watch::Sender<Option<Arc<Transfer>>>,
    /// Local copies run at once: the disk, not the thread count, sets the pace.
    copy_slots: Arc<tokio::sync::Semaphore>,
    /// Woken whenever a round of the open transfer is complete: a DONE that came early waits.
    round_complete: tokio::sync::Notify,
    /// DONEs being sealed: the sender, waiting for COMMITTED, is silent meanwhile.
    sealing: std::sync::atomic::AtomicUsize,
}

impl Session {
    pub fn new(cfg: Arc<ReceiverConfig>) -> Arc<Self> {
        Arc::new(Session { cfg, transfer: tokio::sync::watch::Sender::new(None), copy_slots: Arc::new(tokio::sync::Semaphore::new(2)), round_complete: tokio::sync::Notify::new(), sealing: Default::default() })
    }

    fn is_open(&self) -> bool {
        self.transfer.borrow().is_some()
    }

    /// The open transfer with this id. The sender does not wait for OPEN-ACK before announcing,
    /// so an ANNOUNCE on another connection can overtake the OPEN: wait for it, briefly.
    async fn current(&self, id: &[u8; 16]) -> Result<Arc<Transfer>> {
        let mut rx = self.transfer.subscribe();
        let found = tokio::time::timeout(wire::IDLE_LIMIT, rx.wait_for(|t| t.as_ref().is_some_and(|t| &t.id == id))).await;
        match found {
            Ok(Ok(t)) => Ok(t.clone().expect("matched")),
            _ => bail!("no open transfer with that id in this session"),
        }
    }
}

struct RoundState {
    blocks: Vec<Block>,
    /// Per block: still expected from the sender.
    missing: Vec<bool>,
    missing_count: u32,
    /// Blocks still being copied from local data.
    local_pending: bool,
    reused: u32,
    received: u32,
}

struct Transfer {
    id: [u8; 16],
    object: String,
    staging: Staging,
    local: LocalChunks,
    hasher: ChunkHasher,
    chunker: Chunker,
    rounds: Mutex<BTreeMap<u64, RoundState>>,
    progress: Progress,
    data_dir: PathBuf,
}

/// Serves one connection of a transfer session; `first` is a message already read from it.
/// Ends when the peer closes the connection, or (returning it with the HELLO) when the peer
/// starts a new session on it: connections outlive sessions, so the next transfer starts at
/// the rate the last one reached instead of in slow start.
pub async fn serve<S>(conn: Conn<S>, session: Arc<Session>, first: Option<Message>) -> Result<Option<(Conn<S>, Message)>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sink, mut stream) = conn.split();
    let (out, writer) = wire::spawn_writer(sink);
    match serve_messages(&mut stream, &session, &out, first).await {
        Err(e) => {
            // The sender hears why (a full disk, a digest that does not match) rather than
            // seeing the connection drop; a connection that is itself broken just fails to
            // carry it.
            if out.try_send(Message::Error { code: 1, message: format!("{e:#}") }).is_ok() {
                drop(out);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer.finish()).await;
            }
            Err(e)
        }
        Ok(None) => Ok(None),
        Ok(Some(hello)) => {
            drop(out);
            let sink = tokio::time::timeout(wire::IDLE_LIMIT, writer.finish()).await.context("the last session's replies are still queued")??;
            Ok(Some((sink.reunite(stream).expect("halves of one connection"), hello)))
        }
    }
}

/// Returns the HELLO of a new session on this connection, if the peer starts one.
async fn serve_messages<S>(stream: &mut futures::stream::SplitStream<Conn<S>>, session: &Arc<Session>, out: &tokio::sync::mpsc::Sender<Message>, mut first: Option<Message>) -> Result<Option<Message>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let msg = match first.take() {
            Some(m) => m,
            None => match tokio::time::timeout(wire::IDLE_LIMIT, stream.next()).await {
            Err(_) if session.sealing.load(Relaxed) > 0 => continue,
            Err(_) if !session.is_open() => return Ok(None), // an idle spare connection
            Err(_) => bail!("the sender sent nothing for {} s: link cut?", wire::IDLE_LIMIT.as_secs()),
            Ok(None) => return Ok(None),
            Ok(Some(m)) => m.context("reading from the sender")?,
            },
        };
        match msg {
            Message::Open { transfer, path, size, chunking, base } => {
                let cfg = session.cfg.clone();
                let opened = tokio::task::spawn_blocking(move || background(|| open_transfer(&cfg, transfer, &path, size, chunking, base.as_deref()))).await?;
                let reply = match opened {
                    Ok(t) => {
                        session.transfer.send_replace(Some(Arc::new(t)));
                        Message::OpenAck { transfer, accepted: true, reason: String::new() }
                    }
                    Err(e) => Message::OpenAck { transfer, accepted: false, reason: format!("{e:#}") },
                };
                wire::queue(out, reply).await?;
            }
            Message::Announce { transfer, round, entries } => {
                let t = session.current(&transfer).await?;
                let blocks: Vec<Block> = entries.iter().map(block_of).collect();
                let planner = t.clone();
                let (wanted, local, complete) = tokio::task::spawn_blocking(move || background(|| planner.plan_round(round, blocks))).await??;
                wire::queue(out, Message::Want { transfer, round, wanted }).await?;
                if let Some((reused, received)) = complete {
                    wire::queue(out, Message::Ack { transfer, round, reused, received }).await?;
                }
                if !local.is_empty() {
                    // The WANT is out; the local copies proceed off this connection's path.
                    let (out, slots, session) = (out.clone(), session.copy_slots.clone(), session.clone());
                    tokio::spawn(async move {
                        let _slot = slots.acquire_owned().await;
                        let copied = tokio::task::spawn_blocking(move || background(|| t.copy_local(round, local))).await;
                        let result = match copied {
                            Ok(Ok((failed, done))) => {
                                let mut r = Ok(());
                                if !failed.is_empty() {
                                    r = wire::queue(&out, Message::Want { transfer, round, wanted: failed }).await;
                                }
                                if let (Ok(()), Some((reused, received))) = (&r, done) {
                                    r = wire::queue(&out, Message::Ack { transfer, round, reused, received }).await;
                                    session.round_complete.notify_waiters();
                                }
                                r
                            }
                            Ok(Err(e)) => Err(e),
                            Err(e) => Err(e.into()),
                        };
                        if let Err(e) = result {
                            tracing::warn!(round, "copying local blocks failed: {e:#}");
                            let _ = out.try_send(Message::Error { code: 2, message: format!("round {round}: {e:#}") });
                        }
                    });
                }
            }
            Message::Chunk { transfer, round, index, id, encoding, raw_len, data } => {
                let t = session.current(&transfer).await?;
                let done = tokio::task::spawn_blocking(move || background(|| t.place_chunk(round, index, &id, encoding, raw_len, &data))).await??;
                if let Some((reused, received)) = done {
                    wire::queue(out, Message::Ack { transfer, round, reused, received }).await?;
                    session.round_complete.notify_waiters();
                }
            }
            Message::Done { transfer, size, digest } => {
                let t = session.current(&transfer).await?;
                // DONE may overtake the last chunks, which travel on other connections: this
                // connection goes on reading them while the seal waits for them.
                let (session, out) = (session.clone(), out.clone());
                session.sealing.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let reply = match seal(&session, t, size, &digest, &out).await {
                        Ok(()) => Message::Committed { transfer, ok: true, digest, message: String::new() },
                        Err(e) => Message::Committed { transfer, ok: false, digest, message: format!("{e:#}") },
                    };
                    let _ = wire::queue(&out, reply).await;
                    session.sealing.fetch_sub(1, Relaxed);
                });
            }
            Message::Ping { nonce } => {
                let _ = out.try_send(Message::Pong { nonce });
            }
            // A sender opens a new session only on a connection whose last one is over.
            hello @ Message::Hello { .. } => return Ok(Some(hello)),
            other => bail!("unexpected {} from the sender", other.kind()),
        }
    }
}

/// Seals a transfer at DONE: waits until every announced round is in place (the sender says
/// DONE once it has every WANT, so its last chunks may still be on their way), then checks the
/// object digest and commits. Pings the sender meanwhile, which waits in silence otherwise.
async fn seal(session: &Session, t: Arc<Transfer>, size: u64, digest: &[u8; 32], out: &tokio::sync::mpsc::Sender<Message>) -> Result<()> {
    let mut keepalive = tokio::time::interval(wire::KEEPALIVE);
    let mut last_progress = (t.still_missing(), tokio::time::Instant::now());
    loop {
        let placed = session.round_complete.notified();
        tokio::pin!(placed);
        placed.as_mut().enable();
        let missing = t.still_missing();
        if missing == 0 {
            break;
        }
        if missing != last_progress.0 {
            last_progress = (missing, tokio::time::Instant::now());
        }
        tokio::select! {
            _ = placed => {}
            _ = keepalive.tick() => wire::ping(out),
            _ = tokio::time::sleep_until(last_progress.1 + wire::IDLE_LIMIT) => {
                bail!("{missing} blocks still missing, none placed for {} s after DONE: not committed", wire::IDLE_LIMIT.as_secs())
            }
        }
    }
    drop(t);
    let mut t = session.transfer.send_replace(None).context("the transfer closed before its DONE was sealed")?;
    // The task that placed the last chunk lets go of the transfer a moment after its round was
    // complete.
    let alone = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let t = loop {
        match Arc::try_unwrap(t) {
            Ok(t) => break t,
            Err(_) if tokio::time::Instant::now() > alone => bail!("chunks still being placed at DONE"),
            Err(shared) => {
                t = shared;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    };
    let digest = *digest;
    let mut finishing = tokio::task::spawn_blocking(move || background(|| t.finish(size, &digest)));
    loop {
        tokio::select! {
            r = &mut finishing => return r?,
            _ = keepalive.tick() => wire::ping(out),
        }
    }
}

/// `path` names a file under the data directory: relative, no `..`.
pub fn resolve(data_dir: &Path, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) || path.starts_with(".ferry") {
        bail!("{path:?} is not a valid destination path: give a relative path without '..'");
    }
    Ok(data_dir.join(p))
}

fn open_transfer(cfg: &ReceiverConfig, id: [u8; 16], path: &str, size: u64, chunking: Chunking, base: Option<&str>) -> Result<Transfer> {
    let chunker = Chunker::from_wire(&chunking)?;
    let dest = resolve(&cfg.data_dir, path)?;
    let hasher = ChunkHasher::new(cfg.tenant_key);
    let mut local = LocalChunks::default();
    // The content store: every committed object whose index we kept (the older copy included).
    // An index older than its object (changed in place since) is passed over: its reads would
    // fail verification one by one.
    let mut indexed = Vec::new();
    for idx in catalog::all(&cfg.data_dir) {
        if let Ok(p) = resolve(&cfg.data_dir, &idx.object) {
            if catalog::is_current(&cfg.data_dir, &idx.object, &p) {
                local.add_indexed(&p, &idx.blocks)?;
                indexed.push(p);
            }
        }
    }
    // The older copy at the same path (or where this site keeps it, `older_copy`) counts even
    // when nothing indexed it as it is now.
    for older in std::iter::once(dest.clone()).chain((cfg.older_copy)(&dest)) {
        if older.exists() && !indexed.contains(&older) {
            local.add_file(&older, chunker, &hasher)?;
        }
    }
    if let Some(base) = base {
        let base_path = resolve(&cfg.data_dir, base)?;
        if !base_path.exists() {
            bail!("base {base:?} does not exist at the destination");
        }
        local.add_file(&base_path, chunker, &hasher)?;
    }
    let staging = Staging::open(&dest, &id, size)?;
    tracing::info!(object = path, size, local_chunks = local.len(), resumed = staging.resumed, "transfer opened");
    Ok(Transfer { id, object: path.to_string(), staging, local, hasher, chunker, rounds: Mutex::new(BTreeMap::new()), progress: Progress::default(), data_dir: cfg.data_dir.clone() })
}

type RoundDone = Option<(u32, u32)>;

impl Transfer {
    /// What the announced rounds still lack: blocks expected from the sender, and rounds whose
    /// local copies are not done.
    fn still_missing(&self) -> u64 {
        self.rounds.lock().unwrap().values().map(|r| r.missing_count as u64 + r.local_pending as u64).sum()
    }

    /// Classifies a round without waiting on the disk (unless resuming, where the staging file
    /// must be read): the blocks to WANT at once, and the blocks to copy from local data.
    fn plan_round(&self, round: u64, blocks: Vec<Block>) -> Result<(Vec<u32>, Vec<u32>, RoundDone)> {
        if blocks.len() > 1 << 16 {
            bail!("round {round} has too many blocks");
        }
        let mut wanted = Vec::new();
        let mut local = Vec::new();
        let mut missing = vec![false; blocks.len()];
        let mut reused = 0u32;
        let mut buf = vec![0u8; self.chunker.max_len() as usize];
        for (i, b) in blocks.iter().enumerate() {
            if b.len == 0 || b.len > self.chunker.max_len() {
                bail!("block of {} bytes in round {round}", b.len);
            }
            let Some(id) = &b.id else {
                self.staging.zero(b.offset, b.len as u64)?;
                continue;
            };
            if self.staging.holds(b.offset, &mut buf[..b.len as usize], id, &self.hasher)? {
                reused += 1;
                self.progress.reused.fetch_add(b.len as u64, Relaxed);
            } else if self.local.contains(id) {
                local.push(i as u32);
            } else {
                wanted.push(i as u32);
                missing[i] = true;
            }
        }
        let missing_count = wanted.len() as u32;
        let local_pending = !local.is_empty();
        let mut rounds = self.rounds.lock().unwrap();
        if rounds.contains_key(&round) {
            bail!("round {round} announced twice");
        }
        rounds.insert(round, RoundState { blocks, missing, missing_count, local_pending, reused, received: 0 });
        Ok((wanted, local, (missing_count == 0 && !local_pending).then_some((reused, 0))))
    }

    /// Copies a round's locally held blocks into the staging file (each read verified against
    /// its ID); a block that fails verification is returned, to be wanted from the sender.
    fn copy_local(&self, round: u64, local: Vec<u32>) -> Result<(Vec<u32>, RoundDone)> {
        let blocks = self.rounds.lock().unwrap().get(&round).map(|r| r.blocks.clone()).with_context(|| format!("round {round} vanished"))?;
        let mut buf = vec![0u8; self.chunker.max_len() as usize];
        let (mut copied, mut failed) = (0u32, Vec::new());
        for i in local {
            let b = &blocks[i as usize];
            let data = &mut buf[..b.len as usize];
            if self.local.read(b.id.as_ref().expect("local blocks have IDs"), data, &self.hasher)? {
                self.staging.write(b.offset, data)?;
                copied += 1;
                self.progress.reused.fetch_add(b.len as u64, Relaxed);
            } else {
                failed.push(i);
            }
        }
        let mut rounds = self.rounds.lock().unwrap();
        let r = rounds.get_mut(&round).expect("checked above");
        for &i in &failed {
            r.missing[i as usize] = true;
        }
        r.missing_count += failed.len() as u32;
        r.reused += copied;
        r.local_pending = false;
        Ok((failed, (r.missing_count == 0).then_some((r.reused, r.received))))
    }

    fn place_chunk(&self, round: u64, index: u32, id: &[u8; 32], encoding: Encoding, raw_len: u32, data: &[u8]) -> Result<RoundDone> {
        let block = {
            let rounds = self.rounds.lock().unwrap();
            let r = rounds.get(&round).with_context(|| format!("chunk for unannounced round {round}"))?;
            let b = *r.blocks.get(index as usize).with_context(|| format!("chunk index {index} outside round {round}"))?;
            // An ID other than the announced one: the block changed at a live source since it
            // was announced (checked against that ID below, like any other).
            if !r.missing[index as usize] || b.id.is_none() || b.len != raw_len {
                bail!("chunk {index} of round {round} was not asked for or does not match its announcement");
            }
            b
        };
        let check_and_write = |bytes: &[u8]| -> Result<()> {
            if &self.hasher.id(bytes) != id {
                bail!("chunk {index} of round {round} does not match its ID: refused");
            }
            self.staging.write(block.offset, bytes)
        };
        match encoding {
            Encoding::Raw => check_and_write(data)?,
            Encoding::Zstd => with_decompressed(data, raw_len as usize, check_and_write)?,
        }
        let mut rounds = self.rounds.lock().unwrap();
        let r = rounds.get_mut(&round).unwrap();
        if !std::mem::replace(&mut r.missing[index as usize], false) {
            return Ok(None); // a duplicate that raced: already placed
        }
        r.blocks[index as usize].id = Some(*id);
        r.missing_count -= 1;
        r.received += 1;
        Ok((r.missing_count == 0 && !r.local_pending).then_some((r.reused, r.received)))
    }

    fn finish(self, size: u64, digest: &[u8; 32]) -> Result<()> {
        if size != self.staging.size() {
            bail!("DONE says {size} bytes, OPEN said {}", self.staging.size());
        }
        let rounds = self.rounds.into_inner().unwrap();
        let mut all_blocks = Vec::new();
        for (n, r) in &rounds {
            if r.missing_count != 0 || r.local_pending {
                bail!("round {n} is incomplete at DONE ({} blocks missing): not committed", r.missing_count);
            }
            all_blocks.extend_from_slice(&r.blocks);
        }
        // A sender may scan some blocks first (`SendSpec::first`): the object is its blocks in
        // the object's order, whatever round carried them.
        all_blocks.sort_unstable_by_key(|b| b.offset);
        let mut ours = ObjectDigest::new(&self.chunker, size);
        let mut expected_offset = 0u64;
        for b in &all_blocks {
            if b.offset != expected_offset {
                bail!("the rounds leave a gap or overlap at byte {expected_offset}: not committed");
            }
            ours.add(b);
            expected_offset += b.len as u64;
        }
        if expected_offset != size {
            bail!("the rounds cover {expected_offset} of {size} bytes: not committed");
        }
        if &ours.finish() != digest {
            bail!("the object digest does not match: not committed (the staging file is kept for a resume)");
        }
        catalog::forget(&self.data_dir, &self.object);
        self.staging.commit()?;
        catalog::record(&self.data_dir, &self.object, size, &all_blocks)?;
        tracing::info!(object = %self.object, size, "committed");
        Ok(())
    }
}
