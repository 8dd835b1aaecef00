//! A VM's local disks move with it, live. Sites share no storage, so:
//!
//! 1. the source QEMU starts a dirty bitmap on every disk (64 KiB granularity, the transfer
//!    engine's block);
//! 2. the transfer engine sends each disk as it is (a live source: a block that changes under
//!    it goes as it is when read; a qcow2 disk goes as the guest's bytes, see `disk_view`) to
//!    `vms/<vm>/<file>` at the destination, where an older copy,
//!    a named base, or any chunk the destination holds means less to send. With raw disks
//!    the RAM migration runs beside the pass (`overlap_disks`, the CLI's default): the
//!    destination's QEMU opens the staging file the engine fills, and the source QEMU may not
//!    switch over (`switchover-ack`, the go-ahead held back) until the pass is committed. A
//!    qcow2 disk (or `--disks-first`) goes whole before the RAM migrates;
//! 3. then, while RAM migrates on, the blocks the guest dirtied are read through QEMU's NBD
//!    export of a frozen bitmap (a new one records meanwhile) and travel as disk records inside
//!    the migration stream's batches, which the destination writes to its copy in place;
//! 4. QEMU pauses before switchover (`pause-before-switchover`): the last dirtied blocks go,
//!    then QEMU continues. The stream is ordered, so the destination's disk is complete before
//!    its QEMU gets the device state and runs.
//!
//! What the destination holds of a disk is noted page by page (once it acknowledged the
//! blocks): a RAM page equal to one (the guest's page cache holds what it wrote) then travels
//! as that place on the disk.
//!
//! The source's disk is only ever read: whatever fails, the VM runs on there, intact.
use super::batch::{BatchEncoder, DiskOp};
use super::source::SourceContext;
use crate::control::{self, Event, SendRequest};
use crate::nbd::NbdClient;
use crate::pages::{PageId, PAGE};
use crate::vm::{DiskSpec, VmSpec};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use ferry_transfer::sender::{Observer, SendObserver};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The dirty bitmap's granularity: the transfer engine's block.
const GRANULARITY: u64 = 64 << 10;
/// Dirty blocks are collected this often while RAM migrates: what is left for the pause is
/// what the guest writes in about this long.
const ROUND_EVERY: Duration = Duration::from_millis(200);
/// QEMU's rate limit while it waits, held, for the bulk pass (bytes/s): its migration thread
/// stops for the rest of each 100 ms once it has written anything at all.
const IDLE_BANDWIDTH: u64 = 10;
/// How long QEMU, held until the bulk pass is committed, may take to sync its dirty bitmap
/// before it is let go.
const SYNC_AT_MOST: Duration = Duration::from_millis(500);
/// The switchover bandwidth QEMU is told after the bulk pass (bytes/s of its stream): what the
/// agents carry of pages the guest dirtied on this kind of machine, about a third of a 1 Gbit/s
/// link's worth.
const SWITCHOVER_RATE: u64 = 40 << 20;
/// Disk bytes per batch of records.
const RECORDS_PER_BATCH: usize = 1 << 20;
const READ_PIECE: u64 = 1 << 20;

/// Where a moving VM's disk lives at a site, under its data directory.
pub fn object_name(vm: &str, disk: &DiskSpec) -> String {
    let file = disk.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "disk".into());
    format!("vms/{vm}/{file}")
}

/// Where a live move's bulk pass puts a disk at the destination: its place; or, for a qcow2
/// disk (its pass carries the guest's bytes), a raw file beside it, which the destination makes
/// the qcow2 image at its place before its QEMU opens it (`disk_view`).
pub fn landing_name(vm: &str, disk: &DiskSpec) -> String {
    let object = object_name(vm, disk);
    if disk.format != "qcow2" {
        return object;
    }
    match object.rsplit_once('/') {
        Some((dir, file)) => format!("{dir}/.{file}.ferry-raw"),
        None => format!(".{object}.ferry-raw"),
    }
}

/// The disk a landing file (`landing_name`) becomes: its older version there counts for the pass.
pub fn older_copy(landing: &Path) -> Option<PathBuf> {
    let name = landing.file_name()?.to_str()?;
    let disk = name.strip_prefix('.')?.strip_suffix(".ferry-raw")?;
    Some(landing.with_file_name(disk))
}

/// Two disks of one VM named alike would land on one file at the destination.
pub fn refuse_shared_names(spec: &VmSpec) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for d in &spec.disks {
        if !seen.insert(object_name(&spec.name, d)) {
            bail!("VM {}: two of its disks are named {:?}; ferry keeps a VM's disks by file name at the destination — rename one (nothing was changed)", spec.name, d.path.file_name().unwrap_or_default());
        }
    }
    Ok(())
}

