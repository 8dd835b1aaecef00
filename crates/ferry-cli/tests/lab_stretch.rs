//! The stretched guest segment: a guest running in site b with an address of site a answers the
//! client at that address, through a and across the emulated a–b link over VXLAN (so it pays
//! that link's RTT), with full-size frames; a guest at home in a does not pay it.
mod common;
use common::*;
use ferry_lab::guest::{LabGuest, LabGuestSpec};
use ferry_lab::probe::ProbeReport;

const CLIENT_A_RTT: f64 = 2.0;
const A_B_RTT: f64 = 40.0;
/// What a TCG guest's network path adds to a round trip (lab_guest sees a few ms).
const GUEST_OVERHEAD: f64 = 6.0;
/// The NIC of a guest with address 198.19.1.10 (`LabGuestSpec::mac`), wherever it runs.
const MAC: &str = "52:54:00:12:01:0a";

#[test]
fn a_guest_away_from_home_answers_at_its_home_address_across_the_wan() {
    let _serial = serial();
    let lab = Lab::up("tstretch", &["--rtt", "2ms", "--link", "a-b:rtt=40ms"]);
    let cfg = ferry_lab::lab::load_running("tstretch").unwrap();
    let image = image();
    // Both boot at once: each is mostly waiting on its own vCPU thread.
    let (away, home) = std::thread::scope(|t| {
        let away = t.spawn(|| LabGuest::boot(&cfg, &homed_in_a("away", "b", 20), &image));
        let home = t.spawn(|| LabGuest::boot(&cfg, &homed_in_a("home", "a", 10), &image));
        (away.join().unwrap().expect("the guest in b boots"), home.join().unwrap().expect("the guest in a boots"))
    });
    assert_eq!(away.addr.to_string(), "198.19.1.20", "an address of a's segment although it runs in b");
    println!("guests ready after {:.1} s (away) and {:.1} s (home)", away.boot_to_ready.as_secs_f64(), home.boot_to_ready.as_secs_f64());

    let ab_before = lab.direction("a", "b")["packets"].as_u64().unwrap();
    let r = probe(&lab, &away);
    assert!(r.received as f64 >= r.sent as f64 * 0.98, "the guest in b answered {} of {}", r.received, r.sent);
    let away_rtt = r.rtt_median_ms.unwrap();
    let expected = CLIENT_A_RTT + A_B_RTT;
    assert!((expected - 0.3..expected + GUEST_OVERHEAD).contains(&away_rtt), "median RTT to the guest in b {away_rtt} ms, expected client↔a + a↔b = {expected} ms and a little");
    // The probes crossed the emulated a→b link (inside VXLAN: the client only ever talks to a).
    let ab = lab.direction("a", "b")["packets"].as_u64().unwrap() - ab_before;
    assert!(ab >= r.received, "a→b carried {ab} packets for {} replies", r.received);

    let r = probe(&lab, &home);
    assert!(r.received as f64 >= r.sent as f64 * 0.98, "the guest in a answered {} of {}", r.received, r.sent);
    let home_rtt = r.rtt_median_ms.unwrap();
    assert!((CLIENT_A_RTT - 0.3..CLIENT_A_RTT + GUEST_OVERHEAD).contains(&home_rtt), "median RTT to the guest at home in a {home_rtt} ms");
    println!("median RTT: guest in b {away_rtt:.2} ms, guest in a {home_rtt:.2} ms");

    // Full-size frames (MTU 1500 in the guest) cross the segment whole: the 1550-byte VXLAN
    // packets are neither refused nor fragmented on the way.
    let pings = ping_times(&lab.exec_ok("client", &["ping", "-n", "-c", "3", "-i", "0.2", "-M", "do", "-s", "1472", "198.19.1.20"]));
    assert_eq!(pings.len(), 3, "1500-byte pings to the guest in b: {pings:?}");
    for site in ["a", "b"] {
        let snmp = lab.exec_ok(site, &["cat", "/proc/net/snmp"]);
        assert_eq!(ip_counter(&snmp, "FragCreates"), 0, "site {site} fragmented packets");
        assert_eq!(ip_counter(&snmp, "ReasmReqds"), 0, "site {site} reassembled packets");
    }
}

/// A guest with an address of a's segment, running in `site`.
fn homed_in_a(name: &str, site: &str, host: u8) -> LabGuestSpec {
    let mut s = LabGuestSpec::new(name, site);
    s.home_site = Some("a".into());
    s.host = host;
    s.memory_mib = 128;
    s.workload = vec!["ferry.mem=16M".into(), "ferry.dirty=256K".into()];
    s
}

fn image() -> ferry_lab::guest_image::GuestImage {
    ferry_lab::guest_image::build_guest_image(std::path::Path::new(ferry_lab::guest_image::DEFAULT_CACHE)).unwrap()
}

/// `ferry lab probe` from the client site to the guest's UDP echo, for 2 s.
fn probe(lab: &Lab, g: &LabGuest) -> ProbeReport {
    let out = lab.exec_ok("client", &[env!("CARGO_BIN_EXE_ferry"), "lab", "probe", &format!("{}:7", g.addr), "--duration", "2s", "--json"]);
    println!("{out}");
    serde_json::from_str(&out).unwrap()
}

/// A counter of the `Ip:` lines of /proc/net/snmp.
fn ip_counter(snmp: &str, name: &str) -> u64 {
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:")).map(|l| l.split_whitespace().collect::<Vec<_>>());
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let i = names.iter().position(|n| *n == name).unwrap();
    values[i].parse().unwrap()
}

