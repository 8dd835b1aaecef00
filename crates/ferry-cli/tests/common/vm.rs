//! `ferry vm …` against a site's agent, for the tests that run guests through the agents.
use super::{ferry, text, Sites};
use std::process::Output;

pub fn vm(sites: &Sites, site: &str, args: &[&str]) -> Output {
    let data = sites.data(site);
    ferry().arg("vm").args(args).args(["--data", data.to_str().unwrap()]).output().unwrap()
}

/// Runs `ferry vm args…` at `site`, panicking with its output and both agents' logs if it fails.
pub fn vm_ok(sites: &Sites, site: &str, args: &[&str]) -> String {
    let out = vm(sites, site, args);
    assert!(out.status.success(), "ferry vm {args:?} at {site}:\n{}\nagent a:\n{}\nagent b:\n{}", text(&out), tail(&sites.agent_log("a")), tail(&sites.agent_log("b")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The end of a log, for a failure message.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The VMs a site runs, by name → (pid, state).
pub fn vms(sites: &Sites, site: &str) -> Vec<(String, u64, String)> {
    let v: serde_json::Value = serde_json::from_str(&vm_ok(sites, site, &["list", "--json"])).unwrap();
    v.as_array().unwrap().iter().map(|x| (x["name"].as_str().unwrap().to_string(), x["pid"].as_u64().unwrap(), x["state"].as_str().unwrap().to_string())).collect()
}

/// QEMU processes running this test's g1 (at either site).
pub fn qemu_copies(sites: &Sites) -> usize {
    // The agent names the VM `g1,debug-threads=on`.
    let pattern = format!("qemu-system-x86_64 -name g1[, ].*{}", sites.root.display());
    let out = std::process::Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}
