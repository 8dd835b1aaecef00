//! QEMU's own live migration between lab sites, as `virsh migrate --live --tls` drives it: the
//! destination QEMU started with `-incoming defer`, x509 TLS on both ends, the return path on,
//! QEMU's default downtime limit; optionally multifd (8 channels, zstd).
use crate::heartbeat::{self, GuestCheck};
use crate::qmp::Qmp;
use anyhow::{bail, Context, Result};
use ferry_lab::guest::{LabGuest, LabGuestSpec};
use ferry_lab::guest_image::GuestImage;
use ferry_lab::qemu::{self, GuestLaunch};
use ferry_lab::topology::LabConfig;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

pub const PORT: u16 = 49152;
/// The id of the x509 credentials object `configure` adds on each end.
pub(crate) const TLS_CREDS: &str = "tls0";

#[derive(Clone, Copy, Debug)]
pub struct NativeOptions {
    pub multifd: bool,
}

/// What one native migration measured (wire and probe figures are the caller's).
#[derive(Debug, Default)]
pub struct NativeOutcome {
    pub seconds: f64,
    pub qemu_total_ms: Option<f64>,
    pub qemu_downtime_ms: Option<f64>,
    /// What QEMU sent: `ram.transferred` (which counts multifd's channels too).
    pub stream_bytes: Option<u64>,
    pub error: Option<String>,
}

/// A QEMU this module started (the destination), stopped and its tap removed when dropped.
pub struct Qemu {
    pub child: Child,
    namespace: String,
    tap: String,
}

impl Qemu {
    pub fn spawn(launch: &GuestLaunch) -> Result<Qemu> {
        let _ = std::fs::remove_file(&launch.serial_log);
        let child = launch.spawn()?;
        Ok(Qemu { child, namespace: launch.namespace.clone(), tap: launch.tap.clone() })
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        qemu::remove_tap(&self.namespace, &self.tap);
    }
}

pub struct NativeRun<'a> {
    pub lab: &'a LabConfig,
    pub image: &'a GuestImage,
    /// The guest to boot at a (its home); the destination copy runs at b with the same address.
    pub guest: LabGuestSpec,
    pub tls_dir: &'a Path,
    pub settle: Duration,
    pub timeout: Duration,
    pub options: NativeOptions,
}

/// Boots the guest at a (waiting for `ferry-ready`) and lets its dirtying settle.
pub fn boot_source(run: &NativeRun) -> Result<LabGuest> {
    let mut spec = run.guest.clone();
    spec.name = "lsrc".into();
    spec.site = "a".into();
    let g = LabGuest::boot(run.lab, &spec, run.image).context("booting the source guest at a")?;
    std::thread::sleep(run.settle);
    Ok(g)
}

/// Migrates `source` to a fresh QEMU at b. `around` is called just before the destination
/// starts (start the probe and the counters) and right after the migration ends (read them);
/// the destination's guest is then watched for `hold`.
pub fn migrate(run: &NativeRun, source: &mut LabGuest, hold: Duration, mut around: impl FnMut(bool)) -> (NativeOutcome, GuestCheck) {
    let seq_before = heartbeat::last(&source.heartbeats()).map(|h| h.seq);
    around(true);
    let started = Instant::now();
    let mut outcome = NativeOutcome::default();
    let dest = start_destination(run).and_then(|(q, launch)| {
        let mut sq = Qmp::connect(&source.qmp_socket, Duration::from_secs(10))?;
        configure(&mut sq, run, "client")?;
        sq.execute("migrate", json!({"uri": migrate_uri(run)?}))?;
        let info = wait_migration(&mut sq, run.timeout);
        outcome.seconds = started.elapsed().as_secs_f64();
        around(false);
        let info = info?;
        outcome.qemu_total_ms = info["total-time"].as_f64();
        outcome.qemu_downtime_ms = info["downtime"].as_f64();
        outcome.stream_bytes = info["ram"]["transferred"].as_u64();
        Ok((q, launch))
    });
    let (mut q, launch) = match dest {
        Ok(d) => d,
        Err(e) => {
            if outcome.seconds == 0.0 {
                outcome.seconds = started.elapsed().as_secs_f64();
                around(false);
            }
            outcome.error = Some(format!("{e:#}"));
            return (outcome, GuestCheck { ok: false, seq_before, seq_after: None, why: "migration failed".into() });
        }
    };
    let serial = launch.serial_log.clone();
    let check = heartbeat::watch(|| Ok(qemu::serial_lines(&serial)), || q.running(), seq_before, Duration::from_secs(20), hold);
    (outcome, check)
}