#[test]
fn only_the_probe_site_stays_off_the_stretched_segment() {
    let _serial = serial();
    let lab = Lab::up("tstretch3", &["--sites", "a,b,c", "--rtt", "1ms"]);
    for site in ["a", "b", "c"] {
        let fdb = String::from_utf8_lossy(&lab.exec(site, &["bridge", "fdb", "show", "dev", "vx0"]).stdout).into_owned();
        // One flood entry per peer: a broadcast reaches every other site once.
        let peers = fdb.lines().filter(|l| l.starts_with("00:00:00:00:00:00")).count();
        assert_eq!(peers, 2, "site {site}:\n{fdb}");
    }
    assert!(!lab.exec("client", &["ip", "link", "show", "vx0"]).status.success(), "the client site has no VXLAN device");
    // The endpoints reach each other over the WAN (not only configured).
    lab.exec_ok("c", &["ping", "-n", "-c", "2", "-i", "0.2", "198.18.1.1"]);
}

/// A migration's switch-over without the migration: a paused copy of the guest (same address,
/// same MAC) in b takes over from the original in a when the original stops and the copy is
/// resumed and announces itself (QEMU's gratuitous RARP, as after an incoming migration). The
/// bridges, which had learnt the MAC at a's tap, follow it to b; with nothing learnt, frames
/// for it are flooded across the segment and still reach it.
#[test]
fn after_the_announce_the_segment_follows_the_guest_to_its_new_site() {
    let _serial = serial();
    let lab = Lab::up("tstretchmv", &["--rtt", "2ms", "--link", "a-b:rtt=40ms"]);
    let cfg = ferry_lab::lab::load_running("tstretchmv").unwrap();
    let image = image();
    // Without IPv6 the guests' kernels send nothing unasked (no router solicitations or MLD
    // reports after the resume), so only the announce can teach the bridges where the copy is.
    let quiet = |name: &str, site: &str| {
        let mut s = homed_in_a(name, site, 10);
        s.workload.push("ipv6.disable=1".into());
        s
    };
    let copy = LabGuest::boot(&cfg, &quiet("copy", "b"), &image).expect("the copy in b boots");
    qmp(&copy, "stop", "{}");
    let original = LabGuest::boot(&cfg, &quiet("orig", "a"), &image).expect("the original in a boots");
    assert_eq!(copy.addr, original.addr);
    let r = probe(&lab, &original);
    assert!(r.received as f64 >= r.sent as f64 * 0.98 && r.rtt_median_ms.unwrap() < CLIENT_A_RTT + GUEST_OVERHEAD, "the original in a answers: {r:?}");

    qmp(&original, "stop", "{}");
    qmp(&copy, "cont", "{}");
    // A resumed guest may send something of its own within a few hundred ms, which teaches the
    // bridges too; put them back to how they were before the switch-over (as learnt from the
    // original), so only the announce can move them.
    std::thread::sleep(std::time::Duration::from_millis(500));
    lab.exec_ok("a", &["bridge", "fdb", "replace", MAC, "dev", "tap-orig", "master", "dynamic"]);
    lab.exec_ok("b", &["bridge", "fdb", "replace", MAC, "dev", "vx0", "master", "dynamic"]);
    // FERRY_TEST_NO_ANNOUNCE=1 shows that this test fails without it (no probe is answered).
    if std::env::var_os("FERRY_TEST_NO_ANNOUNCE").is_none() {
        qmp(&copy, "announce-self", r#"{"initial": 50, "max": 550, "rounds": 5, "step": 100}"#);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let r = probe(&lab, &copy);
    assert!(r.received as f64 >= r.sent as f64 * 0.98, "after the announce the copy in b answers {} of {}", r.received, r.sent);
    let rtt = r.rtt_median_ms.unwrap();
    assert!(rtt > CLIENT_A_RTT + A_B_RTT - 0.3, "and the replies come from b: median RTT {rtt} ms");
    let fdb = lab.exec_ok("a", &["bridge", "fdb", "show", "br", "br0"]);
    assert!(fdb.lines().any(|l| l.starts_with(&format!("{MAC} dev vx0"))), "a's bridge sends the guest's MAC over VXLAN:\n{fdb}");

    // Forget what a has learnt (bridge and VXLAN device): unknown unicast floods to b.
    lab.exec_ok("a", &["ip", "link", "set", "br0", "type", "bridge", "fdb_flush"]);
    lab.exec_ok("a", &["bridge", "fdb", "del", MAC, "dev", "vx0", "dst", "198.18.1.2", "self"]);
    let pings = ping_times(&lab.exec_ok("client", &["ping", "-n", "-c", "3", "-i", "0.2", "198.19.1.10"]));
    assert_eq!(pings.len(), 3, "the copy still answers: {pings:?}");
}

/// One QMP command on the guest's monitor socket; panics on an error answer.
fn qmp(g: &LabGuest, command: &str, arguments: &str) {
    use std::io::{BufRead, BufReader, Write};
    let sock = std::os::unix::net::UnixStream::connect(&g.qmp_socket).expect("QMP socket");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut lines = BufReader::new(sock.try_clone().unwrap()).lines();
    lines.next().expect("QMP greeting").unwrap();
    for req in [r#"{"execute": "qmp_capabilities"}"#.to_string(), format!(r#"{{"execute": "{command}", "arguments": {arguments}}}"#)] {
        (&sock).write_all(format!("{req}\n").as_bytes()).unwrap();
        // Events (STOP, RESUME, …) come on the same stream: skip to the answer.
        loop {
            let line = lines.next().expect("QMP answer").unwrap();
            assert!(!line.contains(r#""error""#), "QMP {req}: {line}");
            if line.contains(r#""return""#) {
                break;
            }
        }
    }
}
