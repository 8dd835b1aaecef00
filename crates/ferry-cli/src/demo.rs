//! `ferry demo`: the one command a newcomer runs. Two sites 100 ms apart (and a probe site),
//! an agent in each, a guest booted in one and shown alive from across the WAN, a disk image
//! moved and then its newer version, the running guest moved live to the other site and back
//! while a client keeps probing it, then everything torn down.
use crate::lab_cmd::{lab_config, print_probe, print_status};
use anyhow::{Context, Result};
use clap::Args;
use ferry_bench::heartbeat;
use ferry_bench::measure::{self, MoveSpec};
use ferry_bench::site_vm::SiteVm;
use ferry_bench::sites::{AgentSpec, SiteProcesses};
use ferry_lab::guest::LabGuestSpec;
use ferry_lab::link::LinkParams;
use ferry_lab::topology::LabConfig;
use ferry_lab::units::QueueLimit;
use ferry_lab::{guest_image, lab, probe, qemu, sys};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

const RATE: u64 = 1_000_000_000;

/// The guest's disk: where a VM's disk lives under a site's data directory (so the copy the
/// image moves leave at b is the older version a live move draws on).
const DISK: u64 = 1 << 30;
const DISK_OBJECT: &str = "vms/demo1/disk.raw";

fn disk_path(data: &Path) -> PathBuf {
    data.join(DISK_OBJECT)
}

pub fn run(args: DemoArgs) -> Result<()> {
    sys::require_root("ferry demo")?;
    let q = qemu::check_qemu()?;
    println!("== ferry demo: two sites 100 ms apart on a 1 Gbit/s emulated WAN ({})", q.text);
    let params = LinkParams { rtt: Duration::from_millis(100), rate_bps: RATE, loss: 0.0, jitter: Duration::ZERO, queue: QueueLimit::Bdp };
    let cfg = lab_config(&args.lab, &["a".into(), "b".into()], true, params, &[])?;
    lab::up(&cfg, &std::env::current_exe()?)?;
    let result = Demo::new(&cfg).and_then(|mut d| d.show(args.pause));
    lab::down(&cfg.name)?;
    println!("== lab {} torn down", cfg.name);
    result
}

struct Demo<'a> {
    cfg: &'a LabConfig,
    exe: PathBuf,
    data_a: PathBuf,
    data_b: PathBuf,
    /// The agents (stopped when the demo ends; `lab down` ends the VMs they started).
    procs: SiteProcesses,
    vm: SiteVm,
    guest: LabGuestSpec,
}