/// Before any disk data goes: the destination must not run a VM of this name (its disk would
/// be the one replaced).
pub async fn refuse_if_destination_runs(ctx: &SourceContext<'_>, vm: &str, to: &str) -> Result<()> {
    // A fresh migration ID: the destination does not know it, so it answers from the VMs it runs.
    // Tried again as the migration's setup is: a connection kept warm may have died with a
    // restarted destination agent.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match super::doubt::ask(ctx, vm, to, crate::session::rand_bytes()).await {
            Ok(Some((true, _))) => bail!("{to} already runs a VM named {vm} (nothing was changed)"),
            Ok(_) => return Ok(()),
            Err(e) if attempt < 3 => {
                tracing::warn!(to, "asking whether the destination runs {vm} failed, trying again: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("asking {to} whether it runs a VM named {vm}"))),
        }
    }
}

/// Disk-record batches waiting for the pump: the follower waits (and its next round finds the
/// blocks again) rather than the agent holding a backlog.
pub const PUMP_QUEUE: usize = 8;

/// How a disk goes through the transfer engine, live (its bulk pass) or cold: to its place at
/// the destination, in the dirty bitmap's blocks, its base counting.
pub fn disk_send(vm: &str, disk: &DiskSpec, to: &str, live: bool) -> SendRequest {
    SendRequest { source: disk.path.clone(), to: to.to_string(), dest_path: if live { landing_name(vm, disk) } else { object_name(vm, disk) }, base: disk.base.clone(), block: GRANULARITY as u32, cdc: false, zstd_level: 1, retries: 2, live, first: Vec::new() }
}

/// The destination's view of the spec: each disk at its place under this site's data dir.
pub fn arrive(spec: &mut VmSpec, data_dir: &Path) {
    let vm = spec.name.clone();
    for d in &mut spec.disks {
        d.path = data_dir.join(object_name(&vm, d));
    }
}

/// After the VM left: the disks it left here, as they were at switchover, go into this site's
/// content store (an index of their blocks), so that a move back, or any transfer here, finds
/// them without hashing them first. Off the caller's path; a disk outside the data directory
/// is not a store object and is left alone.
pub fn index_left_copies(data_dir: PathBuf, spec: VmSpec, tenant_key: [u8; 32]) {
    std::thread::spawn(move || {
        // Idle priority: just now the VM resumes at its new site, on a machine this one may
        // share CPUs with, and its first moments there are the pause its clients see.
        unsafe {
            let idle = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle);
        }
        for d in &spec.disks {
            let Ok(object) = d.path.strip_prefix(&data_dir) else { continue };
            let object = object.to_string_lossy().into_owned();
            let hasher = ferry_transfer::scan::ChunkHasher::new(tenant_key);
            let indexed = ferry_transfer::catalog::index_file(&data_dir, &object, &d.path, &hasher, GRANULARITY as u32);
            match indexed {
                Ok(n) => tracing::info!(object, blocks = n, "the disk the VM left here is in the content store"),
                Err(e) => tracing::warn!(object, "indexing the disk the VM left here failed: {e:#}"),
            }
        }
    });
}

/// Pages the destination's copy of a disk holds: page ID → (disk index, offset).
pub type DiskPages = std::collections::HashMap<PageId, (u8, u64)>;
/// A page the destination holds: its ID, the disk's index and the offset there.
pub type HeldPage = (PageId, (u8, u64));
/// Pages the destination now holds, for the pump to take into its `DiskPages`.
pub type PageFeed = Arc<Mutex<Vec<HeldPage>>>;

/// Watches one disk's bulk pass: when the destination opened its staging file, and which
/// blocks it holds (their pages go to the pump only once their round is acknowledged).
struct BulkWatch {
    key: [u8; 32],
    disk: u8,
    opened: tokio::sync::watch::Sender<Option<[u8; 16]>>,
    pending: Mutex<HashMap<u64, Vec<HeldPage>>>,
    feed: PageFeed,
}

impl SendObserver for BulkWatch {
    fn opened(&self, transfer: &[u8; 16]) {
        self.opened.send_replace(Some(*transfer));
    }

    fn sent(&self, round: u64, offset: u64, data: &[u8]) {
        let mut found = Vec::with_capacity(data.len() / PAGE);
        note_pages(&self.key, self.disk, offset, data, &mut found);
        self.pending.lock().unwrap().entry(round).or_default().extend(found);
    }

    fn acked(&self, round: u64) {
        if let Some(pages) = self.pending.lock().unwrap().remove(&round) {
            self.feed.lock().unwrap().extend(pages);
        }
    }
}

/// What the bulk pass did, all disks together.
#[derive(Default)]
pub struct BulkOutcome {
    bytes: u64,
    sent: u64,
    reused: u64,
    seconds: f64,
}

/// The bulk pass under way (it borrows the migration's context).
pub type BulkPass<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<BulkOutcome>> + Send + 'a>>;

