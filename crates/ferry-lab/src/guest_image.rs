//! The tiny lab guest: Debian's cloud kernel and a busybox initramfs that loads the virtio
//! modules, configures the NIC from the kernel command line and runs ferry's guest workload.
//! Built from what is installed on the host (scripts/install-deps.sh) and cached by content
//! hash, so the same inputs give the same image.
use crate::embedded::GUEST_WORKLOAD;
use crate::sys::run;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_CACHE: &str = "/var/cache/ferry/images";
const BUSYBOX: &str = "/bin/busybox";

/// Modules in load order: each after the ones it needs (virtio_ring before virtio).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/block/virtio_blk.ko",
];

const INIT: &str = r#"#!/bin/busybox sh
# ferry lab guest: PID 1. Brings up virtio, the NIC (ferry.ip=, ferry.gw=) and the workload.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null || echo "ferry-init: insmod $m failed"; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
ip link set lo up
ip=$(arg ferry.ip); gw=$(arg ferry.gw)
if [ -n "$ip" ]; then
  n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
  ip link set eth0 up && ip addr add "$ip" dev eth0
  [ -n "$gw" ] && ip route add default via "$gw"
fi
echo "ferry-init: up ip=${ip:-none} uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/ferry-guest-workload
echo "ferry-init: workload exited ($?)"
poweroff -f
"#;

#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
}

/// The newest installed Debian cloud kernel.
pub fn find_cloud_kernel() -> Result<(PathBuf, String)> {
    let mut versions: Vec<String> = std::fs::read_dir("/boot")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("vmlinuz-").map(String::from))
        .filter(|v| v.ends_with("-cloud-amd64") && Path::new(&format!("/lib/modules/{v}")).is_dir())
        .collect();
    versions.sort();
    let v = versions.pop().context("no Debian cloud kernel in /boot: run scripts/install-deps.sh (linux-image-cloud-amd64)")?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{v}")), v))
}

/// Builds (or finds in `cache_dir`) the initramfs for the installed cloud kernel.
pub fn build_guest_image(cache_dir: &Path) -> Result<GuestImage> {
    let (kernel, version) = find_cloud_kernel()?;
    if !Path::new(BUSYBOX).exists() {
        bail!("{BUSYBOX} is missing: run scripts/install-deps.sh (busybox-static)");
    }
    let modules: Vec<PathBuf> = MODULES.iter().map(|m| PathBuf::from(format!("/lib/modules/{version}/kernel/{m}"))).collect();
    let mut key = blake3::Hasher::new();
    key.update(INIT.as_bytes()).update(GUEST_WORKLOAD).update(version.as_bytes());
    key.update(&std::fs::read(BUSYBOX)?);
    for m in &modules {
        key.update(&std::fs::read(m).with_context(|| format!("kernel module {} is missing", m.display()))?);
    }
    let id = key.finalize().to_hex();
    let initrd = cache_dir.join(format!("guest-initrd-{}.cpio.gz", &id[..16]));
    if !initrd.exists() {
        std::fs::create_dir_all(cache_dir)?;
        write_initramfs(&initrd, &modules)?;
        tracing::info!(initrd = %initrd.display(), "built the guest initramfs");
    }
    Ok(GuestImage { kernel, initrd, kernel_version: version })
}

fn write_initramfs(dest: &Path, modules: &[PathBuf]) -> Result<()> {
    let staging = tempdir_in(dest.parent().unwrap())?;
    let root = staging.0.as_path();
    for d in ["bin", "proc", "sys", "dev", "lib/modules", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    write_exec(&root.join("init"), INIT.as_bytes())?;
    write_exec(&root.join("bin/ferry-guest-workload"), GUEST_WORKLOAD)?;
    let mut order = String::new();
    for m in modules {
        let name = m.file_name().unwrap();
        std::fs::copy(m, root.join("lib/modules").join(name))?;
        order.push_str(&name.to_string_lossy());
        order.push('\n');
    }
    std::fs::write(root.join("lib/modules/order"), order)?;
    let tmp = dest.with_extension("tmp");
    // Fixed timestamps and a sorted list: the same inputs give the same bytes.
    let script = format!(
        "cd {root} && find . -exec touch -h -d @0 {{}} + && find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet -R 0:0 | gzip -n -1 > {tmp}",
        root = root.display(),
        tmp = tmp.display()
    );
    run(Command::new("sh").args(["-c", &script]))?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

fn write_exec(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

fn tempdir_in(parent: &Path) -> Result<TempDir> {
    let p = parent.join(format!(".staging-{}-{:x}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
