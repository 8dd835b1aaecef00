//! A running TCG guest that writes to its local disk moves between lab sites with the disk:
//! the destination held an older copy, so the bulk pass sends only what differs; the guest's
//! writes during the move follow in the migration stream; at switchover the destination's disk
//! holds every record the source's held (checked record by record, the rest byte by byte).
mod common;
use common::*;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const DISK: u64 = 256 << 20;
const DATA: u64 = 64 << 20;
/// Where the guest's writer keeps its ring of records, clear of the data above.
const RING_AT: u64 = 128 << 20;
const RING: u64 = 32 << 20;

/// A disk of `data` MiB of incompressible data and sparse space; `changed` MiB in 16 rewritten.
fn write_disk(path: &Path, data: u64, changed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..data {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        if mib % 16 < changed {
            buf[..8].copy_from_slice(b"CHANGED!");
            buf[8..16].copy_from_slice(&mib.to_le_bytes());
        }
        f.write_all_at(&buf, mib << 20).unwrap();
    }
    f.sync_all().unwrap();
}

fn write_spec(dir: &Path, disk: &Path, memory: &str) -> PathBuf {
    write_spec_ring(dir, disk, memory, RING_AT)
}

fn write_spec_ring(dir: &Path, disk: &Path, memory: &str, ring_at: u64) -> PathBuf {
    let image = ferry_lab::guest_image::build_guest_image(Path::new(ferry_lab::guest_image::DEFAULT_CACHE)).unwrap();
    let format = if disk.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
    let spec = format!(
        "name = \"g1\"\nmemory_mib = 256\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\nappend = \"console=ttyS0 quiet panic=-1 ferry.ip=198.19.1.10/24 ferry.gw=198.19.1.1 {memory} ferry.disk=/dev/vda ferry.disk_rate=1M ferry.disk_offset={ring_at} ferry.disk_span={RING}\"\n[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:12:01:0a\"\n[[disks]]\npath = \"{}\"\nformat = \"{format}\"\n",
        image.kernel.display(),
        image.initrd.display(),
        disk.display()
    );
    let path = dir.join("g1.toml");
    std::fs::File::create(&path).unwrap().write_all(spec.as_bytes()).unwrap();
    path
}

/// The guest's latest count of disk records written, from its console at `site`.
fn disk_seq(sites: &Sites, site: &str) -> Option<u64> {
    let console = String::from_utf8_lossy(&vm(sites, site, &["console", "g1", "--lines", "400"]).stdout).into_owned();
    console.lines().rev().find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("seq=")).filter(|_| l.contains("disk")).and_then(|v| v.parse().ok()))
}

fn wait_disk_seq_past(sites: &Sites, site: &str, seq: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = disk_seq(sites, site).filter(|s| *s > seq) {
            return s;
        }
        assert!(Instant::now() < deadline, "the guest at {site} wrote no disk record past {seq}; console:\n{}", String::from_utf8_lossy(&vm(sites, site, &["console", "g1"]).stdout));
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn hash_range(path: &Path, start: u64, end: u64) -> String {
    let f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at).unwrap();
        h.update(&buf[..n]);
        at += n as u64;
    }
    h.finalize().to_hex().to_string()
}