/// Notes each non-zero page of `block` (at `offset` of disk `disk`) as held there.
fn note_pages(key: &[u8; 32], disk: u8, offset: u64, block: &[u8], into: &mut impl Extend<HeldPage>) {
    let pages = block.chunks_exact(PAGE).enumerate().filter(|(_, p)| !ferry_transfer::scan::is_zero(p));
    into.extend(pages.map(|(i, p)| (super::page_id(key, p), (disk, offset + (i * PAGE) as u64))));
}

/// What the batches hand the pump besides QEMU's stream.
pub enum PumpInput {
    /// Disk records, and the pages they put at the destination (noted once the records are
    /// queued: a page must not be referred to before the block that holds it).
    Records(Vec<u8>, Vec<HeldPage>),
    /// Answered once everything handed over before it is queued ahead of any later stream byte.
    Flush(std::sync::mpsc::SyncSender<()>),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskSummary {
    pub disks: usize,
    /// The disks' size, what the bulk pass sent (payload) and how long it took.
    pub bytes: u64,
    pub bulk_sent: u64,
    pub bulk_reused: u64,
    pub bulk_seconds: f64,
    /// Dirty bytes sent while RAM migrated, in how many rounds, and in the pause.
    pub dirty_bytes: u64,
    pub rounds: u32,
    pub final_bytes: u64,
    /// How long the VM stood paused for the last dirty blocks.
    pub final_ms: f64,
    /// The destination checked every disk against the source's digest at switchover.
    #[serde(default)]
    pub verified: bool,
}

/// A disk the source is moving.
#[derive(Clone)]
struct Moving {
    index: u8,
    spec: DiskSpec,
    node: String,
    /// Where the guest's bytes are read: the file itself when raw; for qcow2, QEMU's plain-file
    /// export of it (`disk_view`).
    content: PathBuf,
    /// What the guest wrote here since the VM started (`WRITTEN_BITMAP`): the bulk pass's lead.
    written: Vec<(u64, u64)>,
}

pub struct DiskMove {
    vm: String,
    disks: Vec<Moving>,
    /// The VM's directory at this site (its NBD socket and disk views are there).
    dir: PathBuf,
    nbd_socket: PathBuf,
    generation: u32,
    /// Both sides hash every disk in the pause and the destination compares (`--verify-disks`).
    pub verify: bool,
    pub summary: DiskSummary,
    /// Pages the destination holds, as they become known (the pump takes them).
    feed: PageFeed,
    key: [u8; 32],
}

fn bitmap(generation: u32) -> String {
    format!("ferry-{generation}")
}

/// Records, for as long as a VM runs at a site, every block its guest writes there. Those are
/// the blocks a site it moves to most surely lacks, and the ones its guest most likely still
/// holds in memory (its page cache): they lead the bulk pass, so that the RAM's copies of them
/// can travel as references to blocks the destination already has.
pub const WRITTEN_BITMAP: &str = "ferry-written";
/// A frozen copy of `WRITTEN_BITMAP`, exported for reading (QEMU exports only frozen bitmaps).
const WRITTEN_SNAPSHOT: &str = "ferry-written-now";

/// Starts recording what the guest writes to each of the VM's disks (`WRITTEN_BITMAP`). Best
/// effort: a VM without it moves all the same, its disks only in their own order.
pub async fn record_writes(qmp: &mut crate::qmp::Qmp, vm: &str, disks: usize) {
    if disks == 0 {
        return;
    }
    let added = async {
        let blocks = qmp.execute("query-block", json!({})).await?;
        let mut actions = Vec::new();
        for i in 0..disks {
            let node = super::disk_view::node_of(&blocks, i)?;
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": node, "name": WRITTEN_BITMAP, "granularity": GRANULARITY}}));
        }
        qmp.execute("transaction", json!({ "actions": actions })).await
    };
    if let Err(e) = added.await {
        tracing::warn!(vm, "recording what the guest writes to its disks failed (its disks will move in their own order): {e:#}");
    }
}

/// The ranges `WRITTEN_BITMAP` marks on disk `disk` (node `node`), read through the NBD server
/// `socket` of a running move; empty if the VM has no such bitmap.
async fn written_ranges(qmp: &mut crate::vm::QmpGuard, socket: &Path, disk: u8, node: &str) -> Result<Vec<(u64, u64)>> {
    let export = format!("ferry-written-d{disk}");
    qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": WRITTEN_SNAPSHOT, "granularity": GRANULARITY, "disabled": true}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": WRITTEN_SNAPSHOT, "bitmaps": [WRITTEN_BITMAP]}},
        ]}),
    )
    .await?;
    let exported = qmp.execute("block-export-add", json!({"type": "nbd", "id": export, "node-name": node, "name": export, "writable": false, "bitmaps": [WRITTEN_SNAPSHOT]})).await;
    let ranges = match exported {
        Ok(_) => {
            let (socket, name) = (socket.to_path_buf(), export.clone());
            let read = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, u64)>> {
                let (nbd, ranges) = open_dirty(&socket, &name, WRITTEN_SNAPSHOT)?;
                nbd.disconnect();
                Ok(ranges)
            })
            .await
            .context("reading the written blocks panicked")
            .and_then(|r| r);
            let _ = qmp.execute("block-export-del", json!({"id": export, "mode": "hard"})).await;
            read
        }
        Err(e) => Err(e),
    };
    let _ = qmp.execute("block-dirty-bitmap-remove", json!({"node": node, "name": WRITTEN_SNAPSHOT})).await;
    ranges
}

