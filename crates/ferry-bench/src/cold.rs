//! `ferry bench cold`: the seed experiment. A 4 GiB disk image whose older version the
//! destination already holds moves across an emulated 1 Gbit/s WAN at a range of RTTs with scp,
//! zstd|ssh, rsync and ferry, all in the same lab and the same run; every result is checked
//! byte-equal at the destination, and bytes on the wire are counted by the lab's forwarder.
use crate::plot::{self, Chart, Series};
pub use crate::report::Target;
use crate::report::{self, fmt_num, fmt_pct, median};
use crate::sites::{delivered, AgentSpec, SiteProcesses, SshKeys};
use anyhow::{bail, Context, Result};
use ferry_lab::disk_image::{build_disk_images, DiskImageSpec, DiskImages};
use ferry_lab::link::LinkParams;
use ferry_lab::topology::LabConfig;
use ferry_lab::units::QueueLimit;
use ferry_lab::lab;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The whole image, over ssh.
    Scp,
    /// The whole image compressed, piped through ssh.
    ZstdSsh,
    /// rsync's delta algorithm against the older copy, over ssh.
    Rsync,
    /// ferry over mutual TLS.
    Ferry,
    /// ferry with encryption off (a debugging flag): the cost of security.
    FerryPlaintext,
}

impl Method {
    pub const ALL: [Method; 5] = [Method::Scp, Method::ZstdSsh, Method::Rsync, Method::Ferry, Method::FerryPlaintext];

    pub fn name(self) -> &'static str {
        match self {
            Method::Scp => "scp",
            Method::ZstdSsh => "zstd-ssh",
            Method::Rsync => "rsync",
            Method::Ferry => "ferry",
            Method::FerryPlaintext => "ferry-plaintext",
        }
    }

    pub fn parse(text: &str) -> Result<Method> {
        Method::ALL.into_iter().find(|m| m.name() == text).with_context(|| {
            format!("unknown method {text:?}: choose from {}", Method::ALL.map(Method::name).join(", "))
        })
    }

    fn is_ferry(self) -> bool {
        matches!(self, Method::Ferry | Method::FerryPlaintext)
    }
}

