//! The live benchmark's figures: one row per migration, the table, the targets as
//! ratios between methods of the same run, and CSV, JSON and PNG output.
use crate::plot::{self, Chart, Series};
use crate::report::{self, fmt_num, median, Target};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const QEMU_TLS: &str = "qemu-tls";
pub const QEMU_MULTIFD: &str = "qemu-multifd-zstd-tls";
pub const FERRY: &str = "ferry";
pub const FERRY_RETURN: &str = "ferry-return";
/// ferry with `--postcopy` (there and back): a guest that outruns the link is where it differs.
pub const FERRY_POSTCOPY: &str = "ferry-postcopy";
pub const FERRY_POSTCOPY_RETURN: &str = "ferry-postcopy-return";
/// Every method's rows, in the order tables and plots show them.
pub const METHODS: [&str; 6] = [QEMU_TLS, QEMU_MULTIFD, FERRY, FERRY_RETURN, FERRY_POSTCOPY, FERRY_POSTCOPY_RETURN];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LiveRow {
    pub rtt_ms: f64,
    pub method: String,
    pub run: usize,
    /// The migration completed and the guest ran on at the destination.
    pub ok: bool,
    pub error: Option<String>,
    /// Wall clock: `ferry vm migrate`, or QEMU's migration from starting the destination QEMU
    /// to `completed` (what `virsh migrate` would take).
    pub seconds: f64,
    pub qemu_total_s: Option<f64>,
    pub qemu_downtime_ms: Option<f64>,
    /// The client's view, probing every 10 ms from site `client`.
    pub probe_sent: u64,
    pub probe_lost: u64,
    pub probe_lost_ms: f64,
    pub probe_longest_gap_ms: Option<f64>,
    /// Every gap over 50 ms, as `start+length` (s after the move started, ms): a pause at the
    /// switchover, or a guest slowed before it.
    #[serde(default)]
    pub probe_gaps: String,
    /// IP bytes the lab's forwarder delivered source → destination and back.
    pub wire_forward_bytes: u64,
    pub wire_back_bytes: u64,
    /// Packets the lab's forwarder dropped between a and b meanwhile (its drop-tail queue full):
    /// a loss near the switchover costs the VM a retransmission while it stands still.
    #[serde(default)]
    pub wire_drops: u64,
    /// The migration stream QEMU wrote.
    pub stream_bytes: Option<u64>,
    pub pages_sent: Option<u64>,
    pub pages_referenced: Option<u64>,
    /// Pages sent as a place on a disk the destination was sent (moves with disks).
    #[serde(default)]
    pub pages_from_disk: Option<u64>,
    pub guest_ok: bool,
    pub guest_check: String,
    /// Both agents' CPU time during a ferry migration, per byte of QEMU's stream.
    pub agents_cpu_s: Option<f64>,
    pub cpu_ns_per_byte: Option<f64>,
    pub cpu_cycles_per_byte: Option<f64>,
    /// Seconds into a ferry move when it switched to post-copy, if it did; and the pages the
    /// destination asked for after that.
    #[serde(default)]
    pub postcopy_after_s: Option<f64>,
    #[serde(default)]
    pub postcopy_requests: Option<u64>,
}

impl LiveRow {
    pub fn wire_bytes(&self) -> u64 {
        self.wire_forward_bytes + self.wire_back_bytes
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LiveReport {
    pub rate_bps: u64,
    pub memory_mib: u32,
    pub workload: String,
    pub cpu_mhz: Option<f64>,
    pub rows: Vec<LiveRow>,
    pub targets: Vec<Target>,
}

/// Medians over a method's successful runs at one RTT.
pub struct Figures<'a> {
    rows: &'a [LiveRow],
}

impl<'a> Figures<'a> {
    pub fn new(rows: &'a [LiveRow]) -> Self {
        Figures { rows }
    }

    pub fn rtts(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.rows.iter().map(|r| r.rtt_ms).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.dedup();
        v
    }

    pub fn median(&self, method: &str, rtt: f64, figure: impl Fn(&LiveRow) -> Option<f64>) -> f64 {
        let mut v: Vec<f64> = self.rows.iter().filter(|r| r.ok && r.method == method && r.rtt_ms == rtt).filter_map(figure).collect();
        median(&mut v)
    }

