//! The VMs an agent runs: what a VM is (its spec, which travels with it when it migrates) and
//! the QEMU process that runs it. QEMU runs in its own session so that a killed or restarted
//! agent leaves its VMs running; the agent finds them again from their directories.
use crate::qmp::Qmp;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    pub memory_mib: u32,
    #[serde(default)]
    pub accel: Accel,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: String,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Tcg,
    Kvm,
    /// KVM where this host can create a VM, TCG otherwise.
    #[default]
    Auto,
}

/// A NIC on a host bridge, through a tap the agent creates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub bridge: String,
    pub mac: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    #[serde(default = "raw")]
    pub format: String,
    /// A template every site keeps at this path under its data directory (an older version of
    /// the disk, or the image it was cloned from): what a move need not send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

fn raw() -> String {
    "raw".into()
}

impl VmSpec {
    pub fn from_toml(text: &str) -> Result<VmSpec> {
        let spec: VmSpec = toml::from_str(text).context("reading the VM spec")?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<()> {
        let ok = !self.name.is_empty() && self.name.len() <= 32 && self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            bail!("VM name {:?}: use 1–32 of a-z, 0-9 and -", self.name);
        }
        if self.memory_mib < 16 || self.vcpus == 0 {
            bail!("VM {}: memory_mib must be at least 16 and vcpus at least 1", self.name);
        }
        if self.kernel.is_none() && self.disks.is_empty() {
            bail!("VM {}: give a kernel (with initrd/append) or a disk to boot from", self.name);
        }
        for (what, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(p) = p {
                if !p.is_file() {
                    bail!("VM {}: {what} {} does not exist on this site", self.name, p.display());
                }
            }
        }
        for d in &self.disks {
            if !matches!(d.format.as_str(), "raw" | "qcow2") {
                bail!("VM {}: disk {} has format {:?}; ferry runs raw and qcow2", self.name, d.path.display(), d.format);
            }
            if !d.path.is_file() {
                bail!("VM {}: disk {} does not exist on this site", self.name, d.path.display());
            }
        }
        Ok(())
    }
}

/// Where a VM's files live: its spec, QEMU's pid, QMP socket, serial console log.
pub fn vm_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(".ferry/vms").join(name)
}

/// The tap for NIC `index`: interface names are at most 15 bytes, so it is named by a hash.
fn tap_name(vm: &str, index: usize) -> String {
    let h = blake3::hash(vm.as_bytes());
    format!("fy{}n{index}", &h.to_hex()[..8])
}

fn kvm_usable() -> bool {
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") else { return false };
    let fd = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), KVM_CREATE_VM, 0) };
    if fd >= 0 {
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

/// The accelerator QEMU runs `spec` with here.
fn accel(spec: &VmSpec) -> &'static str {
    match spec.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        Accel::Auto if kvm_usable() => "kvm",
        Accel::Auto => "tcg",
    }
}

/// QEMU's command line for `spec`; `incoming` starts it waiting for a migration.
pub fn qemu_argv(spec: &VmSpec, dir: &Path, incoming: bool) -> Vec<String> {
    // Named threads (a vCPU, the migration, the main loop) tell an operator's `top -H` what
    // the VM's QEMU spends its CPU on during a move.
    let mut a: Vec<String> = vec![ferry_qemu(), "-name".into(), format!("{},debug-threads=on", spec.name), "-accel".into(), accel(spec).into()];
    // The machine type resolves to the same versioned type on both sites (same QEMU).
    a.extend(["-machine", "pc", "-cpu", "max", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"].map(String::from));
    a.extend(["-m".into(), format!("{}M", spec.memory_mib), "-smp".into(), spec.vcpus.to_string()]);
    if let Some(k) = &spec.kernel {
        a.extend(["-kernel".into(), k.display().to_string()]);
    }
    if let Some(i) = &spec.initrd {
        a.extend(["-initrd".into(), i.display().to_string()]);
    }
    if !spec.append.is_empty() {
        a.extend(["-append".into(), spec.append.clone()]);
    }
    for (i, d) in spec.disks.iter().enumerate() {
        a.extend(["-drive".into(), format!("file={},format={},if=virtio,id=disk{i},cache=none,aio=threads", d.path.display(), d.format)]);
    }
    for (i, n) in spec.nics.iter().enumerate() {
        a.extend(["-netdev".into(), format!("tap,id=net{i},ifname={},script=no,downscript=no", tap_name(&spec.name, i))]);
        a.extend(["-device".into(), format!("virtio-net-pci,netdev=net{i},mac={}", n.mac)]);
    }
    a.extend(["-serial".into(), format!("file:{}", dir.join("serial.log").display())]);
    a.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display())]);
    if incoming {
        // A second monitor for post-copy's recovery alone (see `incoming::resume_incoming`).
        a.extend(["-chardev".into(), format!("socket,id=ferry-oob,path={},server=on,wait=off", dir.join(OOB_MONITOR).display())]);
        a.extend(["-mon".into(), "chardev=ferry-oob,mode=control".into()]);
        a.extend(["-incoming".into(), "defer".into()]);
    }
    a
}