impl DiskMove {
    /// Starts dirty tracking and QEMU's NBD server; nothing else changes for the VM.
    pub async fn begin(ctx: &SourceContext<'_>, spec: &VmSpec) -> Result<DiskMove> {
        if spec.disks.len() > u8::MAX as usize {
            bail!("VM {} has more disks than ferry moves", spec.name);
        }
        refuse_shared_names(spec)?;
        for d in &spec.disks {
            if !matches!(d.format.as_str(), "raw" | "qcow2") {
                bail!("VM {}: disk {} is {}; ferry moves raw and qcow2 disks live — nothing was changed", spec.name, d.path.display(), d.format);
            }
        }
        let mut qmp = ctx.vms.qmp(&spec.name).await?;
        let blocks = qmp.execute("query-block", json!({})).await?;
        let mut disks = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            let node = super::disk_view::node_of(&blocks, i)?;
            disks.push(Moving { index: i as u8, spec: d.clone(), node, content: d.path.clone(), written: Vec::new() });
        }
        let dir = ctx.vms.dir(&spec.name);
        let nbd_socket = dir.join("nbd.sock");
        let mut mv = DiskMove { vm: spec.name.clone(), disks, dir: dir.clone(), nbd_socket, generation: 0, verify: false, summary: DiskSummary { disks: spec.disks.len(), ..Default::default() }, feed: Default::default(), key: ctx.cfg.tenant_key()? };
        // Left over from an attempt whose agent died: start clean.
        mv.end(&mut qmp).await;
        // Nodes that record what the guest writes (`WRITTEN_BITMAP`).
        let mut recorded = std::collections::HashSet::new();
        for b in blocks.as_array().into_iter().flatten() {
            let Some(node) = b["inserted"]["node-name"].as_str() else { continue };
            for name in b["inserted"]["dirty-bitmaps"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()) {
                if name == WRITTEN_BITMAP {
                    recorded.insert(node);
                } else if name.starts_with("ferry-") {
                    let _ = qmp.execute("block-dirty-bitmap-remove", json!({"node": node, "name": name})).await;
                }
            }
        }
        let actions: Vec<_> = mv.disks.iter().map(|d| json!({"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": bitmap(0), "granularity": GRANULARITY}})).collect();
        qmp.execute("transaction", json!({ "actions": actions })).await.context("starting dirty tracking on the VM's disks")?;
        let _ = std::fs::remove_file(&mv.nbd_socket);
        // QEMU 10 takes the address in its {type, data} form here.
        if let Err(e) = qmp.execute("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": mv.nbd_socket}}})).await {
            mv.end(&mut qmp).await;
            return Err(e.context("starting the source QEMU's NBD server"));
        }
        for i in 0..mv.disks.len() {
            let d = &mv.disks[i];
            if !recorded.contains(d.node.as_str()) {
                continue;
            }
            match written_ranges(&mut qmp, &mv.nbd_socket, d.index, &d.node).await {
                Ok(ranges) => {
                    let mb = ranges.iter().map(|r| r.1).sum::<u64>() as f64 / 1e6;
                    tracing::info!(vm = %spec.name, disk = d.index, written_mb = mb, "the bulk pass leads with the blocks the guest wrote here");
                    mv.disks[i].written = ranges;
                }
                Err(e) => tracing::warn!(vm = %spec.name, disk = d.index, "reading which blocks the guest wrote failed (the bulk pass goes in the disk's order): {e:#}"),
            }
        }
        let pid = ctx.vms.pid(&spec.name).context("the VM's QEMU is gone")?;
        for i in 0..mv.disks.len() {
            if mv.disks[i].spec.format == "qcow2" {
                match super::disk_view::export(&mut qmp, pid, &dir, mv.disks[i].index, &blocks, false).await {
                    Ok(view) => mv.disks[i].content = view,
                    Err(e) => {
                        mv.end(&mut qmp).await;
                        return Err(e);
                    }
                }
            }
        }
        Ok(mv)
    }

    /// Removes what `begin` and the rounds left in QEMU (best effort: a QEMU about to be killed
    /// need not answer).
    pub async fn end(&self, qmp: &mut crate::vm::QmpGuard) {
        for g in 0..=self.generation {
            for d in &self.disks {
                let _ = qmp.execute("block-export-del", json!({"id": export_id(d.index, g), "mode": "hard"})).await;
            }
        }
        let _ = qmp.execute("nbd-server-stop", json!({})).await;
        for d in self.disks.iter().filter(|d| d.spec.format == "qcow2") {
            super::disk_view::unexport(qmp, &self.dir, d.index).await;
        }
        for g in 0..=self.generation {
            for d in &self.disks {
                let _ = qmp.execute("block-dirty-bitmap-remove", json!({"node": d.node, "name": bitmap(g)})).await;
            }
        }
    }

    pub async fn end_with(&self, ctx: &SourceContext<'_>) {
        if let Ok(mut qmp) = ctx.vms.qmp(&self.vm).await {
            self.end(&mut qmp).await;
        }
    }

    /// Starts the bulk pass: every disk through the transfer engine at once, as it is now.
    /// Returns, per disk, the transfer's ID once the destination has opened its staging file,
    /// and the pass itself, which the caller drives (it goes on beside the RAM migration).
    pub fn bulk<'a>(&self, ctx: &'a SourceContext<'a>, to: &'a str, events: &mpsc::UnboundedSender<Event>) -> (Vec<tokio::sync::watch::Receiver<Option<[u8; 16]>>>, BulkPass<'a>) {
        let started = Instant::now();
        let mut opened = Vec::new();
        let mut sends = Vec::new();
        for d in &self.disks {
            let mut req = disk_send(&self.vm, &d.spec, to, true);
            req.source = d.content.clone();
            req.first = d.written.clone();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let events = events.clone();
            let forward = async move {
                while let Some(ev) = rx.recv().await {
                    if let Event::Progress { progress, wire_sent, seconds } = ev {
                        let remaining = progress.scanned.saturating_sub(progress.acked);
                        let _ = events.send(Event::MigrateProgress { status: "disk".into(), stream_bytes: progress.acked, remaining, wire_sent, seconds });
                    }
                }
            };
            let (opened_tx, opened_rx) = tokio::sync::watch::channel(None);
            opened.push(opened_rx);
            let watch = BulkWatch { key: self.key, disk: d.index, opened: opened_tx, pending: Mutex::default(), feed: self.feed.clone() };
            let path = d.spec.path.clone();
            sends.push(async move {
                let forwarding = tokio::spawn(forward);
                let sent = control::run_send(ctx.cfg, ctx.identity, ctx.warm, req, Some(Observer(Arc::new(watch))), tx).await;
                forwarding.abort();
                sent.with_context(|| format!("sending disk {} to {to}", path.display()))
            });
        }
        let pass = async move {
            let mut out = BulkOutcome::default();
            for sent in futures::future::try_join_all(sends).await? {
                out.bytes += sent.size;
                out.sent += sent.progress.sent_payload;
                out.reused += sent.progress.reused;
            }
            out.seconds = started.elapsed().as_secs_f64();
            Ok(out)
        };
        (opened, Box::pin(pass))
    }

    /// The pages the destination holds, as they become known.
    pub fn page_feed(&self) -> PageFeed {
        self.feed.clone()
    }

    pub fn bulk_done(&mut self, out: BulkOutcome) {
        self.summary.bytes = out.bytes;
        self.summary.bulk_sent = out.sent;
        self.summary.bulk_reused = out.reused;
        self.summary.bulk_seconds = out.seconds;
    }

    /// Keeps the destination's disks following the source's until QEMU pauses before the
    /// switchover; then sends the rest and lets QEMU go on. Returns when QEMU continued (or the
    /// migration ended some other way, which the caller learns from QEMU).
    ///
    /// A bulk pass still under way finishes first; only then may QEMU switch over (it gets
    /// `limit_ms` back, and `converging` starts), and only then do dirty rounds begin: the
    /// destination's copy is committed, so no older block of the bulk pass can land on a record.
    pub async fn follow(&mut self, ctx: &SourceContext<'_>, pump: std::sync::mpsc::SyncSender<PumpInput>, bulk: Option<BulkPass<'_>>, limit_ms: u64, converging: &Mutex<Option<Instant>>, gate: &super::source::SwitchoverGate) -> Result<()> {
        if let Some(pass) = bulk {
            let out = self.await_bulk(ctx, pass).await?;
            tracing::info!(vm = %self.vm, seconds = out.seconds, sent = out.sent, reused = out.reused, "the disks' bulk pass is committed at the destination");
            self.bulk_done(out);
            // What the guest wrote during the pass goes before QEMU may converge, so that the
            // pause carries only the last round's writes.
            self.summary.dirty_bytes += self.round(ctx, &pump, false).await?;
            self.summary.rounds += 1;
            // While held, QEMU found its socket always empty (it only re-sent what the guest
            // dirtied), so its own bandwidth estimate is far above what the path takes, and the
            // stream window's recent rate is no better a guide (on a return trip it is mostly
            // references, while what is left at the end is pages the guest dirtied). Told a
            // modest rate, QEMU stops the VM only with little left; one that does not converge
            // so gets a longer pause allowed later, as any migration does.
            let syncs = |m: &serde_json::Value| m["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
            let now = ctx.vms.qmp(&self.vm).await?.migration().await?;
            let (before, pass_done) = (syncs(&now), now["ram"]["remaining"].as_u64() == Some(0));
            ctx.vms.qmp(&self.vm).await?.execute("migrate-set-parameters", json!({"downtime-limit": limit_ms, "avail-switchover-bandwidth": SWITCHOVER_RATE, "max-bandwidth": super::source::MAX_BANDWIDTH})).await.context("letting QEMU switch over")?;
            // Held with a downtime limit of 0, QEMU never looked again for pages the guest
            // dirtied after its first pass (it syncs its dirty bitmap only once what is left
            // fits in a pause). Let go at once, it would stop the VM at once and send them all
            // in the pause (at 100 ms: 26 MB, and a 331 ms pause where 7 MB made 131 ms). With
            // its limit back it syncs within one of its 100 ms rounds; let go then, it sends
            // what the sync found while the VM runs and converges as any migration does. A
            // QEMU still in its first pass syncs at its end, as it would have anyway: no wait.
            let waiting = Instant::now();
            let mut synced = before;
            while pass_done && synced <= before && waiting.elapsed() < SYNC_AT_MOST {
                tokio::time::sleep(Duration::from_millis(10)).await;
                synced = syncs(&ctx.vms.qmp(&self.vm).await?.migration().await?);
            }
            tracing::info!(vm = %self.vm, pass_done, syncs_before = before, syncs = synced, waited_ms = waiting.elapsed().as_millis() as u64, "QEMU may switch over");
            gate.open();
            *converging.lock().unwrap() = Some(Instant::now());
        }
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let status = ctx.vms.qmp(&self.vm).await?.migration().await?["status"].as_str().unwrap_or("").to_string();
            match status.as_str() {
                "pre-switchover" => {
                    let paused = Instant::now();
                    let bytes = self.round(ctx, &pump, true).await?;
                    if self.verify {
                        let disks: Vec<(u8, PathBuf)> = self.disks.iter().map(|d| (d.index, d.content.clone())).collect();
                        let pump = pump.clone();
                        tokio::task::spawn_blocking(move || -> Result<()> {
                            let mut enc = BatchEncoder::default();
                            for (index, path) in disks {
                                enc.disk_digest(index, &disk_digest(&File::open(&path)?)?);
                            }
                            pump.send(PumpInput::Records(enc.take().0, Vec::new())).map_err(|_| anyhow::anyhow!("the stream pump stopped"))
                        })
                        .await??;
                        self.summary.verified = true;
                    }
                    let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
                    pump.send(PumpInput::Flush(ack_tx)).map_err(|_| anyhow::anyhow!("the stream pump stopped"))?;
                    tokio::task::spawn_blocking(move || ack_rx.recv_timeout(Duration::from_secs(30))).await?.context("the stream pump did not take the last disk blocks")?;
                    ctx.vms.qmp(&self.vm).await?.execute("migrate-continue", json!({"state": "pre-switchover"})).await?;
                    self.summary.final_bytes = bytes;
                    self.summary.final_ms = paused.elapsed().as_secs_f64() * 1e3;
                    tracing::info!(vm = %self.vm, bytes, ms = self.summary.final_ms, "the last dirty blocks are on their way: QEMU switches over");
                    return Ok(());
                }
                "completed" => bail!("QEMU switched over without pausing for the disks"),
                "failed" | "cancelled" => return Ok(()),
                _ if last.elapsed() >= ROUND_EVERY => {
                    self.summary.dirty_bytes += self.round(ctx, &pump, false).await?;
                    self.summary.rounds += 1;
                    last = Instant::now();
                }
                _ => {}
            }
        }
    }

    /// Awaits the bulk pass that the RAM migration runs beside. QEMU, held, its first pass done
    /// and nothing found to send, spins: every turn of its migration thread writes an
    /// end-of-section marker, which the agents carry to the destination's QEMU (on a return
    /// trip, whose RAM is mostly references and soon sent, a fifth of the machine's CPU in
    /// QEMU's thread alone, and the pass took 5.7-7.1 s instead of 2.1 s). So once it has
    /// nothing left, its rate limit turns it to one turn per 100 ms until the pass is done;
    /// `follow` gives it back its bandwidth.
    async fn await_bulk(&self, ctx: &SourceContext<'_>, pass: BulkPass<'_>) -> Result<BulkOutcome> {
        let mut pass = pass;
        let mut check = tokio::time::interval(Duration::from_millis(100));
        let mut throttled = false;
        loop {
            tokio::select! {
                out = &mut pass => return out,
                _ = check.tick(), if !throttled => {
                    let m = ctx.vms.qmp(&self.vm).await?.migration().await?;
                    if m["status"] == "active" && m["ram"]["remaining"].as_u64() == Some(0) {
                        ctx.vms.qmp(&self.vm).await?.execute("migrate-set-parameters", json!({"max-bandwidth": IDLE_BANDWIDTH})).await.context("slowing the held QEMU")?;
                        throttled = true;
                        tracing::info!(vm = %self.vm, "QEMU sent the RAM's first pass and waits for the bulk pass: slowed to a trickle meanwhile");
                    }
                }
            }
        }
    }

    /// Freezes the current bitmap (a fresh one records from the same instant, unless this is the
    /// last round and the VM stands still), and sends the blocks it marks as they are now.
    /// Frozen because QEMU refuses a read-only export of an enabled bitmap; and a bitmap stays
    /// locked while an export holds it, so each generation gets its own export.
    async fn round(&mut self, ctx: &SourceContext<'_>, pump: &std::sync::mpsc::SyncSender<PumpInput>, last: bool) -> Result<u64> {
        let g = self.generation;
        {
            let mut qmp = ctx.vms.qmp(&self.vm).await?;
            let mut actions = Vec::new();
            for d in &self.disks {
                if !last {
                    actions.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": bitmap(g + 1), "granularity": GRANULARITY}}));
                }
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {"node": d.node, "name": bitmap(g)}}));
            }
            qmp.execute("transaction", json!({ "actions": actions })).await.context("freezing the disks' dirty bitmaps")?;
            if !last {
                self.generation += 1;
            }
            for d in &self.disks {
                qmp.execute("block-export-add", json!({"type": "nbd", "id": export_id(d.index, g), "node-name": d.node, "name": export_id(d.index, g), "writable": false, "bitmaps": [bitmap(g)]})).await.context("exporting a disk's dirty blocks")?;
            }
        }
        let (disks, socket, pump, key) = (self.disks.clone(), self.nbd_socket.clone(), pump.clone(), self.key);
        let sent = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut total = 0;
            for d in &disks {
                total += send_dirty(&socket, d.index, &export_id(d.index, g), &bitmap(g), &key, &pump)?;
            }
            Ok(total)
        })
        .await??;
        let mut qmp = ctx.vms.qmp(&self.vm).await?;
        for d in &self.disks {
            let _ = qmp.execute("block-export-del", json!({"id": export_id(d.index, g)})).await;
        }
        Ok(sent)
    }
}

