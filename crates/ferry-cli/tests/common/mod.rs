//! Shared by the integration tests: run the real `ferry` binary, own a lab for one test.
#![allow(dead_code)]
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

mod sites;
mod vm;
#[allow(unused_imports)]
pub use sites::Sites;
#[allow(unused_imports)]
pub use vm::{qemu_copies, tail, vm, vm_ok, vms};

pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs `ferry args…`, panicking with its output if it fails.
pub fn ferry_ok(args: &[&str]) -> String {
    let out = ferry().args(args).output().expect("run ferry");
    assert!(out.status.success(), "ferry {args:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Measurements on a 2-core machine are only meaningful one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn require_root() {
    assert_eq!(unsafe { libc_geteuid() }, 0, "the lab tests need root (network namespaces, TUN): run them as root");
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A lab that exists for the life of the value and is taken down after, even on panic.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn up(name: &str, args: &[&str]) -> Lab {
        require_root();
        let lab = Lab { name: name.to_string() };
        let _ = ferry().args(["lab", "down", "--lab", name]).output();
        let mut all = vec!["lab", "up", "--lab", name];
        all.extend_from_slice(args);
        ferry_ok(&all);
        lab
    }

    pub fn exec(&self, site: &str, cmd: &[&str]) -> Output {
        let mut all = vec!["lab", "exec", "--lab", &self.name, site, "--"];
        all.extend_from_slice(cmd);
        ferry().args(&all).output().expect("run ferry lab exec")
    }

    pub fn exec_ok(&self, site: &str, cmd: &[&str]) -> String {
        let out = self.exec(site, cmd);
        assert!(out.status.success(), "{cmd:?} in site {site} failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ferry(&self, args: &[&str]) -> String {
        let mut all = vec!["lab"];
        all.extend_from_slice(&args[..1]);
        all.extend_from_slice(&["--lab", &self.name]);
        all.extend_from_slice(&args[1..]);
        ferry_ok(&all)
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ferry(&["status", "--json"])).expect("status is JSON")
    }

    /// The counters of direction `from`→`to`.
    pub fn direction(&self, from: &str, to: &str) -> serde_json::Value {
        self.status()["directions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["from"] == from && d["to"] == to)
            .cloned()
            .expect("direction exists")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ferry().args(["lab", "down", "--lab", &self.name]).output();
    }
}

/// Round-trip times (ms) of each reply `ping` printed.
pub fn ping_times(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect()
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}
