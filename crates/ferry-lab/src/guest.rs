//! A lab guest running in a site: booted from the tiny guest image, on the site's bridge, with
//! its serial console in a file and a QMP socket, all under the lab's state directory (so
//! `lab down` removes them with the site).
use crate::guest_image::GuestImage;
use crate::lab::state_dir;
use crate::qemu::{self, GuestLaunch};
use crate::stretch;
use crate::topology::{LabConfig, Site, CLIENT_SITE};
use anyhow::{bail, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LabGuestSpec {
    pub name: String,
    /// The site it runs in.
    pub site: String,
    /// The site whose segment its address and gateway are on, when that is not the site it runs
    /// in: a guest that has moved (or is about to) keeps its home address, and the stretched
    /// segment (`stretch`) carries its traffic to and from the home site. `None`: `site`.
    pub home_site: Option<String>,
    /// Host part of the guest's address on its home segment (198.19.<home>.<host>).
    pub host: u8,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Workload settings, as `ferry.key=value` words for the kernel command line.
    pub workload: Vec<String>,
}

impl LabGuestSpec {
    pub fn new(name: &str, site: &str) -> Self {
        LabGuestSpec {
            name: name.into(),
            site: site.into(),
            home_site: None,
            host: 10,
            memory_mib: 256,
            vcpus: 1,
            workload: vec!["ferry.mem=64M".into(), "ferry.dirty=1M".into()],
        }
    }

    /// The site whose subnet and gateway the guest uses; one it can reach from where it runs.
    pub fn home<'a>(&self, lab: &'a LabConfig) -> Result<&'a Site> {
        let site = lab.site(&self.site)?;
        let Some(home) = &self.home_site else { return Ok(site) };
        let home = lab.site(home)?;
        if home.index != site.index && !(stretch::is_stretched(home) && stretch::is_stretched(site)) {
            bail!("guest {}: the {:?} site's segment is not stretched, so a guest cannot run in {:?} with an address of {:?}", self.name, CLIENT_SITE, site.name, home.name);
        }
        Ok(home)
    }

    pub fn addr(&self, lab: &LabConfig) -> Result<Ipv4Addr> {
        Ok(Ipv4Addr::new(198, 19, self.home(lab)?.index, self.host))
    }

    /// The NIC's MAC, made from the address: as unique as the address on the stretched segment
    /// wherever the guest runs, and the same after a move (what the bridges learn to follow).
    pub fn mac(&self, lab: &LabConfig) -> Result<String> {
        Ok(format!("52:54:00:12:{:02x}:{:02x}", self.home(lab)?.index, self.host))
    }

    /// How to start this guest in its site (making its directory for the serial log and QMP
    /// socket): `boot` runs it; a migration's destination can add `-incoming …` to `extra_args`
    /// and spawn it itself.
    pub fn launch(&self, lab: &LabConfig, image: &GuestImage) -> Result<GuestLaunch> {
        let site = lab.site(&self.site)?;
        let home = self.home(lab)?;
        let dir = state_dir(&lab.name).join("guests").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        let mut append = format!("console=ttyS0 quiet panic=-1 ferry.ip={}/24 ferry.gw={}", self.addr(lab)?, home.guest_gateway());
        for w in &self.workload {
            append.push(' ');
            append.push_str(w);
        }
        Ok(GuestLaunch {
            name: self.name.clone(),
            namespace: lab.namespace(site),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            append,
            tap: format!("tap-{}", self.name),
            mac: self.mac(lab)?,
            serial_log: dir.join("serial.log"),
            qmp_socket: dir.join("qmp.sock"),
            extra_args: vec![],
        })
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
        let launch = spec.launch(lab, image)?;
        let (addr, namespace) = (spec.addr(lab)?, launch.namespace.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkParams;
    use crate::units::QueueLimit;

    fn lab() -> LabConfig {
        let params = LinkParams { rtt: Duration::from_millis(10), rate_bps: 1_000_000_000, loss: 0.0, jitter: Duration::ZERO, queue: QueueLimit::Bdp };
        LabConfig::new("t", &["a".into(), "b".into(), "client".into()], params, &[]).unwrap()
    }

    #[test]
    fn a_guest_away_from_home_keeps_its_home_address_and_mac() {
        let lab = lab();
        let mut g = LabGuestSpec::new("g", "b");
        assert_eq!(g.addr(&lab).unwrap(), Ipv4Addr::new(198, 19, 2, 10));
        g.home_site = Some("a".into());
        assert_eq!(g.addr(&lab).unwrap(), Ipv4Addr::new(198, 19, 1, 10));
        assert_eq!(g.mac(&lab).unwrap(), "52:54:00:12:01:0a");
        let mut home = LabGuestSpec::new("h", "a");
        home.home_site = Some("a".into());
        assert_eq!(home.mac(&lab).unwrap(), g.mac(&lab).unwrap(), "the same address is the same NIC, wherever it runs");
    }

    #[test]
    fn the_client_segment_is_not_stretched() {
        let lab = lab();
        let mut g = LabGuestSpec::new("g", "client");
        g.home_site = Some("a".into());
        assert!(g.home(&lab).unwrap_err().to_string().contains("not stretched"));
        g.site = "a".into();
        g.home_site = Some("nowhere".into());
        assert!(g.home(&lab).is_err());
    }
}