    pub fn time(&self, m: &str, rtt: f64) -> f64 {
        self.median(m, rtt, |r| Some(r.seconds))
    }
    pub fn wire(&self, m: &str, rtt: f64) -> f64 {
        self.median(m, rtt, |r| Some(r.wire_bytes() as f64))
    }
    pub fn gap(&self, m: &str, rtt: f64) -> f64 {
        self.median(m, rtt, |r| r.probe_longest_gap_ms)
    }
    pub fn lost_ms(&self, m: &str, rtt: f64) -> f64 {
        self.median(m, rtt, |r| Some(r.probe_lost_ms))
    }
    /// The best (lowest) figure of QEMU's native methods at `rtt`.
    pub fn native_best(&self, rtt: f64, figure: impl Fn(&Self, &str, f64) -> f64) -> f64 {
        [QEMU_TLS, QEMU_MULTIFD].iter().map(|m| figure(self, m, rtt)).filter(|v| v.is_finite()).fold(f64::NAN, f64::min)
    }
}

/// a / b, where 0 / 0 is 1 (equal) and x / 0 is infinite.
pub fn ratio(a: f64, b: f64) -> f64 {
    if a == 0.0 && b == 0.0 {
        1.0
    } else {
        a / b
    }
}

/// The targets. A target over several RTTs reports its worst ratio (and where); a ratio
/// that cannot be computed (a method failed) is reported as not met.
pub fn targets(rows: &[LiveRow]) -> Vec<Target> {
    let f = Figures::new(rows);
    let rtts = f.rtts();
    let mut out = Vec::new();
    let mut push = |name: String, value: f64, goal: f64| {
        out.push(Target { name, value, goal: format!("<= {goal}"), met: value.is_finite() && value <= goal });
    };
    let at = |want: f64| rtts.iter().copied().find(|&r| (r - want).abs() < 0.5);
    for want in [100.0, 200.0] {
        if let Some(r) = at(want) {
            push(format!("ferry time / QEMU multifd+zstd+TLS time at {r:.0} ms"), f.time(FERRY, r) / f.time(QEMU_MULTIFD, r), 0.5);
        }
    }
    if let (Some(hi), Some(lo)) = (at(200.0), at(0.0)) {
        push("ferry time at 200 ms / at 0 ms".into(), f.time(FERRY, hi) / f.time(FERRY, lo), 1.3);
    }
    // (name, goal, the ratio at one RTT)
    type PerRtt<'a> = (&'a str, f64, Box<dyn Fn(f64) -> f64 + 'a>);
    let per_rtt: [PerRtt; 4] = [
        ("ferry bytes on the wire / QEMU multifd+zstd's, first move", 0.6, Box::new(|r| f.wire(FERRY, r) / f.wire(QEMU_MULTIFD, r))),
        ("ferry bytes on the wire / QEMU multifd+zstd's, return trip", 0.15, Box::new(|r| f.wire(FERRY_RETURN, r) / f.wire(QEMU_MULTIFD, r))),
        ("ferry prober longest gap / QEMU native's best", 1.0, Box::new(|r| ratio(f.gap(FERRY, r), f.native_best(r, Figures::gap)))),
        ("ferry lost probes x 10 ms / QEMU native's best", 1.0, Box::new(|r| ratio(f.lost_ms(FERRY, r), f.native_best(r, Figures::lost_ms)))),
    ];
    for (name, goal, value) in per_rtt {
        if let Some((v, r)) = worst(&rtts, value) {
            push(format!("{name} (worst over RTTs: at {r:.0} ms)"), v, goal);
        }
    }
    out
}

/// The highest `value` over `rtts`, and where: NaN (a failed method) is worst of all.
pub(crate) fn worst(rtts: &[f64], value: impl Fn(f64) -> f64) -> Option<(f64, f64)> {
    let nan_high = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    rtts.iter().map(|&r| (value(r), r)).max_by(|a, b| nan_high(a.0).total_cmp(&nan_high(b.0)))
}

/// One plot series per method: `figure` at each RTT, where it is known.
pub(crate) fn method_series(methods: &[&str], rtts: &[f64], figure: &dyn Fn(&str, f64) -> f64) -> Vec<Series> {
    methods
        .iter()
        .map(|m| Series { name: m.to_string(), points: rtts.iter().map(|&r| (r, figure(m, r))).filter(|p| p.1.is_finite()).collect() })
        .filter(|s| !s.points.is_empty())
        .collect()
}

pub fn table(rows: &[LiveRow]) -> String {
    let header = ["RTT ms", "method", "ok", "time s", "QEMU total s", "QEMU downtime ms", "probe gap ms", "lost x10ms", "wire MB", "stream MB", "pages by ref", "post-copy at s", "guest", "agents ns/B"];
    let opt = |v: Option<f64>| v.map_or("-".into(), fmt_num);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                format!("{:.0}", r.rtt_ms),
                format!("{}#{}", r.method, r.run),
                if r.ok { "yes".into() } else { "FAILED".into() },
                fmt_num(r.seconds),
                opt(r.qemu_total_s),
                opt(r.qemu_downtime_ms),
                opt(r.probe_longest_gap_ms),
                format!("{:.0}", r.probe_lost_ms),
                fmt_num(r.wire_bytes() as f64 / 1e6),
                opt(r.stream_bytes.map(|b| b as f64 / 1e6)),
                r.pages_referenced.map_or("-".into(), |p| p.to_string()),
                r.postcopy_after_s.map_or("-".into(), |t| format!("{t:.1} ({} asked)", r.postcopy_requests.unwrap_or(0))),
                if r.guest_ok { "ok".into() } else { "NOT OK".into() },
                opt(r.cpu_ns_per_byte),
            ]
        })
        .collect();
    let mut s = report::table(&header, &cells);
    for r in rows.iter().filter(|r| !r.ok) {
        s.push_str(&format!("FAILED {} at {:.0} ms (run {}): {}\n", r.method, r.rtt_ms, r.run, r.error.as_deref().unwrap_or(&r.guest_check)));
    }
    s
}

