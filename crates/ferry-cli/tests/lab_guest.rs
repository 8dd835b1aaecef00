//! A real TCG guest boots in a lab site, answers a prober across the emulated WAN and keeps its
//! memory intact; images are reproducible; a missing or old QEMU is named.
mod common;
use common::*;
use std::time::Duration;

#[test]
fn a_guest_boots_in_a_site_and_answers_across_the_wan() {
    let _serial = serial();
    let lab = Lab::up("tguest", &["--rtt", "20ms"]);
    let cfg = ferry_lab::lab::load_running("tguest").unwrap();
    let image = ferry_lab::guest_image::build_guest_image(std::path::Path::new(ferry_lab::guest_image::DEFAULT_CACHE)).unwrap();
    let mut spec = ferry_lab::guest::LabGuestSpec::new("g1", "a");
    spec.workload = vec!["ferry.mem=48M".into(), "ferry.dirty=2M".into()];
    let mut guest = ferry_lab::guest::LabGuest::boot(&cfg, &spec, &image).expect("guest boots");
    println!("guest ready {:.2} s after QEMU started", guest.boot_to_ready.as_secs_f64());
    let ready = guest.serial().into_iter().find(|l| l.starts_with("ferry-ready")).unwrap();
    assert!(ready.contains("mem=50331648"), "{ready}");

    let out = lab.exec_ok("client", &[env!("CARGO_BIN_EXE_ferry"), "lab", "probe", &format!("{}:7", guest.addr), "--duration", "2s", "--json"]);
    let r: ferry_lab::probe::ProbeReport = serde_json::from_str(&out).unwrap();
    println!("{out}");
    assert!(r.received as f64 >= r.sent as f64 * 0.98, "the guest's echo answered {} of {}", r.received, r.sent);
    let rtt = r.rtt_median_ms.unwrap();
    // Client→a is 20 ms; the guest's TCG network path adds a little.
    assert!((19.7..26.0).contains(&rtt), "median RTT to the guest {rtt} ms");

    // The heartbeat advances, memory is dirtied at the asked rate and stays intact.
    let seq = |g: &ferry_lab::guest::LabGuest| g.heartbeats().last().and_then(|l| field(l, "seq")).unwrap_or(0);
    let before = seq(&guest);
    std::thread::sleep(Duration::from_secs(3));
    let after = seq(&guest);
    assert!(after >= before + 2, "heartbeat {before} → {after}");
    let last = guest.heartbeats().last().cloned().unwrap();
    assert_eq!(field(&last, "corrupt"), Some(0), "{last}");
    assert!(field(&last, "dirtied_total").unwrap() > 0, "{last}");
    assert!(guest.is_running());
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
}

#[test]
fn the_guest_image_is_reproducible() {
    let dirs: Vec<_> = (0..2).map(|i| std::env::temp_dir().join(format!("ferry-image-repro-{i}"))).collect();
    let images: Vec<_> = dirs
        .iter()
        .map(|d| {
            let _ = std::fs::remove_dir_all(d);
            ferry_lab::guest_image::build_guest_image(d).unwrap()
        })
        .collect();
    let bytes: Vec<_> = images.iter().map(|i| std::fs::read(&i.initrd).unwrap()).collect();
    assert!(bytes[0] == bytes[1], "two builds of the same inputs differ");
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_missing_or_old_qemu_is_named_with_what_to_do() {
    let _serial = serial();
    let dir = std::env::temp_dir().join("ferry-old-qemu");
    std::fs::create_dir_all(&dir).unwrap();
    let old = dir.join("qemu-system-x86_64");
    // What bookworm's own QEMU prints: the version ferry must refuse.
    std::fs::write(&old, "#!/bin/sh\necho 'QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)'\n").unwrap();
    std::process::Command::new("chmod").args(["+x", old.to_str().unwrap()]).status().unwrap();
    let out = ferry().args(["demo", "--lab", "tqemu"]).env("FERRY_QEMU", &old).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QEMU 7.2 is too old") && err.contains("install-deps.sh"), "{}", text(&out));
    let out = ferry().args(["demo", "--lab", "tqemu"]).env("FERRY_QEMU", "/nonexistent/qemu-system-x86_64").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("QEMU is not installed"), "{}", text(&out));
    assert!(!std::path::Path::new("/run/ferry/labs/tqemu").exists(), "nothing was set up");
}
