//! A VM run by the ferry agents of a lab (`ferry vm start|console|list|migrate|stop` against a
//! site's data directory): what the live benchmark and the demo drive.
use crate::sites::output_with_timeout;
use anyhow::{bail, Context, Result};
use ferry_lab::guest::LabGuestSpec;
use ferry_lab::guest_image::GuestImage;
use ferry_lab::topology::LabConfig;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct SiteVm {
    pub exe: PathBuf,
    pub name: String,
    /// Raw disks the spec gives the VM (virtio, in this order), as paths at the starting site.
    pub disks: Vec<PathBuf>,
    /// Flags every `ferry vm migrate` of this VM gets (e.g. `--disks-first`).
    pub migrate_flags: Vec<String>,
}

/// What `ferry vm migrate --json` printed, and how long the command took.
pub struct Migrated {
    pub summary: serde_json::Value,
    pub seconds: f64,
}

impl SiteVm {
    pub fn new(exe: &Path, name: &str) -> SiteVm {
        SiteVm { exe: exe.to_path_buf(), name: name.to_string(), disks: Vec::new(), migrate_flags: Vec::new() }
    }

    fn vm(&self, data: &Path, args: &[&str], limit: Duration) -> Result<String> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("vm").args(args).arg("--data").arg(data);
        let out = output_with_timeout(&mut cmd, limit).with_context(|| format!("ferry vm {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("ferry vm {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes the VM's spec for a guest homed on site a's segment and starts it with the agent
    /// whose data directory is `data`.
    pub fn start(&self, data: &Path, spec: &LabGuestSpec, lab: &LabConfig, image: &GuestImage) -> Result<()> {
        let launch = spec.launch(lab, image)?;
        let mut toml = spec_toml(&self.name, spec.memory_mib, &image.kernel, &image.initrd, &launch.append, &launch.mac);
        for d in &self.disks {
            toml.push_str(&format!("[[disks]]\npath = \"{}\"\n", d.display()));
        }
        std::fs::create_dir_all(data)?;
        let path = data.join(format!("{}.toml", self.name));
        std::fs::write(&path, toml)?;
        self.vm(data, &["start", path.to_str().unwrap()], Duration::from_secs(60))?;
        Ok(())
    }

    pub fn console(&self, data: &Path) -> Result<Vec<String>> {
        Ok(self.vm(data, &["console", &self.name, "--lines", "400"], Duration::from_secs(10))?.lines().map(String::from).collect())
    }

    /// Waits for a console line starting with `prefix`.
    pub fn wait_line(&self, data: &Path, prefix: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.console(data).unwrap_or_default();
            if let Some(l) = lines.iter().find(|l| l.starts_with(prefix)) {
                return Ok(l.clone());
            }
            if Instant::now() > deadline {
                bail!("VM {} did not print {prefix:?} within {} s; console:\n{}", self.name, within.as_secs(), tail(&lines, 15));
            }
            if self.state(data).as_deref() != Some("running") {
                bail!("VM {} is {:?} before printing {prefix:?}; console:\n{}", self.name, self.state(data), tail(&lines, 15));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// QEMU's run state at the site, if the site runs the VM.
    pub fn state(&self, data: &Path) -> Option<String> {
        let out = self.vm(data, &["list", "--json"], Duration::from_secs(10)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.as_array()?.iter().find(|x| x["name"] == self.name.as_str()).and_then(|x| x["state"].as_str().map(String::from))
    }

    /// `ferry vm migrate NAME --to TO --json` from the site whose data directory is `data`.
    pub fn migrate(&self, data: &Path, to: &str, limit: Duration) -> Result<Migrated> {
        let started = Instant::now();
        let mut args = vec!["migrate", &self.name, "--to", to, "--json"];
        args.extend(self.migrate_flags.iter().map(String::as_str));
        let out = self.vm(data, &args, limit)?;
        let seconds = started.elapsed().as_secs_f64();
        let summary = serde_json::from_str(out.trim()).with_context(|| format!("the migration's summary: {out:?}"))?;
        Ok(Migrated { summary, seconds })
    }

    pub fn stop(&self, data: &Path) {
        let _ = self.vm(data, &["stop", &self.name, "--force"], Duration::from_secs(20));
    }
}

/// The TOML spec `ferry vm start` reads.
pub fn spec_toml(name: &str, memory_mib: u32, kernel: &Path, initrd: &Path, append: &str, mac: &str) -> String {
    format!(
        "name = \"{name}\"\nmemory_mib = {memory_mib}\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\nappend = \"{append}\"\n[[nics]]\nbridge = \"{}\"\nmac = \"{mac}\"\n",
        kernel.display(),
        initrd.display(),
        ferry_lab::lab::GUEST_BRIDGE
    )
}

pub fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_spec_the_agent_reads() {
        let t = spec_toml("g1", 1024, Path::new("/k"), Path::new("/i"), "console=ttyS0 ferry.mem=512M", "52:54:00:12:01:0a");
        assert!(t.contains("name = \"g1\"\nmemory_mib = 1024\naccel = \"tcg\""), "{t}");
        assert!(t.contains("append = \"console=ttyS0 ferry.mem=512M\""), "{t}");
        assert!(t.contains("[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:12:01:0a\""), "{t}");
    }
}
