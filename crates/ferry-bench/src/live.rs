//! `ferry bench live` (issue 4): a running guest moves from site a to site b at a range of RTTs
//! with QEMU's own migration (TLS, single stream), QEMU's best (multifd, 8 channels, zstd, TLS)
//! and ferry (then back again with ferry), the same guest booted afresh for each, all in the
//! same lab and run. A client in site `client` probes the guest every 10 ms throughout; the
//! lab's forwarder counts the bytes on the WAN; the guest must beat on at the destination.
use crate::heartbeat::GuestCheck;
use crate::live_native::{self, NativeOptions, NativeRun};
use crate::live_report::{self, LiveReport, LiveRow, FERRY, FERRY_POSTCOPY, FERRY_POSTCOPY_RETURN, FERRY_RETURN, QEMU_MULTIFD, QEMU_TLS};
use crate::measure::{self, MoveSpec, Seen, Window};
use crate::prober;
use crate::site_vm::SiteVm;
use crate::sites::{AgentSpec, SiteProcesses};
use anyhow::{bail, Context, Result};
use ferry_lab::guest::LabGuestSpec;
use ferry_lab::guest_image::{self, GuestImage};
use ferry_lab::link::LinkParams;
use ferry_lab::topology::LabConfig;
use ferry_lab::units::QueueLimit;
use ferry_lab::{lab, sys};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    QemuTls,
    QemuMultifd,
    /// A move to b, then the return trip to a.
    Ferry,
    /// The same with `--postcopy`.
    FerryPostcopy,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::QemuTls, Method::QemuMultifd, Method::Ferry, Method::FerryPostcopy];

    pub fn name(self) -> &'static str {
        match self {
            Method::QemuTls => "qemu-tls",
            Method::QemuMultifd => "qemu-multifd",
            Method::Ferry => "ferry",
            Method::FerryPostcopy => "ferry-postcopy",
        }
    }

    pub fn parse(text: &str) -> Result<Method> {
        Method::ALL.into_iter().find(|m| m.name() == text).with_context(|| format!("unknown method {text:?}: choose from {}", Method::ALL.map(Method::name).join(", ")))
    }
}

#[derive(Clone)]
pub struct LiveBench {
    pub rtts: Vec<Duration>,
    pub rate_bps: u64,
    pub methods: Vec<Method>,
    pub runs: usize,
    pub memory_mib: u32,
    /// The guest workload, as `ferry.key=value` words.
    pub workload: String,
    /// How long a booted guest runs before it is moved (its dirtying steady).
    pub settle: Duration,
    /// How long the destination's heartbeat is watched after a migration.
    pub hold: Duration,
    pub method_timeout: Duration,
    pub out_dir: PathBuf,
    pub work_dir: PathBuf,
    pub ferry_exe: PathBuf,
    pub lab: String,
}

const GUEST_PORT: u16 = 7;

pub fn run(bench: &LiveBench) -> Result<LiveReport> {
    let setup = Setup::new(bench, "ferry bench live")?;
    let mut rows = Vec::new();
    setup.each_rtt(bench, |ctx| {
        for run in 0..bench.runs {
            for &m in &bench.methods {
                rows.extend(ctx.run_method(m, run));
                ctx.kill_guests();
            }
        }
        write(bench, &rows).map(drop)
    })?;
    let report = write(bench, &rows)?;
    print(&report);
    Ok(report)
}

/// What every live benchmark needs before its first lab: the guest image, QEMU's TLS
/// credentials and the agents' PKI.
pub(crate) struct Setup {
    pub image: GuestImage,
    pub tls_dir: PathBuf,
    pub pki: PathBuf,
}

impl Setup {
    pub fn new(bench: &LiveBench, what: &str) -> Result<Setup> {
        sys::require_root(what)?;
        let q = ferry_lab::qemu::check_qemu()?;
        std::fs::create_dir_all(&bench.out_dir)?;
        std::fs::create_dir_all(&bench.work_dir)?;
        // Every run's agent logs are kept (`Ctx::logs`) until the next bench starts.
        let _ = std::fs::remove_dir_all(bench.work_dir.join("logs"));
        println!("== {} · {} MiB guest, workload {:?}", q.text, bench.memory_mib, bench.workload);
        let image = guest_image::build_guest_image(Path::new(guest_image::DEFAULT_CACHE))?;
        let tls_dir = bench.work_dir.join("qemu-tls");
        // The destination's name as the source's QEMU checks it: the address in the migrate URI.
        crate::qemu_tls::write_creds(&tls_dir, &["b", "198.18.0.2"])?;
        let pki = bench.work_dir.join("pki");
        SiteProcesses::make_pki(&bench.ferry_exe, &pki)?;
        Ok(Setup { image, tls_dir, pki })
    }

