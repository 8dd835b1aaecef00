//! When the source cannot tell how a migration ended — its agent was killed and restarted, or
//! the session died after the VM stopped — it asks the destination rather than guess: resuming
//! a VM the destination already runs would leave two copies. Until the destination answers,
//! the source QEMU stays as it is; QEMU holds a copy of the agent's end of the migration socket
//! ("ferry-hold"), so the agent's death alone does not make QEMU abandon the migration and
//! restart the VM on its own.
use super::source::SourceContext;
use crate::session;
use anyhow::{bail, Result};
use bytes::Bytes;
use ferry_proto::{Message, MigrationId};
use ferry_transfer::wire;
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The name under which QEMU keeps the agent's end of the migration socket.
pub const HOLD_FD: &str = "ferry-hold";
const JOURNAL: &str = "migration.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    pub migration: String,
    pub to: String,
}

pub fn record(vm_dir: &Path, migration: &MigrationId, to: &str) -> Result<()> {
    let j = Journal { migration: migration.iter().map(|b| format!("{b:02x}")).collect(), to: to.into() };
    let tmp = vm_dir.join("migration.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&j)?)?;
    std::fs::rename(&tmp, vm_dir.join(JOURNAL))?;
    Ok(())
}

pub fn clear(vm_dir: &Path) {
    let _ = std::fs::remove_file(vm_dir.join(JOURNAL));
}

pub fn read(vm_dir: &Path) -> Option<(MigrationId, String)> {
    let j: Journal = serde_json::from_slice(&std::fs::read(vm_dir.join(JOURNAL)).ok()?).ok()?;
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(j.migration.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((id, j.to))
}

/// The destination's word on a migration: `Some(running)` once decided, `None` while it is
/// still under way there.
pub async fn ask(ctx: &SourceContext<'_>, vm: &str, to: &str, migration: MigrationId) -> Result<Option<(bool, String)>> {
    let conn = &mut session::open_one(ctx.cfg, ctx.identity, ctx.warm, to).await?;
    // An empty spec asks how the migration ended; it never starts anything.
    conn.send(Message::MigrateOpen { migration, vm: vm.into(), spec: Bytes::new() }).await?;
    loop {
        match wire::next(conn).await? {
            Message::MigrateOutcome { running, message, .. } => return Ok(Some((running, message))),
            Message::Error { code: UNDECIDED, .. } => return Ok(None),
            Message::Error { message, .. } => bail!("{to}: {message}"),
            _ => {}
        }
    }
}

/// The code of the `Error` a destination answers while the migration is still under way there.
pub const UNDECIDED: u16 = 2;

/// Settles a migration the source lost track of: asks the destination until it answers, then
/// ends the source copy (the destination runs the VM) or lets it run on. Says what it did.
pub async fn settle(ctx: &SourceContext<'_>, vm: &str, to: &str, migration: MigrationId) -> String {
    let dir = ctx.vms.dir(vm);
    let mut logged = false;
    loop {
        match ask(ctx, vm, to, migration).await {
            Ok(Some((true, _))) => {
                // Post-copy: the destination runs the VM on pages this QEMU still holds.
                if let Some(status) = super::source::split_status(ctx, vm).await {
                    return format!("{to} runs the VM, but post-copy was under way (the source QEMU is {status}): both QEMUs are kept as they are (a restarted agent does not resume a post-copy)");
                }
                ctx.vms.kill(vm).await;
                clear(&dir);
                return format!("{to} runs the VM: the source copy is removed");
            }
            Ok(Some((false, why))) => {
                let state = release(ctx, vm).await;
                clear(&dir);
                return format!("{to} does not run the VM ({why}); {state}");
            }
            Ok(None) => {}
            Err(e) if !logged => {
                tracing::warn!(vm, to, "IN DOUBT: cannot ask {to} how the migration ended ({e:#}); the source VM stays as it is until {to} answers");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The destination does not run the VM: the source QEMU abandons the migration and runs it.
pub async fn release(ctx: &SourceContext<'_>, vm: &str) -> String {
    if let Ok(mut q) = ctx.vms.qmp(vm).await {
        let _ = q.execute("migrate_cancel", json!({})).await;
        // The last reference to the agent's end of the socket: QEMU now sees it close.
        let _ = q.execute("closefd", json!({ "fdname": HOLD_FD })).await;
    }
    for _ in 0..200 {
        let status = match ctx.vms.qmp(vm).await {
            Ok(mut q) => q.status().await.unwrap_or_default(),
            Err(e) => return format!("the source QEMU does not answer: {e:#}"),
        };
        match status.as_str() {
            "running" => return "the VM keeps running here".into(),
            // Completed on QEMU's side but not run at the destination: start it here again.
            "postmigrate" | "paused" => {
                if let Ok(mut q) = ctx.vms.qmp(vm).await {
                    let _ = q.execute("cont", json!({})).await;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "the source VM did not resume".into()
}

/// At agent start: settles every migration a previous run of the agent left unfinished.
pub async fn settle_all(ctx: &SourceContext<'_>) {
    for vm in ctx.vms.names() {
        if let Some((migration, to)) = read(&ctx.vms.dir(&vm)) {
            tracing::warn!(%vm, %to, "a migration was under way when the agent stopped: asking {to} how it ended");
            let what = settle(ctx, &vm, &to, migration).await;
            tracing::warn!(%vm, "{what}");
        }
    }
}
