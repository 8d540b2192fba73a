#!/usr/bin/env bash
# Runs every vmbackup test from a fresh Debian machine: installs what the tests need,
# builds the daemons the end-to-end tests start, then checks format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests drive (qemu-img/qemu-io make real images, ip makes test networks).
# Installed when missing.
need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# Network namespaces and veth links for the backup-network test (needs root).
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]} (install them, or run this script as root to install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo fmt --all -- --check
cargo build --workspace --bins --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
