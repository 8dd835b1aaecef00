//! Images move between two lab sites through real agents over real mutual TLS: only what the
//! destination lacks crosses, the result is byte-equal, and a cut link, a tampered byte or a
//! killed agent never commits anything wrong.
mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// What the transfer tests ask of the sites.
trait Send {
    fn send_cmd(&self, src: &Path, dest: &str) -> Command;
    fn send(&self, src: &Path, dest: &str) -> serde_json::Value;
}

impl Send for Sites {
    fn send_cmd(&self, src: &Path, dest: &str) -> Command {
        let mut c = ferry();
        c.args(["image", "send", src.to_str().unwrap(), "--to", "b", "--as", dest, "--json", "--data", self.data("a").to_str().unwrap()]);
        c
    }

    fn send(&self, src: &Path, dest: &str) -> serde_json::Value {
        let out = self.send_cmd(src, dest).output().unwrap();
        assert!(out.status.success(), "send failed:\n{}\nagent a:\n{}\nagent b:\n{}", text(&out), self.agent_log("a"), self.agent_log("b"));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// A pseudo-random image: half text-like (compressible), some random, holes between.
fn make_image(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    let mut x = seed | 1;
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        match i % 4 {
            0 => {} // a hole
            1 | 2 => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = b"the quick brown fox jumps over the lazy dog "[(j + i) % 44]),
            _ => chunk.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
        }
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, chunk) in data.chunks(65536).enumerate() {
        if i % 4 != 0 {
            f.write_all_at(chunk, (i * 65536) as u64).unwrap();
        }
    }
}

/// Changes every `every`-th data block of `path` in place; returns the bytes of blocks changed.
fn change_blocks(path: &Path, every: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() as usize / 65536;
    let mut changed = 0;
    for i in (1..blocks).step_by(every) {
        let mut b = vec![0u8; 65536];
        f.read_exact_at(&mut b, (i * 65536) as u64).unwrap();
        b[100..116].copy_from_slice(b"changed version!");
        b[40000] ^= 0xff;
        f.write_all_at(&b, (i * 65536) as u64).unwrap();
        changed += 65536;
    }
    changed
}

fn bbr_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap().contains("bbr")
}

/// The path rate `site`'s agent measured to `peer` (Mbit/s), waiting for its pool to fill.
fn measured_rate(sites: &Sites, site: &str, peer: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ferry().args(["status", "--json", "--data"]).arg(sites.data(site)).output().unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(rate) = v[peer]["rate_mbps"].as_f64() {
                return rate;
            }
        }
        assert!(Instant::now() < deadline, "{site}'s agent never measured the path to {peer}:\n{}", sites.agent_log(site));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp").arg(a).arg(b).status().unwrap().success()
}

#[test]
fn only_what_the_destination_lacks_crosses_and_the_copy_is_exact() {
    let _serial = serial();
    let sites = Sites::new("tsend", "40ms");
    let older = sites.root.join("older.raw");
    make_image(&older, 64 * MIB, 7);
    // Before any session, a's new connections to b measured the path (filler until their
    // congestion control found the link's rate), so the first transfer need not start slowly.
    if bbr_available() {
        let rate = measured_rate(&sites, "a", "b");
        assert!((400.0..5000.0).contains(&rate), "a's connections measured the 1 Gbit/s path at {rate} Mbit/s");
    }
    // First move: nothing at the destination.
    let first = sites.send(&older, "images/disk.raw");
    let dest = sites.data("b").join("images/disk.raw");
    assert!(same_bytes(&older, &dest));
    println!("first: {first}");
    let size = first["size"].as_u64().unwrap();
    let wire_first = first["wire_sent"].as_u64().unwrap();
    assert!(first["progress"]["zero"].as_u64().unwrap() >= size / 4, "holes are not sent");
    assert!(wire_first < size * 6 / 10, "text compresses and holes are skipped: {wire_first} of {size}");
    assert_eq!(first["encrypted"], true);
    // Holes stay holes at the destination.
    let allocated = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    assert!(allocated(&dest) <= allocated(&older) + 65536, "the destination stays sparse");

    // The connections that carried it stay ready for the next transfer (with what their
    // congestion control learnt of the path), under BBR where the kernel has it.
    let sockets = sites.lab.exec_ok("a", &["ss", "-tin", "state", "established", "dport", "=", ":7400"]);
    let acked: u64 = sockets.split_whitespace().filter_map(|w| w.strip_prefix("bytes_acked:")).map(|n| n.parse::<u64>().unwrap()).sum();
    assert!(acked >= wire_first / 2, "a's idle connections to b carried the transfer ({acked} bytes acked, {wire_first} sent):\n{sockets}");
    if bbr_available() {
        assert!(sockets.contains("bbr"), "ferry's connections use BBR:\n{sockets}");
    }

    // Second move: a newer version; the older one is there.
    let newer = sites.root.join("newer.raw");
    std::fs::copy(&older, &newer).unwrap();
    let changed = change_blocks(&newer, 10);
    let second = sites.send(&newer, "images/disk.raw");
    println!("second: {second}");
    assert!(same_bytes(&newer, &dest));
    let wanted = second["progress"]["wanted_raw"].as_u64().unwrap();
    assert!(wanted <= changed, "only changed blocks were asked for: {wanted} of {changed} changed");
    assert!(wanted >= changed / 2, "the changed data blocks were sent ({wanted})");
    let wire = second["wire_sent"].as_u64().unwrap();
    assert!(wire < changed + 2 * MIB as u64, "wire {wire} for {changed} changed bytes");

    // Same content again under another name: all from the content store, nothing sent.
    let third = sites.send(&newer, "images/copy.raw");
    assert_eq!(third["progress"]["wanted_raw"].as_u64().unwrap(), 0, "{third}");
    assert!(third["progress"]["reused"].as_u64().unwrap() >= 48 * MIB as u64, "every data block was found at the destination: {third}");
    assert!(same_bytes(&newer, &sites.data("b").join("images/copy.raw")));
}

