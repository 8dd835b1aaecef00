//! Builds the guest workload (crate ferry-guest) as a static binary and embeds it in ferry, so
//! `ferry lab image` needs nothing but the ferry binary. It is built by a nested cargo with its
//! own target directory (the outer build holds the workspace's) and its own RUSTFLAGS
//! (crt-static must not reach the host's proc-macros, so the target is named explicitly).
use std::path::PathBuf;
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest_dir.join("../ferry-guest");
    println!("cargo:rerun-if-changed={}", guest.join("src").display());
    println!("cargo:rerun-if-changed={}", guest.join("Cargo.toml").display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--offline", "--target", GUEST_TARGET, "--manifest-path"])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols");
    for var in ["RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER", "CARGO_MAKEFLAGS", "MAKEFLAGS", "MFLAGS"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the guest workload");
    assert!(status.success(), "building the guest workload (crates/ferry-guest) failed");
    let bin = target_dir.join(GUEST_TARGET).join("release/ferry-guest-workload");
    std::fs::copy(&bin, out.join("ferry-guest-workload")).expect("copy the guest workload");
}
