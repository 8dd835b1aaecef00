//! `ferry bench live --disk` (issue 5): the live benchmark's guest with the 4 GiB realistic disk
//! (the newer version, attached as /dev/vda, the guest writing a ring of records to it) moves
//! from site a to site b, which holds the older version, with QEMU's own NBD mirror + RAM
//! migration (as libvirt's `--copy-storage-all --tls`) and with ferry (then back again), in the
//! same lab and run; optionally the same guest without its disk moves with ferry too, for the
//! RAM and downtime figures the targets compare with. Every move is verified: the destination's
//! disk against the source's at switchover.
use crate::disk_files::{self, Ring};
use crate::live::{self, Ctx, LiveBench, Setup};
use crate::live_disk_native;
use crate::live_disk_report::{self, DiskReport, DiskRow, FERRY_DISKLESS, QEMU_NBD_MIRROR};
use crate::live_native::{NativeOptions, NativeRun};
use crate::live_report::{LiveRow, FERRY, FERRY_RETURN};
use crate::measure::Window;
use crate::site_vm::SiteVm;
use crate::sites::{AgentSpec, SiteProcesses};
use anyhow::{bail, Context, Result};
use ferry_lab::disk_image::{build_disk_images, DiskImageSpec, DiskImages};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    QemuNbdMirror,
    /// A move to b, then the return trip to a.
    Ferry,
    /// The same guest without its disk (the baseline of the targets).
    FerryDiskless,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::QemuNbdMirror, Method::Ferry, Method::FerryDiskless];

    pub fn name(self) -> &'static str {
        match self {
            Method::QemuNbdMirror => QEMU_NBD_MIRROR,
            Method::Ferry => FERRY,
            Method::FerryDiskless => FERRY_DISKLESS,
        }
    }

    pub fn parse(text: &str) -> Result<Method> {
        Method::ALL.into_iter().find(|m| m.name() == text).with_context(|| format!("unknown method {text:?} for --disk: choose from {}", Method::ALL.map(Method::name).join(", ")))
    }
}

pub struct LiveDiskBench {
    /// The live benchmark's settings; its workload is the guest's without the disk writer.
    pub live: LiveBench,
    pub methods: Vec<Method>,
    /// The guest's disk writes: bytes per second (`ferry.disk_rate`) and the ring's size.
    pub disk_rate: String,
    pub ring_span: u64,
    /// ferry's return trip after its move to b.
    pub return_trip: bool,
    /// ferry's moves send the disks' bulk pass before the RAM (`--disks-first`).
    pub disks_first: bool,
}

/// The VM's name for ferry, and where its disk lives under a site's data directory (where
/// ferry's destination looks for an older copy).
const VM: &str = "live";

fn vm_disk(data: &Path) -> PathBuf {
    data.join("vms").join(VM).join("disk.raw")
}

pub fn run(bench: &LiveDiskBench) -> Result<DiskReport> {
    let setup = Setup::new(&bench.live, "ferry bench live --disk")?;
    println!("== preparing the disk images (cached after the first build)");
    let images = build_disk_images(&DiskImageSpec::default())?;
    let disk_bytes = std::fs::metadata(&images.newer)?.len();
    let ring = Ring::near_end(disk_bytes, bench.ring_span)?;
    let (changed, changed_compressed) = disk_files::changed_compressed(&images.older, &images.newer, 0, u64::MAX)?;
    let writing = LiveBench { workload: format!("{} {}", bench.live.workload, ring.workload(&bench.disk_rate)), ..bench.live.clone() };
    println!("   {} GiB disk; changed 64 KiB blocks {} MiB, compressed {} MiB; the guest writes {}", disk_bytes >> 30, changed >> 20, changed_compressed >> 20, ring.workload(&bench.disk_rate));
    let mut report = DiskReport {
        rate_bps: bench.live.rate_bps,
        memory_mib: bench.live.memory_mib,
        workload: writing.workload.clone(),
        disk_bytes,
        changed_bytes: changed,
        changed_compressed_bytes: changed_compressed,
        cpu_mhz: crate::cpu::cpu_mhz(),
        rows: Vec::new(),
        diskless_from_live_json: Vec::new(),
        targets: Vec::new(),
    };
    if !bench.methods.contains(&Method::FerryDiskless) {
        report.diskless_from_live_json = live_report_rows(&bench.live.out_dir, &bench.live)?;
    }
    let moves = Moves { bench, images: &images, ring, changed_compressed };
    setup.each_rtt(&writing, |ctx| {
        for run in 0..bench.live.runs {
            for &m in &bench.methods {
                let rows = match m {
                    Method::QemuNbdMirror => vec![moves.native(ctx, run)],
                    Method::Ferry => moves.ferry(ctx, run),
                    Method::FerryDiskless => moves.ferry(&Ctx { bench: &bench.live, ..*ctx }, run),
                };
                for r in &rows {
                    live::print_row(&r.live);
                    println!("   {:<22} disk sent {} MB, lacking {} MB; verified: {}", "", mb(r.disk_sent_bytes), mb(r.lacking_compressed_bytes), r.verify);
                }
                report.rows.extend(rows);
                ctx.kill_guests();
            }
        }
        write(&bench.live.out_dir, &mut report)
    })?;
    write(&bench.live.out_dir, &mut report)?;
    live_disk_report::print(&report);
    Ok(report)
}