/// How many MB of blocks the guest wrote led the last bulk pass an agent's log tells of (0 if none).
fn written_mb_led(log: &str) -> f64 {
    let line = log.lines().rev().find(|l| l.contains("the bulk pass leads with the blocks the guest wrote here")).unwrap_or_default();
    line.split("written_mb=").nth(1).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

#[test]
fn a_guest_writing_to_its_disk_moves_with_the_disk_sending_only_what_differs() {
    let _serial = serial();
    let sites = Sites::on(Lab::up("tdsk", &["--rtt", "40ms"]));
    // The VM lives in a's data dir; b holds an older copy of its disk (4 MiB in 64 differ).
    let disk_a = sites.data("a").join("vms/g1/disk.raw");
    let disk_b = sites.data("b").join("vms/g1/disk.raw");
    write_disk(&disk_a, DATA >> 20, 2);
    write_disk(&disk_b, DATA >> 20, 1);
    // b's copy was put there by hand: it joins b's content store (its 64 MiB of data, in
    // 64 KiB blocks; the sparse rest is no block).
    let data_b = sites.data("b");
    let indexed = ferry_ok(&["image", "index", "vms/g1/disk.raw", "--data", data_b.to_str().unwrap()]);
    assert!(indexed.contains("vms/g1/disk.raw: 1024 blocks of 64 KiB"), "{indexed}");
    let spec = write_spec(&sites.root, &disk_a, "ferry.mem=64M ferry.dirty=1M");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    let before = wait_disk_seq_past(&sites, "a", 3, Duration::from_secs(90));

    // The bulk pass whole before the RAM (the other tests here run them side by side, as a
    // raw disk moves by default).
    let out = vm_ok(&sites, "a", &["migrate", "g1", "--to", "b", "--json", "--verify-disks", "--disks-first"]);
    let moved: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("a→b: {moved}");
    assert_eq!(moved["disks"]["verified"], true, "{moved}");
    assert!(sites.agent_log("b").contains("the disk equals the source's at switchover"));
    assert_eq!(qemu_copies(&sites), 1, "exactly one QEMU runs the VM");
    let d = &moved["disks"];
    let n = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k} in {d}"));
    assert_eq!(n("bytes"), DISK);
    // The old copy counted: of 64 MiB of data, the 4 MiB that differ (plus the ring) travel.
    assert!(n("bulk_reused") >= 56 << 20, "{d}");
    assert!(n("bulk_sent") < 24 << 20, "{d}");
    assert!(n("rounds") >= 1, "{d}");
    // The guest's page cache holds the records it wrote, which b's copy was sent: those pages
    // travel as places on that disk (read back and checked there, as the records show below).
    assert!(moved["pages_from_disk"].as_u64().unwrap() > 0, "{moved}");

    // The guest goes on writing at b; then it stops, so that its disk can be read whole.
    let at_b = wait_disk_seq_past(&sites, "b", before + 2, Duration::from_secs(20));
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);
    assert_eq!(qemu_copies(&sites), 0);
    // a's disk is as the source left it at switchover (the VM stood still, then was killed);
    // b's has every record a's had, and what the guest wrote since.
    let check = ferry_lab::disk_records::check_moved(&disk_a, &disk_b, RING_AT, RING).unwrap_or_else(|e| panic!("{e:#}\nagent b:\n{}", tail(&sites.agent_log("b"))));
    println!("records: {check}");
    assert!(check.compared_any() && check.source_max_seq >= before && check.dest_max_seq >= at_b && check.dest_max_seq > check.source_max_seq, "{check}");
    assert_eq!(hash_range(&disk_a, 0, RING_AT), hash_range(&disk_b, 0, RING_AT), "the disk outside the guest's ring differs");
    assert_eq!(hash_range(&disk_a, RING_AT + RING, DISK), hash_range(&disk_b, RING_AT + RING, DISK));
    // Sparse stays sparse: b's copy allocates about what a's does, not the whole disk.
    let allocated = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    assert!(allocated(&disk_b) < DISK / 2, "b allocated {} of {DISK} bytes", allocated(&disk_b));

    // Back to a cold: the guest (writing a fresh ring now) shuts down, its disk goes, mostly
    // found in the copy a kept, and it boots at a.
    let ring2 = RING_AT + RING;
    let spec_b = write_spec_ring(&sites.root, &disk_b, "ferry.mem=64M ferry.dirty=1M", ring2);
    vm_ok(&sites, "b", &["start", spec_b.to_str().unwrap()]);
    let written = wait_disk_seq_past(&sites, "b", 3, Duration::from_secs(90));
    let out = vm_ok(&sites, "b", &["migrate", "g1", "--to", "a", "--cold", "--grace", "1s", "--json"]);
    let cold: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("b→a cold: {cold}");
    assert!(cold["cold"].as_bool().unwrap(), "{cold}");
    // a indexed the copy the VM left there when it moved out: no hashing it again to find it.
    assert!(sites.agent_log("a").contains("the disk the VM left here is in the content store"), "{}", tail(&sites.agent_log("a")));
    assert_b_runs_nothing(&sites);
    assert_eq!(states(&sites, "a"), vec![("g1".to_string(), "running".to_string())]);
    assert!(cold["disks"]["bulk_reused"].as_u64().unwrap() >= 60 << 20, "{cold}");
    assert!(cold["disks"]["bulk_sent"].as_u64().unwrap() < 8 << 20, "{cold}");
    let booted = disk_seq(&sites, "a").unwrap_or(0);
    wait_disk_seq_past(&sites, "a", booted.max(1), Duration::from_secs(60));
    vm_ok(&sites, "a", &["stop", "g1", "--force"]);
    // b's disk is as the guest left it when it shut down; a's holds all of it, and what the
    // guest wrote after it booted there (its writer starts its ring afresh: compare the rest).
    assert!(written >= 3);
    assert_eq!(hash_range(&disk_b, 0, ring2), hash_range(&disk_a, 0, ring2));
    assert_eq!(hash_range(&disk_b, ring2 + RING, DISK), hash_range(&disk_a, ring2 + RING, DISK));
}

