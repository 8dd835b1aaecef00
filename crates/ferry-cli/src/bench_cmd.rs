//! `ferry bench …`: ferry beside today's tools, same lab, same run; figures printed and kept.
use anyhow::Result;
use clap::{Args, Subcommand};
use ferry_bench::cold::{ColdBench, Method};
use ferry_bench::live::{self, LiveBench};
use ferry_bench::live_disk::{self, LiveDiskBench};
use ferry_lab::units::{parse_duration, parse_rate_bps};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Move the 4 GiB disk image to a site holding its older version with scp, zstd|ssh, rsync
    /// and ferry at each RTT; table, CSV, JSON and plots under --out.
    Cold(ColdArgs),
    /// Move a running guest from site a to b at each RTT with QEMU's own migration (TLS; and
    /// multifd+zstd+TLS) and with ferry (and back), probed every 10 ms from site client; table,
    /// CSV, JSON and plots under --out. With --disk the guest has the 4 GiB disk (newer version;
    /// b holds the older) and writes to it: QEMU's NBD mirror + multifd against ferry.
    Live(LiveArgs),
}

#[derive(Args)]
pub struct LiveArgs {
    /// Round-trip times between a and b, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0ms,50ms,100ms,150ms,200ms", value_parser = parse_duration)]
    rtts: Vec<Duration>,
    #[arg(long, default_value = "1gbit", value_parser = parse_rate_bps)]
    rate: u64,
    /// Methods, comma-separated: qemu-tls, qemu-multifd, ferry (ferry includes its return trip)
    /// and ferry-postcopy (ferry with --postcopy, there and back), default all but the last;
    /// with --disk: qemu-nbd-mirror, ferry, ferry-diskless (default: all of them).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// The guest has a local disk that moves with it (issue 5): the 4 GiB realistic image's
    /// newer version at a, its older version at b; results in live-disk.{csv,json,png}.
    #[arg(long)]
    disk: bool,
    /// With --disk: the guest's disk writes (bytes per second of 64 KiB records).
    #[arg(long, default_value = "2M")]
    disk_rate: String,
    /// With --disk: the ring the guest writes its records around (bytes: K, M, G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    disk_span: u64,
    /// With --disk: no return trip after ferry's move.
    #[arg(long, requires = "disk")]
    no_return: bool,
    /// With --disk: ferry's moves send the disks' bulk pass before the RAM (`vm migrate
    /// --disks-first`) instead of beside it.
    #[arg(long, requires = "disk")]
    disks_first: bool,
    /// Runs of every method at each RTT (the median is reported).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The guest's memory, MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// The guest workload (kernel command-line words): working set, dirty rate, page mix.
    #[arg(long, default_value = "ferry.mem=512M ferry.dirty=8M")]
    workload: String,
    /// How long a booted guest runs before it moves.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    settle: Duration,
    /// How long the guest must beat on at the destination.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    hold: Duration,
    /// A migration that takes longer fails (and is recorded as failed).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    method_timeout: Duration,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Scratch space: agents' data, certificates, logs.
    #[arg(long, default_value = "/var/tmp/ferry-bench/live")]
    work: PathBuf,
    #[arg(long, default_value = "blive")]
    lab: String,
    /// Run nothing: make the table, targets and plots again from the live.json (with --disk:
    /// live-disk.json) under --out.
    #[arg(long)]
    replot: bool,
}

#[derive(Args)]
pub struct ColdArgs {
    /// Round-trip times to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0ms,20ms,40ms,60ms,80ms,100ms,120ms,140ms,160ms,180ms,200ms", value_parser = parse_duration)]
    rtts: Vec<Duration>,
    #[arg(long, default_value = "1gbit", value_parser = parse_rate_bps)]
    rate: u64,
    /// Methods to run, comma-separated: scp, zstd-ssh, rsync, ferry, ferry-plaintext.
    #[arg(long, value_delimiter = ',', default_value = "scp,zstd-ssh,rsync,ferry,ferry-plaintext", value_parser = Method::parse)]
    methods: Vec<Method>,
    /// Runs per RTT of each ferry method (the median is reported).
    #[arg(long, default_value_t = 3)]
    ferry_runs: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Scratch space for the destination's copies and the daemons' state.
    #[arg(long, default_value = "/var/tmp/ferry-bench/cold")]
    work: PathBuf,
    #[arg(long, default_value = "bcold")]
    lab: String,
    /// A method slower than this fails the benchmark.
    #[arg(long, default_value = "1800s", value_parser = parse_duration)]
    method_timeout: Duration,
    /// Set this initial congestion window (segments) on both sites' WAN route, for every method.
    #[arg(long)]
    initcwnd: Option<u32>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let out = match cmd {
        BenchCommand::Cold(a) => {
            let bench = ColdBench {
                rtts: a.rtts,
                rate_bps: a.rate,
                methods: a.methods,
                ferry_runs: a.ferry_runs.max(1),
                out_dir: a.out,
                work_dir: a.work,
                ferry_exe: std::env::current_exe()?,
                lab: a.lab,
                method_timeout: a.method_timeout,
                initcwnd: a.initcwnd,
            };
            ferry_bench::cold::run(&bench)?;
            bench.out_dir
        }
        BenchCommand::Live(a) if a.replot && a.disk => {
            live_disk::replot(&a.out)?;
            a.out
        }
        BenchCommand::Live(a) if a.replot => {
            live::replot(&a.out)?;
            a.out
        }
        BenchCommand::Live(a) => {
            let methods = |all: &str| a.methods.clone().unwrap_or_else(|| all.split(',').map(String::from).collect());
            let (live_methods, disk_methods) = if a.disk {
                (vec![], methods("qemu-nbd-mirror,ferry,ferry-diskless").iter().map(|m| live_disk::Method::parse(m)).collect::<Result<_>>()?)
            } else {
                (methods("qemu-tls,qemu-multifd,ferry").iter().map(|m| live::Method::parse(m)).collect::<Result<_>>()?, vec![])
            };
            let bench = LiveBench {
                rtts: a.rtts,
                rate_bps: a.rate,
                methods: live_methods,
                runs: a.runs.max(1),
                memory_mib: a.memory,
                workload: a.workload,
                settle: a.settle,
                hold: a.hold,
                method_timeout: a.method_timeout,
                out_dir: a.out,
                work_dir: a.work,
                ferry_exe: std::env::current_exe()?,
                lab: a.lab,
            };
            if a.disk {
                let disk = LiveDiskBench { live: bench, methods: disk_methods, disk_rate: a.disk_rate, ring_span: a.disk_span, return_trip: !a.no_return, disks_first: a.disks_first };
                live_disk::run(&disk)?;
                disk.live.out_dir
            } else {
                live::run(&bench)?;
                bench.out_dir
            }
        }
    };
    println!("results in {}", out.display());
    Ok(())
}

/// `64M`, `4096K`, `1G` or plain bytes.
fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, shift) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 0),
        Some((i, _)) => (
            &t[..i],
            match t[i..].trim_end_matches("iB").trim_end_matches('B') {
                "K" | "k" => 10,
                "M" | "m" => 20,
                "G" | "g" => 30,
                "" => 0,
                other => anyhow::bail!("size {text:?}: unknown unit {other:?} (use K, M or G)"),
            },
        ),
    };
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("size {text:?}: not a number"))?;
    Ok(n << shift)
}
