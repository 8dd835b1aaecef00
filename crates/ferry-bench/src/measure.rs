//! What is measured around one live migration in the lab: the WAN counters, a client probing
//! the guest from its own site, the guest's heartbeat afterwards and, for ferry, the agents'
//! CPU time. Shared by `ferry bench live` and `ferry demo`.
use crate::heartbeat::{self, GuestCheck};
use crate::prober::Prober;
use crate::site_vm::{Migrated, SiteVm};
use crate::sites::{delivered, dropped};
use anyhow::Result;
use ferry_lab::control::LabStatus;
use ferry_lab::lab;
use ferry_lab::probe::ProbeReport;
use ferry_lab::topology::LabConfig;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// The counters and the client's probe around one migration.
pub struct Window {
    lab: String,
    before: LabStatus,
    after: Option<LabStatus>,
    prober: Prober,
}

/// What a window saw.
pub struct Seen {
    /// IP bytes the forwarder delivered source → destination, and back.
    pub wire_forward: u64,
    pub wire_back: u64,
    /// Packets the forwarder dropped (full queue, or loss) in either direction between a and b.
    pub wire_drops: u64,
    pub probe: Result<ProbeReport>,
}

/// How long the probe runs before the move starts.
pub const PROBE_LEAD: Duration = Duration::from_millis(500);

impl Window {
    /// Starts probing `target` from site `client` (for at most `longest`) and reads the counters.
    pub fn open(lab: &LabConfig, client: &str, target: SocketAddr, longest: Duration) -> Result<Window> {
        let prober = Prober::start(lab, client, target, PROBE_INTERVAL, longest)?;
        // Some probes answered before the move starts: gaps are measured from a live guest.
        std::thread::sleep(PROBE_LEAD);
        Ok(Window { lab: lab.name.clone(), before: lab::status(&lab.name)?, after: None, prober })
    }

    /// Reads the counters when the migration has ended (the probe goes on).
    pub fn mark_end(&mut self) {
        self.after = lab::status(&self.lab).ok();
    }

    pub fn close(self, from: &str, to: &str) -> Seen {
        let (wire_forward, wire_back, wire_drops) = match &self.after {
            Some(after) => (delivered(&self.before, after, from, to), delivered(&self.before, after, to, from), dropped(&self.before, after, from, to) + dropped(&self.before, after, to, from)),
            None => (0, 0, 0),
        };
        Seen { wire_forward, wire_back, wire_drops, probe: self.prober.finish() }
    }
}

/// One `ferry vm migrate`, measured.
pub struct FerryMove {
    pub migrated: Result<Migrated>,
    pub check: GuestCheck,
    pub seen: Seen,
    /// CPU time of the processes given (the agents) during the migration.
    pub cpu_ns: u64,
}

pub struct MoveSpec<'a> {
    pub lab: &'a LabConfig,
    pub vm: &'a SiteVm,
    /// (data directory, site) of the source and of the destination.
    pub from: (&'a Path, &'a str),
    pub to: (&'a Path, &'a str),
    pub probe_target: SocketAddr,
    pub timeout: Duration,
    /// How long the guest must beat on at the destination.
    pub hold: Duration,
}

pub fn ferry_move(m: &MoveSpec, agent_pids: &[u32]) -> Result<FerryMove> {
    let ((from_data, from), (to_data, to)) = (m.from, m.to);
    let seq_before = heartbeat::last(&m.vm.console(from_data)?).map(|h| h.seq);
    let mut window = Window::open(m.lab, "client", m.probe_target, m.timeout + Duration::from_secs(120))?;
    let cpu = || agent_pids.iter().map(|&p| crate::cpu::process_cpu_ns(p).unwrap_or(0)).sum::<u64>();
    let cpu_before = cpu();
    let migrated = m.vm.migrate(from_data, to, m.timeout);
    window.mark_end();
    let cpu_ns = cpu().saturating_sub(cpu_before);
    let check = match &migrated {
        Ok(_) => heartbeat::watch(|| m.vm.console(to_data), || m.vm.state(to_data).as_deref() == Some("running"), seq_before, Duration::from_secs(20), m.hold),
        Err(_) => GuestCheck { ok: false, seq_before, seq_after: None, why: "migration failed".into() },
    };
    Ok(FerryMove { migrated, check, seen: window.close(from, to), cpu_ns })
}