fn export_id(disk: u8, generation: u32) -> String {
    format!("ferry-d{disk}-{generation}")
}

/// Connects to QEMU's NBD export `export` of a frozen `bitmap` and reads the ranges it marks.
fn open_dirty(socket: &Path, export: &str, bitmap: &str) -> Result<(NbdClient, Vec<(u64, u64)>)> {
    let context = format!("qemu:dirty-bitmap:{bitmap}");
    let mut nbd = NbdClient::connect(socket, export, &[&context])?;
    let ranges = nbd.dirty_ranges(&context)?;
    Ok((nbd, ranges))
}

/// Reads the ranges a frozen bitmap marks and hands them to the pump as disk records.
fn send_dirty(socket: &Path, disk: u8, export: &str, bitmap: &str, key: &[u8; 32], pump: &std::sync::mpsc::SyncSender<PumpInput>) -> Result<u64> {
    let (mut nbd, ranges) = open_dirty(socket, export, bitmap)?;
    let mut enc = BatchEncoder::default();
    let mut pages = Vec::new();
    let mut buf = vec![0u8; READ_PIECE as usize];
    let mut total = 0;
    for (start, len) in ranges {
        let mut at = start;
        while at < start + len {
            let n = READ_PIECE.min(start + len - at) as usize;
            nbd.read(at, &mut buf[..n])?;
            enc.disk(disk, at, &buf[..n]);
            note_pages(key, disk, at, &buf[..n], &mut pages);
            total += n as u64;
            at += n as u64;
            if enc.encoded_len() >= RECORDS_PER_BATCH {
                pump.send(PumpInput::Records(enc.take().0, std::mem::take(&mut pages))).map_err(|_| anyhow::anyhow!("the stream pump stopped"))?;
            }
        }
    }
    if !enc.is_empty() {
        pump.send(PumpInput::Records(enc.take().0, pages)).map_err(|_| anyhow::anyhow!("the stream pump stopped"))?;
    }
    nbd.disconnect();
    Ok(total)
}