pub struct ColdBench {
    pub rtts: Vec<Duration>,
    pub rate_bps: u64,
    pub methods: Vec<Method>,
    /// Runs per RTT for the ferry methods (short runs, so the median is cheap to have).
    pub ferry_runs: usize,
    pub out_dir: PathBuf,
    pub work_dir: PathBuf,
    pub ferry_exe: PathBuf,
    pub lab: String,
    /// Longest a single method may take before the run counts as failed.
    pub method_timeout: Duration,
    /// An initial congestion (and receive) window, in segments, set on both sites' WAN route
    /// for every method alike: the OS setting that decides how fast any TCP flow starts.
    pub initcwnd: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdRow {
    pub rtt_ms: f64,
    pub method: &'static str,
    pub run: usize,
    pub seconds: f64,
    /// IP bytes the forwarder delivered source → destination and back during the run.
    pub wire_forward_bytes: u64,
    pub wire_back_bytes: u64,
    pub verified: bool,
    /// What ferry itself reports (empty for the other tools).
    pub ferry_connections: Option<u64>,
    pub ferry_payload_bytes: Option<u64>,
    pub ferry_wanted_raw_bytes: Option<u64>,
    pub ferry_reused_bytes: Option<u64>,
    /// Attempts the send took (more than one: it failed and resumed).
    pub ferry_attempts: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ColdReport {
    pub rate_bps: u64,
    pub image_bytes: u64,
    pub changed_blocks_bytes: u64,
    /// The changed blocks compressed as ferry compresses them: the least that must cross.
    pub changed_compressed_bytes: u64,
    pub rows: Vec<ColdRow>,
    pub targets: Vec<Target>,
}

const DEST_NAME: &str = "disk.raw";

pub fn run(bench: &ColdBench) -> Result<ColdReport> {
    ferry_lab::sys::require_root("ferry bench cold")?;
    for tool in ["scp", "ssh", "sshd", "rsync", "zstd", "ssh-keygen", "cmp"] {
        crate::sites::require_tool(tool)?;
    }
    std::fs::create_dir_all(&bench.out_dir)?;
    std::fs::create_dir_all(&bench.work_dir)?;
    println!("== preparing the disk images (cached after the first build)");
    let images = build_disk_images(&DiskImageSpec::default())?;
    let (changed, changed_compressed) = changed_after_compression(&images.older, &images.newer)?;
    println!(
        "   older {}  newer {}\n   changed 64 KiB blocks: {} MiB, compressed: {} MiB",
        images.older.display(),
        images.newer.display(),
        changed >> 20,
        changed_compressed >> 20
    );
    let keys = SshKeys::create(&bench.work_dir.join("ssh"))?;
    let pki = bench.work_dir.join("pki");
    SiteProcesses::make_pki(&bench.ferry_exe, &pki)?;
    let mut rows = Vec::new();
    for &rtt in &bench.rtts {
        let params = LinkParams { rtt, rate_bps: bench.rate_bps, loss: 0.0, jitter: Duration::ZERO, queue: QueueLimit::Bdp };
        let cfg = LabConfig::new(&bench.lab, &["a".to_string(), "b".to_string()], params, &[])?;
        lab::up(&cfg, &bench.ferry_exe)?;
        if let Some(w) = bench.initcwnd {
            for site in ["a", "b"] {
                set_initcwnd(&cfg, site, w)?;
            }
        }
        let result = run_rtt(bench, &cfg, &images, &keys, &pki, rtt, &mut rows);
        let _ = lab::down(&cfg.name);
        result?;
        write_results(bench, &images, changed, changed_compressed, &rows, false)?;
    }
    let report = write_results(bench, &images, changed, changed_compressed, &rows, true)?;
    Ok(report)
}

fn run_rtt(bench: &ColdBench, cfg: &LabConfig, images: &DiskImages, keys: &SshKeys, pki: &Path, rtt: Duration, rows: &mut Vec<ColdRow>) -> Result<()> {
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    println!("== RTT {rtt_ms} ms");
    let mut procs = SiteProcesses::new(&cfg.name, bench.work_dir.join("logs"));
    let dest_ip = cfg.site("b")?.wan_addr().to_string();
    let src_ip = cfg.site("a")?.wan_addr().to_string();
    procs.start_sshd("b", &dest_ip, keys)?;
    let data_a = bench.work_dir.join("a");
    let data_b = bench.work_dir.join("b");
    let dest = data_b.join(DEST_NAME);
    for &method in &bench.methods {
        let runs = if method.is_ferry() { bench.ferry_runs } else { 1 };
        // The agents are daemons: started once per method, they serve its runs one after the
        // other. Run 0 is the first transfer between the sites since they started (on
        // connections that carried nothing yet); later runs reuse connections that did.
        for run in 0..runs {
            reset_destination(&images.older, &dest, &data_b)?;
            if method.is_ferry() && run == 0 {
                let plaintext = method == Method::FerryPlaintext;
                let a = AgentSpec { site: "a", listen_ip: &src_ip, peer: ("b", &dest_ip), data: &data_a, pki, exe: &bench.ferry_exe, rate_bps: bench.rate_bps, plaintext };
                procs.start_agent(&a)?;
                procs.start_agent(&AgentSpec { site: "b", listen_ip: &dest_ip, peer: ("a", &src_ip), data: &data_b, ..a })?;
            }
            if method.is_ferry() {
                SiteProcesses::wait_warm(&bench.ferry_exe, &data_a, "b")?;
            }
            drop_caches()?;
            let before = lab::status(&cfg.name)?;
            let started = Instant::now();
            let outcome = run_method(bench, cfg, method, &images.newer, &dest, &dest_ip, &data_a, keys);
            let seconds = started.elapsed().as_secs_f64();
            let after = lab::status(&cfg.name)?;
            if outcome.is_err() || run + 1 == runs {
                procs.stop_agents();
                if method.is_ferry() {
                    keep_agent_logs(&bench.work_dir.join("logs"), rtt_ms, method);
                }
            }
            let ferry_summary = outcome.with_context(|| format!("{} at {rtt_ms} ms RTT", method.name()))?;
            let verified = same_bytes(&images.newer, &dest)?;
            let (fwd, back) = (delivered(&before, &after, "a", "b"), delivered(&before, &after, "b", "a"));
            let field = |path: &[&str]| ferry_summary.as_ref().and_then(|s| path.iter().try_fold(s, |v, k| v.get(*k)).and_then(|v| v.as_u64()));
            let row = ColdRow {
                rtt_ms,
                method: method.name(),
                run,
                seconds,
                wire_forward_bytes: fwd,
                wire_back_bytes: back,
                verified,
                ferry_connections: field(&["connections"]),
                ferry_payload_bytes: field(&["progress", "sent_payload"]),
                ferry_wanted_raw_bytes: field(&["progress", "wanted_raw"]),
                ferry_reused_bytes: field(&["progress", "reused"]),
                ferry_attempts: field(&["attempts"]),
            };
            println!(
                "   {:<16} run {run}: {:>8.2} s  wire {:>8.1} MB  {}{}",
                method.name(),
                seconds,
                fwd as f64 / 1e6,
                if verified { "byte-equal" } else { "DIFFERENT" },
                row.ferry_attempts.filter(|&a| a > 1).map_or(String::new(), |a| format!("  ({a} attempts)"))
            );
            if !verified {
                bail!("{} at {rtt_ms} ms RTT left a destination image that differs from the source", method.name());
            }
            rows.push(row);
        }
    }
    Ok(())
}

/// The next method's agents write their logs afresh: these are kept under the RTT and method.
fn keep_agent_logs(logs: &Path, rtt_ms: f64, method: Method) {
    for site in ["a", "b"] {
        let _ = std::fs::copy(logs.join(format!("agent-{site}.log")), logs.join(format!("{rtt_ms:.0}ms-{}-agent-{site}.log", method.name())));
    }
}

/// Runs one method; ferry's methods return ferry's JSON summary.
#[allow(clippy::too_many_arguments)]
fn run_method(bench: &ColdBench, cfg: &LabConfig, method: Method, src: &Path, dest: &Path, dest_ip: &str, data_a: &Path, keys: &SshKeys) -> Result<Option<serde_json::Value>> {
    let (src_s, dest_s) = (src.to_str().unwrap(), dest.to_str().unwrap());
    let ssh = keys.ssh_command();
    let remote = format!("root@{dest_ip}");
    let argv: Vec<String> = match method {
        Method::Scp => {
            let mut v = vec!["scp".to_string()];
            v.extend(keys.ssh_options());
            v.extend([src_s.to_string(), format!("{remote}:{dest_s}")]);
            v
        }
        Method::ZstdSsh => vec!["sh".into(), "-c".into(), format!("zstd -q -1 -T0 -c {src_s} | {ssh} {remote} 'zstd -q -d -f -o {dest_s}'")],
        Method::Rsync => vec!["rsync".into(), "--inplace".into(), "--no-whole-file".into(), "-e".into(), ssh.clone(), src_s.into(), format!("{remote}:{dest_s}")],
        Method::Ferry | Method::FerryPlaintext => {
            let exe = bench.ferry_exe.to_string_lossy().to_string();
            vec![exe, "image".into(), "send".into(), src_s.into(), "--to".into(), "b".into(), "--as".into(), DEST_NAME.into(), "--json".into(), "--data".into(), data_a.to_string_lossy().to_string()]
        }
    };
    let mut cmd = lab::command_in_site(&cfg.name, "a", &argv)?;
    let out = crate::sites::output_with_timeout(&mut cmd, bench.method_timeout)?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", method.name(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    if method.is_ferry() {
        return Ok(Some(serde_json::from_slice(&out.stdout).context("ferry's JSON summary")?));
    }
    Ok(None)
}

fn set_initcwnd(cfg: &LabConfig, site: &str, window: u32) -> Result<()> {
    let src = cfg.site(site)?.wan_addr().to_string();
    let w = window.to_string();
    let argv = ["ip", "route", "change", "198.18.0.0/15", "dev", "wan0", "scope", "link", "src", &src, "initcwnd", &w, "initrwnd", &w].map(String::from);
    let st = lab::command_in_site(&cfg.name, site, &argv)?.status()?;
    anyhow::ensure!(st.success(), "setting initcwnd in site {site}");
    Ok(())
}

/// The destination holds the older version, and nothing else: no content store or partial
/// transfer left by an earlier run, so every run starts from the same state.
fn reset_destination(older: &Path, dest: &Path, data_b: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(data_b.join(".ferry"));
    std::fs::create_dir_all(data_b)?;
    for e in std::fs::read_dir(data_b)?.flatten() {
        if e.file_name().to_string_lossy().contains("ferry-partial") {
            std::fs::remove_file(e.path())?;
        }
    }
    let st = Command::new("cp").arg("--sparse=always").arg(older).arg(dest).status()?;
    anyhow::ensure!(st.success(), "copying the older image to {}", dest.display());
    Ok(())
}

/// Every run starts with cold caches: the source image and the destination's older copy are
/// read from disk, as they would be on a real host.
fn drop_caches() -> Result<()> {
    let st = Command::new("sync").status()?;
    anyhow::ensure!(st.success(), "sync failed");
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    Ok(Command::new("cmp").arg("-s").arg(a).arg(b).status()?.success())
}

/// Bytes of 64 KiB blocks that differ and are not zero in the newer image, raw and compressed
/// with the level ferry uses by default.
fn changed_after_compression(older: &Path, newer: &Path) -> Result<(u64, u64)> {
    crate::disk_files::changed_compressed(older, newer, 0, u64::MAX)
}

fn write_results(bench: &ColdBench, images: &DiskImages, changed: u64, changed_compressed: u64, rows: &[ColdRow], print: bool) -> Result<ColdReport> {
    let image_bytes = std::fs::metadata(&images.newer)?.len();
    let rtts: Vec<f64> = {
        let mut v: Vec<f64> = rows.iter().map(|r| r.rtt_ms).collect();
        v.dedup();
        v
    };
    // The median over a method's runs at one RTT of one figure of its rows. A ferry method's
    // first run (the first transfer since its agents started) is reported on its own when
    // later runs exist: those show the agents as they run, on connections that carried
    // transfers before.
    let median_of = |m: Method, rtt: f64, figure: fn(&ColdRow) -> f64| {
        let of_method = || rows.iter().filter(|r| r.method == m.name() && r.rtt_ms == rtt);
        let later = of_method().any(|r| r.run > 0);
        let mut v: Vec<f64> = of_method().filter(|r| !later || r.run > 0).map(figure).collect();
        median(&mut v)
    };
    let time = |m: Method, rtt: f64| median_of(m, rtt, |r| r.seconds);
    let first_time = |m: Method, rtt: f64| rows.iter().find(|r| r.method == m.name() && r.rtt_ms == rtt && r.run == 0).map_or(f64::NAN, |r| r.seconds);
    let show_first = bench.methods.contains(&Method::Ferry) && bench.ferry_runs > 1;
    let wire = |m: Method, rtt: f64| median_of(m, rtt, |r| r.wire_forward_bytes as f64);
    // The table: one row per RTT, a column per method, then ferry's ratios.
    let mut header = vec!["RTT ms".to_string()];
    header.extend(bench.methods.iter().map(|m| format!("{} s", m.name())));
    if show_first {
        header.push("ferry first s".into());
    }
    header.extend(["ferry/scp".into(), "ferry/best ssh tool".into(), "ferry MB on wire".into()]);
    let mut table_rows = Vec::new();
    for &rtt in &rtts {
        let mut r = vec![format!("{rtt:.0}")];
        r.extend(bench.methods.iter().map(|&m| fmt_num(time(m, rtt))));
        if show_first {
            r.push(fmt_num(first_time(Method::Ferry, rtt)));
        }
        let f = time(Method::Ferry, rtt);
        let best = time(Method::Rsync, rtt).min(time(Method::ZstdSsh, rtt));
        r.push(fmt_pct(f / time(Method::Scp, rtt)));
        r.push(fmt_pct(f / best));
        r.push(fmt_num(wire(Method::Ferry, rtt) / 1e6));
        table_rows.push(r);
    }
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    if print {
        println!("\n{}", report::table(&header_refs, &table_rows));
    }

    let mut targets = Vec::new();
    let mut target = |name: &str, value: f64, goal: &str, met: bool| {
        if value.is_finite() {
            targets.push(Target { name: name.into(), value, goal: goal.into(), met });
        }
    };
    let at = |rtt: f64| rtts.iter().copied().find(|&r| (r - rtt).abs() < 0.5);
    if let Some(r) = at(120.0) {
        let f = time(Method::Ferry, r);
        let v = f / time(Method::Scp, r);
        target("ferry / scp at 120 ms", v, "<= 0.05", v <= 0.05);
        let v = f / time(Method::Rsync, r).min(time(Method::ZstdSsh, r));
        target("ferry / best of rsync, zstd|ssh at 120 ms", v, "<= 0.25", v <= 0.25);
    }
    if let (Some(hi), Some(lo)) = (at(200.0), at(0.0)) {
        let v = time(Method::Ferry, hi) / time(Method::Ferry, lo);
        target("ferry at 200 ms / ferry at 0 ms", v, "<= 1.25", v <= 1.25);
        if show_first {
            let v = first_time(Method::Ferry, hi) / first_time(Method::Ferry, lo);
            target("... first transfer since the agents started", v, "<= 1.25", v <= 1.25);
        }
    }
    let mut wires: Vec<f64> = rows.iter().filter(|r| r.method == "ferry").map(|r| r.wire_forward_bytes as f64).collect();
    let v = median(&mut wires) / changed_compressed as f64;
    target("ferry bytes on the wire / changed blocks compressed", v, "<= 1.10", v <= 1.10);
    let speedups: Vec<f64> = rtts.iter().map(|&r| time(Method::Ferry, r) / time(Method::FerryPlaintext, r) - 1.0).filter(|v| v.is_finite()).collect();
    if !speedups.is_empty() {
        let v = speedups.iter().sum::<f64>() / speedups.len() as f64;
        target("plaintext speed-up over TLS (mean over RTTs)", v, "<= 0.03", v <= 0.03);
    }
    for t in targets.iter().filter(|_| print) {
        println!("target {:<55} {:>8.3}  (goal {}) {}", t.name, t.value, t.goal, if t.met { "met" } else { "NOT MET" });
    }

    let report = ColdReport { rate_bps: bench.rate_bps, image_bytes, changed_blocks_bytes: changed, changed_compressed_bytes: changed_compressed, rows: rows.to_vec(), targets };
    report::write_csv(&bench.out_dir.join("cold.csv"), rows)?;
    report::write_json(&bench.out_dir.join("cold.json"), &report)?;
    let series = |f: &dyn Fn(Method, f64) -> f64, methods: &[Method]| -> Vec<Series> {
        methods.iter().map(|&m| Series { name: m.name().to_string(), points: rtts.iter().map(|&r| (r, f(m, r))).filter(|p| p.1.is_finite()).collect() }).filter(|s| !s.points.is_empty()).collect()
    };
    let times = series(&time, &bench.methods);
    plot::line_chart(
        &bench.out_dir.join("cold-time.png"),
        &Chart { title: "4 GiB image, older version at the destination, 1 Gbit/s", x_label: "RTT (ms)", y_label: "time (s, log scale)", series: &times, log_y: true },
    )?;
    let ratio = |base: Method| move |_: Method, r: f64| time(Method::Ferry, r) / time(base, r);
    let fractions: Vec<Series> = [Method::Scp, Method::ZstdSsh, Method::Rsync]
        .into_iter()
        .filter(|m| bench.methods.contains(m))
        .map(|base| Series { name: format!("ferry / {}", base.name()), points: rtts.iter().map(|&r| (r, 100.0 * ratio(base)(base, r))).filter(|p| p.1.is_finite()).collect() })
        .collect();
    plot::line_chart(
        &bench.out_dir.join("cold-ratio.png"),
        &Chart { title: "ferry's time as a share of each tool's", x_label: "RTT (ms)", y_label: "ferry time / tool time (%)", series: &fractions, log_y: false },
    )?;
    Ok(report)
}
