//! The daemons a benchmark runs inside lab sites (sshd for the baselines, ferry agents), owned
//! so that they are stopped whatever happens to the run.
use anyhow::{bail, Result};
use ferry_lab::control::{DirectionStatus, LabStatus};
use ferry_lab::lab;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn require_tool(name: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).chain([PathBuf::from("/usr/sbin")]).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{name} is not installed: run scripts/install-deps.sh");
    }
    Ok(())
}

pub fn ferry_ok(exe: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!("ferry {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Like `Command::output`, but kills the child (and fails) after `limit`.
pub fn output_with_timeout(cmd: &mut Command, limit: Duration) -> Result<Output> {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: o.join().unwrap_or_default(), stderr: e.join().unwrap_or_default() })
}

/// A client key and a host key for a private sshd; nothing of the host's ssh setup is used.
pub struct SshKeys {
    dir: PathBuf,
}

impl SshKeys {
    pub fn create(dir: &Path) -> Result<SshKeys> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        for name in ["host_ed25519", "client_ed25519"] {
            let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(name)).status()?;
            anyhow::ensure!(st.success(), "ssh-keygen failed");
        }
        std::fs::copy(dir.join("client_ed25519.pub"), dir.join("authorized_keys"))?;
        Ok(SshKeys { dir: dir.to_path_buf() })
    }

    pub fn ssh_options(&self) -> Vec<String> {
        let key = self.dir.join("client_ed25519");
        ["-F", "/dev/null", "-i", key.to_str().unwrap(), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// The ssh command line, as rsync's `-e` and a shell pipeline want it.
    pub fn ssh_command(&self) -> String {
        format!("ssh {}", self.ssh_options().join(" "))
    }

    fn sshd_config(&self, listen: &str) -> Result<PathBuf> {
        let d = self.dir.display();
        let cfg = format!(
            "ListenAddress {listen}\nPort 22\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\n"
        );
        let path = self.dir.join("sshd_config");
        std::fs::write(&path, cfg)?;
        Ok(path)
    }
}

/// IP bytes the lab's forwarder delivered from site `from` to `to` between two status reads.
pub fn delivered(before: &LabStatus, after: &LabStatus, from: &str, to: &str) -> u64 {
    counted(before, after, from, to, |d| d.delivered_bytes)
}

/// Packets the forwarder dropped from `from` to `to` (its queue full, or its loss) between two
/// status reads.
pub fn dropped(before: &LabStatus, after: &LabStatus, from: &str, to: &str) -> u64 {
    counted(before, after, from, to, |d| d.drops_queue + d.drops_loss)
}

/// How far one of the forwarder's counters for `from` → `to` moved between two status reads.
fn counted(before: &LabStatus, after: &LabStatus, from: &str, to: &str, counter: fn(&DirectionStatus) -> u64) -> u64 {
    let get = |s: &LabStatus| s.directions.iter().find(|d| d.from == from && d.to == to).map_or(0, counter);
    get(after).saturating_sub(get(before))
}

/// A ferry agent to run in a lab site.
#[derive(Clone, Copy)]
pub struct AgentSpec<'a> {
    pub site: &'a str,
    pub listen_ip: &'a str,
    /// The other site's name and address.
    pub peer: (&'a str, &'a str),
    pub data: &'a Path,
    pub pki: &'a Path,
    pub exe: &'a Path,
    pub rate_bps: u64,
    pub plaintext: bool,
}

pub struct SiteProcesses {
    lab: String,
    logs: PathBuf,
    daemons: Vec<(String, Child)>,
    agents: Vec<Child>,
}

impl SiteProcesses {
    pub fn new(lab: &str, logs: PathBuf) -> SiteProcesses {
        let _ = std::fs::create_dir_all(&logs);
        SiteProcesses { lab: lab.to_string(), logs, daemons: Vec::new(), agents: Vec::new() }
    }

    fn spawn(&self, site: &str, argv: &[String], log: &str) -> Result<Child> {
        let log = std::fs::File::create(self.logs.join(log))?;
        Ok(lab::command_in_site(&self.lab, site, argv)?.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?)
    }

    pub fn start_sshd(&mut self, site: &str, listen: &str, keys: &SshKeys) -> Result<()> {
        std::fs::create_dir_all("/run/sshd")?; // sshd's privilege-separation directory
        let cfg = keys.sshd_config(listen)?;
        let argv = ["/usr/sbin/sshd", "-D", "-e", "-f", cfg.to_str().unwrap()].map(String::from);
        let child = self.spawn(site, &argv, &format!("sshd-{site}.log"))?;
        self.daemons.push(("sshd".into(), child));
        // Ready when a login from the other side works.
        let mut probe = vec!["ssh".to_string()];
        probe.extend(keys.ssh_options());
        probe.extend([format!("root@{listen}"), "true".into()]);
        let other = if site == "a" { "b" } else { "a" };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = lab::command_in_site(&self.lab, other, &probe)?.output()?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sshd in site {site} does not accept logins: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts a ferry agent in `site` and waits for its control socket.
    pub fn start_agent(&mut self, agent: &AgentSpec) -> Result<()> {
        let AgentSpec { site, listen_ip, peer, data, pki, exe, rate_bps, plaintext } = *agent;
        let sock = data.join(".ferry/agent.sock");
        let _ = std::fs::remove_file(&sock);
        let mut argv: Vec<String> = vec![exe.to_string_lossy().into(), "agent".into(), "--site".into(), site.into()];
        argv.extend(["--listen".into(), format!("{listen_ip}:7400"), "--data".into(), data.to_string_lossy().into()]);
        argv.extend(["--pki".into(), pki.to_string_lossy().into(), "--peer".into(), format!("{}={}:7400", peer.0, peer.1)]);
        argv.extend(["--link-rate".into(), format!("{rate_bps}")]);
        if plaintext {
            argv.push("--insecure-plaintext".into());
        }
        let child = self.spawn(site, &argv, &format!("agent-{site}.log"))?;
        self.agents.push(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !sock.exists() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.logs.join(format!("agent-{site}.log"))).unwrap_or_default();
                bail!("the agent in site {site} did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until the agent with data directory `data` keeps all the connections its path to
    /// `peer` calls for: a daemon's steady state, which a transfer is measured from.
    pub fn wait_warm(exe: &Path, data: &Path, peer: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = Command::new(exe).args(["status", "--json", "--data"]).arg(data).output()?;
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let (ready, wanted) = (v[peer]["ready"].as_u64().unwrap_or(0), v[peer]["wanted"].as_u64().unwrap_or(0));
                if wanted > 0 && ready >= wanted {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the agent in {} has no ready connections to {peer}", data.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agents' process IDs (`ip netns exec` execs the agent in place).
    pub fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().map(|c| c.id()).collect()
    }

    pub fn stop_agents(&mut self) {
        for mut c in self.agents.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    /// A CA and certificates for sites `a` and `b` in `pki` (made afresh).
    pub fn make_pki(exe: &Path, pki: &Path) -> Result<()> {
        let _ = std::fs::remove_dir_all(pki);
        ferry_ok(exe, &["pki", "init", "--pki", pki.to_str().unwrap()])?;
        for s in ["a", "b"] {
            ferry_ok(exe, &["pki", "issue", s, "--pki", pki.to_str().unwrap()])?;
        }
        Ok(())
    }
}

impl Drop for SiteProcesses {
    fn drop(&mut self) {
        self.stop_agents();
        for (_, c) in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

