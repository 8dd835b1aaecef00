//! A cold move, the method ferry's research started from: the guest shuts down, its disks go
//! through the transfer engine (only what the destination lacks; each disk verified by digest
//! before it is committed there), and the destination boots it. Whatever fails, the source
//! boots the VM again from its own disks, which the move only read.
use super::disks::{disk_send, refuse_if_destination_runs, refuse_shared_names, DiskSummary};
use super::source::{prepare, SourceContext};
use super::{Arrival, MigrateRequest, MigrateSummary};
use crate::control::{self, Event};
use crate::session::{self, WireCounter};
use anyhow::{Context, Result};
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub async fn move_cold(ctx: &SourceContext<'_>, req: MigrateRequest, events: mpsc::UnboundedSender<Event>) -> Result<MigrateSummary> {
    let started = Instant::now();
    let spec = ctx.vms.spec(&req.vm)?;
    refuse_shared_names(&spec)?;
    // A cold move carries a qcow2 disk's file as it is.
    for d in spec.disks.iter().filter(|d| d.format == "qcow2") {
        super::disk_view::refuse_external_files(&d.path).map_err(|e| e.context(format!("VM {} keeps running here; nothing was moved", req.vm)))?;
    }
    refuse_if_destination_runs(ctx, &req.vm, &req.to).await?;
    ctx.vms.stop(&req.vm, Duration::from_millis(req.grace_ms as u64)).await?;
    let migration = session::rand_bytes();
    let opened = std::sync::atomic::AtomicBool::new(false);
    let counter = Arc::new(WireCounter::default());
    let moved = async {
        let mut summary = DiskSummary { disks: spec.disks.len(), ..Default::default() };
        for d in &spec.disks {
            let sent = control::run_send(ctx.cfg, ctx.identity, ctx.warm, disk_send(&spec.name, d, &req.to, false), None, events.clone()).await.with_context(|| format!("sending disk {}", d.path.display()))?;
            summary.bytes += sent.size;
            summary.bulk_sent += sent.progress.sent_payload;
            summary.bulk_reused += sent.progress.reused;
            counter.sent.fetch_add(sent.wire_sent, Relaxed);
            counter.received.fetch_add(sent.wire_received, Relaxed);
        }
        summary.bulk_seconds = started.elapsed().as_secs_f64();
        let arrival = Bytes::from(serde_json::to_vec(&Arrival { spec: spec.clone(), cold: true, staged: Vec::new(), postcopy: false, resume: 0 })?);
        opened.store(true, Relaxed);
        let (conns, rtt, _, _lease) = prepare(ctx, &req, migration, &arrival, &counter).await?;
        drop(conns);
        Ok::<_, anyhow::Error>((summary, rtt))
    };
    match moved.await {
        Ok((disks, rtt)) => {
            super::disks::index_left_copies(ctx.vms.data_dir().to_path_buf(), spec.clone(), ctx.cfg.tenant_key()?);
            Ok(MigrateSummary {
            vm: req.vm.clone(),
            to: req.to.clone(),
            seconds: started.elapsed().as_secs_f64(),
            rtt_ms: rtt.as_secs_f64() * 1e3,
            wire_sent: counter.sent.load(Relaxed),
            wire_received: counter.received.load(Relaxed),
            encrypted: !ctx.cfg.insecure_plaintext,
            disks: Some(disks),
            cold: true,
            ..Default::default()
            })
        }
        Err(e) => {
            // Once the destination was asked to boot it, only its word says whether it did:
            // booting here too would run the VM twice.
            let boots_there = if opened.load(Relaxed) { destination_runs(ctx, &req, migration).await } else { Some(false) };
            let state = match boots_there {
                Some(true) => format!("{} runs the VM nevertheless", req.to),
                None => format!("whether {} runs the VM could not be learned: it is not started here (its disks here are intact; start it with `ferry vm start` once {} is known not to run it)", req.to, req.to),
                Some(false) => match ctx.vms.start(&spec, false).await {
                    Ok(()) => "the VM boots again here from its own disks".to_string(),
                    Err(boot) => format!("booting it again here failed too: {boot:#}"),
                },
            };
            Err(e.context(format!("the cold move of {} to {} failed; {state}", req.vm, req.to)))
        }
    }
}

/// Asks the destination, for up to half a minute, whether it runs the VM.
async fn destination_runs(ctx: &SourceContext<'_>, req: &MigrateRequest, migration: ferry_proto::MigrationId) -> Option<bool> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Ok(Some((running, _)))) = tokio::time::timeout(Duration::from_secs(5), super::doubt::ask(ctx, &req.vm, &req.to, migration)).await {
            return Some(running);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}
