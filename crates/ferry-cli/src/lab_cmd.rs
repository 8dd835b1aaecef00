//! `ferry lab …` and `ferry demo`.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_lab::control::{LabStatus, Request};
use ferry_lab::lab::{self, UpOutcome};
use ferry_lab::link::LinkParams;
use ferry_lab::tamper::TamperRule;
use ferry_lab::topology::{LabConfig, CLIENT_SITE};
use ferry_lab::units::{self, parse_duration, parse_loss, parse_queue, parse_rate_bps};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

pub const DEFAULT_LAB: &str = "ferry";

#[derive(Args)]
pub struct LabArgs {
    /// Which lab (labs of different names coexist; namespaces are named LAB-SITE).
    #[arg(long, global = true, default_value = DEFAULT_LAB)]
    lab: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the sites and links (idempotent: an identical lab that is up is left as it is).
    /// The guest segments of all sites but `client` are stretched into one over VXLAN across
    /// the emulated WAN, so a guest keeps its address (and gateway) when it runs in another site.
    Up(UpArgs),
    /// Remove every namespace, device and process the lab made, and nothing else.
    Down,
    /// Per-direction link counters: packets, bytes, drops, queue depth.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a site: `ferry lab exec a -- ping 198.18.0.2`.
    Exec {
        site: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Cut or restore a link: `ferry lab link a-b down`.
    Link { link: String, state: LinkState },
    /// Alter one payload byte of a TCP flow in flight, fixing the TCP checksum (an active attacker).
    Tamper(TamperArgs),
    /// Build (or find cached) the lab's guest images: the tiny bootable guest, and with --disk
    /// the realistic Debian disk image in an older and a newer version.
    Image(ImageArgs),
    /// Probe a UDP echo service every INTERVAL and report replies, RTT and the longest gap.
    Probe(ProbeArgs),
    /// The WAN emulator process (started by `up`).
    #[command(hide = true)]
    Forwarder {
        #[arg(long)]
        state: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LinkState {
    Up,
    Down,
}

#[derive(Args, Clone)]
pub struct LinkDefaults {
    /// Round-trip time of every link (each direction gets half).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    rtt: std::time::Duration,
    /// Serialisation rate of every link, per direction.
    #[arg(long, default_value = "1gbit", value_parser = parse_rate_bps)]
    rate: u64,
    /// Random loss per direction.
    #[arg(long, default_value = "0%", value_parser = parse_loss)]
    loss: f64,
    /// Delay variation (uniform ±, never reordering).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    jitter: std::time::Duration,
    /// Drop-tail queue: bdp, a packet count (1000p) or a drain time (50ms).
    #[arg(long, default_value = "bdp", value_parser = parse_queue)]
    queue: units::QueueLimit,
}

impl LinkDefaults {
    fn params(&self) -> LinkParams {
        LinkParams { rtt: self.rtt, rate_bps: self.rate, loss: self.loss, jitter: self.jitter, queue: self.queue }
    }
}

#[derive(Args)]
struct UpArgs {
    /// The sites (besides the probe site `client`).
    #[arg(long, value_delimiter = ',', default_value = "a,b")]
    sites: Vec<String>,
    /// Leave out the `client` probe site.
    #[arg(long)]
    no_client: bool,
    #[command(flatten)]
    defaults: LinkDefaults,
    /// Per-link settings, e.g. `--link a-b:rtt=120ms,rate=1gbit,loss=0.1%`.
    #[arg(long = "link")]
    links: Vec<String>,
}

#[derive(Args)]
struct TamperArgs {
    /// Direction FROM-TO whose packets are altered.
    link: String,
    #[arg(long)]
    dport: Option<u16>,
    #[arg(long)]
    sport: Option<u16>,
    /// Payload bytes of the flow to let through first.
    #[arg(long, default_value_t = 0)]
    after_bytes: u64,
    /// XOR mask for the altered byte (decimal or 0x hex, non-zero).
    #[arg(long, default_value = "0x01", value_parser = parse_xor_mask)]
    xor: u8,
}

#[derive(Args)]
struct ImageArgs {
    /// Where images are cached.
    #[arg(long, default_value = ferry_lab::guest_image::DEFAULT_CACHE)]
    cache: PathBuf,
    /// Also build the 4 GiB Debian disk image and its newer version (needs the package mirror).
    #[arg(long)]
    disk: bool,
}

#[derive(Args)]
struct ProbeArgs {
    /// ADDRESS:PORT of a UDP echo service.
    target: std::net::SocketAddr,
    /// Probe from inside this site (default: where ferry runs).
    #[arg(long)]
    from: Option<String>,
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    interval: std::time::Duration,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: std::time::Duration,
    #[arg(long)]
    json: bool,
}


fn parse_xor_mask(text: &str) -> Result<u8> {
    let v = match text.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .with_context(|| format!("xor mask {text:?}: expected a byte such as 0x20 or 32"))?;
    anyhow::ensure!(v != 0, "xor mask 0 would change nothing");
    Ok(v)
}

pub fn lab_config(name: &str, sites: &[String], with_client: bool, params: LinkParams, links: &[String]) -> Result<LabConfig> {
    let mut all = sites.to_vec();
    if with_client && !all.iter().any(|s| s == CLIENT_SITE) {
        all.push(CLIENT_SITE.into());
    }
    LabConfig::new(name, &all, params, links)
}

pub fn run(args: LabArgs) -> Result<()> {
    let name = args.lab;
    match args.command {
        LabCommand::Up(up) => {
            let cfg = lab_config(&name, &up.sites, !up.no_client, up.defaults.params(), &up.links)?;
            let exe = std::env::current_exe()?;
            match lab::up(&cfg, &exe)? {
                UpOutcome::Created => println!("lab {name} is up"),
                UpOutcome::AlreadyUp => println!("lab {name} is already up with this configuration"),
            }
            print_sites(&cfg);
        }
        LabCommand::Down => {
            if lab::down(&name)? {
                println!("lab {name} is down");
            } else {
                println!("no lab named {name} is up: nothing to do");
            }
        }
        LabCommand::Status { json } => {
            let status = lab::status(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        LabCommand::Exec { site, command } => {
            ferry_lab::sys::require_root("ferry lab exec")?;
            let err = lab::command_in_site(&name, &site, &command)?.exec();
            return Err(err).context("running the command in the site");
        }
        LabCommand::Link { link, state } => {
            let up = matches!(state, LinkState::Up);
            lab::send(&name, &Request::SetLink { link: link.clone(), up })?;
            println!("link {link} is {}", if up { "up" } else { "down" });
        }
        LabCommand::Tamper(t) => {
            let rule = TamperRule { link: t.link.clone(), src_port: t.sport, dst_port: t.dport, after_bytes: t.after_bytes, xor: t.xor };
            lab::send(&name, &Request::Tamper(rule))?;
            println!("armed: the first TCP payload byte on {} after {} bytes will be XORed with {:#04x}", t.link, t.after_bytes, t.xor);
        }
        LabCommand::Image(args) => image(&args)?,
        LabCommand::Probe(args) => probe(&name, args)?,
        LabCommand::Forwarder { state } => ferry_lab::forwarder::run(&state)?,
    }
    Ok(())
}

fn image(args: &ImageArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let guest = ferry_lab::guest_image::build_guest_image(&args.cache)?;
    println!("guest kernel  {} ({})", guest.kernel.display(), guest.kernel_version);
    println!("guest initrd  {} ({:.1} s)", guest.initrd.display(), t.elapsed().as_secs_f64());
    if args.disk {
        let spec = ferry_lab::disk_image::DiskImageSpec { cache_dir: args.cache.clone(), ..Default::default() };
        let disks = ferry_lab::disk_image::build_disk_images(&spec)?;
        println!("disk older    {}", disks.older.display());
        println!("disk newer    {}", disks.newer.display());
        println!("{}", serde_json::to_string_pretty(&disks.report)?);
    }
    Ok(())
}

fn probe(lab_name: &str, args: ProbeArgs) -> Result<()> {
    if let Some(site) = &args.from {
        ferry_lab::sys::require_root("ferry lab probe --from")?;
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        let mut argv = vec![exe, "lab".into(), "probe".into(), args.target.to_string()];
        argv.extend(["--interval".into(), units::format_duration(args.interval), "--duration".into(), units::format_duration(args.duration)]);
        if args.json {
            argv.push("--json".into());
        }
        let err = lab::command_in_site(lab_name, site, &argv)?.exec();
        return Err(err).context("running the probe in the site");
    }
    let r = ferry_lab::probe::run_probe(args.target, args.interval, args.duration)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_probe(&r);
    }
    Ok(())
}

pub fn print_probe(r: &ferry_lab::probe::ProbeReport) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} ms"));
    println!(
        "probe {}: sent {} received {} lost {} · rtt median {} max {} · longest gap {}",
        r.target, r.sent, r.received, r.lost, ms(r.rtt_median_ms), ms(r.rtt_max_ms), ms(r.longest_gap_ms)
    );
}

fn print_sites(cfg: &LabConfig) {
    for s in &cfg.sites {
        println!("  site {:<8} namespace {:<16} wan {:<12} guests {}/24", s.name, cfg.namespace(s), s.wan_addr(), s.guest_subnet());
    }
    let stretched: Vec<_> = ferry_lab::stretch::stretched_sites(cfg).iter().map(|s| s.name.as_str()).collect();
    if stretched.len() >= 2 {
        println!(
            "  guest segments of {} stretched into one: VXLAN {} over the WAN between endpoints 198.18.1.<site index>",
            stretched.join(", "),
            ferry_lab::stretch::VNI
        );
    }
    for l in &cfg.links {
        let p = &l.params;
        println!(
            "  link {}-{}: rtt {} rate {} loss {}% jitter {} queue {} B",
            l.a,
            l.b,
            units::format_duration(p.rtt),
            units::format_rate(p.rate_bps),
            p.loss * 100.0,
            units::format_duration(p.jitter),
            p.queue_limit_bytes()
        );
    }
}

pub fn print_status(s: &LabStatus) {
    println!("lab {} — forwarder pid {}, up {:.0} s", s.lab, s.forwarder_pid, s.uptime_secs);
    println!(
        "{:<18} {:>4} {:>10} {:>14} {:>10} {:>8} {:>8} {:>8} {:>16}",
        "direction", "up", "packets", "bytes", "delivered", "lost", "q-drops", "cut", "queue pkts/bytes"
    );
    for d in &s.directions {
        println!(
            "{:<18} {:>4} {:>10} {:>14} {:>10} {:>8} {:>8} {:>8} {:>16}",
            format!("{}→{}", d.from, d.to),
            if d.up { "yes" } else { "CUT" },
            d.packets,
            d.bytes,
            d.delivered_packets,
            d.drops_loss,
            d.drops_queue,
            d.drops_down,
            format!("{}/{}", d.queue_packets, d.queue_bytes)
        );
    }
}
