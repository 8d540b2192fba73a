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
# File-level restore tests build partitioned ext4 and XFS images without mounting (sfdisk,
# mke2fs -d, mkfs.xfs -p, and LVM metadata with pvcreate/vgcreate/vgcfgrestore on a loop
# device; xfs_db reads an inode's time as the oracle)
# and the resource tests use loop devices and tmpfs (losetup, mount).
command -v sfdisk >/dev/null 2>&1 || need+=(fdisk)
command -v mke2fs >/dev/null 2>&1 || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null 2>&1 || need+=(xfsprogs)
command -v vgcfgrestore >/dev/null 2>&1 || need+=(lvm2)
command -v losetup >/dev/null 2>&1 || need+=(mount)
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]} (install them, or run this script as root to install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# A real single-node Ceph for the RADOS and S3 backend tests (tests/common/ceph.rs starts
# mon, mgr, OSD and radosgw itself, in a temporary directory), the ceph/rados/radosgw-admin
# CLIs, librados-dev to link against librados, and curl to speak S3 (SigV4) to radosgw.
# Debian 12 has Ceph 16.2. The packages' postinst scripts start no daemon without systemd:
# deb-systemd-invoke acts only when systemd runs, and invoke-rc.d finds no runlevel.
# About a minute on a fresh machine; the output is shown only if the install fails.
ceph_need=()
command -v ceph-mon >/dev/null 2>&1 || ceph_need+=(ceph-mon)
command -v ceph-mgr >/dev/null 2>&1 || ceph_need+=(ceph-mgr)
command -v ceph-osd >/dev/null 2>&1 || ceph_need+=(ceph-osd)
command -v radosgw >/dev/null 2>&1 || ceph_need+=(radosgw)
command -v rados >/dev/null 2>&1 || ceph_need+=(ceph-common)
[ -e /usr/include/rados/librados.h ] || ceph_need+=(librados-dev)
command -v curl >/dev/null 2>&1 || ceph_need+=(curl)
if ((${#ceph_need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${ceph_need[*]} (install them, or run this script as root to install them)" >&2
    exit 1
  fi
  echo "installing ${ceph_need[*]}" >&2
  apt-get update -qq
  if ! out="$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${ceph_need[@]}" 2>&1)"; then
    echo "$out" >&2
    exit 1
  fi
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

# One clean build: incremental state would only add gigabytes to target/ that a single
# run never reads back.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all -- --check
cargo build --workspace --bins --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# The qcow2 parsers and the format decoders under libFuzzer for a bounded time each
# (VMBACKUP_FUZZ_SECONDS per qcow2 target, a quarter of it per decoder; 0 skips them).
if [ "${VMBACKUP_FUZZ_SECONDS:-60}" != 0 ]; then
  scripts/fuzz.sh
fi
