//! Running TCG guests move between lab sites through real agents over mutual TLS: the guest
//! keeps its memory (its own checker finds no corrupt page) and its address, exactly one copy
//! runs at the end, a return trip sends mostly references, and a destination that refuses the
//! VM, a cut link, a destination QEMU that dies or a killed destination agent leave the source
//! VM running.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A guest spec for site `home`'s segment (the lab stretches it to the other sites).
fn write_spec(dir: &Path, name: &str, workload: &str) -> PathBuf {
    let image = ferry_lab::guest_image::build_guest_image(Path::new(ferry_lab::guest_image::DEFAULT_CACHE)).unwrap();
    let spec = format!(
        "name = \"{name}\"\nmemory_mib = 256\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\nappend = \"console=ttyS0 quiet panic=-1 ferry.ip=198.19.1.10/24 ferry.gw=198.19.1.1 {workload}\"\n[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:12:01:0a\"\n",
        image.kernel.display(),
        image.initrd.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, spec).unwrap();
    path
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
}

/// The guest's latest heartbeat at `site` (its serial console there).
fn last_heartbeat(sites: &Sites, site: &str) -> Option<String> {
    String::from_utf8_lossy(&vm(sites, site, &["console", "g1", "--lines", "200"]).stdout).lines().rfind(|l| l.starts_with("ferry-hb")).map(String::from)
}

