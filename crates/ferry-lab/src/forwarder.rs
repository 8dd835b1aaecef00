//! The WAN emulator process: one TUN device per site, a reader thread per site that classifies
//! packets to a link direction and admits them through its `LinkModel`, and a writer thread per
//! direction that releases each packet into the far site at its delivery instant.
use crate::control::{DirectionStatus, LabStatus, Request, Response};
use crate::link::{LinkModel, Verdict, MTU};
use crate::sys;
use crate::tamper::Tamperer;
use crate::topology::LabConfig;
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The TUN device every site reaches the WAN through.
pub const WAN_IF: &str = "wan0";
const BUF_SIZE: usize = 2048;
const SPIN_BEFORE_DEADLINE: Duration = Duration::from_micros(200);
const SPIN_MAX_IN_FLIGHT: usize = 8;
/// Under load a link's next packet is due every few µs (12 µs for 1500 bytes at 1 Gbit/s), and
/// a wake per packet made the delivering thread spend most of its time arming timers and
/// switching (perf: 41 % in futex waits at 900 Mbit/s; the forwarder took 1.2 of this machine's
/// 2 cores). So a loaded link delivers what is due at most this often: a packet arrives up to
/// this much late, which the link's delay dwarfs, and the wakes are a tenth.
const LOADED_WAKE_EVERY: Duration = Duration::from_micros(100);
type Buf = Box<[u8; BUF_SIZE]>;

/// Recycled packet buffers: after warm-up the data path allocates nothing.
#[derive(Default)]
struct Pool(Mutex<Vec<Buf>>);

impl Pool {
    fn take(&self) -> Buf {
        self.0.lock().unwrap().pop().unwrap_or_else(|| Box::new([0u8; BUF_SIZE]))
    }
    fn give(&self, b: Buf) {
        self.0.lock().unwrap().push(b);
    }
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    delivered_packets: AtomicU64,
    delivered_bytes: AtomicU64,
    drops_loss: AtomicU64,
    drops_queue: AtomicU64,
    drops_down: AtomicU64,
    tampered: AtomicU64,
    /// Sum of how late packets left compared with their delivery instant.
    late_ns: AtomicU64,
}

struct InFlight {
    deliver_at: Instant,
    buf: Buf,
    len: usize,
}

struct DirState {
    model: LinkModel,
    in_flight: VecDeque<InFlight>,
    tamper: Option<Tamperer>,
}

struct Direction {
    from: usize,
    to: usize,
    up: AtomicBool,
    state: Mutex<DirState>,
    wake: Condvar,
    counters: Counters,
}

struct Forwarder {
    lab: LabConfig,
    tuns: Vec<Arc<OwnedFd>>,
    /// `directions[from * n + to]`; the diagonal is unused.
    directions: Vec<Option<Arc<Direction>>>,
    pool: Arc<Pool>,
    started: Instant,
}

/// Runs until a `Shutdown` request; the TUN devices vanish with the process.
pub fn run(state_dir: &Path) -> Result<()> {
    let lab: LabConfig = serde_json::from_slice(&std::fs::read(state_dir.join("config.json"))?)
        .context("reading the lab's config.json")?;
    // A thread that dies would leave a forwarder that holds the TUN devices but moves nothing:
    // any panic takes the whole process down, which `lab down` / `lab up` know how to clean.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let fwd = Arc::new(Forwarder::open(lab)?);
    for to in 0..fwd.lab.sites.len() {
        for from in 0..fwd.lab.sites.len() {
            if let Some(dir) = fwd.direction(from, to) {
                let (fwd, dir) = (fwd.clone(), dir.clone());
                std::thread::Builder::new()
                    .name(format!("deliver-{from}-{to}"))
                    .spawn(move || fwd.deliver_loop(&dir))?;
            }
        }
        let f = fwd.clone();
        std::thread::Builder::new().name(format!("admit-{to}")).spawn(move || f.admit_loop(to))?;
    }
    let socket = state_dir.join("ctl.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    std::fs::write(state_dir.join("forwarder.pid"), std::process::id().to_string())?;
    tracing::info!(lab = %fwd.lab.name, sites = fwd.lab.sites.len(), "forwarder ready");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let (resp, stop) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => fwd.handle(req),
            Err(e) => (Response { error: Some(format!("malformed request: {e}")), ..Default::default() }, false),
        };
        let mut out = serde_json::to_string(&resp)?;
        out.push('\n');
        let _ = (&conn).write_all(out.as_bytes());
        if stop {
            tracing::info!("forwarder shutting down on request");
            let _ = std::fs::remove_file(&socket);
            std::process::exit(0);
        }
    }
    Ok(())
}

