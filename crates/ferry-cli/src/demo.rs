//! `ferry demo`: the one command a newcomer runs. Two sites 100 ms apart (and a probe site),
//! a guest booted in one, shown alive from across the WAN, then everything torn down.
use crate::lab_cmd::{lab_config, print_probe, print_status};
use anyhow::{Context, Result};
use clap::Args;
use ferry_lab::guest::{LabGuest, LabGuestSpec};
use ferry_lab::link::LinkParams;
use ferry_lab::units::QueueLimit;
use ferry_lab::{guest_image, lab, probe, qemu, sys};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Name of the demo's lab (its namespaces are LAB-a, LAB-b, LAB-client).
    #[arg(long, default_value = "demo")]
    lab: String,
    /// Keep the lab and guest up until Enter is pressed, to look around.
    #[arg(long)]
    pause: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    sys::require_root("ferry demo")?;
    let q = qemu::check_qemu()?;
    println!("== ferry demo: two sites 100 ms apart on a 1 Gbit/s emulated WAN ({})", q.text);
    let params = LinkParams { rtt: Duration::from_millis(100), rate_bps: 1_000_000_000, loss: 0.0, jitter: Duration::ZERO, queue: QueueLimit::Bdp };
    let cfg = lab_config(&args.lab, &["a".into(), "b".into()], true, params, &[])?;
    lab::up(&cfg, &std::env::current_exe()?)?;
    let result = show(&cfg, args.pause);
    lab::down(&cfg.name)?;
    println!("== lab {} torn down", cfg.name);
    result
}

fn show(cfg: &ferry_lab::topology::LabConfig, pause: bool) -> Result<()> {
    let t = Instant::now();
    let image = guest_image::build_guest_image(std::path::Path::new(guest_image::DEFAULT_CACHE))?;
    println!("-- guest image ready in {:.1} s: {} + {}", t.elapsed().as_secs_f64(), image.kernel.display(), image.initrd.display());
    let spec = LabGuestSpec::new("demo1", "a");
    let mut guest = LabGuest::boot(cfg, &spec, &image).context("booting the demo guest in site a")?;
    println!("-- guest {} booted in site a under TCG: ready {:.1} s after QEMU started, address {}", guest.name, guest.boot_to_ready.as_secs_f64(), guest.addr);
    if let Some(ready) = guest.serial().into_iter().find(|l| l.starts_with("ferry-ready")) {
        println!("   {ready}");
    }
    println!("-- probing the guest's UDP echo from site client (100 ms away) every 10 ms for 3 s");
    let probe_argv: Vec<String> = [
        std::env::current_exe()?.to_string_lossy().as_ref(),
        "lab",
        "probe",
        &format!("{}:7", guest.addr),
        "--duration",
        "3s",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = lab::command_in_site(&cfg.name, "client", &probe_argv)?.output()?;
    anyhow::ensure!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: probe::ProbeReport = serde_json::from_slice(&out.stdout).context("probe output")?;
    print!("   ");
    print_probe(&r);
    anyhow::ensure!(r.received > 0, "the guest did not answer the probe");
    println!("-- the guest's heartbeat on its serial console:");
    for hb in guest.heartbeats().iter().rev().take(3).rev() {
        println!("   {hb}");
    }
    anyhow::ensure!(guest.is_running(), "the guest stopped");
    println!("-- WAN link counters:");
    print_status(&lab::status(&cfg.name)?);
    if pause {
        println!("-- paused: try `ferry lab exec --lab {} client -- ping {}`; press Enter to tear down", cfg.name, guest.addr);
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    drop(guest);
    Ok(())
}
