//! A lab guest running in a site: booted from the tiny guest image, on the site's bridge, with
//! its serial console in a file and a QMP socket, all under the lab's state directory (so
//! `lab down` removes them with the site).
use crate::guest_image::GuestImage;
use crate::lab::state_dir;
use crate::qemu::{self, GuestLaunch};
use crate::topology::{LabConfig, Site};
use anyhow::{bail, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LabGuestSpec {
    pub name: String,
    pub site: String,
    /// Host part of the guest's address on the site's segment (198.19.<site>.<host>).
    pub host: u8,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Workload settings, as `ferry.key=value` words for the kernel command line.
    pub workload: Vec<String>,
}

impl LabGuestSpec {
    pub fn new(name: &str, site: &str) -> Self {
        LabGuestSpec { name: name.into(), site: site.into(), host: 10, memory_mib: 256, vcpus: 1, workload: vec!["ferry.mem=64M".into(), "ferry.dirty=1M".into()] }
    }
}

pub struct LabGuest {
    child: Child,
    pub name: String,
    pub addr: Ipv4Addr,
    pub namespace: String,
    tap: String,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// From QEMU's start to the workload's `ferry-ready` line.
    pub boot_to_ready: Duration,
}

impl LabGuest {
    /// Boots the guest and waits until its workload has filled its memory and reports ready.
    pub fn boot(lab: &LabConfig, spec: &LabGuestSpec, image: &GuestImage) -> Result<LabGuest> {
        let site: &Site = lab.site(&spec.site)?;
        let namespace = lab.namespace(site);
        let dir = state_dir(&lab.name).join("guests").join(&spec.name);
        std::fs::create_dir_all(&dir)?;
        let addr = Ipv4Addr::new(198, 19, site.index, spec.host);
        let mut append = format!("console=ttyS0 quiet panic=-1 ferry.ip={addr}/24 ferry.gw={}", site.guest_gateway());
        for w in &spec.workload {
            append.push(' ');
            append.push_str(w);
        }
        let launch = GuestLaunch {
            name: spec.name.clone(),
            namespace: namespace.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            append,
            tap: format!("tap-{}", spec.name),
            mac: format!("52:54:00:12:{:02x}:{:02x}", site.index, spec.host),
            serial_log: dir.join("serial.log"),
            qmp_socket: dir.join("qmp.sock"),
            extra_args: vec![],
        };
        let _ = std::fs::remove_file(&launch.serial_log);
        let started = Instant::now();
        let child = launch.spawn()?;
        let mut guest = LabGuest {
            child,
            name: spec.name.clone(),
            addr,
            namespace,
            tap: launch.tap.clone(),
            serial_log: launch.serial_log.clone(),
            qmp_socket: launch.qmp_socket.clone(),
            boot_to_ready: Duration::ZERO,
        };
        guest.wait_for_line("ferry-ready", Duration::from_secs(120))?;
        guest.boot_to_ready = started.elapsed();
        Ok(guest)
    }

    pub fn serial(&self) -> Vec<String> {
        qemu::serial_lines(&self.serial_log)
    }

    /// Waits for a serial line containing `needle`; fails with the console's tail if QEMU exits
    /// or the time runs out.
    pub fn wait_for_line(&mut self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.serial().into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            if let Some(status) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("guest {} exited ({status}) before {needle:?}: {}\nconsole:\n{}", self.name, err.trim(), self.console_tail());
            }
            if Instant::now() > deadline {
                bail!("guest {} did not print {needle:?} within {within:?}; console:\n{}", self.name, self.console_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn console_tail(&self) -> String {
        let lines = self.serial();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The workload's heartbeat lines (`ferry-hb …`) so far.
    pub fn heartbeats(&self) -> Vec<String> {
        self.serial().into_iter().filter(|l| l.starts_with("ferry-hb")).collect()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for LabGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        qemu::remove_tap(&self.namespace, &self.tap);
    }
}
