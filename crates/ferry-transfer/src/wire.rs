//! What sender and receiver share about connections: the framed stream type, timed reads that
//! turn a silent (cut) link into an error, and a writer task per connection.
use crate::scan::Block;
use anyhow::{bail, Context, Result};
use ferry_proto::{Entry, EntryKind, FrameCodec, Message};
use futures::stream::SplitSink;
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

/// The next message from a connection or its read half, or an error if the peer closed it
/// or sent nothing for `IDLE_LIMIT`.
pub async fn next<St, E>(stream: &mut St) -> Result<Message>
where
    St: futures::Stream<Item = std::result::Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(IDLE_LIMIT, stream.next()).await {
        Err(_) => bail!("the peer sent nothing for {} s: link cut?", IDLE_LIMIT.as_secs()),
        Ok(None) => bail!("the peer closed the connection"),
        Ok(Some(m)) => m.context("reading from the peer"),
    }
}

/// Spawns the connection's writer: messages queued on the returned sender go out in order;
/// batches are flushed once the queue runs dry. The writer ends (returning the sink) when every
/// sender is dropped, and is aborted if its `Writer` is dropped first, so a connection that
/// failed does not linger blocked on a dead socket.
pub fn spawn_writer<S>(mut sink: Sink<S>) -> (mpsc::Sender<Message>, Writer<S>)
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
    (tx, Writer::new(task))
}

pub struct Writer<S> {
    task: Option<tokio::task::JoinHandle<Result<Sink<S>>>>,
}

impl<S> Writer<S> {
    /// Owns a writer task: it is aborted if dropped before `finish`.
    pub fn new(task: tokio::task::JoinHandle<Result<Sink<S>>>) -> Self {
        Writer { task: Some(task) }
    }

    /// Waits until everything queued has been written; the senders must be dropped first.
    pub async fn finish(mut self) -> Result<Sink<S>> {
        self.task.take().expect("finished once").await.context("writer panicked")?
    }
}

impl<S> Drop for Writer<S> {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Queues a message for the writer. A queue that stays full this long means the link stopped
/// draining (a cut): an error, rather than a task blocked for as long as TCP keeps retrying.
pub async fn queue(out: &mpsc::Sender<Message>, msg: Message) -> Result<()> {
    match tokio::time::timeout(IDLE_LIMIT, out.send(msg)).await {
        Err(_) => bail!("nothing could be sent for {} s: link cut?", IDLE_LIMIT.as_secs()),
        Ok(r) => r.map_err(|_| anyhow::anyhow!("the connection's writer failed")),
    }
}

/// A keepalive never waits: a full queue already keeps the peer busy.
pub fn ping(out: &mpsc::Sender<Message>) {
    let _ = out.try_send(Message::Ping { nonce: 0 });
}

pub fn entry_of(b: &Block) -> Entry {
    Entry { offset: b.offset, len: b.len, kind: b.id.map_or(EntryKind::Zero, EntryKind::Data) }
}

pub fn block_of(e: &Entry) -> Block {
    Block { offset: e.offset, len: e.len, id: match e.kind { EntryKind::Data(id) => Some(id), EntryKind::Zero => None } }
}
