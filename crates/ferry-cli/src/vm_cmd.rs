//! `ferry vm start|list|stop|console|migrate`: VMs run by the local agent.
use crate::transfer_cmd::DEFAULT_DATA;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::config::control_socket;
use ferry_agent::control::{self, Event, Request};
use ferry_agent::migrate::{MigrateRequest, MigrateSummary};
use ferry_agent::vm::VmSpec;
use ferry_lab::units::parse_duration;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
    /// The local agent's data directory (its control socket lives there).
    #[arg(long, global = true, default_value = DEFAULT_DATA)]
    data: PathBuf,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Start a VM from its spec (TOML: name, vcpus, memory_mib, accel, kernel/initrd/append or
    /// disks, nics).
    Start { spec: PathBuf },
    /// The VMs this site runs and their state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Power a VM down (then end QEMU after --grace, at once with --force).
    Stop {
        name: String,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        grace: Duration,
        #[arg(long)]
        force: bool,
    },
    /// The last lines of a VM's serial console.
    Console {
        name: String,
        #[arg(long, default_value_t = 40)]
        lines: usize,
    },
    /// Move a running VM to another site (live): its RAM and device state travel over the
    /// sites' mutual-TLS channel; the VM runs on here until the destination runs it.
    Migrate {
        name: String,
        #[arg(long)]
        to: String,
        /// The pause a client should see at most: QEMU's downtime-limit is this less the
        /// one-way delay (at least 20 ms); raised step by step if the guest dirties memory
        /// faster than it moves.
        #[arg(long, default_value = "60ms", value_parser = parse_duration)]
        downtime: Duration,
        /// One machine-readable summary instead of progress lines.
        #[arg(long)]
        json: bool,
        /// Hash every local disk at both sites in the switchover pause; the VM runs at the
        /// destination only if they are equal (the pause grows by the time to read a disk).
        #[arg(long)]
        verify_disks: bool,
        /// Send the disks' bulk pass whole before the RAM migration starts, instead of running
        /// the two side by side (the default for raw disks; a qcow2 disk always goes first).
        #[arg(long)]
        disks_first: bool,
        /// Switch to post-copy once the first pass is done if the guest dirties memory about as
        /// fast as the path carries it (or pre-copy has not converged in 20 s): the VM then runs
        /// at the destination and fetches what it lacks from here. Until the last page arrives
        /// the VM's state is split between the sites: a cut link pauses it at both until the
        /// move resumes (for up to 10 minutes), and a destination QEMU that dies loses it.
        /// Diskless VMs only.
        #[arg(long, conflicts_with = "cold")]
        postcopy: bool,
        /// Move it stopped: shut the guest down, send its disks, boot it at the destination.
        #[arg(long)]
        cold: bool,
        /// With --cold: how long the guest has to power off before QEMU is quit.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        grace: Duration,
    },
}

