//! `ferry pki …`, `ferry agent`, `ferry image send`.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::config::{control_socket, parse_peer, AgentConfig};
use ferry_agent::control::{self, Event, Request, SendRequest, SendSummary};
use ferry_agent::session::{self, Identity};
use ferry_lab::units::{format_rate, parse_rate_bps};
use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub const DEFAULT_DATA: &str = "/var/lib/ferry";
pub const DEFAULT_PKI: &str = "/var/lib/ferry/pki";

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create the deployment's certificate authority.
    Init {
        #[arg(long, default_value = DEFAULT_PKI)]
        pki: PathBuf,
        #[arg(long, default_value = "ferry sites CA")]
        name: String,
    },
    /// Issue a site's certificate and key, signed by the CA.
    Issue {
        site: String,
        #[arg(long, default_value = DEFAULT_PKI)]
        pki: PathBuf,
    },
}

pub fn pki(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init { pki, name } => {
            ferry_pki::init_ca(&pki, &name)?;
            println!("CA created in {}", pki.display());
        }
        PkiCommand::Issue { site, pki } => {
            let path = ferry_pki::issue_site(&pki, &site)?;
            println!("site {site}: certificate {}", path.display());
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct AgentArgs {
    /// This site's name (its certificate must prove it).
    #[arg(long)]
    site: String,
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// Where received objects, staging files and the content store live.
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    #[arg(long, default_value = DEFAULT_PKI)]
    pki: PathBuf,
    /// Another site's agent: SITE=ADDR:PORT (repeatable).
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(String, SocketAddr)>,
    /// The WAN rate to plan sessions for (connections = bandwidth-delay product / window).
    #[arg(long, default_value = "1gbit", value_parser = parse_rate_bps)]
    link_rate: u64,
    /// Debugging only: no TLS. Never use on a real network.
    #[arg(long, hide = true)]
    insecure_plaintext: bool,
    /// Do not let new connections to a peer measure the path with filler before their first
    /// session: saves up to a few bandwidth-delay products of WAN traffic per reconnect, and
    /// the first session after it starts in TCP slow start.
    #[arg(long)]
    no_path_probe: bool,
}

pub fn agent(args: AgentArgs) -> Result<()> {
    let cfg = Arc::new(AgentConfig {
        site: args.site,
        listen: args.listen,
        data_dir: args.data,
        pki_dir: args.pki,
        peers: args.peers.into_iter().collect::<BTreeMap<_, _>>(),
        link_rate_bps: args.link_rate,
        insecure_plaintext: args.insecure_plaintext,
        no_path_probe: args.no_path_probe,
    });
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let identity = Arc::new(Identity::load(&cfg)?);
    tracing::info!(site = %cfg.site, data = %cfg.data_dir.display(), link_rate = %format_rate(cfg.link_rate_bps), "agent starting");
    let vms = Arc::new(ferry_agent::vm::Vms::load(&cfg.data_dir));
    let store = Arc::new(std::sync::Mutex::new(ferry_agent::pages::PageStore::open(&cfg.data_dir.join(".ferry/pages"))?));
    let migrations = ferry_agent::migrate::incoming::Shared::new(vms.clone(), store.clone(), cfg.tenant_key()?);
    runtime()?.block_on(async move {
        let warm = ferry_agent::warm::Warm::start(cfg.clone(), identity.clone());
        let agent = Arc::new(control::Agent { cfg: cfg.clone(), identity: identity.clone(), warm, vms, store });
        tokio::select! {
            r = session::serve(cfg.clone(), identity.clone(), migrations) => r,
            r = control::serve(agent) => r,
        }
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

#[derive(Args)]
pub struct StatusArgs {
    /// The local agent's data directory (its control socket lives there).
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    #[arg(long)]
    json: bool,
}

/// `ferry status`: the local agent's peer sites and the connections it keeps ready to each.
pub fn status(a: StatusArgs) -> Result<()> {
    let ev = runtime()?.block_on(control::request(&control_socket(&a.data), &Request::Status, |_| {}))?;
    let Event::Status { peers } = ev else { anyhow::bail!("unexpected answer from the agent") };
    if a.json {
        println!("{}", serde_json::to_string(&peers)?);
        return Ok(());
    }
    for (site, p) in peers {
        let rtt = p.rtt_ms.map_or("unreachable so far".to_string(), |r| format!("RTT {r:.1} ms"));
        let rate = p.rate_mbps.map_or(String::new(), |r| format!(" · path measured at {r:.0} Mbit/s"));
        println!("{site}: {} of {} connections ready · {rtt}{rate}", p.ready, p.wanted);
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Send a disk image (or any file) to another site through the local agent.
    Send(SendArgs),
    /// Add a file already under the local agent's data directory (copied in by other means) to
    /// its content store, so that transfers and moves here find its blocks without hashing it.
    Index {
        /// Path under the data directory.
        object: String,
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
    },
}

#[derive(Args)]
pub struct SendArgs {
    source: PathBuf,
    /// Destination site.
    #[arg(long)]
    to: String,
    /// Path under the destination agent's data directory.
    #[arg(long = "as")]
    dest_path: String,
    /// A base image at the destination (path under its data directory) whose blocks count.
    #[arg(long)]
    base: Option<String>,
    /// The local agent's data directory (its control socket lives there).
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// Fixed block size for disk images.
    #[arg(long, default_value_t = 65536)]
    block: u32,
    /// How to cut the object: `fixed` aligned blocks (disk images: holes skipped, in-place
    /// changes found), `cdc` content-defined chunks (files, where insertions shift data), or
    /// `auto`: fixed for image files and anything sized in whole blocks, else cdc.
    #[arg(long, default_value = "auto", value_parser = ["auto", "fixed", "cdc"])]
    chunking: String,
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Print one machine-readable summary instead of the progress bar.
    #[arg(long)]
    json: bool,
}

pub fn image(cmd: ImageCommand) -> Result<()> {
    let a = match cmd {
        ImageCommand::Send(a) => a,
        ImageCommand::Index { object, data } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            return match rt.block_on(ferry_agent::control::request(&ferry_agent::config::control_socket(&data), &Request::Index { object }, |_| {}))? {
                Event::Ok { message } => {
                    println!("{message}");
                    Ok(())
                }
                Event::Failed { error } => anyhow::bail!("{error}"),
                other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
            };
        }
    };
    let source = std::fs::canonicalize(&a.source).with_context(|| format!("{} does not exist", a.source.display()))?;
    let cdc = match a.chunking.as_str() {
        "fixed" => false,
        "cdc" => true,
        _ => !looks_like_disk_image(&source, a.block)?,
    };
    let req = Request::Send(SendRequest { source, to: a.to, dest_path: a.dest_path, base: a.base, block: a.block, cdc, zstd_level: a.zstd_level, retries: a.retries, live: false, first: Vec::new() });
    let bar = (!a.json).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} scanned · {msg} · ETA {eta}")
                .unwrap(),
        );
        b
    });
    let result = runtime()?.block_on(control::request(&control_socket(&a.data), &req, |ev| {
        let Some(bar) = &bar else { return };
        match ev {
            Event::Started { size, connections, rtt_ms, attempt } => {
                bar.set_length(*size);
                bar.println(format!("attempt {attempt}: {connections} connections, RTT {rtt_ms:.1} ms"));
            }
            Event::Progress { progress: p, wire_sent, seconds } => {
                bar.set_position(p.scanned);
                bar.set_message(format!(
                    "sent {} on the wire ({:.0} Mbit/s) · reused {} · zero {}",
                    human(*wire_sent),
                    *wire_sent as f64 * 8.0 / seconds.max(1e-3) / 1e6,
                    human(p.reused),
                    human(p.zero)
                ));
            }
            Event::Retrying { attempt, error } => bar.println(format!("attempt {attempt} failed: {error}; resuming")),
            _ => {}
        }
    }))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match result {
        Event::Done(s) => {
            if a.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print_summary(&s);
            }
            Ok(())
        }
        Event::Failed { error } => anyhow::bail!("{error}"),
        _ => unreachable!("request returns only a final event"),
    }
}

