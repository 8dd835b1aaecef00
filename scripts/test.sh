#!/usr/bin/env bash
# The whole test suite on a fresh machine (as root: the lab makes network namespaces and runs
# QEMU guests). Release mode: the WAN emulator must keep up with 1 Gbit/s in the fidelity tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/install-deps.sh
cargo test --release --locked --workspace "$@"