pub fn run(a: VmArgs) -> Result<()> {
    let socket = control_socket(&a.data);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ask = |req: Request, on: &mut dyn FnMut(&Event)| rt.block_on(control::request(&socket, &req, on));
    match a.command {
        VmCommand::Start { spec } => {
            let text = std::fs::read_to_string(&spec).with_context(|| format!("reading {}", spec.display()))?;
            let spec = VmSpec::from_toml(&text)?;
            print_ok(ask(Request::VmStart { spec }, &mut |_| {})?)
        }
        VmCommand::List { json } => match ask(Request::VmList, &mut |_| {})? {
            Event::Vms { vms } if json => {
                println!("{}", serde_json::to_string(&vms)?);
                Ok(())
            }
            Event::Vms { vms } => {
                println!("{:<24} {:>8} {:>6} {:>6}  state", "name", "pid", "MiB", "vCPUs");
                for v in vms {
                    println!("{:<24} {:>8} {:>6} {:>6}  {}", v.name, v.pid, v.memory_mib, v.vcpus, v.state);
                }
                Ok(())
            }
            other => unexpected(other),
        },
        VmCommand::Stop { name, grace, force } => print_ok(ask(Request::VmStop { name, grace_ms: if force { 0 } else { grace.as_millis() as u64 } }, &mut |_| {})?),
        VmCommand::Console { name, lines } => match ask(Request::VmConsole { name, lines }, &mut |_| {})? {
            Event::Console { text } => {
                println!("{text}");
                Ok(())
            }
            other => unexpected(other),
        },
        VmCommand::Migrate { name, to, downtime, json, cold, grace, verify_disks, disks_first, postcopy } => {
            let req = Request::Migrate(MigrateRequest { vm: name, to, downtime_ms: downtime.as_millis() as u32, cold, grace_ms: grace.as_millis() as u32, verify_disks, overlap_disks: !disks_first, postcopy });
            let mut on = |ev: &Event| {
                if json {
                    return;
                }
                match ev {
                    Event::Started { connections, rtt_ms, .. } => eprintln!("destination ready · {connections} connections · RTT {rtt_ms:.1} ms"),
                    Event::MigrateProgress { status, stream_bytes, remaining, wire_sent, seconds } => {
                        eprintln!("{seconds:6.1} s  {status:<10} stream {:>8.1} MB  wire {:>8.1} MB  RAM left {:>7.1} MB", mb(*stream_bytes), mb(*wire_sent), mb(*remaining))
                    }
                    _ => {}
                }
            };
            match ask(req, &mut on)? {
                Event::Migrated(s) if json => {
                    println!("{}", serde_json::to_string(&s)?);
                    Ok(())
                }
                Event::Migrated(s) => {
                    print_summary(&s);
                    Ok(())
                }
                other => unexpected(other),
            }
        }
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn print_summary(s: &MigrateSummary) {
    let security = if s.encrypted { " · mutual TLS" } else { " · UNENCRYPTED" };
    if s.cold {
        println!("VM {} was shut down, its disks moved (each verified) and it boots at {} · {:.2} s · RTT {:.1} ms · wire {:.1} MB{security}", s.vm, s.to, s.seconds, s.rtt_ms, mb(s.wire_sent));
    } else {
        println!("VM {} now runs at {} · {:.2} s · RTT {:.1} ms · {} connections{security}", s.vm, s.to, s.seconds, s.rtt_ms, s.connections);
        print_live(s);
    }
    if let Some(d) = &s.disks {
        println!(
            "  disks: {} · {:.1} MB · bulk {:.2} s, {:.1} MB sent, {:.1} MB reused · {} live rounds, {:.1} MB dirty · last {:.1} MB in {:.0} ms paused",
            d.disks,
            mb(d.bytes),
            d.bulk_seconds,
            mb(d.bulk_sent),
            mb(d.bulk_reused),
            d.rounds,
            mb(d.dirty_bytes),
            mb(d.final_bytes),
            d.final_ms
        );
    }
}

fn print_live(s: &MigrateSummary) {
    let downtime = s.qemu_downtime_ms.map_or("-".into(), |d| format!("{d:.0} ms"));
    println!("  QEMU's stream {:.1} MB → on the wire {:.1} MB ({:.1} %) · QEMU downtime {downtime}", mb(s.stream_bytes), mb(s.wire_sent), 100.0 * s.wire_sent as f64 / s.stream_bytes.max(1) as f64);
    println!("  pages: {} sent, {} by reference, {} from the moved disks, {} zero · {:.1} MB other state", s.pages_sent, s.pages_referenced, s.pages_from_disk, s.pages_zero, mb(s.literal_bytes));
    if let Some(o) = &s.opaque {
        println!("  part of the stream was carried opaque: {o}");
    }
}

fn print_ok(ev: Event) -> Result<()> {
    match ev {
        Event::Ok { message } => {
            println!("{message}");
            Ok(())
        }
        other => unexpected(other),
    }
}

fn unexpected(ev: Event) -> Result<()> {
    match ev {
        Event::Failed { error } => bail!("{error}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}
