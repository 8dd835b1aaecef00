//! Post-copy that lost its session. From the switch on, each site's QEMU holds part of the VM:
//! the destination runs it, the source holds the pages not sent yet. A cut link, a dead
//! connection or a killed transfer pauses both QEMUs (`postcopy-paused`), and nothing is lost
//! while they wait: neither is ended or restarted. The source opens a session again; the
//! destination's QEMU listens anew (`migrate-recover`), the source's goes on into it (`migrate`
//! with `resume`), the two QEMUs exchange which pages arrived, and the rest follows.
use super::readiness::Readiness;
use super::source::{self, PumpState, SourceContext};
use super::{Arrival, MigrateRequest, MigrateSummary};
use crate::control::Event;
use crate::session::WireCounter;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ferry_proto::MigrationId;
use serde_json::json;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long the source keeps trying to reach the destination again. Past it the move fails,
/// and both QEMUs still wait, paused, for an operator (QEMU's own `migrate-recover`).
const RESUME_WITHIN: Duration = Duration::from_secs(600);
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long a QEMU whose stream is gone may take to notice before it is paused outright.
const NOTICE_WITHIN: Duration = Duration::from_secs(2);

/// The first session's figures, for the summary.
pub struct First {
    pub rtt: Duration,
    pub connections: usize,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn resume_postcopy(ctx: &SourceContext<'_>, req: &MigrateRequest, migration: MigrationId, spec: &crate::vm::VmSpec, st: &Arc<PumpState>, events: &mpsc::UnboundedSender<Event>, counter: &Arc<WireCounter>, started: Instant, first: First, lost: anyhow::Error) -> Result<MigrateSummary> {
    let deadline = Instant::now() + RESUME_WITHIN;
    let mut why = lost;
    let mut tries = 0u32;
    loop {
        tracing::warn!(vm = %req.vm, to = %req.to, "post-copy lost its session; the VM waits, paused, at both sites until it resumes: {why:#}");
        if paused(ctx, &req.vm).await? {
            // Everything had arrived: the destination's QEMU confirmed it before the loss.
            return source::finish_move(ctx, req, first.rtt, first.connections, counter, st, started, spec, None).await;
        }
        if Instant::now() > deadline {
            bail!("post-copy of {} to {} could not be resumed within {} s ({why:#}): the VM waits, paused, at both sites; each QEMU keeps its part", req.vm, req.to, RESUME_WITHIN.as_secs());
        }
        if tries > 0 {
            tokio::time::sleep(RETRY_EVERY).await;
        }
        tries += 1;
        let arrival = Arrival { spec: spec.clone(), cold: false, staged: Vec::new(), postcopy: true, resume: tries };
        let arrival = Bytes::from(serde_json::to_vec(&arrival)?);
        // A destination that could not resume yet (its QEMU still winding the old stream
        // down) may later: every failure is tried again until the deadline.
        let (conns, rtt, held, _lease) = match source::prepare(ctx, req, migration, &arrival, counter).await {
            Ok(opened) => opened,
            Err(e) => {
                why = e;
                continue;
            }
        };
        let ready = Arc::new(Readiness::already(&req.vm, conns.len(), held));
        let qemu = match resume_qemu(ctx, &req.vm).await {
            Ok(q) => q,
            Err(e) => {
                why = e.context("resuming the source QEMU's post-copy");
                continue;
            }
        };
        st.resumes.fetch_add(1, Relaxed);
        tracing::info!(vm = %req.vm, to = %req.to, at_ms = started.elapsed().as_millis() as u64, "post-copy resumes");
        match source::relay(ctx, req, migration, conns, rtt, &ready, qemu.try_clone()?, st, events, counter, started, None, None, true).await {
            Ok(()) => return source::finish_move(ctx, req, first.rtt, first.connections, counter, st, started, spec, None).await,
            Err(e) => {
                let _ = qemu.shutdown(std::net::Shutdown::Both);
                why = e;
            }
        }
    }
}

/// Waits until the source QEMU's post-copy is paused (or done: true). A QEMU whose stream
/// still looks open (the session died, its socket did not) is paused outright.
async fn paused(ctx: &SourceContext<'_>, vm: &str) -> Result<bool> {
    let since = Instant::now();
    let mut asked = false;
    loop {
        let m = ctx.vms.qmp(vm).await?.migration().await?;
        match m["status"].as_str().unwrap_or("") {
            "postcopy-paused" => return Ok(false),
            "completed" => return Ok(true),
            "postcopy-active" | "postcopy-recover-setup" | "postcopy-recover" => {
                if !asked && since.elapsed() > NOTICE_WITHIN {
                    ctx.vms.qmp(vm).await?.execute("migrate-pause", json!({})).await.context("pausing the source QEMU's post-copy")?;
                    asked = true;
                }
            }
            other => bail!("the source QEMU's post-copy is {other:?}: {}", m["error-desc"].as_str().unwrap_or("no reason given")),
        }
        if since.elapsed() > 5 * NOTICE_WITHIN {
            bail!("the source QEMU's post-copy did not pause");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Hands the source QEMU a new socket to go on in; the agent keeps the other end.
async fn resume_qemu(ctx: &SourceContext<'_>, vm: &str) -> Result<UnixStream> {
    let mut qmp = ctx.vms.qmp(vm).await?;
    let qemu = source::give_stream_socket(&mut qmp).await?;
    qmp.execute("migrate", json!({"uri": "fd:ferry-mig", "resume": true})).await?;
    Ok(qemu)
}