/// Waits until the guest at `site` has beaten past `seq`; returns the heartbeat line.
fn wait_heartbeat_after(sites: &Sites, site: &str, seq: u64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = last_heartbeat(sites, site) {
            if field(&l, "seq").unwrap_or(0) > seq {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "the guest at {site} did not beat past {seq}; console:\n{}", String::from_utf8_lossy(&vm(sites, site, &["console", "g1"]).stdout));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn migrate(sites: &Sites, from: &str, to: &str) -> serde_json::Value {
    let out = vm_ok(sites, from, &["migrate", "g1", "--to", to, "--json"]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_running_guest_moves_keeps_its_memory_and_address_and_comes_back_by_reference() {
    let _serial = serial();
    let mut sites = Sites::on(Lab::up("tmig", &["--rtt", "40ms", "--link", "client-a:rtt=2ms"]));
    let spec = write_spec(&sites.root, "g1", "ferry.mem=96M ferry.dirty=2M");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    let before = wait_heartbeat_after(&sites, "a", 1, Duration::from_secs(60));
    assert_eq!(vms(&sites, "a")[0].2, "running");

    // A client keeps talking to the guest's echo service while it moves.
    let probe = ferry()
        .args(["lab", "exec", "--lab", "tmig", "client", "--", env!("CARGO_BIN_EXE_ferry"), "lab", "probe", "198.19.1.10:7", "--duration", "25s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let first = migrate(&sites, "a", "b");
    println!("a→b: {first}");
    assert!(vms(&sites, "a").is_empty(), "the source copy is gone");
    let at_b = vms(&sites, "b");
    assert_eq!((at_b.len(), at_b[0].2.as_str()), (1, "running"), "{at_b:?}");
    assert_eq!(qemu_copies(&sites), 1, "exactly one QEMU runs the VM");
    // The QEMU that took the TCG guest in did so on small pages (see `vm.rs`).
    let status = std::fs::read_to_string(format!("/proc/{}/status", at_b[0].1)).unwrap();
    assert!(status.contains("THP_enabled:\t0"), "the destination QEMU runs without huge pages:\n{status}");
    let after = wait_heartbeat_after(&sites, "b", field(&before, "seq").unwrap(), Duration::from_secs(30));
    assert_eq!(field(&after, "corrupt"), Some(0), "the guest's memory check after the move: {after}");
    // The stream was understood (pages by content), and the wire carried less than QEMU wrote.
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert!(first["opaque"].is_null(), "{first}");
    assert!(n(&first, "pages_sent") * 4096 > 40 << 20, "{first}");
    assert!(n(&first, "wire_sent") < n(&first, "stream_bytes"), "{first}");
    assert!(first["encrypted"].as_bool().unwrap());
    // QEMU planned its switchover with the rate pages cross the path at (`switchover.rs`): at
    // most ten times the link's, and not starved (the path probe may find a busy machine's path
    // slower than its link).
    let log = sites.agent_log("a");
    let told: Vec<u64> = log.lines().filter(|l| l.contains("QEMU plans its switchover")).filter_map(|l| l.split("told_mbps=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    let path_mbps = 1000; // the lab's link, which the agents are told
    assert!(!told.is_empty() && told.iter().all(|&t| (path_mbps / 20..=10 * path_mbps).contains(&t)), "switchover rates told: {told:?}\n{}", tail(&log));

    // Back to a, which kept the pages it sent: most of the memory travels as references. Its
    // store now misses one read in a thousand (fault injection): a asks b for those pages.
    let pki = sites.root.join("pki");
    sites.kill_agent("a");
    sites.start_agent_with("a", &pki, &[("FERRY_FAULT", "store-forgets-pages")]);
    std::thread::sleep(Duration::from_secs(2));
    let back = migrate(&sites, "b", "a");
    println!("b→a: {back}");
    assert!(vms(&sites, "b").is_empty());
    assert_eq!(qemu_copies(&sites), 1);
    let home = wait_heartbeat_after(&sites, "a", field(&after, "seq").unwrap(), Duration::from_secs(30));
    assert_eq!(field(&home, "corrupt"), Some(0), "{home}");
    assert!(n(&back, "pages_referenced") > 3 * n(&back, "pages_sent"), "return trip: {back}");
    let asked = sites.agent_log("a").matches("asking the source for a page").count();
    assert!(asked > 0, "the faulty store made a ask for pages: {}", tail(&sites.agent_log("a")));
    assert!(n(&back, "wire_sent") * 3 < n(&first, "wire_sent"), "return trip sent {} B, first trip {} B", n(&back, "wire_sent"), n(&first, "wire_sent"));

    let out = probe.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("probe: {}", text(&out)));
    println!("probe: {report}");
    // The guest answered at its old address after each move (across the stretched segment).
    let (sent, received) = (report["sent"].as_u64().unwrap(), report["received"].as_u64().unwrap());
    assert!(received as f64 > sent as f64 * 0.8, "{report}");
    vm_ok(&sites, "a", &["stop", "g1", "--force"]);
    assert_eq!(qemu_copies(&sites), 0);
}

/// Starts `ferry vm migrate` from a to b in the background.
fn start_migrate(sites: &Sites) -> Child {
    let data = sites.data("a");
    ferry().args(["vm", "migrate", "g1", "--to", "b", "--json", "--data", data.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits until b's QEMU is receiving (so the failure hits a migration under way).
fn wait_incoming(sites: &Sites, child: &mut Child) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = std::mem::replace(child, ferry().arg("--version").spawn().unwrap()).wait_with_output().unwrap();
            panic!("the migration ended before b received anything:\n{}\nagent a:\n{}", text(&out), tail(&sites.agent_log("a")));
        }
        if let Some((_, pid, state)) = vms(sites, "b").into_iter().next() {
            if state == "inmigrate" {
                std::thread::sleep(Duration::from_millis(1500));
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "b never started receiving");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The migration failed clearly, the source runs on with intact memory, b runs nothing.
fn assert_source_survived(sites: &Sites, child: Child, why: &str, expect_in_error: &str) {
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{why}: the migration should fail:\n{}", text(&out));
    assert!(err.contains("keeps running here") && err.contains(expect_in_error), "{why}: {err}");
    let at_a = vms(sites, "a");
    assert_eq!(at_a[0].2, "running", "{why}: {at_a:?}");
    let seq = field(&last_heartbeat(sites, "a").unwrap(), "seq").unwrap();
    let hb = wait_heartbeat_after(sites, "a", seq, Duration::from_secs(10));
    assert_eq!(field(&hb, "corrupt"), Some(0), "{why}: {hb}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while qemu_copies(sites) != 1 {
        assert!(Instant::now() < deadline, "{why}: {} QEMUs run g1; b: {:?}", qemu_copies(sites), vms(sites, "b"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_cut_link_a_dying_destination_qemu_or_a_killed_agent_leave_the_source_running() {
    let _serial = serial();
    let mut sites = Sites::on(Lab::up("tmigf", &["--no-client", "--rtt", "20ms", "--rate", "50mbit"]));
    // Mostly random memory on a slow link: the migration takes long enough to be cut.
    let spec = write_spec(&sites.root, "g1", "ferry.mem=160M ferry.dirty=1M ferry.mix=random:90,zero:10");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    wait_heartbeat_after(&sites, "a", 1, Duration::from_secs(90));

    // b runs a VM of that name already (one without a NIC): it refuses the move. QEMU's stream
    // started with the request, before the answer came; it is cancelled and the VM runs on.
    let decoy_dir = sites.root.join("decoy");
    std::fs::create_dir_all(&decoy_dir).unwrap();
    let decoy = std::fs::read_to_string(&spec).unwrap();
    let decoy_spec = decoy_dir.join("g1.toml");
    std::fs::write(&decoy_spec, &decoy[..decoy.find("[[nics]]").unwrap()]).unwrap();
    vm_ok(&sites, "b", &["start", decoy_spec.to_str().unwrap()]);
    let seq = field(&last_heartbeat(&sites, "a").unwrap(), "seq").unwrap();
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused the VM") && err.contains("keeps running here"), "{}", text(&out));
    assert_eq!(vms(&sites, "a")[0].2, "running");
    let hb = wait_heartbeat_after(&sites, "a", seq, Duration::from_secs(10));
    assert_eq!(field(&hb, "corrupt"), Some(0), "{hb}");
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);

    let mut child = start_migrate(&sites);
    wait_incoming(&sites, &mut child);
    sites.lab.ferry(&["link", "a-b", "down"]);
    assert_source_survived(&sites, child, "cut link", "link cut");
    sites.lab.ferry(&["link", "a-b", "up"]);

    let mut child = start_migrate(&sites);
    let pid = wait_incoming(&sites, &mut child);
    unsafe { libc_kill(pid as i32, 9) };
    assert_source_survived(&sites, child, "destination QEMU killed", "");

    let mut child = start_migrate(&sites);
    wait_incoming(&sites, &mut child);
    sites.kill_agent("b");
    assert_source_survived(&sites, child, "destination agent killed", "");
    vm_ok(&sites, "a", &["stop", "g1", "--force"]);
}

#[test]
fn a_guest_that_outruns_the_link_moves_by_post_copy() {
    let _serial = serial();
    let sites = Sites::on(Lab::up("tmigp", &["--no-client", "--rtt", "40ms", "--rate", "200mbit"]));
    // Random pages rewritten faster than a 200 Mbit/s link carries them: pre-copy's passes
    // would not shrink.
    let spec = write_spec(&sites.root, "g1", "ferry.mem=64M ferry.dirty=32M ferry.mix=random:90,zero:10");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    let before = wait_heartbeat_after(&sites, "a", 1, Duration::from_secs(60));
    let out = vm_ok(&sites, "a", &["migrate", "g1", "--to", "b", "--json", "--postcopy"]);
    let moved: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("a→b: {moved}");
    let log = sites.agent_log("a");
    assert!(moved["postcopy_after_s"].as_f64().is_some(), "the move never switched to post-copy: {moved}\n{}", tail(&log));
    assert!(moved["opaque"].is_null(), "the post-copy stream was understood: {moved}");
    assert!(vms(&sites, "a").is_empty(), "the source copy is gone");
    assert_eq!(qemu_copies(&sites), 1, "exactly one QEMU runs the VM");
    let after = wait_heartbeat_after(&sites, "b", field(&before, "seq").unwrap(), Duration::from_secs(30));
    assert_eq!(field(&after, "corrupt"), Some(0), "the guest's memory check after a post-copy move: {after}");
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);
}

#[test]
fn a_post_copy_whose_link_is_cut_waits_at_both_sites_and_resumes_losing_nothing() {
    let _serial = serial();
    let sites = Sites::on(Lab::up("tmigr", &["--no-client", "--rtt", "40ms", "--rate", "50mbit"]));
    // On a 50 Mbit/s link the pages left at the switch take seconds to cross: the cut lands
    // while the VM runs at b on pages a still holds.
    let spec = write_spec(&sites.root, "g1", "ferry.mem=48M ferry.dirty=16M ferry.mix=random:90,zero:10");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    let before = wait_heartbeat_after(&sites, "a", 1, Duration::from_secs(60));
    let data = sites.data("a");
    let child = ferry().args(["vm", "migrate", "g1", "--to", "b", "--json", "--postcopy", "--data", data.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !sites.agent_log("a").contains("post-copy sends the rest") {
        assert!(Instant::now() < deadline, "the move never ran the VM at b by post-copy:\n{}", tail(&sites.agent_log("a")));
        std::thread::sleep(Duration::from_millis(20));
    }
    sites.lab.ferry(&["link", "a-b", "down"]);
    // Longer than a connection may stay silent: both agents give the session up.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(qemu_copies(&sites), 2, "each site's QEMU keeps its part of the VM while the link is down");
    assert!(sites.agent_log("a").contains("post-copy lost its session"), "{}", tail(&sites.agent_log("a")));
    sites.lab.ferry(&["link", "a-b", "up"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the move should resume and complete:\n{}\nagent a:\n{}\nagent b:\n{}", text(&out), tail(&sites.agent_log("a")), tail(&sites.agent_log("b")));
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("a→b: {moved}");
    assert!(moved["postcopy_resumes"].as_u64().unwrap() >= 1, "{moved}");
    assert!(vms(&sites, "a").is_empty(), "the source copy is gone");
    assert_eq!(qemu_copies(&sites), 1, "exactly one QEMU runs the VM");
    let after = wait_heartbeat_after(&sites, "b", field(&before, "seq").unwrap(), Duration::from_secs(30));
    assert_eq!(field(&after, "corrupt"), Some(0), "the guest's memory check after a resumed post-copy: {after}");
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);
}

/// Heartbeat lines in the serial log a site's VM directory holds (readable with its agent dead).
fn serial_seq(sites: &Sites, site: &str) -> u64 {
    let log = std::fs::read_to_string(sites.data(site).join(".ferry/vms/g1/serial.log")).unwrap_or_default();
    log.lines().rfind(|l| l.starts_with("ferry-hb")).and_then(|l| field(l, "seq")).unwrap_or(0)
}

#[test]
fn a_source_agent_that_dies_as_the_destination_takes_over_leaves_exactly_one_copy() {
    let _serial = serial();
    let mut sites = Sites::on(Lab::up("tmigd", &["--no-client", "--rtt", "20ms"]));
    let pki = sites.root.join("pki");
    let spec = write_spec(&sites.root, "g1", "ferry.mem=48M ferry.dirty=1M");
    vm_ok(&sites, "a", &["start", spec.to_str().unwrap()]);
    wait_heartbeat_after(&sites, "a", 1, Duration::from_secs(60));
    // The VM outlives its agent.
    sites.kill_agent("a");
    let seq = serial_seq(&sites, "a");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(serial_seq(&sites, "a") > seq, "the VM kept running without its agent");
    sites.start_agent_with("a", &pki, &[("FERRY_FAULT", "source-dies-at-shut")]);
    std::thread::sleep(Duration::from_secs(2));

    // The agent dies as the destination reports it has loaded the VM and runs it.
    let out = vm(&sites, "a", &["migrate", "g1", "--to", "b", "--json"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(sites.agent_log("a").contains("source-dies-at-shut: the agent dies now"), "{}", tail(&sites.agent_log("a")));
    let at_b = vms(&sites, "b");
    assert_eq!(at_b[0].2, "running", "{at_b:?}");
    // The source QEMU neither gave up nor resumed: it still holds the stopped VM.
    assert_eq!(qemu_copies(&sites), 2);
    let stopped_at = serial_seq(&sites, "a");
    let b_seq = last_heartbeat(&sites, "b").and_then(|l| field(&l, "seq")).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(serial_seq(&sites, "a"), stopped_at, "the source copy must not run while in doubt");
    wait_heartbeat_after(&sites, "b", b_seq, Duration::from_secs(10));

    // b's agent restarts too and forgets the migration: it answers from the VMs it runs.
    sites.kill_agent("b");
    sites.start_agent("b", &pki);
    // Restarted, the agent asks b, which runs the VM: the source copy goes.
    sites.start_agent("a", &pki);
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu_copies(&sites) != 1 || !vms(&sites, "a").is_empty() {
        assert!(Instant::now() < deadline, "the source copy was not settled: a {:?}\n{}", vms(&sites, "a"), tail(&sites.agent_log("a")));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(sites.agent_log("a").contains("runs the VM: the source copy is removed"), "{}", tail(&sites.agent_log("a")));
    let hb = wait_heartbeat_after(&sites, "b", b_seq + 2, Duration::from_secs(10));
    assert_eq!(field(&hb, "corrupt"), Some(0), "{hb}");
    vm_ok(&sites, "b", &["stop", "g1", "--force"]);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
