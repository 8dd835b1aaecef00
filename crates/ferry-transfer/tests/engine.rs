//! Sender and receiver over real loopback TCP connections (no TLS here: the agent adds it).
use ferry_proto::FrameCodec;
use ferry_transfer::progress::Progress;
use ferry_transfer::receiver::{self, ReceiverConfig, Session};
use ferry_transfer::scan::Chunker;
use ferry_transfer::sender::{self, SendSpec};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

const KEY: [u8; 32] = [42; 32];

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_image(path: &Path, blocks: usize, seed: u8) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len((blocks * 65536) as u64).unwrap();
    for i in 0..blocks {
        if i % 3 == 0 {
            continue; // hole
        }
        let b: Vec<u8> = (0..65536u32).map(|j| ((j / 7) as u8).wrapping_add(i as u8).wrapping_mul(if i % 5 == 0 { seed } else { 1 })).collect();
        f.write_all_at(&b, (i * 65536) as u64).unwrap();
    }
}

async fn transfer(data_dir: &Path, source: &Path, dest: &str, connections: usize) -> anyhow::Result<Arc<Progress>> {
    transfer_with(data_dir, source, dest, connections, Chunker::Fixed { block: 65536 }).await
}

async fn transfer_with(data_dir: &Path, source: &Path, dest: &str, connections: usize, chunker: Chunker) -> anyhow::Result<Arc<Progress>> {
    transfer_spec(data_dir, connections, SendSpec { source: source.into(), dest_path: dest.into(), base: None, chunker, zstd_level: 1, transfer: [7; 16], tenant_key: KEY, live: false, first: Vec::new(), observer: None }).await
}

async fn transfer_spec(data_dir: &Path, connections: usize, spec: SendSpec) -> anyhow::Result<Arc<Progress>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let session = Session::new(Arc::new(ReceiverConfig::new(data_dir.to_path_buf(), KEY)));
    let server = tokio::spawn(async move {
        for _ in 0..connections {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(receiver::serve(Framed::new(tcp, FrameCodec), session.clone(), None));
        }
    });
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(Framed::new(TcpStream::connect(addr).await?, FrameCodec));
    }
    server.await?;
    let progress = Arc::new(Progress::default());
    sender::send(conns, spec, progress.clone()).await?;
    Ok(progress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_an_image_then_only_its_changes() {
    let d = dir("delta");
    let (src, data) = (d.join("src.raw"), d.join("data"));
    write_image(&src, 200, 3);
    let p = transfer(&data, &src, "img.raw", 4).await.unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(data.join("img.raw")).unwrap());
    assert_eq!(p.reused.load(Relaxed), 0);
    let first_wanted = p.wanted_raw.load(Relaxed);
    assert!(first_wanted > 0);
    assert!(p.sent_payload.load(Relaxed) < first_wanted / 3, "repetitive data compresses");

    write_image(&src, 200, 9); // every 5th data block changes
    let p = transfer(&data, &src, "img.raw", 3).await.unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(data.join("img.raw")).unwrap());
    let changed_blocks = (0..200).filter(|i| i % 3 != 0 && i % 5 == 0).count() as u64;
    assert_eq!(p.wanted_raw.load(Relaxed), changed_blocks * 65536, "exactly the changed blocks were asked for");
}

/// Blocks asked for first (a live disk's recently written ones) lead the first round, and the
/// object still commits whole and in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_asked_for_first_go_first_and_the_object_commits_whole() {
    use ferry_transfer::sender::{Observer, SendObserver};
    #[derive(Default)]
    struct Order(std::sync::Mutex<Vec<(u64, u64)>>);
    impl SendObserver for Order {
        fn sent(&self, round: u64, offset: u64, _data: &[u8]) {
            self.0.lock().unwrap().push((round, offset / 65536));
        }
    }
    let d = dir("first");
    let (src, data) = (d.join("src.raw"), d.join("data"));
    // 600 blocks: three rounds; scanned in order, blocks 550-559 would be in the last.
    write_image(&src, 600, 3);
    let order = Arc::new(Order::default());
    let first = vec![(550 * 65536, 10 * 65536), (20 * 65536 + 100, 1)];
    let spec = SendSpec { source: src.clone(), dest_path: "img.raw".into(), base: None, chunker: Chunker::Fixed { block: 65536 }, zstd_level: 1, transfer: [7; 16], tenant_key: KEY, live: false, first, observer: Some(Observer(order.clone())) };
    transfer_spec(&data, 2, spec).await.unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(data.join("img.raw")).unwrap());
    let sent = order.0.lock().unwrap().clone();
    // Rounds are served in parallel, each in its own order: the first round starts with them.
    let early: Vec<u64> = [20].into_iter().chain(550..560).filter(|i| i % 3 != 0).collect();
    let first_round: Vec<u64> = sent.iter().filter(|(round, _)| *round == 0).map(|&(_, block)| block).collect();
    assert_eq!(first_round[..early.len()], early[..], "the blocks asked for first lead the first round: {sent:?}");
    assert_eq!(sent.len(), (0..600).filter(|i| i % 3 != 0).count(), "every data block was sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_escaping_the_data_directory_is_refused() {
    let d = dir("escape");
    let src = d.join("src.raw");
    write_image(&src, 2, 1);
    let err = transfer(&d.join("data"), &src, "../outside.raw", 1).await.unwrap_err();
    assert!(format!("{err:#}").contains("not a valid destination path"), "{err:#}");
    assert!(!d.join("outside.raw").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_defined_chunks_find_a_file_whose_data_shifted() {
    let d = dir("cdc");
    let (src, data) = (d.join("log.txt"), d.join("data"));
    let mut x = 5u64;
    let mut body: Vec<u8> = (0..6_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"abcdefghijklmnopqrstuvwxyz \n"[(x % 28) as usize]
        })
        .collect();
    std::fs::write(&src, &body).unwrap();
    transfer_with(&data, &src, "log.txt", 2, Chunker::DEFAULT_CDC).await.unwrap();
    // Lines inserted near the start shift everything after them.
    body.splice(100_000..100_000, b"a new line near the start\n".repeat(10));
    std::fs::write(&src, &body).unwrap();
    let p = transfer_with(&data, &src, "log.txt", 2, Chunker::DEFAULT_CDC).await.unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(data.join("log.txt")).unwrap());
    let wanted = p.wanted_raw.load(Relaxed);
    assert!(wanted <= 3 * 256 * 1024, "only the chunks around the insertion travel: {wanted} of {} bytes", body.len());
    assert!(p.reused.load(Relaxed) > 5_000_000);
}

