//! An agent's settings: who it is, where it listens, where its data and certificates live, and
//! how to reach other sites.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentConfig {
    pub site: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub pki_dir: PathBuf,
    /// Other sites' agent addresses.
    pub peers: BTreeMap<String, SocketAddr>,
    /// The WAN rate the agent plans its connections for (bit/s).
    pub link_rate_bps: u64,
    /// Debugging only: carry sessions over plain TCP (never a default).
    pub insecure_plaintext: bool,
    /// New warm connections go straight to the pool without first measuring the path with
    /// filler (see `path_probe`).
    #[serde(default)]
    pub no_path_probe: bool,
}

impl AgentConfig {
    pub fn control_socket(&self) -> PathBuf {
        control_socket(&self.data_dir)
    }

    pub fn peer(&self, site: &str) -> Result<SocketAddr> {
        match self.peers.get(site) {
            Some(a) => Ok(*a),
            None => bail!(
                "site {site:?} is not known to this agent (known: {}): start the agent with --peer {site}=ADDR:PORT",
                self.peers.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// The per-tenant chunk key: one tenant per CA for now, derived from the CA certificate so
    /// every site of the deployment agrees on it and no other deployment shares it.
    pub fn tenant_key(&self) -> Result<[u8; 32]> {
        let ca = std::fs::read(self.pki_dir.join("ca.pem")).with_context(|| format!("reading {}/ca.pem", self.pki_dir.display()))?;
        Ok(ferry_transfer::scan::derive_key("ferry tenant chunk key v1", &ca))
    }
}

pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join(".ferry/agent.sock")
}

/// `b=198.18.0.2:7400`
pub fn parse_peer(text: &str) -> Result<(String, SocketAddr)> {
    let (site, addr) = text.split_once('=').with_context(|| format!("--peer {text:?}: expected SITE=ADDR:PORT"))?;
    Ok((site.to_string(), addr.parse().with_context(|| format!("--peer {text:?}: bad address"))?))
}