impl Forwarder {
    fn open(lab: LabConfig) -> Result<Self> {
        let n = lab.sites.len();
        let mut tuns = Vec::new();
        for site in &lab.sites {
            let ns = lab.namespace(site);
            let fd = sys::open_tun_in(&ns, WAN_IF)?;
            configure_wan(&ns, site.wan_addr())?;
            tuns.push(Arc::new(fd));
        }
        let now = Instant::now();
        let mut directions = vec![None; n * n];
        for (li, link) in lab.links.iter().enumerate() {
            let a = lab.sites.iter().position(|s| s.name == link.a).unwrap();
            let b = lab.sites.iter().position(|s| s.name == link.b).unwrap();
            for (k, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
                let model = LinkModel::new(link.params.clone(), (li * 2 + k) as u64 + 1, now);
                directions[from * n + to] = Some(Arc::new(Direction {
                    from,
                    to,
                    up: AtomicBool::new(true),
                    state: Mutex::new(DirState { model, in_flight: VecDeque::with_capacity(8192), tamper: None }),
                    wake: Condvar::new(),
                    counters: Counters::default(),
                }));
            }
        }
        Ok(Forwarder { lab, tuns, directions, pool: Arc::default(), started: now })
    }

    fn direction(&self, from: usize, to: usize) -> Option<&Arc<Direction>> {
        self.directions[from * self.lab.sites.len() + to].as_ref()
    }

    /// Which site a packet is for, by the address plan (`Site::owns`), without a table walk.
    fn destination(&self, pkt: &[u8]) -> Option<usize> {
        if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            return None;
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let o = dst.octets();
        let index = match o {
            [198, 18, 0, i] => i,
            // VXLAN tunnel endpoints of the stretched guest segment (`Site::vtep_addr`).
            [198, 18, 1, i] => i,
            [198, 19, i, _] => i,
            _ => return None,
        } as usize;
        (1..=self.lab.sites.len()).contains(&index).then(|| index - 1)
    }

