//! QEMU's own way to move a VM with a local disk, as `virsh migrate --live --copy-storage-all
//! --tls` drives it: the destination QEMU (`-incoming defer -S`, a fresh empty disk of the same
//! size) exports its disk over NBD with TLS; the source mirrors its disk there
//! (`blockdev-mirror`, sync full) until the job is ready, then migrates RAM with QEMU's best
//! setting of the live benchmark (multifd 8 + zstd + TLS); when the source has switched over,
//! cancelling the ready mirror leaves a consistent copy, the NBD server stops and the
//! destination continues.
use crate::heartbeat::{self, GuestCheck};
use crate::live_native::{self, NativeOutcome, NativeRun, Qemu, TLS_CREDS};
use crate::qmp::Qmp;
use anyhow::{bail, Context, Result};
use ferry_lab::qemu::{self, GuestLaunch};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

pub const NBD_PORT: u16 = 10809;
/// The disk's node (both ends), its device and the destination's export.
const NODE: &str = "vda";
const DEVICE: &str = "vda-dev";
const EXPORT: &str = "vda";
const JOB: &str = "m0";
const TARGET: &str = "mirror-tgt";
/// A mirror this close to its length has done its first pass: what is left is the guest's
/// latest writes.
const CAUGHT_UP: u64 = 8 << 20;

/// The disk as both ends attach it: a raw file opened O_DIRECT with thread-pool I/O (as ferry's
/// agent runs disks), on a virtio-blk device (the guest's /dev/vda).
fn disk_args(path: &Path) -> Vec<String> {
    let blockdev = json!({"driver": "raw", "node-name": NODE, "file": {"driver": "file", "filename": path, "aio": "threads", "cache": {"direct": true}}});
    vec!["-blockdev".into(), blockdev.to_string(), "-device".into(), format!("virtio-blk-pci,drive={NODE},id={DEVICE}")]
}

/// A lab guest this module started with a disk.
pub struct DiskGuest {
    qemu: Qemu,
    launch: GuestLaunch,
}

impl DiskGuest {
    pub fn serial(&self) -> Vec<String> {
        qemu::serial_lines(&self.launch.serial_log)
    }
}

/// Boots the guest at a with `disk`, waits for its workload (`ferry-ready`) and its disk writer
/// (a `disk seq=` line), and lets both settle.
pub fn boot_source(run: &NativeRun, disk: &Path) -> Result<DiskGuest> {
    let mut spec = run.guest.clone();
    spec.name = "lsrc".into();
    spec.site = "a".into();
    let mut launch = spec.launch(run.lab, run.image)?;
    launch.extra_args = disk_args(disk);
    let mut g = DiskGuest { qemu: Qemu::spawn(&launch)?, launch };
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let lines = g.serial();
        if lines.iter().any(|l| l.starts_with("ferry-ready")) && lines.iter().any(|l| l.contains("disk seq=") && !l.contains("seq=0 ")) {
            break;
        }
        if !g.qemu.running() || Instant::now() > deadline {
            bail!("the source guest did not start writing to its disk; console:\n{}", crate::site_vm::tail(&lines, 15));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(run.settle);
    Ok(g)
}

/// What one mirror + migration measured (wire and probe figures are the caller's).
#[derive(Debug, Default)]
pub struct MirrorOutcome {
    pub native: NativeOutcome,
    /// Bytes the mirror job copied (its final `len`), and when it was ready.
    pub mirror_bytes: Option<u64>,
    pub mirror_ready_s: Option<f64>,
    /// When the mirror, its first pass done but never caught up with the guest's writes, was
    /// switched to write-blocking (see [`wait_ready`]).
    pub mirror_blocking_s: Option<f64>,
    /// From RAM switchover to the destination running: the mirror's cancel, `nbd-server-stop`
    /// and `cont`.
    pub after_switchover_ms: Option<f64>,
}

/// Moves `source` with its disk to a fresh QEMU at b whose disk is `dest_disk` (an empty file
/// of the same size). `around` is called just before the destination starts and right after it
/// runs; the destination is then watched for `hold` and returned, still running, so that the
/// caller stops it before reading its disk.
pub fn migrate(run: &NativeRun, source: &mut DiskGuest, dest_disk: &Path, hold: Duration, mut around: impl FnMut(bool)) -> (MirrorOutcome, GuestCheck, Option<Qemu>) {
    let seq_before = heartbeat::last(&source.serial()).map(|h| h.seq);
    let mut outcome = MirrorOutcome::default();
    around(true);
    let started = Instant::now();
    let mut ended = false;
    let result = (|| -> Result<(Qemu, GuestLaunch)> {
        let mut args = disk_args(dest_disk);
        args.push("-S".into());
        let (q, launch, mut dq) = live_native::spawn_destination(run, args)?;
        let dest_ip = run.lab.site("b")?.wan_addr().to_string();
        dq.execute("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": dest_ip, "port": NBD_PORT.to_string()}}, "tls-creds": TLS_CREDS}))?;
        dq.execute("block-export-add", json!({"type": "nbd", "id": "exp0", "node-name": NODE, "name": EXPORT, "writable": true}))?;
        live_native::incoming(&mut dq, run)?;

        let mut sq = Qmp::connect(&source.launch.qmp_socket, Duration::from_secs(10))?;
        live_native::configure(&mut sq, run, "client")?;
        let node = source_node(&mut sq)?;
        sq.execute("blockdev-add", json!({"driver": "nbd", "node-name": TARGET, "server": {"type": "inet", "host": dest_ip, "port": NBD_PORT.to_string()}, "export": EXPORT, "tls-creds": TLS_CREDS}))?;
        sq.execute("blockdev-mirror", json!({"job-id": JOB, "device": node, "target": TARGET, "sync": "full"}))?;
        let deadline = started + run.timeout;
        outcome.mirror_blocking_s = wait_ready(&mut sq, deadline).context("waiting for the mirror to be ready")?.map(|t| t.duration_since(started).as_secs_f64());
        outcome.mirror_ready_s = Some(started.elapsed().as_secs_f64());
        let blocking = outcome.mirror_blocking_s.map_or(String::new(), |t| format!(" (write-blocking from {t:.1} s)"));
        println!("   mirror ready after {:.1} s{blocking}; migrating RAM", started.elapsed().as_secs_f64());

        sq.execute("migrate", json!({"uri": live_native::migrate_uri(run)?}))?;
        let info = live_native::wait_migration(&mut sq, deadline.saturating_duration_since(Instant::now()))?;
        let switched = Instant::now();
        outcome.native.qemu_total_ms = info["total-time"].as_f64();
        outcome.native.qemu_downtime_ms = info["downtime"].as_f64();
        outcome.native.stream_bytes = info["ram"]["transferred"].as_u64();
        // The source stands still: cancelling the ready job copies what is left and stops.
        let last = job(&mut sq)?;
        sq.execute("block-job-cancel", json!({"device": JOB}))?;
        let last = wait_job_gone(&mut sq, Instant::now() + Duration::from_secs(60))?.or(last);
        outcome.mirror_bytes = last.and_then(|j| j["len"].as_u64());
        let _ = sq.execute("blockdev-del", json!({"node-name": TARGET}));
        dq.execute("nbd-server-stop", json!({}))?;
        dq.execute("cont", json!({}))?;
        outcome.after_switchover_ms = Some(switched.elapsed().as_secs_f64() * 1e3);
        outcome.native.seconds = started.elapsed().as_secs_f64();
        around(false);
        ended = true;
        Ok((q, launch))
    })();
    if !ended {
        outcome.native.seconds = started.elapsed().as_secs_f64();
        around(false);
    }
    let (mut q, launch) = match result {
        Ok(d) => d,
        Err(e) => {
            outcome.native.error = Some(format!("{e:#}"));
            return (outcome, GuestCheck { ok: false, seq_before, seq_after: None, why: "migration failed".into() }, None);
        }
    };
    let serial = launch.serial_log.clone();
    let check = heartbeat::watch(|| Ok(qemu::serial_lines(&serial)), || q.running(), seq_before, Duration::from_secs(20), hold);
    (outcome, check, Some(q))
}