/// live.json's diskless ferry rows, when their guest is this one.
fn live_report_rows(out: &Path, live: &LiveBench) -> Result<Vec<LiveRow>> {
    let Ok(r) = crate::live_report::read(out) else {
        println!("   no {}: the targets need --methods …,ferry-diskless", out.join("live.json").display());
        return Ok(Vec::new());
    };
    if r.workload != live.workload || r.memory_mib != live.memory_mib {
        println!("   note: live.json's guest ({} MiB, {:?}) is not this one: its diskless figures are compared anyway", r.memory_mib, r.workload);
    }
    Ok(live_disk_report::diskless_from(out))
}


fn mb(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6))
}

/// Makes the tables, targets and plots again from the live-disk.json a run left in `out`.
pub fn replot(out: &Path) -> Result<DiskReport> {
    let mut report = live_disk_report::read(out)?;
    write(out, &mut report)?;
    live_disk_report::print(&report);
    Ok(report)
}

fn write(out: &Path, report: &mut DiskReport) -> Result<()> {
    report.targets = live_disk_report::targets(report);
    live_disk_report::write(out, report)
}

/// One `ferry vm migrate` into `row` (its time even if it fails), with the disks' figures.
fn trip(ctx: &Ctx, vm: &SiteVm, procs: &SiteProcesses, row: &mut DiskRow, from: (&Path, &str), to: (&Path, &str)) -> Result<()> {
    let started = std::time::Instant::now();
    let moved = ctx.ferry_trip(vm, procs, &mut row.live, from, to);
    match &moved {
        Ok(s) => row.set_ferry_disks(s),
        Err(_) => row.live.seconds = started.elapsed().as_secs_f64(),
    }
    moved.map(drop)
}

struct Moves<'a> {
    bench: &'a LiveDiskBench,
    images: &'a DiskImages,
    ring: Ring,
    /// What the older copy lacks of the newer image (the ring is empty in both).
    changed_compressed: u64,
}

