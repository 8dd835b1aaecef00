#!/usr/bin/env bash
# Installs everything ferry's demo, tests and benchmarks need on a fresh Debian bookworm machine.
# Idempotent: re-running it is cheap once everything is present.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-deps: must run as root (apt-get)" >&2; exit 1; }; }

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null || return 1
  local major
  major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
  [ "${major:-0}" -ge 10 ]
}

PKGS=(busybox-static cpio iproute2 debootstrap e2fsprogs iperf3 iputils-ping nftables
      kmod linux-image-cloud-amd64 procps psmisc socat zstd rsync fonts-dejavu-core openssh-client openssh-server)

missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done

if [ ${#missing[@]} -gt 0 ] || ! qemu_ok; then
  need_root
  export DEBIAN_FRONTEND=noninteractive
  # QEMU 7.2 (bookworm) corrupts TCG guests that dirty memory during pre-copy: take 10.x from
  # backports. Enable the suite on the existing source entry rather than naming any mirror here.
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ] && ! grep -q 'bookworm-backports' "$src"; then
    sed -i '0,/^Suites:.*bookworm bookworm-updates/s//& bookworm-backports/' "$src"
  fi
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-deps: could not enable bookworm-backports in $src" >&2; exit 1
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${PKGS[@]}"
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
fi
qemu_ok || { echo "install-deps: QEMU >= 10 is required, found: $(qemu-system-x86_64 --version | head -1)" >&2; exit 1; }
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -1))"