    /// Brings up the lab (sites a, b and client) at each of the bench's RTTs in turn and runs
    /// `body` in it; the lab goes down after each, whatever `body` returned.
    pub fn each_rtt(&self, bench: &LiveBench, mut body: impl FnMut(&Ctx) -> Result<()>) -> Result<()> {
        for &rtt in &bench.rtts {
            let params = LinkParams { rtt, rate_bps: bench.rate_bps, loss: 0.0, jitter: Duration::ZERO, queue: QueueLimit::Bdp };
            let names = ["a", "b", "client"].map(String::from);
            let cfg = LabConfig::new(&bench.lab, &names, params, &["client-a:rtt=1ms".to_string()])?;
            println!("== RTT {} ms (client–a 1 ms)", rtt.as_millis());
            lab::up(&cfg, &bench.ferry_exe)?;
            let ctx = Ctx { bench, cfg: &cfg, image: &self.image, tls_dir: &self.tls_dir, pki: &self.pki, rtt_ms: rtt.as_secs_f64() * 1e3 };
            let result = body(&ctx);
            let _ = lab::down(&cfg.name);
            result?;
        }
        Ok(())
    }
}

/// The table and the targets.
pub fn print(report: &LiveReport) {
    println!("\n{}", live_report::table(&report.rows));
    live_report::print_targets(&report.targets);
    for line in live_report::postcopy_comparison(&report.rows) {
        println!("{line}");
    }
}

/// Makes the table, targets and plots again from the `live.json` a run left in `out`.
pub fn replot(out: &Path) -> Result<LiveReport> {
    let report = live_report::read(out)?;
    live_report::write(out, &report)?;
    print(&report);
    Ok(report)
}

fn write(bench: &LiveBench, rows: &[LiveRow]) -> Result<LiveReport> {
    let report = LiveReport {
        rate_bps: bench.rate_bps,
        memory_mib: bench.memory_mib,
        workload: bench.workload.clone(),
        cpu_mhz: crate::cpu::cpu_mhz(),
        rows: rows.to_vec(),
        targets: live_report::targets(rows),
    };
    live_report::write(&bench.out_dir, &report)?;
    Ok(report)
}

/// One lab at one RTT, and what a method needs to run in it.
pub(crate) struct Ctx<'a> {
    pub bench: &'a LiveBench,
    pub cfg: &'a LabConfig,
    pub image: &'a GuestImage,
    pub tls_dir: &'a Path,
    pub pki: &'a Path,
    pub rtt_ms: f64,
}

/// One migration's line as it finishes.
pub(crate) fn print_row(r: &LiveRow) {
    let gap = r.probe_longest_gap_ms.map_or("-".into(), |g| format!("{g:.0}"));
    let status = if r.ok { "ok".to_string() } else { format!("FAILED: {}", r.error.as_deref().unwrap_or(&r.guest_check)) };
    println!(
        "   {:<22} {:>7.2} s  QEMU downtime {:>6} ms  probe gap {:>6} ms lost {:>4}  wire {:>8.1} MB  guest {}  {status}",
        r.method,
        r.seconds,
        r.qemu_downtime_ms.map_or("-".into(), |d| format!("{d:.0}")),
        gap,
        r.probe_lost,
        r.wire_bytes() as f64 / 1e6,
        r.guest_check
    );
    if !r.probe_gaps.is_empty() {
        println!("   {:<22} client's gaps over 50 ms (s into the move + ms): {}", "", r.probe_gaps);
    }
    if r.wire_drops > 0 {
        println!("   {:<22} the link dropped {} packets (its queue full)", "", r.wire_drops);
    }
}

