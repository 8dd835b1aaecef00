//! `ferry lab up/down` make and remove exactly what they should, also after a forwarder crash;
//! links can be cut; an attacker on the link can alter a flow; bad input is named.
mod common;
use common::*;
use std::time::Duration;

fn namespaces_of(lab: &str) -> Vec<String> {
    let out = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{lab}-")))
        .map(String::from)
        .collect()
}

fn forwarders_of(lab: &str) -> usize {
    let out = std::process::Command::new("pgrep").args(["-f", &format!("lab forwarder --state /run/ferry/labs/{lab}$")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn assert_nothing_left(lab: &str) {
    assert!(namespaces_of(lab).is_empty(), "namespaces left: {:?}", namespaces_of(lab));
    assert_eq!(forwarders_of(lab), 0, "a forwarder process is left");
    assert!(!std::path::Path::new(&format!("/run/ferry/labs/{lab}")).exists(), "state directory left");
    let links = std::process::Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("wan0"), "a TUN device is left in the root namespace");
}

#[test]
fn up_and_down_are_idempotent_and_leave_nothing_behind() {
    let _serial = serial();
    require_root();
    let name = "tlife";
    let _ = ferry().args(["lab", "down", "--lab", name]).output();
    let first = ferry_ok(&["lab", "up", "--lab", name, "--rtt", "10ms"]);
    assert!(first.contains("is up"), "{first}");
    assert_eq!(namespaces_of(name).len(), 3, "a, b and client");
    let second = ferry_ok(&["lab", "up", "--lab", name, "--rtt", "10ms"]);
    assert!(second.contains("already up"), "{second}");
    assert_eq!(forwarders_of(name), 1);
    // A different configuration replaces the lab rather than stacking a second one.
    ferry_ok(&["lab", "up", "--lab", name, "--rtt", "30ms"]);
    assert_eq!(forwarders_of(name), 1);
    let lab = Lab { name: name.into() };
    let t = ping_times(&lab.exec_ok("a", &["ping", "-n", "-c", "3", "-i", "0.2", "198.18.0.2"]));
    assert!(t.iter().all(|&x| x > 29.0), "the new RTT applies: {t:?}");
    // Something running inside a site goes with the lab.
    lab.exec_ok("b", &["sh", "-c", "sleep 600 >/dev/null 2>&1 &"]);
    assert!(ferry_ok(&["lab", "down", "--lab", name]).contains("is down"));
    assert_nothing_left(name);
    assert!(ferry_ok(&["lab", "down", "--lab", name]).contains("nothing to do"));
    std::mem::forget(lab);
}

#[test]
fn a_crashed_forwarder_is_reported_and_cleaned_up() {
    let _serial = serial();
    let lab = Lab::up("tcrash", &["--rtt", "10ms"]);
    let pid = std::fs::read_to_string("/run/ferry/labs/tcrash/forwarder.pid").unwrap();
    assert!(std::process::Command::new("kill").args(["-9", pid.trim()]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    let out = ferry().args(["lab", "status", "--lab", "tcrash"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forwarder is not running"), "{}", text(&out));
    // `up` after a crash rebuilds a working lab.
    ferry_ok(&["lab", "up", "--lab", "tcrash", "--rtt", "10ms"]);
    lab.exec_ok("a", &["ping", "-n", "-c", "2", "-i", "0.2", "198.18.0.2"]);
    let pid = std::fs::read_to_string("/run/ferry/labs/tcrash/forwarder.pid").unwrap();
    std::process::Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
    ferry_ok(&["lab", "down", "--lab", "tcrash"]);
    assert_nothing_left("tcrash");
}

#[test]
fn a_cut_link_carries_nothing_until_restored() {
    let _serial = serial();
    let lab = Lab::up("tcut", &["--rtt", "10ms"]);
    lab.ferry(&["link", "a-b", "down"]);
    let cut = lab.exec("a", &["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "198.18.0.2"]);
    assert!(!cut.status.success(), "ping crossed a cut link:\n{}", text(&cut));
    // Only that link is cut.
    lab.exec_ok("a", &["ping", "-n", "-c", "2", "-i", "0.2", "198.18.0.3"]);
    assert!(lab.direction("a", "b")["drops_down"].as_u64().unwrap() >= 3);
    assert_eq!(lab.direction("a", "b")["up"], false);
    lab.ferry(&["link", "b-a", "up"]);
    lab.exec_ok("a", &["ping", "-n", "-c", "3", "-i", "0.2", "198.18.0.2"]);
}

#[test]
fn a_tampered_byte_reaches_the_receiving_application() {
    let _serial = serial();
    let lab = Lab::up("ttamper", &["--no-client", "--rtt", "10ms"]);
    let dir = std::env::temp_dir().join("ferry-tamper-test");
    std::fs::create_dir_all(&dir).unwrap();
    let (sent, recv) = (dir.join("sent"), dir.join("recv"));
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(&sent, &data).unwrap();
    let _ = std::fs::remove_file(&recv);
    lab.ferry(&["tamper", "a-b", "--dport", "7000", "--after-bytes", "300000", "--xor", "0x20"]);
    let recv_arg = format!("OPEN:{},creat,trunc", recv.display());
    let server = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["lab", "exec", "--lab", "ttamper", "b", "--", "socat", "-u", "TCP-LISTEN:7000,reuseaddr", &recv_arg])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.exec_ok("a", &["socat", "-u", &format!("FILE:{}", sent.display()), "TCP:198.18.0.2:7000"]);
    let out = server.wait_with_output().unwrap();
    assert!(out.status.success());
    let got = std::fs::read(&recv).unwrap();
    assert_eq!(got.len(), data.len(), "the stream arrived whole: TCP accepted the altered segment");
    let diffs: Vec<usize> = (0..data.len()).filter(|&i| got[i] != data[i]).collect();
    assert_eq!(diffs, vec![300_000], "exactly the chosen byte differs");
    assert_eq!(got[300_000], data[300_000] ^ 0x20);
    assert_eq!(lab.direction("a", "b")["tampered"], 1);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let _serial = serial();
    let cases: &[(&[&str], &str)] = &[
        (&["lab", "up", "--lab", "tbad", "--rate", "0"], "zero"),
        (&["lab", "up", "--lab", "tbad", "--rtt=-5ms"], "negative"),
        (&["lab", "up", "--lab", "tbad", "--link", "a-x:rtt=1ms"], "unknown site \"x\""),
        (&["lab", "up", "--lab", "tbad", "--loss", "150%"], "out of range"),
        (&["lab", "status", "--lab", "tnone"], "no lab named \"tnone\""),
    ];
    for (args, needle) in cases {
        let out = ferry().args(*args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{args:?}: expected {needle:?} in\n{}", text(&out));
    }
    let lab = Lab::up("tbad", &["--no-client", "--rtt", "1ms"]);
    let out = ferry().args(["lab", "exec", "--lab", "tbad", "nowhere", "--", "true"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown site \"nowhere\": lab \"tbad\" has sites a, b"), "{}", text(&out));
    let out = ferry().args(["lab", "link", "--lab", "tbad", "a-q", "down"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown site \"q\""), "{}", text(&out));
    // Without root: refused with what to do, before anything is made.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_ferry"), "lab", "up", "--lab", "tnoroot"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"), "{}", text(&out));
    drop(lab);
}