impl<'a> Demo<'a> {
    /// A CA, a certificate per site and an agent in each site.
    fn new(cfg: &'a LabConfig) -> Result<Demo<'a>> {
        let exe = std::env::current_exe()?;
        let work = lab::state_dir(&cfg.name).join("transfer");
        let _ = std::fs::remove_dir_all(&work);
        let (pki, data_a, data_b) = (work.join("pki"), work.join("a"), work.join("b"));
        std::fs::create_dir_all(&data_a)?;
        SiteProcesses::make_pki(&exe, &pki)?;
        let (ip_a, ip_b) = (cfg.site("a")?.wan_addr().to_string(), cfg.site("b")?.wan_addr().to_string());
        let mut procs = SiteProcesses::new(&cfg.name, work.join("logs"));
        let a = AgentSpec { site: "a", listen_ip: &ip_a, peer: ("b", &ip_b), data: &data_a, pki: &pki, exe: &exe, rate_bps: RATE, plaintext: false };
        procs.start_agent(&a)?;
        procs.start_agent(&AgentSpec { site: "b", listen_ip: &ip_b, peer: ("a", &ip_a), data: &data_b, ..a })?;
        println!("-- agents in a ({ip_a}:7400) and b ({ip_b}:7400), mutual TLS 1.3 with site certificates from a CA in {}", pki.display());
        let mut guest = LabGuestSpec::new("demo1", "a");
        guest.memory_mib = 512;
        // The guest also writes to its disk, in a ring near its end, throughout.
        guest.workload = ["ferry.mem=192M", "ferry.dirty=2M", "ferry.disk=/dev/vda", "ferry.disk_rate=1M", &format!("ferry.disk_offset={}", DISK - (64 << 20)), "ferry.disk_span=32M"].map(String::from).to_vec();
        let mut vm = SiteVm::new(&exe, "demo1");
        vm.disks = vec![disk_path(&data_a)];
        Ok(Demo { cfg, exe, data_a, data_b, procs, vm, guest })
    }

    fn show(&mut self, pause: bool) -> Result<()> {
        let t = Instant::now();
        let image = guest_image::build_guest_image(Path::new(guest_image::DEFAULT_CACHE))?;
        println!("-- guest image ready in {:.1} s: {} + {}", t.elapsed().as_secs_f64(), image.kernel.display(), image.initrd.display());
        self.move_image()?;
        let t = Instant::now();
        self.vm.start(&self.data_a, &self.guest, self.cfg, &image).context("starting the demo guest in site a")?;
        let ready = self.vm.wait_line(&self.data_a, "ferry-ready", Duration::from_secs(180))?;
        let addr = self.guest.addr(self.cfg)?;
        println!("-- guest demo1 ({} MiB, its 1 GiB disk the image above) started by site a's agent under TCG: ready {:.1} s later, address {addr}", self.guest.memory_mib, t.elapsed().as_secs_f64());
        println!("   {ready}");
        self.probe_a_while(addr.to_string())?;
        println!("-- the guest's heartbeat on its serial console:");
        for hb in self.heartbeats(&self.data_a).iter().rev().take(3).rev() {
            println!("   {hb}");
        }
        let target = SocketAddr::new(addr.into(), 7);
        println!("-- moving the running guest and its disk from site a to site b (ferry vm migrate) while site client probes it every 10 ms");
        self.live_move(target, (&self.data_a, "a"), (&self.data_b, "b"))?;
        println!("-- and back to site a, which still holds the pages it sent and the disk it had: most travel as references");
        std::thread::sleep(Duration::from_secs(2));
        self.live_move(target, (&self.data_b, "b"), (&self.data_a, "a"))?;
        println!("-- WAN link counters:");
        print_status(&lab::status(&self.cfg.name)?);
        if pause {
            println!("-- paused: try `ferry lab exec --lab {} client -- ping {addr}`; press Enter to tear down", self.cfg.name);
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
        }
        self.vm.stop(&self.data_a);
        self.procs.stop_agents();
        Ok(())
    }

    fn heartbeats(&self, data: &Path) -> Vec<String> {
        self.vm.console(data).unwrap_or_default().into_iter().filter(|l| heartbeat::parse(l).is_some()).collect()
    }

    fn probe_a_while(&self, addr: String) -> Result<()> {
        println!("-- probing the guest's UDP echo from site client (100 ms away) every 10 ms for 3 s");
        let argv: Vec<String> = [self.exe.to_string_lossy().as_ref(), "lab", "probe", &format!("{addr}:7"), "--duration", "3s", "--json"].iter().map(|s| s.to_string()).collect();
        let out = lab::command_in_site(&self.cfg.name, "client", &argv)?.output()?;
        anyhow::ensure!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
        let r: probe::ProbeReport = serde_json::from_slice(&out.stdout).context("probe output")?;
        print!("   ");
        print_probe(&r);
        anyhow::ensure!(r.received > 0, "the guest did not answer the probe");
        Ok(())
    }

    /// One live migration, measured and explained.
    fn live_move(&self, target: SocketAddr, from: (&Path, &str), to: (&Path, &str)) -> Result<()> {
        let spec = MoveSpec { lab: self.cfg, vm: &self.vm, from, to, probe_target: target, timeout: Duration::from_secs(120), hold: Duration::from_secs(3) };
        let mv = measure::ferry_move(&spec, &[])?;
        let m = mv.migrated.with_context(|| format!("migrating the guest from {} to {}", from.1, to.1))?;
        let s = &m.summary;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "   moved in {:.2} s · QEMU's downtime {} ms · {} connections, RTT {:.1} ms, {}",
            m.seconds,
            s["qemu_downtime_ms"].as_f64().map_or("-".into(), |d| format!("{d:.0}")),
            n("connections"),
            s["rtt_ms"].as_f64().unwrap_or(0.0),
            if s["encrypted"].as_bool() == Some(true) { "mutual TLS" } else { "UNENCRYPTED" }
        );
        let wire = mv.seen.wire_forward + mv.seen.wire_back;
        println!(
            "   QEMU's stream {:.1} MB → on the WAN {:.1} MB ({:.1} %, both directions, as the lab's link counted it)",
            mb(n("stream_bytes")),
            mb(wire),
            100.0 * wire as f64 / n("stream_bytes").max(1) as f64
        );
        println!("   pages: {} sent, {} by reference, {} from the moved disk, {} zero", n("pages_sent"), n("pages_referenced"), n("pages_from_disk"), n("pages_zero"));
        let d = &s["disks"];
        if d.is_object() {
            let dn = |k: &str| d[k].as_u64().unwrap_or(0);
            println!(
                "   disk: {:.0} MB · bulk pass {:.2} s sent {:.1} MB (the rest the destination held) · {} rounds of the guest's writes, {:.1} MB · the last {:.2} MB in {:.0} ms paused",
                mb(dn("bytes")),
                d["bulk_seconds"].as_f64().unwrap_or(0.0),
                mb(dn("bulk_sent")),
                dn("rounds"),
                mb(dn("dirty_bytes")),
                mb(dn("final_bytes")),
                d["final_ms"].as_f64().unwrap_or(0.0)
            );
        }
        match &mv.seen.probe {
            Ok(r) => println!(
                "   the client saw: longest gap {} · lost {} of {} probes ({} ms at 10 ms each)",
                r.longest_gap_ms.map_or("-".into(), |g| format!("{g:.0} ms")),
                r.lost,
                r.sent,
                r.lost * 10
            ),
            Err(e) => println!("   the probe failed: {e:#}"),
        }
        println!("   heartbeat at {} ({}):", to.1, mv.check.why);
        for hb in self.heartbeats(to.0).iter().rev().take(3).rev() {
            println!("   {hb}");
        }
        anyhow::ensure!(mv.check.ok, "the guest did not run on at {}: {}", to.1, mv.check.why);
        Ok(())
    }

