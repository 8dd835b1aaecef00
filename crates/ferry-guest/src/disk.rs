//! The disk writer: a steady stream of checkable records (see
//! [`ferry_guest::disk_record`]) written sequentially around a ring on a block
//! device, each followed by `fdatasync` so it has reached the virtual disk
//! before the next one starts. After a live migration the host compares the
//! disk images (`ferry_lab::disk_records`): a record the move lost, or an old
//! one that overwrote a newer one, shows up as a wrong sequence number.
//!
//! It runs on its own thread at the workload's lowered priority and sleeps
//! between records, so it never competes with the echo threads for long.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use ferry_guest::disk_record::{self, RecordHeader, Ring, RECORD_SIZE};

use crate::config::Config;
use crate::report;

/// How often the `disk seq=` progress line is printed.
const PROGRESS_PERIOD: Duration = Duration::from_secs(1);
/// Pause after a failed open or write before trying again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Least pause after every record, even when behind the rate.
const MIN_PAUSE: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSettings {
    pub path: PathBuf,
    pub bytes_per_sec: u64,
    pub offset: u64,
    pub span: u64,
    pub seed: u64,
}

impl DiskSettings {
    /// The writer's settings, or `None` if it is disabled.
    pub fn from_config(config: &Config) -> Option<DiskSettings> {
        let path = config.disk.clone()?;
        if config.disk_bytes_per_sec == 0 {
            return None;
        }
        Some(DiskSettings {
            path,
            bytes_per_sec: config.disk_bytes_per_sec,
            offset: config.disk_offset,
            span: config.disk_span,
            seed: config.seed,
        })
    }
}

/// Starts the writer thread; it runs until the process ends.
pub fn spawn_disk_writer(settings: DiskSettings) {
    let spawned = thread::Builder::new()
        .name("ferry-disk".to_string())
        .spawn(move || run(&settings));
    if let Err(error) = spawned {
        report::disk_error(&mut io::stdout().lock(), None, &error);
    }
}

fn run(settings: &DiskSettings) {
    let ring = match Ring::new(settings.offset, settings.span) {
        Ok(ring) => ring,
        Err(reason) => {
            let error = io::Error::new(io::ErrorKind::InvalidInput, reason);
            report::disk_error(&mut io::stdout().lock(), None, &error);
            return;
        }
    };
    let file = open_with_retry(&settings.path);
    report::disk_started(
        &mut io::stdout().lock(),
        &settings.path,
        settings.offset,
        settings.span,
        ring.slots,
        settings.bytes_per_sec,
        settings.seed,
    );
    let mut writer = RecordWriter::new(ring, settings.seed);
    let mut budget = RecordBudget::new(settings.bytes_per_sec);
    let started = Instant::now();
    let mut next_progress = started;
    loop {
        let now = Instant::now();
        if now >= next_progress {
            report::disk_progress(&mut io::stdout().lock(), writer.written(), writer.errors);
            next_progress += PROGRESS_PERIOD;
            if next_progress <= now {
                next_progress = now + PROGRESS_PERIOD;
            }
        }
        if budget.records_due(now.saturating_duration_since(started)) == 0 {
            let wake = (started + budget.next_due()).min(next_progress);
            thread::sleep(wake.saturating_duration_since(now).max(MIN_PAUSE));
            continue;
        }
        match writer.write_next(&file) {
            Ok(()) => budget.record_written(),
            Err((seq, offset, error)) => {
                report::disk_error(&mut io::stdout().lock(), Some((seq, offset)), &error);
                thread::sleep(RETRY_PAUSE);
            }
        }
        thread::sleep(MIN_PAUSE);
    }
}