impl Moves<'_> {
    /// What a destination holding `older` lacked of `source` at switchover: the image's changed
    /// blocks, and the records in the ring.
    fn lacking(&self, older: &Path, source: &Path, outside_too: bool) -> Result<u64> {
        let (_, ring) = disk_files::changed_compressed(older, source, self.ring.offset, self.ring.offset + self.ring.span)?;
        Ok(ring + if outside_too { self.changed_compressed } else { 0 })
    }

    fn native(&self, ctx: &Ctx, run: usize) -> DiskRow {
        let mut row = DiskRow::new(ctx.row(QEMU_NBD_MIRROR, run));
        let work = ctx.bench.work_dir.join("native");
        let (src, dst) = (work.join("source.raw"), work.join("dest.raw"));
        let b = ctx.bench;
        let result = (|| -> Result<()> {
            disk_files::place(&self.images.newer, &src, self.ring)?;
            disk_files::empty(&dst, std::fs::metadata(&src)?.len())?;
            let nr = NativeRun { lab: ctx.cfg, image: ctx.image, guest: ctx.guest(), tls_dir: ctx.tls_dir, settle: b.settle, timeout: b.method_timeout, options: NativeOptions { multifd: true } };
            let mut source = live_disk_native::boot_source(&nr, &src)?;
            let mut window = Window::open(ctx.cfg, "client", ctx.probe_target()?, ctx.probe_longest())?;
            let (outcome, check, dest) = live_disk_native::migrate(&nr, &mut source, &dst, b.hold, |start| {
                if !start {
                    window.mark_end();
                }
            });
            live::seen_figures(&mut row.live, window.close("a", "b"));
            let n = &outcome.native;
            row.live.seconds = n.seconds;
            row.live.qemu_total_s = n.qemu_total_ms.map(|t| t / 1e3);
            row.live.qemu_downtime_ms = n.qemu_downtime_ms;
            row.live.stream_bytes = n.stream_bytes;
            row.disk_sent_bytes = outcome.mirror_bytes;
            row.mirror_ready_s = outcome.mirror_ready_s;
            row.mirror_blocking_s = outcome.mirror_blocking_s;
            row.after_switchover_ms = outcome.after_switchover_ms;
            live::set_check(&mut row.live, &check);
            // Both QEMUs end: the source's disk is as at switchover, the destination's quiet.
            drop(dest);
            drop(source);
            if let Some(e) = &outcome.native.error {
                bail!("{e}");
            }
            row.set_verified(disk_files::verify(&src, None, &dst, self.ring).map(|c| c.to_string()));
            Ok(())
        })();
        row.conclude(result);
        row
    }

    /// ferry's move a → b with the disk (b holding the older version) and its return trip (a
    /// holding what it had at the first switchover); or, in a `Ctx` whose guest writes no disk
    /// (`ferry-diskless`), the same guest's move without one.
    fn ferry(&self, ctx: &Ctx, run: usize) -> Vec<DiskRow> {
        let with_disk = ctx.bench.workload.contains("ferry.disk=");
        let mut first = DiskRow::new(ctx.row(if with_disk { FERRY } else { FERRY_DISKLESS }, run));
        let mut back = DiskRow::new(ctx.row(FERRY_RETURN, run));
        let returning = with_disk && self.bench.return_trip;
        let b = ctx.bench;
        let work = b.work_dir.join("ferry");
        let _ = std::fs::remove_dir_all(&work);
        let (data_a, data_b) = (work.join("a"), work.join("b"));
        let (disk_a, disk_b) = (vm_disk(&data_a), vm_disk(&data_b));
        let kept_ring = work.join("ring-at-first-switchover.raw");
        let mut procs = SiteProcesses::new(&ctx.cfg.name, ctx.logs(run).join(if with_disk { "disk" } else { "diskless" }));
        let mut vm = SiteVm::new(&b.ferry_exe, VM);
        if self.bench.disks_first {
            vm.migrate_flags.push("--disks-first".into());
        }
        let mut first_outside = None;
        let result = (|| -> Result<()> {
            if with_disk {
                disk_files::place(&self.images.newer, &disk_a, self.ring)?;
                disk_files::place(&self.images.older, &disk_b, self.ring)?;
                vm.disks.push(disk_a.clone());
            }
            let (ip_a, ip_b) = (ctx.cfg.site("a")?.wan_addr().to_string(), ctx.cfg.site("b")?.wan_addr().to_string());
            let a = AgentSpec { site: "a", listen_ip: &ip_a, peer: ("b", &ip_b), data: &data_a, pki: ctx.pki, exe: &b.ferry_exe, rate_bps: b.rate_bps, plaintext: false };
            procs.start_agent(&a)?;
            procs.start_agent(&AgentSpec { site: "b", listen_ip: &ip_b, peer: ("a", &ip_a), data: &data_b, ..a })?;
            SiteProcesses::wait_warm(&b.ferry_exe, &data_a, "b")?;
            SiteProcesses::wait_warm(&b.ferry_exe, &data_b, "a")?;
            vm.start(&data_a, &ctx.guest(), ctx.cfg, ctx.image)?;
            vm.wait_line(&data_a, "ferry-ready", Duration::from_secs(240))?;
            std::thread::sleep(b.settle);
            let moved = trip(ctx, &vm, &procs, &mut first, (&data_a, "a"), (&data_b, "b"));
            if !with_disk {
                first.set_verified(Ok("no disk".into()));
                first.conclude(moved);
                return Ok(());
            }
            if moved.is_ok() {
                // a's disk is as the source left it at switchover; the return trip overwrites it.
                first.lacking_compressed_bytes = Some(self.lacking(&self.images.older, &disk_a, true)?);
                first_outside = Some(disk_files::digest_outside(&disk_a, self.ring)?);
                disk_files::keep_ring(&disk_a, &kept_ring, self.ring)?;
            }
            if !returning || moved.is_err() || !first.live.guest_ok {
                back.live.error = Some("not run: the move to b failed".into());
                vm.stop(&data_b);
                first.set_verified(disk_files::verify(&disk_a, None, &disk_b, self.ring).map(|c| c.to_string()));
                first.conclude(moved);
                return Ok(());
            }
            std::thread::sleep(b.settle);
            let moved_back = trip(ctx, &vm, &procs, &mut back, (&data_b, "b"), (&data_a, "a"));
            // Both sites' disks are quiet: b's as at the return's switchover, a's once stopped.
            vm.stop(&data_b);
            vm.stop(&data_a);
            first.set_verified(disk_files::verify(&kept_ring, first_outside.as_deref(), &disk_b, self.ring).map(|c| c.to_string()));
            first.conclude(Ok(()));
            if moved_back.is_ok() {
                back.lacking_compressed_bytes = Some(self.lacking(&kept_ring, &disk_b, false)?);
            }
            back.set_verified(disk_files::verify(&disk_b, None, &disk_a, self.ring).map(|c| c.to_string()));
            back.conclude(moved_back);
            Ok(())
        })();
        vm.stop(&data_a);
        vm.stop(&data_b);
        let mut rows = vec![first];
        if returning {
            rows.push(back);
        }
        if let Err(e) = result {
            for r in rows.iter_mut().filter(|r| r.live.error.is_none() && !r.live.ok) {
                r.live.ok = false;
                r.live.error = Some(format!("{e:#}"));
            }
        }
        rows
    }
}