/// Post-copy beside pre-copy, where a run has both: not an issue target, the evidence of when
/// `--postcopy` helps (time, the client's longest gap and lost probes, post-copy over pre-copy).
pub fn postcopy_comparison(rows: &[LiveRow]) -> Vec<String> {
    let f = Figures::new(rows);
    f.rtts()
        .into_iter()
        .filter(|&r| f.time(FERRY, r).is_finite() && f.time(FERRY_POSTCOPY, r).is_finite())
        .map(|r| {
            format!(
                "post-copy / pre-copy at {r:.0} ms: time {:.2} ({:.2} / {:.2} s), longest gap {:.2} ({:.0} / {:.0} ms), lost probes {:.2} ({:.0} / {:.0} ms)",
                f.time(FERRY_POSTCOPY, r) / f.time(FERRY, r),
                f.time(FERRY_POSTCOPY, r),
                f.time(FERRY, r),
                ratio(f.gap(FERRY_POSTCOPY, r), f.gap(FERRY, r)),
                f.gap(FERRY_POSTCOPY, r),
                f.gap(FERRY, r),
                ratio(f.lost_ms(FERRY_POSTCOPY, r), f.lost_ms(FERRY, r)),
                f.lost_ms(FERRY_POSTCOPY, r),
                f.lost_ms(FERRY, r),
            )
        })
        .collect()
}

pub fn print_targets(targets: &[Target]) {
    for t in targets {
        println!("target {:<92} {:>8.3}  (goal {}) {}", t.name, t.value, t.goal, if t.met { "met" } else { "NOT MET" });
    }
}

/// A previous run's report, its targets computed again from its rows.
pub fn read(out: &Path) -> Result<LiveReport> {
    let mut report: LiveReport = report::read_json(&out.join("live.json"), "a live benchmark report")?;
    report.targets = targets(&report.rows);
    Ok(report)
}

