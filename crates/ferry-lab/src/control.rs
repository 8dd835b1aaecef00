//! The forwarder's control socket: one JSON request per line, one JSON response per line.
use crate::link::LinkParams;
use crate::tamper::TamperRule;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Cut (`up: false`) or restore both directions of a link `a-b`.
    SetLink { link: String, up: bool },
    Tamper(TamperRule),
    Shutdown,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<LabStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabStatus {
    pub lab: String,
    pub forwarder_pid: u32,
    pub uptime_secs: f64,
    pub directions: Vec<DirectionStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirectionStatus {
    pub from: String,
    pub to: String,
    pub up: bool,
    pub params: LinkParams,
    pub packets: u64,
    pub bytes: u64,
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    pub drops_loss: u64,
    pub drops_queue: u64,
    pub drops_down: u64,
    pub queue_packets: u64,
    pub queue_bytes: u64,
    pub queue_limit_bytes: u64,
    pub tampered: u64,
    /// How late, on average, packets left the delay line (the emulator's own error).
    pub mean_late_us: f64,
}

pub fn request(socket: &Path, req: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("the lab's forwarder does not answer on {} (is the lab up?)", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    let resp: Response = serde_json::from_str(&answer).context("malformed answer from the forwarder")?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "forwarder refused the request".into()));
    }
    Ok(resp)
}
