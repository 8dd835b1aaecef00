//! Finding a usable QEMU and starting lab guests inside a site.
use crate::lab::GUEST_BRIDGE;
use crate::sys::{ip_in, run};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// QEMU 7.x corrupts TCG guests that dirty memory during pre-copy; 10.x is what ferry targets.
pub const MIN_QEMU_MAJOR: u32 = 10;
const INSTALL_HINT: &str = "run scripts/install-deps.sh (it installs qemu-system-x86 10.x from bookworm-backports)";

/// The QEMU binary: `FERRY_QEMU` if set, else `qemu-system-x86_64` on PATH.
pub fn qemu_binary() -> String {
    std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub text: String,
}

/// Checks that QEMU is installed and new enough, naming what to do if not.
pub fn check_qemu() -> Result<QemuVersion> {
    let bin = qemu_binary();
    let out = match Command::new(&bin).arg("--version").output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("QEMU is not installed ({bin} not found): {INSTALL_HINT}"),
        Err(e) => return Err(e).with_context(|| format!("running {bin} --version")),
    };
    let text = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    let v = parse_version(&text).with_context(|| format!("cannot read QEMU's version from {text:?}"))?;
    if v.major < MIN_QEMU_MAJOR {
        bail!(
            "QEMU {}.{} is too old: ferry needs QEMU ≥ {MIN_QEMU_MAJOR} (7.x corrupts TCG guests that dirty memory during pre-copy); {INSTALL_HINT}",
            v.major,
            v.minor
        );
    }
    Ok(v)
}

fn parse_version(text: &str) -> Option<QemuVersion> {
    let rest = text.split("version ").nth(1)?;
    let mut nums = rest.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    Some(QemuVersion { major: nums.next()?.parse().ok()?, minor: nums.next()?.parse().ok()?, text: text.to_string() })
}

/// How to start one lab guest.
#[derive(Clone, Debug)]
pub struct GuestLaunch {
    pub name: String,
    /// Namespace of the site it runs in.
    pub namespace: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Tap device on the site's guest bridge, and the NIC's MAC.
    pub tap: String,
    pub mac: String,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub extra_args: Vec<String>,
}

impl GuestLaunch {
    /// Creates the tap on the site's bridge and starts QEMU (TCG) in the site.
    pub fn spawn(&self) -> Result<Child> {
        check_qemu()?;
        let _ = ip_in(&self.namespace, &["link", "del", &self.tap]);
        ip_in(&self.namespace, &["tuntap", "add", &self.tap, "mode", "tap"])?;
        ip_in(&self.namespace, &["link", "set", &self.tap, "master", GUEST_BRIDGE, "up"])?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespace, &qemu_binary()])
            .args(["-name", &self.name, "-accel", "tcg", "-machine", "pc", "-cpu", "max"])
            .args(["-m", &format!("{}M", self.memory_mib), "-smp", &self.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.append])
            .args(["-serial", &format!("file:{}", self.serial_log.display())])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", self.qmp_socket.display())])
            .args(["-netdev", &format!("tap,id=net0,ifname={},script=no,downscript=no", self.tap)])
            .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={}", self.mac)])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Scheduled as ferry's agent schedules the VMs it runs, so that the methods compared
        // run their guests alike.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                ferry_transfer::priority::own_session_in_group(ferry_transfer::priority::VM_GROUP_NICE);
                Ok(())
            });
        }
        cmd.spawn().context("starting QEMU")
    }
}

/// Lines the guest has written to its serial console so far.
pub fn serial_lines(log: &Path) -> Vec<String> {
    std::fs::read(log).map(|b| String::from_utf8_lossy(&b).lines().map(String::from).collect()).unwrap_or_default()
}

/// Removes a guest's tap (QEMU's exit does not).
pub fn remove_tap(namespace: &str, tap: &str) {
    let _ = run(Command::new("ip").args(["-n", namespace, "link", "del", tap]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_version_lines() {
        let v = parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)").unwrap();
        assert_eq!((v.major, v.minor), (10, 0));
        let old = parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)").unwrap();
        assert_eq!((old.major, old.minor), (7, 2));
        assert!(parse_version("something else").is_none());
    }
}