    fn admit_loop(&self, from: usize) {
        sys::tighten_timer_slack();
        let tun = &self.tuns[from];
        loop {
            let mut buf = self.pool.take();
            let len = match sys::read_packet(tun, &mut buf[..MTU.max(BUF_SIZE - 1)]) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(site = %self.lab.sites[from].name, "TUN read failed: {e}");
                    std::process::exit(1);
                }
            };
            let dir = match self.destination(&buf[..len]).and_then(|to| self.direction(from, to)) {
                Some(d) => d,
                None => {
                    self.pool.give(buf);
                    continue;
                }
            };
            let c = &dir.counters;
            c.packets.fetch_add(1, Relaxed);
            c.bytes.fetch_add(len as u64, Relaxed);
            if !dir.up.load(Relaxed) {
                c.drops_down.fetch_add(1, Relaxed);
                self.pool.give(buf);
                continue;
            }
            let now = Instant::now();
            let mut st = dir.state.lock().unwrap();
            match st.model.admit(len, now) {
                Verdict::Deliver(deliver_at) => {
                    if let Some(t) = st.tamper.as_mut() {
                        if t.apply(&mut buf[..len]) {
                            c.tampered.fetch_add(1, Relaxed);
                        }
                    }
                    let was_empty = st.in_flight.is_empty();
                    st.in_flight.push_back(InFlight { deliver_at, buf, len });
                    drop(st);
                    if was_empty {
                        dir.wake.notify_one();
                    }
                }
                v => {
                    drop(st);
                    let counter = if v == Verdict::DropLoss { &c.drops_loss } else { &c.drops_queue };
                    counter.fetch_add(1, Relaxed);
                    self.pool.give(buf);
                }
            }
        }
    }

    fn deliver_loop(&self, dir: &Direction) {
        sys::tighten_timer_slack();
        let tun = &self.tuns[dir.to];
        let mut due: Vec<InFlight> = Vec::with_capacity(1024);
        loop {
            {
                let mut st = dir.state.lock().unwrap();
                loop {
                    let now = Instant::now();
                    match st.in_flight.front() {
                        None => st = dir.wake.wait(st).unwrap(),
                        Some(head) if head.deliver_at > now => {
                            let wait = head.deliver_at - now;
                            // Under load the next deadline is always microseconds away and a
                            // few µs of lateness are nothing next to the RTT: only sparse
                            // traffic (pings, probes) is worth a spin.
                            let sparse = st.in_flight.len() <= SPIN_MAX_IN_FLIGHT;
                            if wait > SPIN_BEFORE_DEADLINE || !sparse {
                                let sleep = if sparse { wait - SPIN_BEFORE_DEADLINE } else { wait.max(LOADED_WAKE_EVERY) };
                                st = dir.wake.wait_timeout(st, sleep).unwrap().0;
                            } else {
                                // A sleeping thread wakes tens of µs late on a busy VM: cover the
                                // last stretch by yielding, so the configured delay is what a
                                // packet sees.
                                drop(st);
                                std::thread::yield_now();
                                st = dir.state.lock().unwrap();
                            }
                        }
                        Some(_) => {
                            while st.in_flight.front().is_some_and(|p| p.deliver_at <= now) {
                                due.push(st.in_flight.pop_front().unwrap());
                            }
                            break;
                        }
                    }
                }
            }
            let written_at = Instant::now();
            for p in due.drain(..) {
                let late = written_at.saturating_duration_since(p.deliver_at).as_nanos() as u64;
                dir.counters.late_ns.fetch_add(late, Relaxed);
                // A full receive queue on the far side is a drop there, as on a real host.
                if sys::write_packet(tun, &p.buf[..p.len]).is_ok() {
                    dir.counters.delivered_packets.fetch_add(1, Relaxed);
                    dir.counters.delivered_bytes.fetch_add(p.len as u64, Relaxed);
                }
                self.pool.give(p.buf);
            }
        }
    }

    fn handle(&self, req: Request) -> (Response, bool) {
        let result = match req {
            Request::Status => Ok(Some(self.status())),
            Request::SetLink { link, up } => self.set_link(&link, up).map(|_| None),
            Request::Tamper(rule) => self.arm_tamper(rule).map(|_| None),
            Request::Shutdown => return (Response { ok: true, ..Default::default() }, true),
        };
        let resp = match result {
            Ok(status) => Response { ok: true, status, error: None },
            Err(e) => Response { ok: false, error: Some(format!("{e:#}")), status: None },
        };
        (resp, false)
    }

    fn set_link(&self, pair: &str, up: bool) -> Result<()> {
        let link = &self.lab.links[self.lab.link_index(pair)?];
        let a = self.site_pos(&link.a);
        let b = self.site_pos(&link.b);
        for (from, to) in [(a, b), (b, a)] {
            let dir = self.direction(from, to).unwrap();
            dir.up.store(up, Relaxed);
            if !up {
                // A cut cable loses what was on it.
                let mut st = dir.state.lock().unwrap();
                let lost = st.in_flight.len() as u64;
                for p in st.in_flight.drain(..) {
                    self.pool.give(p.buf);
                }
                dir.counters.drops_down.fetch_add(lost, Relaxed);
            }
        }
        tracing::info!(link = pair, up, "link state changed");
        Ok(())
    }

    fn arm_tamper(&self, rule: crate::tamper::TamperRule) -> Result<()> {
        let (from, to) = rule
            .link
            .split_once('-')
            .with_context(|| format!("{:?} is not a direction: expected FROM-TO", rule.link))?;
        self.lab.link_index(&rule.link)?;
        let dir = self.direction(self.site_pos(from), self.site_pos(to)).unwrap();
        tracing::info!(?rule, "tamper rule armed");
        dir.state.lock().unwrap().tamper = Some(Tamperer::new(rule));
        Ok(())
    }

    fn site_pos(&self, name: &str) -> usize {
        self.lab.sites.iter().position(|s| s.name == name).expect("validated site")
    }

    fn status(&self) -> LabStatus {
        let now = Instant::now();
        let directions = self
            .directions
            .iter()
            .flatten()
            .map(|d| {
                let mut st = d.state.lock().unwrap();
                let (queue_packets, queue_bytes) = st.model.queue_depth(now);
                let c = &d.counters;
                DirectionStatus {
                    from: self.lab.sites[d.from].name.clone(),
                    to: self.lab.sites[d.to].name.clone(),
                    up: d.up.load(Relaxed),
                    params: st.model.params().clone(),
                    packets: c.packets.load(Relaxed),
                    bytes: c.bytes.load(Relaxed),
                    delivered_packets: c.delivered_packets.load(Relaxed),
                    delivered_bytes: c.delivered_bytes.load(Relaxed),
                    drops_loss: c.drops_loss.load(Relaxed),
                    drops_queue: c.drops_queue.load(Relaxed),
                    drops_down: c.drops_down.load(Relaxed),
                    queue_packets,
                    queue_bytes,
                    queue_limit_bytes: st.model.params().queue_limit_bytes(),
                    tampered: c.tampered.load(Relaxed),
                    mean_late_us: c.late_ns.load(Relaxed) as f64 / 1e3 / c.delivered_packets.load(Relaxed).max(1) as f64,
                }
            })
            .collect();
        LabStatus {
            lab: self.lab.name.clone(),
            forwarder_pid: std::process::id(),
            uptime_secs: (now - self.started).as_secs_f64(),
            directions,
        }
    }
}

fn configure_wan(ns: &str, addr: Ipv4Addr) -> Result<()> {
    sys::ip_in(ns, &["addr", "replace", &format!("{addr}/32"), "dev", WAN_IF])?;
    sys::ip_in(ns, &["link", "set", WAN_IF, "mtu", &MTU.to_string(), "txqueuelen", "1000", "up"])?;
    sys::ip_in(ns, &["route", "replace", "198.18.0.0/15", "dev", WAN_IF, "src", &addr.to_string()])?;
    Ok(())
}
