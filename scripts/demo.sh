#!/usr/bin/env bash
# The demo on a fresh machine: installs what ferry needs, builds it, runs `ferry demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/install-deps.sh
cargo build --release --locked -q
exec target/release/ferry demo "$@"