#[test]
fn a_cut_link_resumes_without_resending_what_arrived() {
    let _serial = serial();
    let sites = Sites::with_rate("tcutx", "20ms", "200mbit");
    let img = sites.root.join("big.raw");
    make_image(&img, 256 * MIB, 11);
    let child = sites.send_cmd(&img, "big.raw").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Cut once a good part has arrived, restore a few seconds later.
    let staging_dir = sites.data("b");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partial = std::fs::read_dir(&staging_dir).ok().into_iter().flatten().flatten().find(|e| e.file_name().to_string_lossy().contains("ferry-partial"));
        if let Some(p) = partial {
            if std::os::unix::fs::MetadataExt::blocks(&p.metadata().unwrap()) * 512 > 40 * MIB as u64 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no progress before the cut");
        std::thread::sleep(Duration::from_millis(20));
    }
    sites.lab.ferry(&["link", "a-b", "down"]);
    std::thread::sleep(Duration::from_secs(10));
    assert!(!sites.data("b").join("big.raw").exists(), "nothing committed while cut");
    let partial = std::fs::read_dir(&staging_dir).unwrap().flatten().find(|e| e.file_name().to_string_lossy().contains("ferry-partial")).unwrap();
    let placed_before = std::os::unix::fs::MetadataExt::blocks(&partial.metadata().unwrap()) * 512;
    sites.lab.ferry(&["link", "a-b", "up"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\nagent a:\n{}", text(&out), sites.agent_log("a"));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("placed before the restore: {placed_before}; {s}");
    assert!(s["attempts"].as_u64().unwrap() >= 2, "the cut was noticed and resumed");
    assert!(same_bytes(&img, &sites.data("b").join("big.raw")));
    // The resumed attempt found in the staging file what had been placed before the cut and
    // did not ask for it again.
    let reused = s["progress"]["reused"].as_u64().unwrap();
    assert!(reused + 2 * MIB as u64 >= placed_before, "resumed attempt reused {reused} of {placed_before} placed before the cut");
    assert!(reused > 0);
}

#[test]
fn a_tampered_byte_is_caught_and_nothing_corrupt_is_committed() {
    let _serial = serial();
    let sites = Sites::new("ttamp", "10ms");
    let img = sites.root.join("img.raw");
    make_image(&img, 32 * MIB, 3);
    sites.lab.ferry(&["tamper", "a-b", "--dport", "7400", "--after-bytes", "2000000", "--xor", "0x04"]);
    let s = sites.send(&img, "img.raw");
    println!("{s}");
    assert_eq!(sites.lab.direction("a", "b")["tampered"], 1, "the attacker altered a byte");
    assert!(s["attempts"].as_u64().unwrap() >= 2, "TLS refused the altered record and the transfer resumed");
    assert!(same_bytes(&img, &sites.data("b").join("img.raw")));
    assert!(sites.agent_log("b").to_lowercase().contains("decrypt") || sites.agent_log("b").contains("bad record"), "{}", sites.agent_log("b"));
}

#[test]
fn a_killed_destination_agent_resumes_after_restart() {
    let _serial = serial();
    let mut sites = Sites::with_rate("tkill", "10ms", "100mbit");
    let img = sites.root.join("img.raw");
    make_image(&img, 128 * MIB, 5);
    let child = sites.send_cmd(&img, "img.raw").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    sites.kill_agent("b");
    assert!(!sites.data("b").join("img.raw").exists());
    std::thread::sleep(Duration::from_secs(1));
    sites.start_agent("b", &sites.root.join("pki"));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(same_bytes(&img, &sites.data("b").join("img.raw")));
}

#[test]
fn a_site_from_another_ca_is_refused() {
    let _serial = serial();
    let mut sites = Sites::new("tauth", "1ms");
    // Site b restarts with a certificate from a different CA.
    let rogue = sites.root.join("rogue-pki");
    ferry_ok(&["pki", "init", "--pki", rogue.to_str().unwrap()]);
    ferry_ok(&["pki", "issue", "b", "--pki", rogue.to_str().unwrap()]);
    sites.kill_agent("b");
    sites.start_agent("b", &rogue);
    let img = sites.root.join("img.raw");
    make_image(&img, MIB, 1);
    let mut cmd = sites.send_cmd(&img, "img.raw");
    cmd.args(["--retries", "0"]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate") || err.contains("ca"), "{}", text(&out));
    assert!(!sites.data("b").join("img.raw").exists());
}
