//! Thin wrappers over the kernel interfaces the lab needs: network namespaces, TUN devices,
//! and running `ip`.
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

pub fn require_root(what: &str) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, TUN devices): run it as root, e.g. with sudo");
    }
    Ok(())
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS args…`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

pub fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

pub fn netns_exists(ns: &str) -> bool {
    Path::new(&netns_path(ns)).exists()
}

/// Opens a TUN device named `ifname` inside namespace `ns`. `setns` changes only the calling
/// thread's namespace, so the work happens on a short-lived thread; the returned descriptor
/// keeps working from any thread.
pub fn open_tun_in(ns: &str, ifname: &str) -> Result<OwnedFd> {
    let ns = ns.to_string();
    let ifname = ifname.to_string();
    std::thread::spawn(move || -> Result<OwnedFd> {
        let nsfile = File::open(netns_path(&ns)).with_context(|| format!("namespace {ns} is missing"))?;
        if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {ns}: {}", std::io::Error::last_os_error());
        }
        open_tun(&ifname)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("TUN opener thread panicked"))?
}

fn open_tun(ifname: &str) -> Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("open /dev/net/tun: {} (is the tun module loaded?)", std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // Layer 3, no packet-information header, no offloads: the forwarder sees every packet as
    // the wire would carry it.
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &req) } != 0 {
        bail!("TUNSETIFF {ifname}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads one packet; retries on EINTR.
pub fn read_packet(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn write_packet(fd: &OwnedFd, pkt: &[u8]) -> std::io::Result<()> {
    let n = unsafe { libc::write(fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Timer slack makes a sleeping thread wake up to 50 µs late by default; the delay line wants
/// its packets out on time.
pub fn tighten_timer_slack() {
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
}

/// PIDs of every process inside a namespace.
pub fn pids_in(ns: &str) -> Vec<i32> {
    run(Command::new("ip").args(["netns", "pids", ns]))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

pub fn process_alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The process's command line, to be sure a PID from a file still names our process.
pub fn process_cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}