/// `qemu-img` on a lab disk.
fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 image of what `write_disk` writes.
fn write_qcow2_disk(path: &Path, data: u64, changed: u64) {
    let raw = path.with_extension("raw-source");
    write_disk(&raw, data, changed);
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), path.to_str().unwrap()]);
    std::fs::remove_file(raw).unwrap();
}

/// The guest's bytes of a qcow2 disk, as a raw file beside it.
fn guest_bytes(qcow2: &Path) -> PathBuf {
    let raw = qcow2.with_extension("guest.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", qcow2.to_str().unwrap(), raw.to_str().unwrap()]);
    raw
}

#[test]
fn a_qcow2_disk_moves_live_there_and_back_and_stays_a_sparse_qcow2_image() {
    let _serial = serial();
    let mut sites = Sites::on(Lab::up("tdskq", &["--no-client", "--rtt", "20ms"]));
    // b holds an older version of the image (not in its content store: it was put there by
    // hand, and the pass still finds it, as the older copy of the disk).
    let disk_a = sites.data("a").join("vms/g1/disk.qcow2");
    let disk_b = sites.data("b").join("vms/g1/disk.qcow2");
    write_qcow2_disk(&disk_a, DATA >> 20, 2);
    write_qcow2_disk(&disk_b, DATA >> 20, 1);
    let spec = write_spec(&sites.root, &disk_a, "ferry.mem=64M ferry.dirty=1M");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    let before = wait_disk_seq_past(&sites, "a", 3, Duration::from_secs(90));
    // The VM's scheduling group ranks above the agents' (their hashing and compressing must not
    // starve its vCPU).
    if std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled").is_ok_and(|v| v.trim() == "1") {
        let pid = vms(&sites, "a")[0].1;
        let group = std::fs::read_to_string(format!("/proc/{pid}/autogroup")).unwrap();
        assert!(group.trim_end().ends_with("nice -5"), "{group}");
    }
    // a's agent restarts: it no longer shares the running QEMU's mount namespace (each agent
    // gets a copy of the site's), where QEMU mounts its export of the disk.
    sites.kill_agent("a");
    sites.start_agent("a", &sites.root.join("pki"));
    std::thread::sleep(Duration::from_secs(2));

    // The pass reads the guest's bytes through the source QEMU (the image's own bytes are its
    // format), and b makes them a qcow2 image again; the records follow through b's QEMU.
    let out = vm_ok(&sites, "a", &["migrate", "g1", "--to", "b", "--json", "--verify-disks"]);
    let moved: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("a→b: {moved}");
    let d = &moved["disks"];
    assert_eq!(d["verified"], true, "{moved}");
    assert_eq!(d["bytes"].as_u64(), Some(DISK), "the guest's size, not the image file's: {d}");
    assert!(d["bulk_reused"].as_u64().unwrap() >= 56 << 20, "{d}");
    assert!(d["bulk_sent"].as_u64().unwrap() < 24 << 20, "{d}");
    assert!(sites.agent_log("a").contains("the RAM migration cannot run beside its bulk pass"), "{}", tail(&sites.agent_log("a")));
    // What the guest wrote since it started (its ring) led the bulk pass.
    assert!(written_mb_led(&sites.agent_log("a")) > 0.0, "{}", tail(&sites.agent_log("a")));
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&["info", "--output", "json", "-U", disk_b.to_str().unwrap()])).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"].as_u64(), Some(DISK), "{info}");
    assert!(info["actual-size"].as_u64().unwrap() < DISK / 2, "sparse stays sparse: {info}");
    let at_b = wait_disk_seq_past(&sites, "b", before + 2, Duration::from_secs(20));

    // And back: a's image (the one the VM left) is the older copy now.
    let out = vm_ok(&sites, "b", &["migrate", "g1", "--to", "a", "--json", "--verify-disks"]);
    let back: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("b→a: {back}");
    assert_eq!(back["disks"]["verified"], true, "{back}");
    assert!(back["disks"]["bulk_reused"].as_u64().unwrap() >= 60 << 20, "{back}");
    // b recorded what the guest wrote from the moment it ran there: that led the way back.
    assert!(written_mb_led(&sites.agent_log("b")) > 0.0, "{}", tail(&sites.agent_log("b")));
    assert_eq!(qemu_copies(&sites), 1, "exactly one QEMU runs the VM");
    // The exports QEMU made for the move are gone at both sites.
    for site in ["a", "b"] {
        let view = sites.data(site).join(".ferry/vms/g1/disk0.ferry-view");
        assert!(!view.exists(), "{} is left", view.display());
    }
    wait_disk_seq_past(&sites, "a", at_b + 2, Duration::from_secs(20));
    vm_ok(&sites, "a", &["stop", "g1", "--force"]);

    // b's image is as the VM left it at the second switchover; a's has every record b's had,
    // and what the guest wrote since.
    let (raw_a, raw_b) = (guest_bytes(&disk_a), guest_bytes(&disk_b));
    let check = ferry_lab::disk_records::check_moved(&raw_b, &raw_a, RING_AT, RING).unwrap_or_else(|e| panic!("{e:#}\nagent a:\n{}", tail(&sites.agent_log("a"))));
    println!("records: {check}");
    assert!(check.compared_any() && check.source_max_seq >= at_b && check.dest_max_seq > check.source_max_seq, "{check}");
    assert_eq!(hash_range(&raw_a, 0, RING_AT), hash_range(&raw_b, 0, RING_AT));
    assert_eq!(hash_range(&raw_a, RING_AT + RING, DISK), hash_range(&raw_b, RING_AT + RING, DISK));

    // An image that names a backing file does not move cold (the chain would stay behind, and
    // a destination must not open files by names a sender chose): the VM runs on at a.
    let top = sites.data("a").join("vms/g1/top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", disk_a.to_str().unwrap(), "-F", "qcow2", top.to_str().unwrap()]);
    let spec = write_spec(&sites.root, &top, "ferry.mem=64M ferry.dirty=1M");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    wait_disk_seq_past(&sites, "a", 1, Duration::from_secs(90));
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b", "--cold"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("names a backing file") && err.contains("keeps running here"), "{}", text(&out));
    assert_eq!(states(&sites, "a"), vec![("g1".to_string(), "running".to_string())]);
    assert_b_runs_nothing(&sites);
    vm_ok(&sites, "a", &["stop", "g1", "--force"]);
}