/// The name the destination's QEMU knows a disk by while its bulk pass still fills the staging
/// file: a second link to that file. QEMU opens its images again by name when it takes them
/// over (at switchover, and after a failed migration out), so the name must outlive the rename
/// that commits the staging file; it stays while the VM runs here, and the next arrival
/// replaces it (which frees a copy it alone still held).
pub fn live_link(final_path: &Path, staging: &Path) -> Result<PathBuf> {
    let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let link = final_path.with_file_name(format!(".{name}.ferry-live"));
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(staging, &link).with_context(|| format!("linking {} (has the bulk pass opened it here?)", staging.display()))?;
    Ok(link)
}

/// The destination's side: disk records written into its copies, in place, while its QEMU
/// waits (it reads its disks only once it runs).
pub struct DiskWriter {
    files: Vec<File>,
    paths: Vec<PathBuf>,
    /// Each disk's size: a record must lie inside it (read once; the copies do not grow).
    sizes: Vec<u64>,
    /// Records written since the last sync.
    unsynced: std::sync::atomic::AtomicBool,
    /// FERRY_FAULT=disk-record-corrupt: the first record is written with a byte flipped, so
    /// the tests can show that verification catches a copy that went wrong.
    corrupt_one: std::sync::atomic::AtomicBool,
}

