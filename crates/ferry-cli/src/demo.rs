//! `ferry demo`: the one command a newcomer runs. Two sites 100 ms apart (and a probe site),
//! a guest booted in one, shown alive from across the WAN, then everything torn down.
use crate::lab_cmd::{lab_config, print_probe, print_status};
use anyhow::{Context, Result};
use clap::Args;
use ferry_lab::guest::{LabGuest, LabGuestSpec};
use ferry_lab::link::LinkParams;
use ferry_lab::units::QueueLimit;
use ferry_lab::{guest_image, lab, probe, qemu, sys};
use ferry_bench::sites::{AgentSpec, SiteProcesses};
use std::process::Command;
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
    move_image(cfg)?;
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

/// Site agents over mutual TLS move a disk image to site b, then its newer version: the second
/// move sends only the changed blocks.
fn move_image(cfg: &ferry_lab::topology::LabConfig) -> Result<()> {
    const SIZE: u64 = 1 << 30;
    let exe = std::env::current_exe()?;
    let work = lab::state_dir(&cfg.name).join("transfer");
    let _ = std::fs::remove_dir_all(&work);
    let (pki, data_a, data_b) = (work.join("pki"), work.join("a"), work.join("b"));
    std::fs::create_dir_all(&data_a)?;
    println!("-- moving a disk image from site a to site b over mutual TLS 1.3");
    SiteProcesses::make_pki(&exe, &pki)?;
    let (ip_a, ip_b) = (cfg.site("a")?.wan_addr().to_string(), cfg.site("b")?.wan_addr().to_string());
    let mut procs = SiteProcesses::new(&cfg.name, work.join("logs"));
    let a = AgentSpec { site: "a", listen_ip: &ip_a, peer: ("b", &ip_b), data: &data_a, pki: &pki, exe: &exe, rate_bps: 1_000_000_000, plaintext: false };
    procs.start_agent(&a)?;
    procs.start_agent(&AgentSpec { site: "b", listen_ip: &ip_b, peer: ("a", &ip_a), data: &data_b, ..a })?;
    println!("   a CA and site certificates in {}; agents listening in a ({ip_a}:7400) and b ({ip_b}:7400)", pki.display());
    let image = data_a.join("vm1.raw");
    ferry_lab::synthetic_image::write_image(&image, SIZE, 1)?;
    println!("   first move: a 1 GiB image (text-like, random and sparse blocks) that site b does not have");
    send(cfg, &exe, &image, &data_a)?;
    let changed = ferry_lab::synthetic_image::change_blocks(&image, 16, 2)?;
    println!("   second move: a newer version, {} MiB of its blocks rewritten; b holds the older one", changed >> 20);
    send(cfg, &exe, &image, &data_a)?;
    let same = Command::new("cmp").arg("-s").arg(&image).arg(data_b.join("vm1.raw")).status()?.success();
    anyhow::ensure!(same, "the image at site b differs from the source");
    println!("   site b's copy is byte-equal to the source");
    Ok(())
}

fn send(cfg: &ferry_lab::topology::LabConfig, exe: &std::path::Path, image: &std::path::Path, data_a: &std::path::Path) -> Result<()> {
    let argv: Vec<String> = [exe.to_str().unwrap(), "image", "send", image.to_str().unwrap(), "--to", "b", "--as", "vm1.raw", "--data", data_a.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let st = lab::command_in_site(&cfg.name, "a", &argv)?.status()?;
    anyhow::ensure!(st.success(), "ferry image send failed");
    Ok(())
}