fn open_with_retry(path: &Path) -> File {
    let mut reported = false;
    loop {
        // No create: a mistyped device name must not become a file in /dev.
        match OpenOptions::new().write(true).open(path) {
            Ok(file) => return file,
            Err(error) => {
                if !reported {
                    let error = io::Error::new(
                        error.kind(),
                        format!("cannot open {}: {error} (retrying)", path.display()),
                    );
                    report::disk_error(&mut io::stdout().lock(), None, &error);
                    reported = true;
                }
                thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

/// Writes records 1, 2, 3, … around the ring. A failed write is retried with
/// the same sequence number, so record `seq` is always in slot
/// `ring.slot_of(seq)` and the ring never has gaps.
struct RecordWriter {
    ring: Ring,
    seed: u64,
    next_seq: u64,
    errors: u64,
    buffer: Vec<u8>,
}

impl RecordWriter {
    fn new(ring: Ring, seed: u64) -> RecordWriter {
        RecordWriter {
            ring,
            seed,
            next_seq: 1,
            errors: 0,
            buffer: vec![0; RECORD_SIZE],
        }
    }

    /// Sequence number of the last record written and synced (0 before the first).
    fn written(&self) -> u64 {
        self.next_seq - 1
    }

    /// Writes and syncs the next record; on failure returns its sequence
    /// number, offset and the error.
    fn write_next(
        &mut self,
        file: &(impl FileExt + SyncData),
    ) -> Result<(), (u64, u64, io::Error)> {
        let seq = self.next_seq;
        let offset = self.ring.slot_offset(self.ring.slot_of(seq));
        disk_record::encode(
            &mut self.buffer,
            RecordHeader {
                seq,
                offset,
                seed: self.seed,
            },
        );
        match file
            .write_all_at(&self.buffer, offset)
            .and_then(|()| file.sync_data())
        {
            Ok(()) => {
                self.next_seq += 1;
                Ok(())
            }
            Err(error) => {
                self.errors += 1;
                Err((seq, offset, error))
            }
        }
    }
}

/// `fdatasync`, as a trait so the tests can use a plain file.
trait SyncData {
    fn sync_data(&self) -> io::Result<()>;
}

impl SyncData for File {
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// Records owed after `elapsed` at `bytes_per_sec`, rounded down.
fn records_owed(bytes_per_sec: u64, elapsed: Duration) -> u64 {
    let bytes = bytes_per_sec as u128 * elapsed.as_nanos() / 1_000_000_000;
    (bytes / RECORD_SIZE as u128) as u64
}

/// The disk counterpart of the memory workload's `DirtyBudget`: exact over
/// time however late the writer wakes, and debt beyond one second's worth
/// (after a migration pause, or a slow disk) is forgiven rather than burst.
#[derive(Debug, Clone)]
struct RecordBudget {
    bytes_per_sec: u64,
    max_backlog: u64,
    /// Records owed so far that have been written or forgiven.
    settled: u64,
}

impl RecordBudget {
    fn new(bytes_per_sec: u64) -> RecordBudget {
        RecordBudget {
            bytes_per_sec,
            max_backlog: records_owed(bytes_per_sec, Duration::from_secs(1)).max(1),
            settled: 0,
        }
    }

    /// Records to write now, `elapsed` after the writer started.
    fn records_due(&mut self, elapsed: Duration) -> u64 {
        let due = records_owed(self.bytes_per_sec, elapsed).saturating_sub(self.settled);
        if due > self.max_backlog {
            self.settled += due - self.max_backlog;
            return self.max_backlog;
        }
        due
    }

    fn record_written(&mut self) {
        self.settled += 1;
    }

    /// Time since the start at which the next record falls due.
    fn next_due(&self) -> Duration {
        if self.bytes_per_sec == 0 {
            return Duration::from_secs(3600);
        }
        let bytes = (self.settled as u128 + 1) * RECORD_SIZE as u128;
        let nanos = bytes * 1_000_000_000;
        let nanos = nanos.div_ceil(self.bytes_per_sec as u128);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_guest::disk_record::{parse, Parsed};
    use std::cell::Cell;

    #[test]
    fn budget_paces_records_and_forgives_long_pauses() {
        let mut budget = RecordBudget::new(2 << 20); // 32 records/s
        assert_eq!(budget.records_due(Duration::ZERO), 0);
        assert_eq!(budget.next_due(), Duration::from_nanos(31_250_000));
        assert_eq!(budget.records_due(Duration::from_millis(31)), 0);
        assert_eq!(budget.records_due(Duration::from_millis(32)), 1);
        budget.record_written();
        assert_eq!(budget.next_due(), Duration::from_nanos(62_500_000));
        assert_eq!(budget.records_due(Duration::from_millis(500)), 15);
        // A 10 s pause: one second's worth is due, the rest is forgiven.
        assert_eq!(budget.records_due(Duration::from_secs(10)), 32);
        for _ in 0..32 {
            budget.record_written();
        }
        assert_eq!(budget.records_due(Duration::from_secs(10)), 0);
        assert_eq!(budget.records_due(Duration::from_millis(10_500)), 16);
    }

    /// A file whose writes fail while `failing` is set.
    struct Flaky {
        file: File,
        failing: Cell<bool>,
    }

    impl FileExt for Flaky {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.file.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            if self.failing.get() {
                return Err(io::Error::other("injected"));
            }
            self.file.write_at(buf, offset)
        }
    }

    impl SyncData for Flaky {
        fn sync_data(&self) -> io::Result<()> {
            self.file.sync_data()
        }
    }

    #[test]
    fn writer_fills_the_ring_wraps_and_retries_failed_records() {
        let path = std::env::temp_dir().join(format!("ferry-guest-disk-{}", std::process::id()));
        let offset = 8192;
        let ring = Ring::new(offset, 3 * RECORD_SIZE as u64).unwrap();
        let file = Flaky {
            file: OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap(),
            failing: Cell::new(false),
        };
        let mut writer = RecordWriter::new(ring, 42);
        for _ in 0..4 {
            writer.write_next(&file).unwrap();
        }
        file.failing.set(true);
        let (seq, at, _) = writer.write_next(&file).unwrap_err();
        assert_eq!((seq, at), (5, offset + RECORD_SIZE as u64));
        file.failing.set(false);
        writer.write_next(&file).unwrap(); // seq 5 again
        assert_eq!((writer.written(), writer.errors), (5, 1));

        let mut slot = vec![0u8; RECORD_SIZE];
        let seqs: Vec<u64> = (0..3)
            .map(|index| {
                let at = ring.slot_offset(index);
                file.file.read_exact_at(&mut slot, at).unwrap();
                match parse(&slot, at) {
                    Parsed::Record(header) => {
                        assert_eq!(header.seed, 42);
                        header.seq
                    }
                    other => panic!("slot {index}: {other:?}"),
                }
            })
            .collect();
        assert_eq!(seqs, vec![4, 5, 3]);
        std::fs::remove_file(&path).unwrap();
    }
}