/// Disk images change in place, in aligned blocks; other files change by insertion too.
fn looks_like_disk_image(path: &std::path::Path, block: u32) -> Result<bool> {
    const IMAGE_EXTENSIONS: [&str; 7] = ["raw", "img", "qcow2", "vmdk", "vhd", "vhdx", "iso"];
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let meta = std::fs::metadata(path)?;
    Ok(IMAGE_EXTENSIONS.contains(&ext.as_str()) || meta.file_type().is_block_device() || (meta.len() > 0 && meta.len() % block as u64 == 0))
}

fn print_summary(s: &SendSummary) {
    let p = &s.progress;
    println!("sent {} → {}:{} ({}) in {:.2} s", s.source.display(), s.to, s.dest_path, human(s.size), s.seconds);
    println!(
        "  on the wire {} ({:.2} % of the image) · chunks sent {} raw → {} compressed · reused at destination {} · holes/zeros {}",
        human(s.wire_sent),
        s.wire_sent as f64 / s.size.max(1) as f64 * 100.0,
        human(p.wanted_raw),
        human(p.sent_payload),
        human(p.reused),
        human(p.zero)
    );
    println!(
        "  {} connections, RTT {:.1} ms, {} attempt(s), {} · verified digest {}",
        s.connections,
        s.rtt_ms,
        s.attempts,
        if s.encrypted { "mutual TLS 1.3" } else { "UNENCRYPTED (debug)" },
        s.digest
    );
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
