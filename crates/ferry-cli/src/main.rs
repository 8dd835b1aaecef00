//! `ferry`: moves running VMs between sites over long, untrusted links.
mod bench_cmd;
mod demo;
mod lab_cmd;
mod transfer_cmd;
mod vm_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Move running VMs between clouds, securely and fast")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Emulated inter-cloud sites and WAN links on this machine, for tests and benchmarks.
    Lab(lab_cmd::LabArgs),
    /// Site certificates: a CA per deployment, a certificate per site.
    #[command(subcommand)]
    Pki(transfer_cmd::PkiCommand),
    /// The per-site daemon: receives from other sites, sends for the local CLI.
    Agent(transfer_cmd::AgentArgs),
    /// The local agent's peer sites and the connections it keeps ready to each.
    Status(transfer_cmd::StatusArgs),
    /// Move disk images between sites.
    #[command(subcommand)]
    Image(transfer_cmd::ImageCommand),
    /// VMs run by the local agent: start, list, stop, console, migrate to another site.
    Vm(vm_cmd::VmArgs),
    /// Benchmarks against today's tools in the lab (long: run by hand, not in CI).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Two sites 100 ms apart: a guest runs in one, an image and its newer version move, then the
    /// running guest moves live there and back while a client probes it; all torn down after.
    Demo(demo::DemoArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only for a terminal: an agent's log is mostly a file, read by people and tests.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(args) => lab_cmd::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(cmd) => bench_cmd::run(cmd),
        Command::Pki(cmd) => transfer_cmd::pki(cmd),
        Command::Agent(args) => transfer_cmd::agent(args),
        Command::Image(cmd) => transfer_cmd::image(cmd),
        Command::Status(args) => transfer_cmd::status(args),
        Command::Vm(args) => vm_cmd::run(args),
    };
    if let Err(e) = result {
        eprintln!("ferry: error: {e:#}");
        std::process::exit(1);
    }
}