impl DiskWriter {
    pub fn open(paths: &[PathBuf]) -> Result<DiskWriter> {
        let mut files = Vec::new();
        for p in paths {
            files.push(std::fs::OpenOptions::new().read(true).write(true).open(p).with_context(|| format!("opening {} to follow the source's writes", p.display()))?);
        }
        let corrupt_one = std::env::var("FERRY_FAULT").is_ok_and(|f| f == "disk-record-corrupt");
        let sizes = files.iter().map(|f| f.metadata().map(|m| m.len())).collect::<std::io::Result<_>>()?;
        Ok(DiskWriter { files, paths: paths.to_vec(), sizes, unsynced: false.into(), corrupt_one: corrupt_one.into() })
    }

    pub fn apply(&self, w: DiskOp<'_>) -> Result<()> {
        let (disk, offset, len) = match w {
            DiskOp::Data { disk, offset, data } => (disk, offset, data.len() as u64),
            DiskOp::Zero { disk, offset, len } => (disk, offset, len as u64),
            DiskOp::Digest { disk, digest } => return self.verify(disk, &digest),
            DiskOp::ReadPage { disk, offset, ref out } => (disk, offset, out.len() as u64),
        };
        let file = self.files.get(disk as usize).with_context(|| format!("a record for disk {disk}, which the VM does not have"))?;
        let size = self.sizes[disk as usize];
        if offset.checked_add(len).is_none_or(|end| end > size) {
            bail!("a record for {}+{len} lies outside disk {disk} ({size} bytes)", offset);
        }
        let path = &self.paths[disk as usize];
        if let DiskOp::ReadPage { out, .. } = w {
            return file.read_exact_at(out, offset).with_context(|| format!("reading {}", path.display()));
        }
        self.unsynced.store(true, std::sync::atomic::Ordering::Relaxed);
        match w {
            DiskOp::Data { data, .. } if self.corrupt_one.swap(false, std::sync::atomic::Ordering::Relaxed) => {
                tracing::error!("FERRY_FAULT=disk-record-corrupt: a disk record is written with a byte flipped");
                let mut bad = data.to_vec();
                bad[0] ^= 1;
                file.write_all_at(&bad, offset).map_err(|e| write_error(e, path))
            }
            DiskOp::Data { data, .. } => file.write_all_at(data, offset).map_err(|e| write_error(e, path)),
            DiskOp::Zero { .. } => {
                // Stays sparse: the range is released, and reads as zeros.
                let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64) };
                if r == 0 {
                    return Ok(());
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(write_error(e, path));
                }
                // A filesystem without holes: the zeros are written.
                file.write_all_at(&vec![0u8; len as usize], offset).map_err(|e| write_error(e, path))
            }
            DiskOp::Digest { .. } | DiskOp::ReadPage { .. } => unreachable!("handled above"),
        }
    }

    /// The copy must be the source's, byte for byte, before the stream (and so the VM) goes on.
    fn verify(&self, disk: u8, digest: &[u8; 32]) -> Result<()> {
        let file = self.files.get(disk as usize).with_context(|| format!("a digest for disk {disk}, which the VM does not have"))?;
        let ours = disk_digest(file)?;
        if &ours != digest {
            bail!("disk {} differs from the source's at switchover (digest {} here, {} there): the VM does not run here", self.paths[disk as usize].display(), ferry_transfer::sender::hex(&ours[..8]), ferry_transfer::sender::hex(&digest[..8]));
        }
        tracing::info!(disk = %self.paths[disk as usize].display(), "the disk equals the source's at switchover");
        Ok(())
    }

    /// Before any stream byte that follows disk records reaches QEMU: once QEMU has it all, it
    /// runs the VM, and the source's copy ends, so what the guest had written must be on disk.
    pub fn sync_if_written(&self) -> Result<()> {
        if self.unsynced.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        for (f, p) in self.files.iter().zip(&self.paths) {
            f.sync_data().map_err(|e| write_error(e, p))?;
        }
        Ok(())
    }
}

/// BLAKE3 of a whole disk as it reads (holes as zeros), a megabyte at a time.
pub fn disk_digest(file: &File) -> Result<[u8; 32]> {
    let size = file.metadata()?.len();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

fn write_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        anyhow::anyhow!("the destination disk is full while following the source's writes to {}", path.display())
    } else {
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    }
}
