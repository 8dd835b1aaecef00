//! A qcow2 disk as its guest sees it. The transfer engine and the disk writer work on a disk's
//! bytes at the guest's offsets; a qcow2 file's own bytes are its format (clusters, tables),
//! which its QEMU rewrites as the guest runs. So, while a qcow2 disk moves live, its QEMU
//! exports the disk over FUSE as a plain file of the guest's bytes (holes where it has none):
//! the source's bulk pass reads that, and the destination's records are written into it. The
//! destination keeps the pass's bytes in a raw file beside the disk's place, and makes that the
//! qcow2 image at its place before its QEMU opens it.
use crate::vm::QmpGuard;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// What `query-block` says of QEMU's device for disk `disk` (`-drive …,id=disk<N>`).
fn device_of(blocks: &serde_json::Value, disk: usize) -> Result<&serde_json::Value> {
    let device = format!("disk{disk}");
    let inserted = blocks.as_array().into_iter().flatten().find(|b| b["device"] == device.as_str()).map(|b| &b["inserted"]);
    inserted.filter(|i| i["node-name"].is_string()).with_context(|| format!("QEMU has no block device {device}"))
}

/// The block node QEMU's device for disk `disk` uses, from `query-block`.
pub fn node_of(blocks: &serde_json::Value, disk: usize) -> Result<String> {
    Ok(device_of(blocks, disk)?["node-name"].as_str().unwrap_or_default().to_string())
}

fn export_id(disk: u8) -> String {
    format!("ferry-view-{disk}")
}

fn mountpoint(vm_dir: &Path, disk: u8) -> PathBuf {
    vm_dir.join(format!("disk{disk}.ferry-view"))
}

/// Exports disk `disk` (its device as `query-block` gave it: `blocks`) as a plain file;
/// returns the path through which this agent reaches it. QEMU mounts it in its own mount namespace, which is not this agent's when
/// the agent was restarted since the VM started (each agent gets a copy of the site's), so the
/// path goes through QEMU's view of the filesystem (`/proc/PID/root`).
pub async fn export(qmp: &mut QmpGuard, pid: u32, vm_dir: &Path, disk: u8, blocks: &serde_json::Value, writable: bool) -> Result<PathBuf> {
    let device = device_of(blocks, disk as usize)?;
    let (node, virtual_size) = (&device["node-name"], device["image"]["virtual-size"].as_u64());
    unexport(qmp, vm_dir, disk).await;
    let mount = mountpoint(vm_dir, disk);
    std::fs::write(&mount, b"").with_context(|| format!("making {}", mount.display()))?;
    qmp.execute("block-export-add", json!({"type": "fuse", "id": export_id(disk), "node-name": node, "mountpoint": mount, "writable": writable}))
        .await
        .with_context(|| format!("exporting disk {disk} of the VM as a plain file (QEMU's FUSE export)"))?;
    let through = PathBuf::from(format!("/proc/{pid}/root")).join(mount.strip_prefix("/").unwrap_or(&mount));
    // The size must be the guest's: a path that missed the mount shows the empty file under it,
    // and an empty disk must never be what travels.
    let size = std::fs::metadata(&through).map(|m| m.len()).unwrap_or(0);
    if Some(size) != virtual_size {
        unexport(qmp, vm_dir, disk).await;
        bail!("disk {disk}'s export reads {size} bytes at {}, the disk has {virtual_size:?}", through.display());
    }
    Ok(through)
}

/// Ends the export (best effort: QEMU may be gone) and removes its mountpoint.
pub async fn unexport(qmp: &mut QmpGuard, vm_dir: &Path, disk: u8) {
    let _ = qmp.execute("block-export-del", json!({"id": export_id(disk), "mode": "hard"})).await;
    detach(vm_dir, disk);
}

/// A mount left by a QEMU that ended without unexporting goes (the agent shares that QEMU's
/// mount namespace, or the namespace went with it).
pub fn detach(vm_dir: &Path, disk: u8) {
    let mount = mountpoint(vm_dir, disk);
    if let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) {
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(&mount);
}

/// Every mount a VM's directory may hold, after its QEMU ended.
pub fn detach_all(vm_dir: &Path, disks: usize) {
    for disk in 0..disks.min(u8::MAX as usize + 1) {
        detach(vm_dir, disk as u8);
    }
}

/// The guest's bytes a live move's bulk pass left at `raw` become a qcow2 image at `path`
/// (sparse where the guest has nothing) before any QEMU opens it; `raw` then goes.
pub fn raw_to_qcow2(raw: &Path, path: &Path) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.ferry-qcow2"));
    let _ = std::fs::remove_file(&tmp);
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536"])
        .arg(raw)
        .arg(&tmp)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!("making {} a qcow2 image: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    std::fs::remove_file(raw)?;
    Ok(())
}

/// A qcow2 image must hold all of its guest's bytes: one that names other files (a backing
/// file, an external data file) would make QEMU open them by those names — files a cold move
/// does not carry, and at a destination, files of that host the image's sender chose.
pub fn refuse_external_files(path: &Path) -> Result<()> {
    let out = std::process::Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(path).output().context("running qemu-img")?;
    if !out.status.success() {
        bail!("reading {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("qemu-img's account of {}", path.display()))?;
    if info["format"] != "qcow2" {
        bail!("{} is not a qcow2 image (qemu-img reads it as {})", path.display(), info["format"]);
    }
    let named = [("a backing file", &info["full-backing-filename"]), ("a backing file", &info["backing-filename"]), ("an external data file", &info["format-specific"]["data"]["data-file"])];
    if let Some((what, name)) = named.iter().find(|(_, v)| !v.is_null()) {
        bail!("the qcow2 image {} names {what} ({name}): ferry moves self-contained images (a live move flattens the chain; `qemu-img convert` makes one)", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img");
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// What a destination boots and a cold move carries must be one self-contained file: an
    /// image naming another file of the host (a backing file, an external data file) is refused.
    #[test]
    fn only_self_contained_qcow2_images_pass() {
        let dir = std::env::temp_dir().join(format!("ferry-disk-view-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &p("plain.qcow2"), "64M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", &p("plain.qcow2"), "-F", "qcow2", &p("overlay.qcow2")]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", p("data.raw")), &p("external.qcow2"), "64M"]);
        qemu_img(&["create", "-q", "-f", "raw", &p("disk.raw"), "64M"]);

        refuse_external_files(Path::new(&p("plain.qcow2"))).expect("a plain qcow2 image passes");
        let err = |name: &str| format!("{:#}", refuse_external_files(Path::new(&p(name))).expect_err(name));
        assert!(err("overlay.qcow2").contains("a backing file"), "{}", err("overlay.qcow2"));
        assert!(err("external.qcow2").contains("an external data file"), "{}", err("external.qcow2"));
        assert!(err("disk.raw").contains("not a qcow2 image"), "{}", err("disk.raw"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
