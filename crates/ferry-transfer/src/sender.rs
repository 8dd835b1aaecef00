//! The sending side: scan the object into rounds of blocks, ANNOUNCE each round on one of the
//! session's connections, answer WANT with compressed chunks, count ACKs; then DONE with the
//! object digest and wait for COMMITTED. Many rounds are in flight on every connection.
use crate::compress::Compressor;
use crate::manifest::ObjectDigest;
use crate::progress::Progress;
use crate::scan::{scan_blocks, Block, ChunkHasher};
use crate::wire::{self, Conn};
use anyhow::{bail, Context, Result};
use ferry_proto::{Chunking, Encoding, Message};
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
/// Rounds announced ahead of their ACK on one connection. IDs are cheap; this keeps the WANTs
/// coming for a full RTT on a fast link.
const ROUNDS_IN_FLIGHT: usize = 32;

#[derive(Clone, Debug)]
pub struct SendSpec {
    pub source: PathBuf,
    pub dest_path: String,
    pub base: Option<String>,
    pub block: u32,
    pub zstd_level: i32,
    pub transfer: [u8; 16],
    pub tenant_key: [u8; 32],
}

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

pub async fn send<S>(mut conns: Vec<Conn<S>>, spec: SendSpec, progress: Arc<Progress>) -> Result<SendOutcome>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let file = Arc::new(File::open(&spec.source).with_context(|| format!("opening {}", spec.source.display()))?);
    let size = file.metadata()?.len();
    let control = &mut conns[0];
    control
        .send(Message::Open {
            transfer: spec.transfer,
            path: spec.dest_path.clone(),
            size,
            chunking: Chunking::Fixed { block: spec.block },
            base: spec.base.clone(),
        })
        .await?;
    match wire::next(control).await? {
        Message::OpenAck { accepted: true, .. } => {}
        Message::OpenAck { reason, .. } => bail!("the destination refused the transfer: {reason}"),
        other => bail!("expected OPEN-ACK, got {}", other.kind()),
    }

    let (round_tx, round_rx) = mpsc::channel::<Round>(ROUNDS_IN_FLIGHT);
    let scanner = {
        let (file, progress, hasher) = (file.clone(), progress.clone(), ChunkHasher::new(spec.tenant_key));
        let block = spec.block;
        tokio::task::spawn_blocking(move || scan_into_rounds(&file, size, block, &hasher, &progress, round_tx))
    };
    let rounds = Arc::new(Mutex::new(round_rx));
    let mut tasks = Vec::new();
    for conn in conns {
        let ctx = ConnCtx { file: file.clone(), rounds: rounds.clone(), progress: progress.clone(), transfer: spec.transfer, level: spec.zstd_level };
        tasks.push(tokio::spawn(ctx.run(conn)));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.context("connection task panicked")??);
    }
    let (digest, round_count) = scanner.await.context("scanner panicked")??;
    let control = &mut conns[0];
    control.send(Message::Done { transfer: spec.transfer, size, digest }).await?;
    // The receiver verifies and syncs a large file before it answers, pinging meanwhile.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), wire::next(control)).await.context("no COMMITTED from the destination")??;
        match msg {
            Message::Ping { .. } | Message::Pong { .. } => continue,
            Message::Committed { ok: true, digest: theirs, .. } if theirs == digest => break,
            Message::Committed { ok: true, .. } => bail!("the destination committed a different digest"),
            Message::Committed { message, .. } => bail!("the destination did not commit: {message}"),
            other => bail!("expected COMMITTED, got {}", other.kind()),
        }
    }
    Ok(SendOutcome { size, digest: hex(&digest), rounds: round_count, seconds: started.elapsed().as_secs_f64() })
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn scan_into_rounds(file: &File, size: u64, block: u32, hasher: &ChunkHasher, progress: &Progress, tx: mpsc::Sender<Round>) -> Result<([u8; 32], u64)> {
    let mut digest = ObjectDigest::new(block, size);
    let mut current = Vec::with_capacity(ROUND_BLOCKS);
    let mut number = 0u64;
    scan_blocks(file, size, block, hasher, |b| {
        digest.add(&b);
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
    Ok((digest.finish(), number))
}

struct ConnCtx {
    file: Arc<File>,
    rounds: Arc<Mutex<mpsc::Receiver<Round>>>,
    progress: Arc<Progress>,
    transfer: [u8; 16],
    level: i32,
}

impl ConnCtx {
    async fn run<S>(self, conn: Conn<S>) -> Result<Conn<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, mut stream) = conn.split();
        let (out, writer) = wire::spawn_writer(sink);
        let mut in_flight: HashMap<u64, Arc<Vec<Block>>> = HashMap::new();
        let mut wanted_by_round: HashMap<u64, u64> = HashMap::new();
        let mut scan_done = false;
        let mut keepalive = tokio::time::interval(wire::KEEPALIVE);
        while !(scan_done && in_flight.is_empty()) {
            tokio::select! {
                round = next_round(&self.rounds), if !scan_done && in_flight.len() < ROUNDS_IN_FLIGHT => match round {
                    Some(r) => {
                        let entries = r.blocks.iter().map(wire::entry_of).collect();
                        in_flight.insert(r.number, Arc::new(r.blocks));
                        wire::queue(&out, Message::Announce { transfer: self.transfer, round: r.number, entries }).await?;
                    }
                    None => scan_done = true,
                },
                msg = wire::next_timed(&mut stream) => match msg? {
                    Message::Want { round, wanted, .. } => {
                        let blocks = in_flight.get(&round).with_context(|| format!("WANT for unknown round {round}"))?.clone();
                        let wanted_bytes: u64 = wanted.iter().filter_map(|&i| blocks.get(i as usize)).map(|b| b.len as u64).sum();
                        wanted_by_round.insert(round, wanted_bytes);
                        self.serve_want(round, blocks, wanted, out.clone());
                    }
                    Message::Ack { round, .. } => {
                        let blocks = in_flight.remove(&round).with_context(|| format!("ACK for unknown round {round}"))?;
                        let data: u64 = blocks.iter().filter(|b| b.id.is_some()).map(|b| b.len as u64).sum();
                        let wanted = wanted_by_round.remove(&round).unwrap_or(0);
                        // Data the receiver did not ask for it found locally.
                        self.progress.reused.fetch_add(data.saturating_sub(wanted), Relaxed);
                        self.progress.acked.fetch_add(blocks.iter().map(|b| b.len as u64).sum(), Relaxed);
                    }
                    Message::Pong { .. } | Message::Ping { .. } => {}
                    Message::Error { message, .. } => bail!("the destination reported: {message}"),
                    other => bail!("unexpected {} from the destination", other.kind()),
                },
                _ = keepalive.tick() => wire::ping(&out),
            }
        }
        drop(out);
        let sink = writer.finish().await?;
        Ok(sink.reunite(stream).expect("halves of one connection"))
    }

    /// Reads and compresses the wanted chunks off the async threads, queueing them for the
    /// connection's writer (whose bounded queue is the back-pressure).
    fn serve_want(&self, round: u64, blocks: Arc<Vec<Block>>, wanted: Vec<u32>, out: mpsc::Sender<Message>) {
        let (file, progress, transfer, level) = (self.file.clone(), self.progress.clone(), self.transfer, self.level);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut compressor = Compressor::new(level)?;
            let mut buf = vec![0u8; blocks.first().map_or(0, |b| b.len as usize)];
            for index in wanted {
                let b = blocks.get(index as usize).with_context(|| format!("WANT index {index} outside round {round}"))?;
                let Some(id) = b.id else { bail!("WANT for a zero range") };
                buf.resize(b.len as usize, 0);
                file.read_exact_at(&mut buf, b.offset)?;
                let (encoding, data) = match compressor.compress(&buf)? {
                    Some(z) => (Encoding::Zstd, bytes::Bytes::copy_from_slice(z)),
                    None => (Encoding::Raw, bytes::Bytes::copy_from_slice(&buf)),
                };
                progress.wanted_raw.fetch_add(b.len as u64, Relaxed);
                progress.sent_payload.fetch_add(data.len() as u64, Relaxed);
                let msg = Message::Chunk { transfer, round, index, id, encoding, raw_len: b.len, data };
                if out.blocking_send(msg).is_err() {
                    break; // the connection is gone; its task reports why
                }
            }
            Ok(())
        });
    }
}

async fn next_round(rounds: &Mutex<mpsc::Receiver<Round>>) -> Option<Round> {
    rounds.lock().await.recv().await
}