/// A session's connections outlive it: after COMMITTED the sender has every connection back
/// with nothing of the transfer left to read, and a HELLO on each hands the receiver's side back
/// too, so a second transfer runs on the same sockets (and their congestion state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_of_a_finished_transfer_carry_the_next() {
    use futures::SinkExt;
    let d = dir("reuse");
    let (src, data) = (d.join("src.raw"), d.join("data"));
    write_image(&src, 120, 3);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = 3;
    let session = Session::new(Arc::new(ReceiverConfig::new(data.clone(), KEY)));
    let server = tokio::spawn(async move {
        let mut served = Vec::new();
        for _ in 0..connections {
            let (tcp, _) = listener.accept().await.unwrap();
            served.push(tokio::spawn(receiver::serve(Framed::new(tcp, FrameCodec), session.clone(), None)));
        }
        served
    });
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(Framed::new(TcpStream::connect(addr).await.unwrap(), FrameCodec));
    }
    let served = server.await.unwrap();
    let spec = |transfer: u8| SendSpec { source: src.clone(), dest_path: "img.raw".into(), base: None, chunker: Chunker::Fixed { block: 65536 }, zstd_level: 1, transfer: [transfer; 16], tenant_key: KEY, live: false, first: Vec::new(), observer: None };
    let (first, mut conns) = sender::send(conns, spec(1), Arc::new(Progress::default())).await.unwrap();
    assert_eq!(conns.len(), connections, "every connection comes back");
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(data.join("img.raw")).unwrap());

    let hello = ferry_proto::Message::Hello { version: ferry_proto::PROTOCOL_VERSION, min_version: ferry_proto::PROTOCOL_VERSION, site: "a".into(), session: [2; 16], connection_index: 0, connection_count: connections as u16 };
    for c in conns.iter_mut() {
        c.send(hello.clone()).await.unwrap();
    }
    let second_session = Session::new(Arc::new(ReceiverConfig::new(data.clone(), KEY)));
    for handle in served {
        let (conn, said) = handle.await.unwrap().unwrap().expect("the receiver hands the connection back at HELLO");
        assert!(matches!(said, ferry_proto::Message::Hello { session, .. } if session == [2; 16]));
        tokio::spawn(receiver::serve(conn, second_session.clone(), None));
    }
    write_image(&src, 120, 9);
    let progress = Arc::new(Progress::default());
    let (second, _) = sender::send(conns, spec(2), progress.clone()).await.unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(data.join("img.raw")).unwrap());
    assert_ne!(first.digest, second.digest);
    assert!(progress.reused.load(Relaxed) > 0, "the second transfer still sends only what changed");
}

/// DONE may come before the last chunks (they travel on other connections), so the receiver
/// waits for them; a chunk that never comes leaves nothing committed, and the sender hears why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_whose_chunks_never_come_commits_nothing() {
    use ferry_proto::{Entry, EntryKind, Message};
    use futures::{SinkExt, StreamExt};
    let d = dir("early-done");
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let session = Session::new(Arc::new(ReceiverConfig::new(data.clone(), KEY)));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = receiver::serve(Framed::new(tcp, FrameCodec), session, None).await;
    });
    let mut c = Framed::new(TcpStream::connect(addr).await.unwrap(), FrameCodec);
    let transfer = [5; 16];
    c.send(Message::Open { transfer, path: "x.raw".into(), size: 65536, chunking: Chunker::Fixed { block: 65536 }.to_wire(), base: None }).await.unwrap();
    c.send(Message::Announce { transfer, round: 0, entries: vec![Entry { offset: 0, len: 65536, kind: EntryKind::Data([9; 32]) }] }).await.unwrap();
    c.send(Message::Done { transfer, size: 65536, digest: [1; 32] }).await.unwrap();
    let started = std::time::Instant::now();
    let mut last_ping = started;
    let (ok, message) = loop {
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "no answer to DONE");
        // A live sender pings every second; the receiver takes a silent one for a cut link.
        if last_ping.elapsed() >= std::time::Duration::from_secs(1) {
            c.send(Message::Ping { nonce: 0 }).await.unwrap();
            last_ping = std::time::Instant::now();
        }
        let Ok(next) = tokio::time::timeout(std::time::Duration::from_millis(200), c.next()).await else { continue };
        match next.unwrap().unwrap() {
            Message::Committed { ok, message, .. } => break (ok, message),
            Message::OpenAck { accepted, .. } => assert!(accepted),
            Message::Want { wanted, .. } => assert_eq!(wanted, vec![0]),
            Message::Ping { .. } | Message::Pong { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(!ok, "committed without its data");
    assert!(message.contains("still missing"), "{message}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(5), "the receiver waited for the chunk before it gave up");
    assert!(!data.join("x.raw").exists(), "nothing was committed");
}
