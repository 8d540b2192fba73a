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

# A real QEMU system emulator (TCG, no KVM) for the live-VM tests. Debian's
# qemu-system-x86 cannot be installed beside the machine's newer qemu-utils, so its
# packages are unpacked into a folder of their own, with the libraries they need.
QEMU_SYSTEM_DIR="${VMBACKUP_QEMU_SYSTEM_DIR:-/opt/vmbackup-test/qemu-system}"
if [ ! -x "$QEMU_SYSTEM_DIR/usr/bin/qemu-system-x86_64" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: $QEMU_SYSTEM_DIR (run this script as root to fetch it)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcapstone4 libfdt1 libpmem1 librdmacm1 \
    libibverbs1 libslirp0 libvdeplug2
  fetch="$(mktemp -d)"
  (cd "$fetch" && apt-get download -qq qemu-system-x86 qemu-system-data qemu-system-common seabios ipxe-qemu)
  mkdir -p "$QEMU_SYSTEM_DIR"
  for deb in "$fetch"/*.deb; do dpkg-deb -x "$deb" "$QEMU_SYSTEM_DIR"; done
  rm -rf "$fetch"
fi
export VMBACKUP_QEMU_SYSTEM_DIR="$QEMU_SYSTEM_DIR"

cargo fmt --all -- --check
cargo build --workspace --bins --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
