//! A client probing a guest's echo service from inside a lab site for as long as something
//! lasts (a migration): the downtime that client sees.
use anyhow::{bail, Context, Result};
use ferry_lab::probe::{run_probe_until, ProbeReport};
use ferry_lab::topology::LabConfig;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ProbeReport>>>,
}

impl Prober {
    /// Starts probing `target` every `interval` from site `site`, for at most `longest`. The
    /// probe runs on a thread of this process that has entered the site's network namespace
    /// (`setns` moves only the calling thread).
    pub fn start(lab: &LabConfig, site: &str, target: SocketAddr, interval: Duration, longest: Duration) -> Result<Prober> {
        let ns = ferry_lab::sys::netns_path(&lab.namespace(lab.site(site)?));
        let nsfile = std::fs::File::open(&ns).with_context(|| format!("namespace {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {ns}: {}", std::io::Error::last_os_error());
            }
            run_probe_until(target, interval, longest, flag)
        });
        Ok(Prober { stop, thread: Some(thread) })
    }

    /// Stops probing and reports (about a second later: replies still in flight count).
    pub fn finish(mut self) -> Result<ProbeReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("once").join().map_err(|_| anyhow::anyhow!("the prober panicked"))?
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The downtime figures a probe report gives: the longest gap between replies, and the lost
/// probes as time (lost × interval).
pub fn downtime_ms(r: &ProbeReport) -> (Option<f64>, f64) {
    (r.longest_gap_ms, r.lost as f64 * r.interval_ms)
}
