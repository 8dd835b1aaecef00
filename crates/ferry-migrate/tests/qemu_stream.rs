//! A real QEMU 10 pre-copy save of a running guest is split, rebuilt from its pieces, and loaded
//! by a second QEMU whose guest carries on with its memory intact.
use ferry_migrate::{Piece, Splitter, StreamEvent, PAGE_SIZE};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 256;
/// The lab guest's workload: fills 48 MiB, rewrites 2 MiB/s, verifies and prints heartbeats.
/// No NIC, so no address and no echo service.
const APPEND: &str = "console=ttyS0 quiet panic=-1 ferry.mem=48M ferry.dirty=2M ferry.echo=0";

#[test]
fn a_real_qemu_stream_splits_rebuilds_and_loads() {
    let started = Instant::now();
    let image =
        ferry_lab::guest_image::build_guest_image(Path::new(ferry_lab::guest_image::DEFAULT_CACHE))
            .expect("the lab guest image (scripts/install-deps.sh installs what it needs)");
    let dir = TempDir::new();

    // Source: boot, let the workload fill its memory, save a live pre-copy stream to a file.
    let mut source = Qemu::spawn(&dir.0, "source", &image, &[]);
    source.wait_for_line(|l| l.starts_with("ferry-ready"), Duration::from_secs(60));
    // A few seconds of dirtying first, so the save re-sends pages the guest rewrote.
    source.wait_for_line(
        |l| heartbeat_seq(l).is_some_and(|seq| seq >= 3),
        Duration::from_secs(10),
    );
    let original_path = dir.0.join("stream.bin");
    let mut qmp = source.qmp();
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": false}]}),
    );
    qmp.execute(
        "migrate",
        json!({"uri": format!("file:{}", original_path.display())}),
    );
    let info = qmp.wait_for_migration(Duration::from_secs(30));
    println!(
        "saved in {} ms, downtime {} ms, {} iterations",
        info["total-time"], info["downtime"], info["ram"]["dirty-sync-count"]
    );
    let source_seq = source
        .heartbeat_seqs()
        .into_iter()
        .max()
        .expect("heartbeats before the save");
    drop(qmp);
    drop(source); // paused after the save; only one copy of the guest should run

    // Split in random-sized feeds and rebuild from the pieces.
    let original = std::fs::read(&original_path).unwrap();
    let seed: u64 = rand::random();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut rebuilt = Vec::with_capacity(original.len());
    let mut events = Vec::new();
    let mut pages_by_block = std::collections::BTreeMap::<String, u64>::new();
    let mut misplaced_pages = Vec::new();
    let mut splitter = Splitter::new();
    let mut collect = |piece: Piece<'_>| {
        rebuilt.extend_from_slice(piece.bytes());
        match piece {
            Piece::Page {
                block,
                offset,
                data,
            } => {
                let start = rebuilt.len() - data.len();
                if data.len() != PAGE_SIZE
                    || !page_record_precedes(&rebuilt[..start], block, offset)
                {
                    misplaced_pages.push((start, block.to_string(), offset));
                }
                *pages_by_block.entry(block.to_string()).or_default() += 1;
            }
            Piece::Event(event) => events.push((rebuilt.len(), event)),
            Piece::Literal(_) => {}
        }
    };
    let split_started = Instant::now();
    let mut at = 0;
    while at < original.len() {
        // Mostly around a page, sometimes tiny, sometimes large.
        let size = match rng.random_range(0..10) {
            0 => rng.random_range(1..16),
            1 => rng.random_range(1..1 << 20),
            _ => rng.random_range(1..3 * PAGE_SIZE),
        };
        let end = (at + size).min(original.len());
        splitter.feed(&original[at..end], &mut collect);
        at = end;
    }
    splitter.finish(&mut collect);
    let split_time = split_started.elapsed();
    let stats = splitter.stats().clone();
    println!(
        "stream {} bytes (feed seed {seed}): {} pages, {} zero pages, {} literal bytes, split in {:?}; pages by block {pages_by_block:?}; blocks {:?}",
        original.len(),
        stats.pages,
        stats.zero_pages,
        stats.literal_bytes,
        split_time,
        stats.ram_blocks
    );
    println!("events (at rebuilt offset): {events:?}");

    assert!(
        rebuilt == original,
        "rebuilt stream differs from the original (feed seed {seed})"
    );
    assert_eq!(
        misplaced_pages,
        [],
        "every page is {PAGE_SIZE} bytes right after its own PAGE record"
    );
    // QEMU's own count of what it sent.
    assert_eq!(Some(stats.pages), info["ram"]["normal"].as_u64(), "{info}");
    assert_eq!(
        Some(stats.zero_pages),
        info["ram"]["duplicate"].as_u64(),
        "{info}"
    );
    assert_eq!(stats.opaque_reason, None, "the whole stream was understood");
    let kinds: Vec<&StreamEvent> = events.iter().map(|(_, e)| e).collect();
    assert_eq!(
        kinds,
        [
            &StreamEvent::RamStart,
            &StreamEvent::RamEnd,
            &StreamEvent::DeviceState,
            &StreamEvent::Eof
        ],
        "feed seed {seed}"
    );
    assert_eq!(
        events.last().unwrap().0,
        original.len(),
        "EOF at the very end"
    );
    assert_eq!(
        stats.ram_blocks.get("pc.ram"),
        Some(&(MEMORY_MIB << 20)),
        "{:?}",
        stats.ram_blocks
    );
    let guest_pages = (MEMORY_MIB << 20) / PAGE_SIZE as u64;
    assert!(
        stats.pages + stats.zero_pages >= guest_pages,
        "every page of pc.ram is sent at least once: {} pages + {} zero pages",
        stats.pages,
        stats.zero_pages
    );
    // 48 MiB of the workload's memory is non-zero content (a fifth of it zero pages), plus
    // the kernel and initramfs.
    assert!(
        stats.pages >= (40 << 20) / PAGE_SIZE as u64,
        "{} pages",
        stats.pages
    );
    assert!(
        stats.zero_pages > guest_pages / 4,
        "{} zero pages",
        stats.zero_pages
    );
    assert_eq!(stats.page_bytes, stats.pages * PAGE_SIZE as u64);
    assert_eq!(stats.stream_bytes(), original.len() as u64);

    // Destination: load the rebuilt stream; the guest must carry on where it stopped.
    let rebuilt_path = dir.0.join("rebuilt.bin");
    std::fs::write(&rebuilt_path, &rebuilt).unwrap();
    drop((original, rebuilt));
    let mut dest = Qemu::spawn(&dir.0, "dest", &image, &["-incoming", "defer"]);
    let mut qmp = dest.qmp();
    qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", rebuilt_path.display())}),
    );
    qmp.wait_for_migration(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while qmp.execute("query-status", json!({}))["status"] != "running" {
        assert!(
            Instant::now() < deadline,
            "the destination VM did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two heartbeats past the source's last: the guest is alive, not just flushing a line.
    dest.wait_for_line(
        |l| heartbeat_seq(l).is_some_and(|seq| seq >= source_seq + 2),
        Duration::from_secs(20),
    );
    let lines = dest.serial_lines();
    let heartbeats: Vec<&String> = lines.iter().filter(|l| l.starts_with("ferry-hb")).collect();
    for line in &heartbeats {
        assert!(line.contains(" corrupt=0"), "{line}");
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("ferry-corrupt")),
        "{lines:?}"
    );
    println!(
        "destination heartbeats after seq {source_seq}: {:?} (test took {:?})",
        heartbeats,
        started.elapsed()
    );
}

/// Whether `before` ends with a PAGE record for this block and offset: the be64 word with
/// CONTINUE, or the word without it followed by the block's counted name.
fn page_record_precedes(before: &[u8], block: &str, offset: u64) -> bool {
    const PAGE: u64 = 0x08;
    const CONTINUE: u64 = 0x20;
    let word_at = |end: usize| -> Option<u64> {
        let bytes = before.get(end.checked_sub(8)?..end)?;
        Some(u64::from_be_bytes(bytes.try_into().unwrap()))
    };
    if word_at(before.len()) == Some(offset | PAGE | CONTINUE) {
        return true;
    }
    let named = before.len().checked_sub(1 + block.len());
    named.is_some_and(|at| {
        before[at] as usize == block.len()
            && &before[at + 1..] == block.as_bytes()
            && word_at(at) == Some(offset | PAGE)
    })
}

fn heartbeat_seq(line: &str) -> Option<u64> {
    line.strip_prefix("ferry-hb ")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("seq="))?
        .parse()
        .ok()
}