fn start_destination(run: &NativeRun) -> Result<(Qemu, GuestLaunch)> {
    let (q, launch, mut dq) = spawn_destination(run, vec![])?;
    incoming(&mut dq, run)?;
    Ok((q, launch))
}

/// Starts the destination QEMU at b for `run.guest` (`-incoming defer`, then `extra_args`),
/// connects to its QMP and configures it as a migration's server end.
pub(crate) fn spawn_destination(run: &NativeRun, extra_args: Vec<String>) -> Result<(Qemu, GuestLaunch, Qmp)> {
    let mut spec = run.guest.clone();
    spec.name = "ldst".into();
    spec.site = "b".into();
    spec.home_site = Some("a".into());
    let mut launch = spec.launch(run.lab, run.image)?;
    launch.extra_args = vec!["-incoming".into(), "defer".into()];
    launch.extra_args.extend(extra_args);
    let q = Qemu::spawn(&launch)?;
    let mut dq = Qmp::connect(&launch.qmp_socket, Duration::from_secs(20)).context("the destination QEMU's QMP")?;
    configure(&mut dq, run, "server")?;
    Ok((q, launch, dq))
}

/// The destination's `migrate-incoming` on b's WAN address.
pub(crate) fn incoming(dq: &mut Qmp, run: &NativeRun) -> Result<()> {
    dq.execute("migrate-incoming", json!({"uri": migrate_uri(run)?}))?;
    Ok(())
}

/// Where the destination listens for the migration stream (the source's `migrate` URI).
pub(crate) fn migrate_uri(run: &NativeRun) -> Result<String> {
    Ok(format!("tcp:{}:{PORT}", run.lab.site("b")?.wan_addr()))
}

/// The same capabilities and parameters on both ends, and the TLS credentials for `endpoint`.
pub(crate) fn configure(qmp: &mut Qmp, run: &NativeRun, endpoint: &str) -> Result<()> {
    qmp.execute("object-add", json!({"qom-type": "tls-creds-x509", "id": TLS_CREDS, "dir": run.tls_dir.to_str().unwrap(), "endpoint": endpoint, "verify-peer": true}))?;
    let mut caps = vec![json!({"capability": "return-path", "state": true})];
    if run.options.multifd {
        caps.push(json!({"capability": "multifd", "state": true}));
    }
    qmp.execute("migrate-set-capabilities", json!({"capabilities": caps}))?;
    let mut params = json!({"tls-creds": TLS_CREDS});
    if run.options.multifd {
        params["multifd-channels"] = json!(8);
        params["multifd-compression"] = json!("zstd");
    }
    qmp.execute("migrate-set-parameters", params)?;
    Ok(())
}

/// Polls `query-migrate` until it completes; fails on QEMU's failure or after `limit` (then
/// cancels, so the source runs on).
pub(crate) fn wait_migration(qmp: &mut Qmp, limit: Duration) -> Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(info),
            "failed" | "cancelled" => bail!("QEMU's migration {}: {}", info["status"], info["error-desc"].as_str().unwrap_or("no reason given")),
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = qmp.execute("migrate_cancel", json!({}));
            let ram = &info["ram"];
            bail!(
                "did not converge within {} s ({} MB sent, {} MB still dirty, dirty rate {} pages/s, {} iterations)",
                limit.as_secs(),
                ram["transferred"].as_u64().unwrap_or(0) / 1_000_000,
                ram["remaining"].as_u64().unwrap_or(0) / 1_000_000,
                ram["dirty-pages-rate"].as_u64().unwrap_or(0),
                ram["dirty-sync-count"].as_u64().unwrap_or(0)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
