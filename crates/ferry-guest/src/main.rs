//! `ferry-guest-workload`: the long-running process inside a ferry lab guest.
//!
//! It keeps guest memory busy in a realistic way (page-cache, text, random
//! and zero pages, rewritten at a set rate), checks that memory for
//! corruption, prints a heartbeat, and answers UDP/TCP echo so a prober can
//! measure migration downtime. Optionally it also writes checkable records
//! to a disk (`ferry.disk=`, see `disk.rs`). std only: it is linked
//! statically for a busybox initramfs.

mod config;
mod content;
mod corpus;
mod disk;
mod echo;
mod memory;
mod report;
mod workload;

use std::io::{self, Write};
use std::process::ExitCode;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use config::{Config, Invocation};
use content::PageClass;
use corpus::CorpusReader;
use report::FillSummary;
use workload::Workload;

/// Period of the dirty/verify loop once the fill is done.
const TICK: Duration = Duration::from_millis(10);
/// Longest stretch of filling between heartbeat checks.
const FILL_SLICE: Duration = Duration::from_millis(50);
/// Share of a tick the dirtier may use; debt it cannot clear carries over.
const DIRTY_SHARE: Duration = Duration::from_millis(6);
/// Share of a tick for verification: a low duty cycle (~10%), so the
/// verifier does not compete with the echo thread on a single slow vCPU.
const VERIFY_SHARE: Duration = Duration::from_millis(1);
const VERIFY_MAX_PAGES_PER_TICK: u64 = 256;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Without /proc mounted there is no command line to read: use defaults.
    let kernel_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config = match config::load(&kernel_cmdline, &args) {
        Ok(Invocation::Run(config)) => config,
        Ok(Invocation::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("ferry-guest-workload: {error}");
            return ExitCode::from(2);
        }
    };
    run(config)
}

/// Runs until killed; returns only if the memory cannot be allocated.
fn run(config: Config) -> ExitCode {
    let started = Instant::now();
    if config.echo_port != 0 {
        echo::spawn_echo_services(config.echo_port);
    }
    // After spawning the echo threads, so only this thread is affected.
    lower_this_threads_priority();
    // After lowering the priority, which a new thread inherits.
    if let Some(settings) = disk::DiskSettings::from_config(&config) {
        disk::spawn_disk_writer(settings);
    }

    // Walking the corpus can take a while on a big tree; do it off this
    // thread so heartbeats start immediately.
    let corpus_root = config.corpus.clone();
    let mut corpus_scan: Option<JoinHandle<CorpusReader>> =
        Some(thread::spawn(move || CorpusReader::scan(&corpus_root)));
    let mut workload: Option<Workload> = None;
    let mut fill_started = started;
    let mut heartbeat = Heartbeat::new(config.heartbeat, started);
    // Stdout is locked per report, never across a sleep: the disk writer
    // thread prints too.
    let out = io::stdout;

    loop {
        let now = Instant::now();
        if heartbeat.is_due(now) {
            let stats = workload.as_ref().map(Workload::stats).unwrap_or_default();
            report::heartbeat(
                &mut out().lock(),
                heartbeat.seq(),
                now.duration_since(started).as_millis(),
                &stats,
            );
            heartbeat.advance(now);
        }

        let Some(work) = workload.as_mut() else {
            if corpus_scan.as_ref().is_some_and(JoinHandle::is_finished) {
                let scan = corpus_scan.take().expect("checked above");
                // A panicking walk just means no cache content.
                let corpus = scan
                    .join()
                    .unwrap_or_else(|_| CorpusReader::from_files(Vec::new()));
                eprintln!(
                    "ferry-guest-workload: corpus {}: {} files",
                    config.corpus.display(),
                    corpus.file_count()
                );
                match Workload::new(&config, corpus) {
                    Ok(created) => workload = Some(created),
                    Err(error) => {
                        eprintln!("ferry-guest-workload: {error}");
                        return ExitCode::FAILURE;
                    }
                }
                fill_started = Instant::now();
            } else {
                sleep_until(heartbeat.next_due().min(now + TICK));
            }
            continue;
        };

        if !work.is_filled() {
            if work.fill_until(heartbeat.next_due().min(now + FILL_SLICE)) {
                let done = Instant::now();
                report::ready(
                    &mut out().lock(),
                    &fill_summary(&config, work, done.duration_since(fill_started)),
                );
                work.start_dirtying(done);
            }
            continue;
        }

        work.dirty_due_pages(now, now + DIRTY_SHARE);
        let mut out = out().lock();
        work.verify_some(
            VERIFY_MAX_PAGES_PER_TICK,
            Instant::now() + VERIFY_SHARE,
            &mut out,
        );
        let _ = out.flush(); // any ferry-corrupt lines
        drop(out);
        sleep_until(heartbeat.next_due().min(now + TICK));
    }
}

fn fill_summary(config: &Config, work: &Workload, fill_time: Duration) -> FillSummary {
    FillSummary {
        mem_bytes: config.mem_bytes,
        pages: work.pages() as u64,
        fill_ms: fill_time.as_millis(),
        class_pages: PageClass::ALL.map(|class| work.class_pages(class)),
    }
}

/// Heartbeat schedule: fixed period without drift, and no burst of lines
/// after a stall (e.g. the VM paused for migration) — missed beats are skipped.
struct Heartbeat {
    period: Duration,
    next_due: Instant,
    /// Sequence number of the next heartbeat; the first one (printed at
    /// start-up) is 1, so `seq` is also the number of heartbeats printed.
    next_seq: u64,
}

impl Heartbeat {
    fn new(period: Duration, started: Instant) -> Heartbeat {
        Heartbeat {
            period,
            next_due: started,
            next_seq: 1,
        }
    }

    fn is_due(&self, now: Instant) -> bool {
        now >= self.next_due
    }

    fn next_due(&self) -> Instant {
        self.next_due
    }

    fn seq(&self) -> u64 {
        self.next_seq
    }

    fn advance(&mut self, now: Instant) {
        self.next_seq += 1;
        self.next_due += self.period;
        if self.next_due <= now {
            self.next_due = now + self.period;
        }
    }
}

fn sleep_until(deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if !remaining.is_zero() {
        thread::sleep(remaining);
    }
}

/// Makes the memory work yield to the echo threads on a single slow vCPU, so
/// a long fill or a high dirty rate cannot delay echo replies (which would
/// read as migration downtime). On Linux `nice` applies to the calling
/// thread only; the echo threads were created before and keep priority 0.
fn lower_this_threads_priority() {
    extern "C" {
        fn nice(increment: std::os::raw::c_int) -> std::os::raw::c_int;
    }
    // SAFETY: nice(3) has no memory-safety preconditions. Failure (-1 with
    // errno) only means the priority stays as it was, which is harmless.
    unsafe {
        nice(10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_keeps_period_and_skips_missed_beats() {
        let start = Instant::now();
        let period = Duration::from_secs(1);
        let mut heartbeat = Heartbeat::new(period, start);
        assert!(heartbeat.is_due(start));
        assert_eq!(heartbeat.seq(), 1);

        // Slightly late beat: the next one stays on the original grid.
        heartbeat.advance(start + Duration::from_millis(30));
        assert_eq!(heartbeat.next_due(), start + period);
        assert_eq!(heartbeat.seq(), 2);

        // A 5 s stall: one beat now, the next a full period later.
        let resumed = start + Duration::from_secs(6);
        assert!(heartbeat.is_due(resumed));
        heartbeat.advance(resumed);
        assert_eq!(heartbeat.next_due(), resumed + period);
        assert_eq!(heartbeat.seq(), 3);
    }
}