/// The socket of an incoming QEMU's out-of-band monitor.
pub const OOB_MONITOR: &str = "qmp-oob.sock";

fn ferry_qemu() -> String {
    std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub pid: u32,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, …) or `exited`.
    pub state: String,
    pub memory_mib: u32,
    pub vcpus: u32,
}

struct Vm {
    spec: VmSpec,
    pid: u32,
    /// QEMU serves one QMP client at a time: the agent keeps one connection per VM and takes
    /// turns on it.
    qmp: Arc<tokio::sync::Mutex<Option<Qmp>>>,
}

/// A turn on a VM's QMP connection.
pub struct QmpGuard(tokio::sync::OwnedMutexGuard<Option<Qmp>>);

impl std::ops::Deref for QmpGuard {
    type Target = Qmp;
    fn deref(&self) -> &Qmp {
        self.0.as_ref().expect("connected")
    }
}

impl std::ops::DerefMut for QmpGuard {
    fn deref_mut(&mut self) -> &mut Qmp {
        self.0.as_mut().expect("connected")
    }
}

/// The agent's VMs, by name.
pub struct Vms {
    data_dir: PathBuf,
    vms: Mutex<BTreeMap<String, Vm>>,
}

impl Vms {
    /// Finds the VMs a previous run of the agent left running.
    pub fn load(data_dir: &Path) -> Vms {
        let mut vms = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(data_dir.join(".ferry/vms")) {
            for e in entries.flatten() {
                let dir = e.path();
                let spec = std::fs::read(dir.join("spec.json")).ok().and_then(|b| serde_json::from_slice::<VmSpec>(&b).ok());
                let pid = std::fs::read_to_string(dir.join("pid")).ok().and_then(|p| p.trim().parse::<u32>().ok());
                if let (Some(spec), Some(pid)) = (spec, pid) {
                    if process_alive(pid) {
                        tracing::info!(vm = %spec.name, pid, "found a running VM");
                        vms.insert(spec.name.clone(), Vm { spec, pid, qmp: Arc::default() });
                    }
                }
            }
        }
        Vms { data_dir: data_dir.to_path_buf(), vms: Mutex::new(vms) }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        vm_dir(&self.data_dir, name)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn spec(&self, name: &str) -> Result<VmSpec> {
        match self.vms.lock().unwrap().get(name) {
            Some(vm) => Ok(vm.spec.clone()),
            None => bail!("no VM named {name:?} runs on this site"),
        }
    }

    /// Starts QEMU for `spec` (waiting for a migration if `incoming`) and connects to its QMP.
    pub async fn start(&self, spec: &VmSpec, incoming: bool) -> Result<()> {
        self.start_with_disks(spec, incoming, None).await
    }

    /// As `start`, but QEMU opens its disks at `disks` (files that become the spec's paths
    /// later, by rename): the VM is known by `spec`.
    pub async fn start_with_disks(&self, spec: &VmSpec, incoming: bool, disks: Option<&[PathBuf]>) -> Result<()> {
        let mut opened = spec.clone();
        for (d, p) in opened.disks.iter_mut().zip(disks.unwrap_or_default()) {
            d.path = p.clone();
        }
        opened.validate()?;
        {
            let vms = self.vms.lock().unwrap();
            if let Some(vm) = vms.get(&spec.name) {
                if process_alive(vm.pid) {
                    bail!("a VM named {:?} already runs on this site (pid {})", spec.name, vm.pid);
                }
            }
        }
        let dir = self.dir(&spec.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("spec.json"), serde_json::to_vec_pretty(spec)?)?;
        for (i, nic) in spec.nics.iter().enumerate() {
            let tap = tap_name(&spec.name, i);
            let _ = ip(&["link", "del", &tap]);
            ip(&["tuntap", "add", &tap, "mode", "tap"])?;
            ip(&["link", "set", &tap, "master", &nic.bridge, "up"]).with_context(|| format!("attaching the VM's NIC to bridge {}", nic.bridge))?;
        }
        let argv = qemu_argv(&opened, &dir, incoming);
        let log = std::fs::File::create(dir.join("qemu.log"))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // A QEMU taking in a TCG guest does so without transparent huge pages: QEMU asks for
        // them on guest RAM, and then each page the stream writes first makes the kernel
        // clear 2 MiB, most of it never written in a guest whose memory is half zeros (the
        // destination QEMU spent most of its CPU clearing pages; without them a first move
        // took 2.8-3.1 s against 3.6 s at 0 ms). A KVM guest keeps them: there they make
        // the guest itself faster, for as long as it runs.
        let no_huge_pages = incoming && accel(spec) == "tcg";
        // Its own session: the VM outlives the agent (a restarted agent finds it again). The
        // session is also the VM's scheduling group, which ranks above the site's other work,
        // ferry's own included.
        unsafe {
            cmd.pre_exec(move || {
                if no_huge_pages {
                    libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
                }
                ferry_transfer::priority::own_session_in_group(ferry_transfer::priority::VM_GROUP_NICE);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", argv[0]))?;
        let pid = child.id();
        // Reap it when it exits; the agent learns of the exit from the pid.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        std::fs::write(dir.join("pid"), pid.to_string())?;
        let qmp: Arc<tokio::sync::Mutex<Option<Qmp>>> = Arc::default();
        // Held until connected: QEMU serves one QMP client, and it must be this one.
        let mut slot = qmp.clone().lock_owned().await;
        self.vms.lock().unwrap().insert(spec.name.clone(), Vm { spec: spec.clone(), pid, qmp });
        match Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(20)).await {
            Ok(mut q) => {
                // An incoming VM starts recording once it runs (`incoming::watch_qemu`).
                if !incoming {
                    crate::migrate::disks::record_writes(&mut q, &spec.name, spec.disks.len()).await;
                }
                *slot = Some(q);
                Ok(())
            }
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                self.forget(&spec.name);
                Err(e.context(format!("QEMU for VM {} did not come up: {}", spec.name, log.trim())))
            }
        }
    }

    /// The VM's QMP connection, (re)connected if needed; others wait while it is held.
    pub async fn qmp(&self, name: &str) -> Result<QmpGuard> {
        let (slot, pid) = match self.vms.lock().unwrap().get(name) {
            Some(vm) => (vm.qmp.clone(), vm.pid),
            None => bail!("no VM named {name:?} runs on this site"),
        };
        if !process_alive(pid) {
            bail!("VM {name}'s QEMU (pid {pid}) has exited");
        }
        let mut guard = slot.lock_owned().await;
        if guard.as_ref().is_none_or(|q| q.broken) {
            *guard = None;
            *guard = Some(Qmp::connect(&self.dir(name).join("qmp.sock"), Duration::from_secs(5)).await?);
        }
        Ok(QmpGuard(guard))
    }

    pub async fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<(String, u32, u32, u32)> = self.vms.lock().unwrap().values().map(|v| (v.spec.name.clone(), v.pid, v.spec.memory_mib, v.spec.vcpus)).collect();
        let mut out = Vec::new();
        for (name, pid, memory_mib, vcpus) in vms {
            let state = if !process_alive(pid) {
                "exited".to_string()
            } else {
                match self.qmp(&name).await {
                    Ok(mut q) => q.status().await.unwrap_or_else(|e| format!("unknown ({e:#})")),
                    Err(e) => format!("unknown ({e:#})"),
                }
            };
            out.push(VmInfo { name, pid, state, memory_mib, vcpus });
        }
        out
    }

    /// Stops the VM: an ACPI power-down it has `grace` to honour, then QEMU is told to quit
    /// (at once when `grace` is zero); the VM is forgotten.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<()> {
        let pid = self.vms.lock().unwrap().get(name).map(|v| v.pid).with_context(|| format!("no VM named {name:?} runs on this site"))?;
        if !grace.is_zero() {
            if let Ok(mut q) = self.qmp(name).await {
                let _ = q.execute("system_powerdown", json!({})).await;
            }
            let deadline = std::time::Instant::now() + grace;
            while process_alive(pid) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.kill(name).await;
        Ok(())
    }

    /// Ends QEMU now (QMP `quit`, then SIGKILL) and forgets the VM.
    pub async fn kill(&self, name: &str) {
        let Some(pid) = self.vms.lock().unwrap().get(name).map(|v| v.pid) else { return };
        if process_alive(pid) {
            if let Ok(mut q) = self.qmp(name).await {
                let _ = q.execute("quit", json!({})).await;
            }
            for _ in 0..50 {
                if !process_alive(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if process_alive(pid) {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        self.forget_pid(name, pid);
    }

    fn forget(&self, name: &str) {
        if let Some(pid) = self.pid(name) {
            self.forget_pid(name, pid);
        }
    }

    /// Forgets the VM `name` if it is still the QEMU `pid`: a VM of the same name may have been
    /// started meanwhile (an incoming migration after a failed one), and it is not this one.
    fn forget_pid(&self, name: &str, pid: u32) {
        let mut vms = self.vms.lock().unwrap();
        if vms.get(name).is_none_or(|v| v.pid != pid) {
            return;
        }
        let vm = vms.remove(name).expect("present");
        drop(vms);
        for i in 0..vm.spec.nics.len() {
            let _ = ip(&["link", "del", &tap_name(name, i)]);
        }
        crate::migrate::disk_view::detach_all(&self.dir(name), vm.spec.disks.len());
        let _ = std::fs::remove_file(self.dir(name).join("pid"));
    }

    pub fn names(&self) -> Vec<String> {
        self.vms.lock().unwrap().keys().cloned().collect()
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.vms.lock().unwrap().get(name).map(|v| v.pid)
    }

    /// The last `lines` lines of the VM's serial console.
    pub fn console(&self, name: &str, lines: usize) -> Result<String> {
        self.spec(name)?;
        let log = std::fs::read(self.dir(name).join("serial.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&log);
        let all: Vec<&str> = text.lines().collect();
        Ok(all[all.len().saturating_sub(lines)..].join("\n"))
    }
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_read_from_toml_and_are_checked() {
        let k = std::env::temp_dir().join("ferry-vm-spec-kernel");
        std::fs::write(&k, b"x").unwrap();
        let text = format!("name = \"web1\"\nmemory_mib = 256\naccel = \"tcg\"\nkernel = \"{}\"\nappend = \"console=ttyS0\"\n[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:12:01:0a\"\n", k.display());
        let spec = VmSpec::from_toml(&text).unwrap();
        assert_eq!((spec.vcpus, spec.accel, spec.nics.len()), (1, Accel::Tcg, 1));
        let argv = qemu_argv(&spec, Path::new("/x"), true).join(" ");
        assert!(argv.contains("-accel tcg") && argv.contains("-m 256M") && argv.ends_with("-incoming defer"), "{argv}");
        assert!(tap_name("web1", 0).len() <= 15);
        assert!(VmSpec::from_toml(&text.replace("web1", "Web 1")).unwrap_err().to_string().contains("VM name"));
        assert!(format!("{:#}", VmSpec::from_toml(&text.replace("memory_mib", "memory")).unwrap_err()).contains("memory"));
        let missing = text.replace(&k.display().to_string(), "/nonexistent/vmlinuz");
        assert!(VmSpec::from_toml(&missing).unwrap_err().to_string().contains("does not exist"));
    }
}