/// The VMs a site runs, by name → state.
fn states(sites: &Sites, site: &str) -> Vec<(String, String)> {
    vms(sites, site).into_iter().map(|(name, _, state)| (name, state)).collect()
}

/// Starts `ferry vm migrate g1 --to b` in the background; returns once b's QEMU is receiving
/// and a moment more (so a failure hits a move under way, with the guest's writes flowing).
fn start_migrate_until_receiving(sites: &Sites) -> std::process::Child {
    let data = sites.data("a");
    let mut child = ferry().args(["vm", "migrate", "g1", "--to", "b", "--data", data.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while states(sites, "b").first().is_none_or(|(_, state)| state != "inmigrate") {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!("the migration ended ({}) before b received anything: {}\n{}", out.status, text(&out), tail(&sites.agent_log("a")));
        }
        assert!(Instant::now() < deadline, "b never started receiving:\n{}", tail(&sites.agent_log("a")));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    child
}

/// b's agent starts again, with `env` (fault injection), and has its connections to a ready.
fn restart_b(sites: &mut Sites, pki: &Path, env: &[(&str, &str)]) {
    sites.kill_agent("b");
    sites.start_agent_with("b", pki, env);
    std::thread::sleep(Duration::from_secs(3));
}

/// b runs nothing: no VM on its list (its agent may take a moment to forget a QEMU it ended
/// when the move failed, as with the link cut, when it learns of the failure late).
fn assert_b_runs_nothing(sites: &Sites) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !states(sites, "b").is_empty() {
        assert!(Instant::now() < deadline, "b lists {:?}", states(sites, "b"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The move failed clearly, and the guest runs on at a, still writing its disk.
fn assert_source_runs_on(sites: &Sites, out: std::process::Output, why: &str, expect_in_error: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{why}: the migration should fail:\n{}", text(&out));
    assert!(err.contains("keeps running here") && err.contains(expect_in_error), "{why}: {err}");
    assert_source_still_runs(sites, why);
}

/// The guest runs on at a, still writing its disk, in the one QEMU that runs it.
fn assert_source_still_runs(sites: &Sites, why: &str) {
    assert_eq!(states(sites, "a"), vec![("g1".to_string(), "running".to_string())], "{why}");
    let seq = disk_seq(sites, "a").unwrap();
    wait_disk_seq_past(sites, "a", seq + 1, Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while qemu_copies(sites) != 1 {
        assert!(Instant::now() < deadline, "{why}: {} QEMUs run g1", qemu_copies(sites));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_full_destination_disk_or_a_cut_link_leave_the_source_running_on_its_intact_disk() {
    let _serial = serial();
    let mut sites = Sites::on(Lab::up("tdskf", &["--no-client", "--rtt", "20ms", "--rate", "100mbit"]));
    let disk_a = sites.data("a").join("vms/g1/disk.raw");
    let disk_b = sites.data("b").join("vms/g1/disk.raw");
    write_disk(&disk_a, 16, 0);
    // Mostly random memory on a slower link: the live phase lasts long enough to be cut.
    let spec = write_spec(&sites.root, &disk_a, "ferry.mem=128M ferry.dirty=1M ferry.mix=random:90,zero:10");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    wait_disk_seq_past(&sites, "a", 3, Duration::from_secs(90));

    // b runs a VM of that name, whose disk the move would replace: nothing moves (a set up
    // the move while it asked, and undoes that).
    write_disk(&disk_b, 16, 1);
    let spec_b = write_spec(&sites.root, &disk_b, "ferry.mem=64M");
    vm_ok(&sites, "b", &["start", spec_b.to_str().unwrap()]);
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("b already runs a VM named g1"), "{}", text(&out));
    assert_eq!(states(&sites, "b"), vec![("g1".to_string(), "running".to_string())]);
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);
    std::fs::remove_file(&disk_b).unwrap();
    assert_source_still_runs(&sites, "b runs a VM of that name");

    // b's disk has room for less than the VM's disk holds. (Its agent restarts around the
    // mount: it runs in a mount namespace of its own, copied when it starts.)
    let pki = sites.root.join("pki");
    let vms_b = sites.data("b").join("vms");
    std::fs::create_dir_all(&vms_b).unwrap();
    sites.kill_agent("b");
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"]).arg(&vms_b).status().unwrap();
    assert!(mounted.success());
    sites.start_agent("b", &pki);
    std::thread::sleep(Duration::from_secs(3));
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b"]);
    sites.kill_agent("b");
    let _ = std::process::Command::new("umount").arg(&vms_b).status();
    sites.start_agent("b", &pki);
    assert_source_runs_on(&sites, out, "destination disk full", "full");
    assert_b_runs_nothing(&sites);

    // The link goes down while RAM and the guest's writes are on their way.
    let child = start_migrate_until_receiving(&sites);
    sites.lab.ferry(&["link", "a-b", "down"]);
    assert_source_runs_on(&sites, child.wait_with_output().unwrap(), "cut link", "");
    // What b kept is no VM of its own: it runs nothing, and its copy only serves the next try.
    assert_b_runs_nothing(&sites);
    sites.lab.ferry(&["link", "a-b", "up"]);

    // b's agent is killed while the guest's writes are on their way.
    let child = start_migrate_until_receiving(&sites);
    sites.kill_agent("b");
    assert_source_runs_on(&sites, child.wait_with_output().unwrap(), "destination agent killed", "");
    sites.start_agent("b", &pki);
    assert_b_runs_nothing(&sites);

    // a's agent is killed mid-move: the VM outlives it, still writing. Restarted, the agent
    // finds it running (b never ran it); what the move left in the source QEMU (dirty bitmaps,
    // its NBD server) is cleared by the next try below.
    let child = start_migrate_until_receiving(&sites);
    sites.kill_agent("a");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the CLI lost its agent: {}", text(&out));
    sites.start_agent("a", &pki);
    let deadline = Instant::now() + Duration::from_secs(30);
    while states(&sites, "a") != vec![("g1".to_string(), "running".to_string())] || qemu_copies(&sites) != 1 {
        assert!(Instant::now() < deadline, "after a's agent died: a {:?}, b {:?}, {} QEMUs\n{}", states(&sites, "a"), states(&sites, "b"), qemu_copies(&sites), tail(&sites.agent_log("a")));
        std::thread::sleep(Duration::from_millis(200));
    }
    let seq = disk_seq(&sites, "a").unwrap();
    wait_disk_seq_past(&sites, "a", seq + 1, Duration::from_secs(20));
    assert_b_runs_nothing(&sites);

    // b's QEMU loads the VM but cannot take its disk over (fault injection: the name it opened
    // it by is gone): b says so, and the source, whose QEMU had completed, runs the VM on.
    restart_b(&mut sites, &pki, &[("FERRY_FAULT", "disk-name-lost")]);
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b"]);
    assert_source_runs_on(&sites, out, "a destination QEMU that cannot take its disk over", "loaded the VM but did not start it");
    assert_b_runs_nothing(&sites);

    // b writes one of the guest's blocks wrong (fault injection): the digests compared in the
    // pause differ, and the VM runs on at a.
    restart_b(&mut sites, &pki, &[("FERRY_FAULT", "disk-record-corrupt")]);
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b", "--verify-disks"]);
    assert_source_runs_on(&sites, out, "a corrupt copy", "differs from the source's at switchover");
    assert_b_runs_nothing(&sites);

    // Healed, the move goes through (the RAM migration beside the bulk pass, as by default);
    // the disk b kept from the cut attempt is mostly reused.
    restart_b(&mut sites, &pki, &[]);
    let out = vm_ok(&sites, "a", &["migrate", "g1", "--to", "b", "--json", "--verify-disks"]);
    let moved: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("after the cut: {moved}");
    assert_eq!(moved["disks"]["verified"], true, "{moved}");
    assert!(moved["disks"]["bulk_reused"].as_u64().unwrap() >= 12 << 20, "{moved}");
    let seq = disk_seq(&sites, "b").unwrap_or(0);
    wait_disk_seq_past(&sites, "b", seq + 1, Duration::from_secs(20));
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);
    let check = ferry_lab::disk_records::check_moved(&disk_a, &disk_b, RING_AT, RING).unwrap_or_else(|e| panic!("{e:#}"));
    println!("records: {check}");
    assert!(check.compared_any() && check.dest_max_seq > check.source_max_seq, "{check}");
    assert_eq!(hash_range(&disk_a, 0, RING_AT), hash_range(&disk_b, 0, RING_AT));
}