    /// Site agents move a disk image to site b, then its newer version: the second move sends
    /// only the changed blocks. The image then changes a little more and becomes the guest's
    /// disk, so b holds an older copy of it.
    fn move_image(&self) -> Result<()> {
        println!("-- moving a disk image from site a to site b over mutual TLS 1.3");
        let image = disk_path(&self.data_a);
        std::fs::create_dir_all(image.parent().unwrap())?;
        ferry_lab::synthetic_image::write_image(&image, DISK, 1)?;
        println!("   first move: a 1 GiB image (text-like, random and sparse blocks) that site b does not have");
        self.send(&image)?;
        let changed = ferry_lab::synthetic_image::change_blocks(&image, 16, 2)?;
        println!("   second move: a newer version, {} MiB of its blocks rewritten; b holds the older one", changed >> 20);
        self.send(&image)?;
        let same = Command::new("cmp").arg("-s").arg(&image).arg(disk_path(&self.data_b)).status()?.success();
        anyhow::ensure!(same, "the image at site b differs from the source");
        println!("   site b's copy is byte-equal to the source");
        let changed = ferry_lab::synthetic_image::change_blocks(&image, 64, 3)?;
        println!("   the image changes again ({} MiB) and becomes the demo guest's disk: b holds an older copy", changed >> 20);
        Ok(())
    }

    fn send(&self, image: &Path) -> Result<()> {
        let argv: Vec<String> = [self.exe.to_str().unwrap(), "image", "send", image.to_str().unwrap(), "--to", "b", "--as", DISK_OBJECT, "--data", self.data_a.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let st = lab::command_in_site(&self.cfg.name, "a", &argv)?.status()?;
        anyhow::ensure!(st.success(), "ferry image send failed");
        Ok(())
    }
}