/// The node under the guest's disk device, as `query-block` names it.
fn source_node(qmp: &mut Qmp) -> Result<String> {
    let blocks = qmp.execute("query-block", json!({}))?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(DEVICE)))
        .and_then(|b| b["inserted"]["node-name"].as_str().map(String::from))
        .context("query-block shows no disk on the guest's virtio-blk device")
}

/// The mirror job as `query-block-jobs` shows it, if it exists.
fn job(qmp: &mut Qmp) -> Result<Option<Value>> {
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    Ok(jobs.as_array().into_iter().flatten().find(|j| j["device"] == JOB).cloned())
}

/// Waits until the mirror job is ready. A background mirror becomes ready only at a moment when
/// nothing is dirty and nothing in flight: a guest that writes more often than once per WAN
/// round trip never gives it one, and libvirt would wait forever. So, once the first pass is
/// done (at most `CAUGHT_UP` behind) and the job still is not ready a second later, the job is switched to
/// `copy-mode=write-blocking` (QEMU ≥ 8.2; libvirt's `--copy-storage-synchronous-writes` uses
/// that mode from the start): guest writes then reach the target before they complete, and the
/// job converges. Returns when it was switched, if it was.
fn wait_ready(qmp: &mut Qmp, deadline: Instant) -> Result<Option<Instant>> {
    let (mut caught_up, mut switched) = (None::<Instant>, None);
    let mut report = Instant::now();
    loop {
        let Some(j) = job(qmp)? else { bail!("the mirror job ended before it was ready (QEMU reports the reason as an event; see the verification)") };
        if j["ready"].as_bool() == Some(true) {
            return Ok(switched);
        }
        let (offset, len) = (j["offset"].as_u64().unwrap_or(0), j["len"].as_u64().unwrap_or(u64::MAX));
        if len.saturating_sub(offset) <= CAUGHT_UP && switched.is_none() {
            let since = *caught_up.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                qmp.execute("block-job-change", json!({"id": JOB, "type": "mirror", "copy-mode": "write-blocking"}))?;
                switched = Some(Instant::now());
            }
        }
        if report.elapsed() > Duration::from_secs(15) {
            println!("   mirror: {} of {} MB{}", offset / 1_000_000, len / 1_000_000, if switched.is_some() { " (write-blocking)" } else { "" });
            report = Instant::now();
        }
        if Instant::now() > deadline {
            bail!("not ready in time: copied {} of {} MB{}", offset / 1_000_000, len / 1_000_000, if switched.is_some() { " (write-blocking)" } else { "" });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the job to disappear; returns the last view of it.
fn wait_job_gone(qmp: &mut Qmp, deadline: Instant) -> Result<Option<Value>> {
    let mut last = None;
    while let Some(j) = job(qmp)? {
        if Instant::now() > deadline {
            bail!("the cancelled mirror job did not end: {j}");
        }
        last = Some(j);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(last)
}
