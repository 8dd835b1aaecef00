//! Bringing a lab up and down: namespaces, the guest bridge in each site, the forwarder process,
//! the guest segment stretched across the sites (`stretch`).
//! Everything made is recorded in the lab's state directory first, so `down` removes exactly
//! that — also after a crash half-way through `up` or of the forwarder.
use crate::control::{self, LabStatus, Request};
use crate::stretch;
use crate::sys::{self, ip_in, run};
use crate::topology::{LabConfig, Site};
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The bridge in each site that guests' taps join.
pub const GUEST_BRIDGE: &str = "br0";
const STATE_ROOT: &str = "/run/ferry/labs";

pub fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(lab)
}

fn control_socket(lab: &str) -> PathBuf {
    state_dir(lab).join("ctl.sock")
}

/// The recorded configuration of a lab that is (or was partly) up.
pub fn load(lab: &str) -> Result<Option<LabConfig>> {
    let path = state_dir(lab).join("config.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn load_running(lab: &str) -> Result<LabConfig> {
    load(lab)?.with_context(|| format!("no lab named {lab:?} is up: start one with `ferry lab up`"))
}

#[derive(Debug, PartialEq, Eq)]
pub enum UpOutcome {
    Created,
    AlreadyUp,
}

pub fn up(cfg: &LabConfig, ferry_exe: &Path) -> Result<UpOutcome> {
    sys::require_root("ferry lab up")?;
    if let Some(existing) = load(&cfg.name)? {
        if &existing == cfg && forwarder_pid(&cfg.name).is_some() && all_namespaces_present(cfg) && stretch::joined(cfg) {
            return Ok(UpOutcome::AlreadyUp);
        }
        tracing::info!(lab = %cfg.name, "replacing the lab's previous state");
        down(&cfg.name)?;
    }
    let dir = state_dir(&cfg.name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(cfg)?)?;
    let result = create_sites(cfg).and_then(|_| start_forwarder(cfg, ferry_exe)).and_then(|_| stretch::join(cfg));
    if let Err(e) = result {
        let _ = down(&cfg.name);
        return Err(e);
    }
    Ok(UpOutcome::Created)
}

fn all_namespaces_present(cfg: &LabConfig) -> bool {
    cfg.sites.iter().all(|s| sys::netns_exists(&cfg.namespace(s)))
}

fn create_sites(cfg: &LabConfig) -> Result<()> {
    for site in &cfg.sites {
        let ns = cfg.namespace(site);
        if !sys::netns_exists(&ns) {
            run(Command::new("ip").args(["netns", "add", &ns]))?;
        }
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        run(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]))?;
        ip_in(&ns, &["link", "add", GUEST_BRIDGE, "address", &bridge_mac(site), "type", "bridge"])?;
        ip_in(&ns, &["addr", "add", &format!("{}/24", site.guest_gateway()), "dev", GUEST_BRIDGE])?;
        ip_in(&ns, &["link", "set", GUEST_BRIDGE, "up"])?;
    }
    Ok(())
}

/// A fixed MAC for a site's bridge: otherwise a bridge takes its lowest port's MAC, so the
/// gateway's MAC would change under the guests whenever a tap (or a migrated guest's tap) is
/// added; and on the stretched segment every site's bridge must differ. 02: locally
/// administered; c6:13 = 198.19, then the site's index: "198.19.<index>.1".
pub fn bridge_mac(site: &Site) -> String {
    format!("02:00:c6:13:{:02x}:01", site.index)
}

/// The forwarder's scheduling group's nice value: ahead of a VM's group (-5) and of the
/// agents' (0).
const FORWARDER_GROUP_NICE: &[u8] = b"-10";

fn start_forwarder(cfg: &LabConfig, ferry_exe: &Path) -> Result<()> {
    let dir = state_dir(&cfg.name);
    let log = std::fs::File::create(dir.join("forwarder.log"))?;
    let mut cmd = Command::new(ferry_exe);
    cmd.args(["lab", "forwarder", "--state"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session: the forwarder outlives the `up` command and its terminal. The session
    // is its scheduling group (autogroup), ranked above everything under test: the emulated
    // links are the network, which no guest or agent on this machine should slow down (the
    // lab saw its threads wait 50 ms for a CPU while agents hashed and compressed).
    unsafe {
        cmd.pre_exec(|| {
            ferry_transfer::priority::own_session_in_group(FORWARDER_GROUP_NICE);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the forwarder")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if control::request(&control_socket(&cfg.name), &Request::Status).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the forwarder exited during start-up ({status}):\n{}", log_tail(&cfg.name));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the forwarder did not become ready within 15 s:\n{}", log_tail(&cfg.name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn log_tail(lab: &str) -> String {
    let text = std::fs::read_to_string(state_dir(lab).join("forwarder.log")).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The forwarder's PID, if the recorded one is still our forwarder.
pub fn forwarder_pid(lab: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state_dir(lab).join("forwarder.pid")).ok()?.trim().parse().ok()?;
    let cmdline = sys::process_cmdline(pid);
    (sys::process_alive(pid) && cmdline.contains("lab forwarder")).then_some(pid)
}

/// Removes what `up` made for this lab, and nothing else. Returns whether there was anything.
pub fn down(lab: &str) -> Result<bool> {
    sys::require_root("ferry lab down")?;
    let Some(cfg) = load(lab)? else { return Ok(false) };
    if let Some(pid) = forwarder_pid(lab) {
        let _ = control::request(&control_socket(lab), &Request::Shutdown);
        if !wait_gone(pid, Duration::from_secs(2)) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_gone(pid, Duration::from_secs(2));
        }
    }
    for site in &cfg.sites {
        let ns = cfg.namespace(site);
        if !sys::netns_exists(&ns) {
            continue;
        }
        stop_processes_in(&ns);
        run(Command::new("ip").args(["netns", "del", &ns]))?;
    }
    std::fs::remove_dir_all(state_dir(lab))?;
    Ok(true)
}

/// Whatever runs inside a site (guests, probes, servers) goes with it: TERM, then KILL.
fn stop_processes_in(ns: &str) {
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let pids = sys::pids_in(ns);
        if pids.is_empty() {
            return;
        }
        for &pid in &pids {
            unsafe { libc::kill(pid, signal) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|&p| sys::process_alive(p) && !is_zombie(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while sys::process_alive(pid) && !is_zombie(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

pub fn status(lab: &str) -> Result<LabStatus> {
    load_running(lab)?;
    let resp = control::request(&control_socket(lab), &Request::Status)
        .with_context(|| format!("lab {lab:?} is recorded but its forwarder is not running (crashed?): run `ferry lab down --lab {lab}` then `ferry lab up`"))?;
    Ok(resp.status.expect("status answer carries status"))
}

pub fn send(lab: &str, req: &Request) -> Result<()> {
    load_running(lab)?;
    control::request(&control_socket(lab), req)?;
    Ok(())
}

/// The command that runs `argv` inside a site's namespace.
pub fn command_in_site(lab: &str, site: &str, argv: &[String]) -> Result<Command> {
    let cfg = load_running(lab)?;
    let ns = cfg.namespace(cfg.site(site)?);
    if argv.is_empty() {
        bail!("nothing to run: give a command after --");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns]).args(argv);
    Ok(cmd)
}
