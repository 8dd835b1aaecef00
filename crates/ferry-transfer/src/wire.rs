//! What sender and receiver share about connections: the framed stream type, timed reads that
//! turn a silent (cut) link into an error, and a writer task per connection.
use crate::scan::Block;
use anyhow::{bail, Context, Result};
use ferry_proto::{Entry, EntryKind, FrameCodec, Message};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

pub type Conn<S> = Framed<S, FrameCodec>;
pub type Sink<S> = SplitSink<Conn<S>, Message>;

/// Both sides ping this often, so a healthy connection is never silent for long.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// A connection silent this long is dead (a cut link: TCP alone would wait minutes).
pub const IDLE_LIMIT: Duration = Duration::from_secs(8);

pub async fn next<S>(conn: &mut Conn<S>) -> Result<Message>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(IDLE_LIMIT, conn.next()).await {
        Err(_) => bail!("the peer sent nothing for {} s: link cut?", IDLE_LIMIT.as_secs()),
        Ok(None) => bail!("the peer closed the connection"),
        Ok(Some(m)) => m.context("reading from the peer"),
    }
}

pub async fn next_timed<S>(stream: &mut SplitStream<Conn<S>>) -> Result<Message>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(IDLE_LIMIT, stream.next()).await {
        Err(_) => bail!("the peer sent nothing for {} s: link cut?", IDLE_LIMIT.as_secs()),
        Ok(None) => bail!("the peer closed the connection"),
        Ok(Some(m)) => m.context("reading from the peer"),
    }
}

/// Spawns the connection's writer: messages queued on the returned sender go out in order;
/// batches are flushed once the queue runs dry. Ends (returning the sink) when every sender
/// is dropped.
pub fn spawn_writer<S>(mut sink: Sink<S>) -> (mpsc::Sender<Message>, tokio::task::JoinHandle<Result<Sink<S>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            sink.feed(msg).await?;
            while let Ok(more) = rx.try_recv() {
                sink.feed(more).await?;
            }
            sink.flush().await?;
        }
        Ok(sink)
    });
    (tx, task)
}

pub fn entry_of(b: &Block) -> Entry {
    Entry { offset: b.offset, len: b.len, kind: b.id.map_or(EntryKind::Zero, EntryKind::Data) }
}

pub fn block_of(e: &Entry) -> Block {
    Block { offset: e.offset, len: e.len, id: match e.kind { EntryKind::Data(id) => Some(id), EntryKind::Zero => None } }
}