/// Fills the row's wire and probe figures from what a window saw.
pub(crate) fn seen_figures(row: &mut LiveRow, seen: Seen) {
    row.wire_forward_bytes = seen.wire_forward;
    row.wire_back_bytes = seen.wire_back;
    row.wire_drops = seen.wire_drops;
    match seen.probe {
        Ok(r) => {
            let (gap, lost_ms) = prober::downtime_ms(&r);
            row.probe_sent = r.sent;
            row.probe_lost = r.lost;
            row.probe_lost_ms = lost_ms;
            row.probe_longest_gap_ms = gap;
            let lead = crate::measure::PROBE_LEAD.as_secs_f64();
            row.probe_gaps = r.long_gaps.iter().map(|(at, ms)| format!("{:.2}+{ms:.0}", at - lead)).collect::<Vec<_>>().join(" ");
        }
        Err(e) => {
            row.error.get_or_insert(format!("the probe failed: {e:#}"));
        }
    }
}

impl Ctx<'_> {
    /// Where one run's agents log: kept for every RTT and run (the agents' data are not).
    pub fn logs(&self, run: usize) -> PathBuf {
        self.bench.work_dir.join("logs").join(format!("{:.0}ms-run{run}", self.rtt_ms))
    }

    pub fn row(&self, method: &str, run: usize) -> LiveRow {
        LiveRow { rtt_ms: self.rtt_ms, method: method.into(), run, ..Default::default() }
    }

    pub fn guest(&self) -> LabGuestSpec {
        let mut g = LabGuestSpec::new("live", "a");
        g.memory_mib = self.bench.memory_mib;
        g.workload = self.bench.workload.split_whitespace().map(String::from).collect();
        g
    }

    fn run_method(&self, m: Method, run: usize) -> Vec<LiveRow> {
        let rows = match m {
            Method::QemuTls => vec![self.native(QEMU_TLS, run, NativeOptions { multifd: false })],
            Method::QemuMultifd => vec![self.native(QEMU_MULTIFD, run, NativeOptions { multifd: true })],
            Method::Ferry => self.ferry(run, false),
            Method::FerryPostcopy => self.ferry(run, true),
        };
        rows.iter().for_each(print_row);
        rows
    }

    fn native(&self, method: &str, run: usize, options: NativeOptions) -> LiveRow {
        let mut row = self.row(method, run);
        let nr = NativeRun { lab: self.cfg, image: self.image, guest: self.guest(), tls_dir: self.tls_dir, settle: self.bench.settle, timeout: self.bench.method_timeout, options };
        let result = (|| -> Result<()> {
            let mut source = live_native::boot_source(&nr)?;
            let mut window = Window::open(self.cfg, "client", self.probe_target()?, self.probe_longest())?;
            let (outcome, check) = live_native::migrate(&nr, &mut source, self.bench.hold, |start| {
                if !start {
                    window.mark_end();
                }
            });
            seen_figures(&mut row, window.close("a", "b"));
            row.seconds = outcome.seconds;
            row.qemu_total_s = outcome.qemu_total_ms.map(|t| t / 1e3);
            row.qemu_downtime_ms = outcome.qemu_downtime_ms;
            row.stream_bytes = outcome.stream_bytes;
            set_check(&mut row, &check);
            if let Some(e) = outcome.error {
                bail!(e);
            }
            Ok(())
        })();
        finish(&mut row, result);
        row
    }

    /// ferry's move a → b and its return trip, with fresh agents (an empty page store).
    fn ferry(&self, run: usize, postcopy: bool) -> Vec<LiveRow> {
        let names = if postcopy { (FERRY_POSTCOPY, FERRY_POSTCOPY_RETURN) } else { (FERRY, FERRY_RETURN) };
        let (mut first, mut back) = (self.row(names.0, run), self.row(names.1, run));
        let work = self.bench.work_dir.join("ferry");
        let _ = std::fs::remove_dir_all(&work);
        let (data_a, data_b) = (work.join("a"), work.join("b"));
        let mut procs = SiteProcesses::new(&self.cfg.name, self.logs(run));
        let mut vm = SiteVm::new(&self.bench.ferry_exe, "live");
        if postcopy {
            vm.migrate_flags.push("--postcopy".into());
        }
        let result = (|| -> Result<()> {
            let (ip_a, ip_b) = (self.cfg.site("a")?.wan_addr().to_string(), self.cfg.site("b")?.wan_addr().to_string());
            let a = AgentSpec { site: "a", listen_ip: &ip_a, peer: ("b", &ip_b), data: &data_a, pki: self.pki, exe: &self.bench.ferry_exe, rate_bps: self.bench.rate_bps, plaintext: false };
            procs.start_agent(&a)?;
            procs.start_agent(&AgentSpec { site: "b", listen_ip: &ip_b, peer: ("a", &ip_a), data: &data_b, ..a })?;
            SiteProcesses::wait_warm(&self.bench.ferry_exe, &data_a, "b")?;
            SiteProcesses::wait_warm(&self.bench.ferry_exe, &data_b, "a")?;
            vm.start(&data_a, &self.guest(), self.cfg, self.image)?;
            vm.wait_line(&data_a, "ferry-ready", Duration::from_secs(240))?;
            std::thread::sleep(self.bench.settle);
            let first_ok = self.ferry_trip(&vm, &procs, &mut first, (&data_a, "a"), (&data_b, "b")).map(drop);
            finish(&mut first, first_ok);
            if !first.ok {
                bail!("the first move failed");
            }
            std::thread::sleep(self.bench.settle);
            let back_ok = self.ferry_trip(&vm, &procs, &mut back, (&data_b, "b"), (&data_a, "a")).map(drop);
            finish(&mut back, back_ok);
            Ok(())
        })();
        if let Err(e) = result {
            for r in [&mut first, &mut back] {
                if r.error.is_none() && !r.ok {
                    r.error = Some(format!("{e:#}"));
                }
            }
        }
        vm.stop(&data_a);
        vm.stop(&data_b);
        vec![first, back]
    }

    /// One `ferry vm migrate`, measured into `row`; returns ferry's JSON summary.
    pub fn ferry_trip(&self, vm: &SiteVm, procs: &SiteProcesses, row: &mut LiveRow, from: (&Path, &str), to: (&Path, &str)) -> Result<serde_json::Value> {
        let spec = MoveSpec { lab: self.cfg, vm, from, to, probe_target: self.probe_target()?, timeout: self.bench.method_timeout, hold: self.bench.hold };
        let mv = measure::ferry_move(&spec, &procs.agent_pids())?;
        seen_figures(row, mv.seen);
        set_check(row, &mv.check);
        let m = mv.migrated?;
        let s = &m.summary;
        row.seconds = m.seconds;
        row.qemu_total_s = s["qemu_total_ms"].as_f64().map(|t| t / 1e3);
        row.qemu_downtime_ms = s["qemu_downtime_ms"].as_f64();
        row.stream_bytes = s["stream_bytes"].as_u64();
        row.pages_sent = s["pages_sent"].as_u64();
        row.pages_referenced = s["pages_referenced"].as_u64();
        row.pages_from_disk = s["pages_from_disk"].as_u64();
        row.postcopy_after_s = s["postcopy_after_s"].as_f64();
        row.postcopy_requests = s["postcopy_requests"].as_u64();
        row.agents_cpu_s = Some(mv.cpu_ns as f64 / 1e9);
        (row.cpu_ns_per_byte, row.cpu_cycles_per_byte) = crate::cpu::per_byte(mv.cpu_ns, row.stream_bytes.unwrap_or(0), crate::cpu::cpu_mhz());
        if let Some(o) = s["opaque"].as_str() {
            println!("   note: part of the stream went opaque: {o}");
        }
        Ok(m.summary)
    }

    pub fn probe_target(&self) -> Result<SocketAddr> {
        Ok(SocketAddr::new(self.guest().addr(self.cfg)?.into(), GUEST_PORT))
    }

    pub fn probe_longest(&self) -> Duration {
        self.bench.method_timeout + Duration::from_secs(120)
    }

    /// Ends every QEMU left in sites a and b (a failed run's), so the next method starts clean.
    pub fn kill_guests(&self) {
        for site in ["a", "b"] {
            let Ok(s) = self.cfg.site(site) else { continue };
            for pid in sys::pids_in(&self.cfg.namespace(s)) {
                if sys::process_cmdline(pid).contains("qemu-system") {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && ["a", "b"].iter().any(|site| self.cfg.site(site).is_ok_and(|s| sys::pids_in(&self.cfg.namespace(s)).iter().any(|&p| sys::process_cmdline(p).contains("qemu-system")))) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub(crate) fn set_check(row: &mut LiveRow, check: &GuestCheck) {
    row.guest_ok = check.ok;
    row.guest_check = check.why.clone();
}

pub(crate) fn finish(row: &mut LiveRow, result: Result<()>) {
    if let Err(e) = result {
        row.error.get_or_insert(format!("{e:#}"));
    }
    row.ok = row.error.is_none() && row.guest_ok;
}
