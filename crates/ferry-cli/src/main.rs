//! `ferry`: moves running VMs between sites over long, untrusted links.
mod demo;
mod lab_cmd;

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
    /// Bring up two sites 100 ms apart, boot a guest in one, show it running, tear down.
    Demo(demo::DemoArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(args) => lab_cmd::run(args),
        Command::Demo(args) => demo::run(args),
    };
    if let Err(e) = result {
        eprintln!("ferry: error: {e:#}");
        std::process::exit(1);
    }
}