/// A QEMU process, killed when dropped.
struct Qemu {
    child: Child,
    name: String,
    serial: PathBuf,
    qmp_socket: PathBuf,
}

impl Qemu {
    fn spawn(
        dir: &Path,
        name: &str,
        image: &ferry_lab::guest_image::GuestImage,
        extra: &[&str],
    ) -> Qemu {
        let serial = dir.join(format!("{name}.serial"));
        let qmp_socket = dir.join(format!("{name}.qmp"));
        let child = Command::new(ferry_lab::qemu::qemu_binary())
            .args([
                "-name", name, "-accel", "tcg", "-machine", "pc", "-cpu", "max",
            ])
            .args(["-m", &format!("{MEMORY_MIB}M"), "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", APPEND])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64 (QEMU 10)");
        Qemu {
            child,
            name: name.into(),
            serial,
            qmp_socket,
        }
    }

    fn qmp(&mut self) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(stream) = UnixStream::connect(&self.qmp_socket) {
                return Qmp::new(stream);
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "{}: no QMP socket", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn serial_lines(&self) -> Vec<String> {
        std::fs::read(&self.serial)
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn heartbeat_seqs(&self) -> Vec<u64> {
        self.serial_lines()
            .iter()
            .filter_map(|l| heartbeat_seq(l))
            .collect()
    }

    fn wait_for_line(&mut self, wanted: impl Fn(&str) -> bool, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.serial_lines().into_iter().find(|l| wanted(l)) {
                return line;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: the awaited console line did not come within {within:?}; console:\n{}",
                self.name,
                self.serial_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited ({status}); console:\n{}",
                self.name,
                self.serial_lines().join("\n")
            );
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-written QMP client: one JSON object per line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn new(stream: UnixStream) -> Qmp {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` value, skipping asynchronous events.
    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").expect("write to QMP");
        loop {
            let reply = self.read();
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            if let Some(error) = reply.get("error") {
                panic!("QMP {command} failed: {error}");
            }
        }
    }

    /// Polls `query-migrate` until it completes; fails on a failed or cancelled migration.
    fn wait_for_migration(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let info = self.execute("query-migrate", json!({}));
            match info["status"].as_str() {
                Some("completed") => return info,
                Some("failed" | "cancelled") => panic!("migration ended: {info}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "migration still {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A directory under /tmp, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "ferry-migrate-qemu-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
