//! Two lab sites, a and b, each with a ferry agent, sharing a CA.
use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub struct Sites {
    pub lab: Lab,
    pub root: PathBuf,
    agents: Vec<(String, Child)>,
}

impl Sites {
    /// A lab with sites a and b, a CA, and an agent in each site.
    pub fn new(name: &str, rtt: &str) -> Sites {
        Sites::with_rate(name, rtt, "1gbit")
    }

    pub fn with_rate(name: &str, rtt: &str, rate: &str) -> Sites {
        let lab = Lab::up(name, &["--no-client", "--rtt", rtt, "--rate", rate]);
        Sites::on(lab)
    }

    /// Agents a and b (with a CA) in a lab that is up.
    pub fn on(lab: Lab) -> Sites {
        let name = lab.name.clone();
        let root = std::env::temp_dir().join(format!("ferry-transfer-{name}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let pki = root.join("pki");
        ferry_ok(&["pki", "init", "--pki", pki.to_str().unwrap()]);
        for s in ["a", "b"] {
            ferry_ok(&["pki", "issue", s, "--pki", pki.to_str().unwrap()]);
        }
        let mut sites = Sites { lab, root, agents: vec![] };
        sites.start_agent("a", &pki);
        sites.start_agent("b", &pki);
        sites
    }

    pub fn data(&self, site: &str) -> PathBuf {
        self.root.join(site)
    }

    pub fn start_agent(&mut self, site: &str, pki: &Path) {
        self.start_agent_with(site, pki, &[]);
    }

    /// Starts a site's agent with extra environment (fault injection), appending to its log.
    pub fn start_agent_with(&mut self, site: &str, pki: &Path, env: &[(&str, &str)]) {
        let (me, peer, peer_addr) = if site == "a" { ("198.18.0.1", "b", "198.18.0.2") } else { ("198.18.0.2", "a", "198.18.0.1") };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.root.join(format!("agent-{site}.log"))).unwrap();
        // Removed before the agent starts, never after: it may have made its socket already.
        let sock = self.data(site).join(".ferry/agent.sock");
        let _ = std::fs::remove_file(&sock);
        let child = ferry()
            .envs(env.iter().copied())
            .args(["lab", "exec", "--lab", &self.lab.name, site, "--", env!("CARGO_BIN_EXE_ferry"), "agent", "--site", site])
            .args(["--listen", &format!("{me}:7400"), "--data", self.data(site).to_str().unwrap(), "--pki", pki.to_str().unwrap()])
            .args(["--peer", &format!("{peer}={peer_addr}:7400")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "agent {site} did not start:\n{}", self.agent_log(site));
            std::thread::sleep(Duration::from_millis(50));
        }
        self.agents.push((site.to_string(), child));
    }

    pub fn kill_agent(&mut self, site: &str) {
        let i = self.agents.iter().position(|(s, _)| s == site).unwrap();
        let (_, mut child) = self.agents.remove(i);
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = std::fs::remove_file(self.data(site).join(".ferry/agent.sock"));
    }

    pub fn agent_log(&self, site: &str) -> String {
        std::fs::read_to_string(self.root.join(format!("agent-{site}.log"))).unwrap_or_default()
    }

}

impl Drop for Sites {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