pub fn write(out: &Path, report: &LiveReport) -> Result<()> {
    report::write_csv(&out.join("live.csv"), &report.rows)?;
    report::write_json(&out.join("live.json"), report)?;
    let f = Figures::new(&report.rows);
    let rtts = f.rtts();
    let series = |figure: &dyn Fn(&str, f64) -> f64| method_series(&METHODS, &rtts, figure);
    let title = format!("{} MiB guest, {}, {} Gbit/s", report.memory_mib, report.workload, report.rate_bps as f64 / 1e9);
    let charts: [(&str, &str, Vec<Series>, bool); 3] = [
        ("live-time.png", "migration time (s)", series(&|m, r| f.time(m, r)), false),
        ("live-downtime.png", "longest gap a client sees, probing every 10 ms (ms)", series(&|m, r| f.gap(m, r)), false),
        ("live-wire.png", "bytes on the WAN, both directions (MB)", series(&|m, r| f.wire(m, r) / 1e6), false),
    ];
    for (file, y_label, series, log_y) in charts {
        plot::line_chart(&out.join(file), &Chart { title: &title, x_label: "RTT (ms)", y_label, series: &series, log_y })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rtt: f64, method: &str, seconds: f64, wire_mb: u64, gap: f64, lost: u64) -> LiveRow {
        LiveRow { rtt_ms: rtt, method: method.into(), ok: true, seconds, wire_forward_bytes: wire_mb * 1_000_000, probe_longest_gap_ms: Some(gap), probe_lost: lost, probe_lost_ms: lost as f64 * 10.0, guest_ok: true, ..Default::default() }
    }

    fn sample() -> Vec<LiveRow> {
        let mut rows = Vec::new();
        for rtt in [0.0, 100.0, 200.0] {
            rows.push(row(rtt, QEMU_TLS, 20.0 + rtt / 10.0, 1000, 400.0, 30));
            rows.push(row(rtt, QEMU_MULTIFD, 10.0 + rtt / 10.0, 500, 300.0, 20));
            rows.push(row(rtt, FERRY, 5.0 + rtt / 100.0, 250, 250.0, 20));
            rows.push(row(rtt, FERRY_RETURN, 3.0, 50, 200.0, 10));
        }
        rows
    }

    fn get<'a>(t: &'a [Target], name: &str) -> &'a Target {
        t.iter().find(|t| t.name.starts_with(name)).unwrap_or_else(|| panic!("{name}: {t:?}"))
    }

    #[test]
    fn targets_are_ratios_of_the_same_run() {
        let t = targets(&sample());
        let at100 = get(&t, "ferry time / QEMU multifd+zstd+TLS time at 100 ms");
        assert!((at100.value - 6.0 / 20.0).abs() < 1e-9 && at100.met, "{at100:?}");
        let flat = get(&t, "ferry time at 200 ms / at 0 ms");
        assert!((flat.value - 7.0 / 5.0).abs() < 1e-9 && !flat.met, "{flat:?}");
        let wire = get(&t, "ferry bytes on the wire / QEMU multifd+zstd's, first move");
        assert!((wire.value - 0.5).abs() < 1e-9 && wire.met);
        let back = get(&t, "ferry bytes on the wire / QEMU multifd+zstd's, return trip");
        assert!((back.value - 0.1).abs() < 1e-9 && back.met);
        let gap = get(&t, "ferry prober longest gap / QEMU native's best");
        assert!((gap.value - 250.0 / 300.0).abs() < 1e-9 && gap.met, "{gap:?}");
        let lost = get(&t, "ferry lost probes x 10 ms / QEMU native's best");
        assert!((lost.value - 1.0).abs() < 1e-9 && lost.met, "{lost:?}");
    }

    #[test]
    fn a_failed_method_leaves_its_target_unmet_and_the_worst_rtt_decides() {
        let mut rows = sample();
        for r in rows.iter_mut().filter(|r| r.method == QEMU_MULTIFD && r.rtt_ms == 200.0) {
            r.ok = false;
        }
        rows.push(row(100.0, FERRY, 9.0, 450, 900.0, 90)); // a second, worse run: the median moves
        let t = targets(&rows);
        let at200 = get(&t, "ferry time / QEMU multifd+zstd+TLS time at 200 ms");
        assert!(at200.value.is_nan() && !at200.met);
        let wire = get(&t, "ferry bytes on the wire / QEMU multifd+zstd's, first move");
        assert!(!wire.met && wire.name.contains("at 200 ms"), "{wire:?}");
        let gap = get(&t, "ferry prober longest gap / QEMU native's best");
        // At 100 ms: median of 250 and 900 = 575 against multifd's 300.
        assert!(gap.name.contains("at 100 ms") && (gap.value - 575.0 / 300.0).abs() < 1e-9 && !gap.met, "{gap:?}");
        // At 200 ms only the single stream counts as native's best.
        let f = Figures::new(&rows);
        assert_eq!(f.native_best(200.0, Figures::gap), 400.0);
    }

    #[test]
    fn zero_against_zero_is_equal() {
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert!(ratio(10.0, 0.0).is_infinite());
        assert_eq!(ratio(5.0, 10.0), 0.5);
    }
}
