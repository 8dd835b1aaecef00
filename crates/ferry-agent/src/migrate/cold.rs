//! A cold move, the method ferry's research started from: the guest shuts down, its disks go
//! through the transfer engine (only what the destination lacks; each disk verified by digest
//! before it is committed there), and the destination boots it. Whatever fails, the source
//! boots the VM again from its own disks, which the move only read.
use super::disks::{object_name, DiskSummary};
use super::source::{prepare, SourceContext};
use super::{Arrival, MigrateRequest, MigrateSummary};
use crate::control::{self, Event, SendRequest};
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
    ctx.vms.stop(&req.vm, Duration::from_millis(req.grace_ms as u64)).await?;
    let counter = Arc::new(WireCounter::default());
    let moved = async {
        let mut summary = DiskSummary { disks: spec.disks.len(), ..Default::default() };
        for d in &spec.disks {
            let send = SendRequest { source: d.path.clone(), to: req.to.clone(), dest_path: object_name(&spec.name, d), base: d.base.clone(), block: 64 << 10, cdc: false, zstd_level: 1, retries: 2, live: false };
            let sent = control::run_send(ctx.cfg, ctx.identity, ctx.warm, send, events.clone()).await.with_context(|| format!("sending disk {}", d.path.display()))?;
            summary.bytes += sent.size;
            summary.bulk_sent += sent.progress.sent_payload;
            summary.bulk_reused += sent.progress.reused;
            counter.sent.fetch_add(sent.wire_sent, Relaxed);
            counter.received.fetch_add(sent.wire_received, Relaxed);
        }
        summary.bulk_seconds = started.elapsed().as_secs_f64();
        let arrival = Bytes::from(serde_json::to_vec(&Arrival { spec: spec.clone(), cold: true })?);
        let (conns, rtt, _) = prepare(ctx, &req, session::rand_bytes(), &arrival, &counter).await?;
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
            let state = match ctx.vms.start(&spec, false).await {
                Ok(()) => "the VM boots again here from its own disks".to_string(),
                Err(boot) => format!("booting it again here failed too: {boot:#}"),
            };
            Err(e.context(format!("the cold move of {} to {} failed; {state}", req.vm, req.to)))
        }
    }
}
