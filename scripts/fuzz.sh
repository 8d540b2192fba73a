#!/usr/bin/env bash
# Runs vmbackup's fuzzers for a bounded time each: the qcow2 parsers (agent/fuzz) from seed
# images qemu-img makes, then the format decoders (proto/fuzz). Any crash, panic, leak or
# timeout fails the run; libFuzzer leaves the input in <crate>/fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                        # 60 s per qcow2 target, 15 s per decoder
#   VMBACKUP_FUZZ_SECONDS=600 scripts/fuzz.sh
#
# cargo-fuzz is installed when missing. It needs rustc's unstable sanitizer flags; the
# stable toolchain allows them with RUSTC_BOOTSTRAP=1, so no nightly toolchain is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
secs="${VMBACKUP_FUZZ_SECONDS:-60}"
decoder_secs=$(( secs / 4 > 5 ? secs / 4 : 5 ))

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT

# Seed images: small clusters keep them short enough for libFuzzer to mutate. Between them
# they have data, zero clusters, an internal snapshot, a persistent bitmap, a compressed
# cluster, a backing file and an extended-L2 layout.
img() { qemu-img create -q -f qcow2 -o "cluster_size=4096${2:+,$2}" "$seeds/$1" "${3:-1M}"; }
img plain.qcow2
img data.qcow2
qemu-io -f qcow2 -c 'write -P 0x5a 0 12k' -c 'write -z 64k 8k' -c 'write -P 0x11 900k 4k' "$seeds/data.qcow2" >/dev/null
cp "$seeds/data.qcow2" "$seeds/snapshot.qcow2"
qemu-img snapshot -c first "$seeds/snapshot.qcow2"
qemu-io -f qcow2 -c 'write -P 0x22 0 4k' "$seeds/snapshot.qcow2" >/dev/null
cp "$seeds/data.qcow2" "$seeds/bitmap.qcow2"
qemu-img bitmap -f qcow2 --add "$seeds/bitmap.qcow2" dirty
raw="$seeds/raw.img"
head -c 65536 /dev/urandom > "$raw"
printf 'vmbackup%.0s' $(seq 1 4096) >> "$raw"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$raw" "$seeds/compressed.qcow2"
rm -f "$raw"
img overlay.qcow2 "backing_file=data.qcow2,backing_fmt=qcow2"
img extl2.qcow2 "extended_l2=on,cluster_size=16384"
ls "$seeds" | sed 's/^/seed: /'

# run <crate dir> <target> <seconds> [seed dir] [libFuzzer options...]
run() {
  local dir="$1" target="$2" t="$3"
  shift 3
  local corpus="$root/$dir/fuzz/corpus/$target"
  mkdir -p "$corpus"
  local inputs=("$corpus")
  if [ $# -gt 0 ] && [ -d "$1" ]; then
    inputs+=("$1")
    shift
  fi
  echo "fuzzing $dir $target for ${t}s" >&2
  (cd "$root/$dir/fuzz" && cargo fuzz run "$target" "${inputs[@]}" -- \
    -max_total_time="$t" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 -print_funcs=0 "$@")
}

run agent qcow2_header "$secs" "$seeds" -max_len=65536
run agent qcow2_open "$secs" "$seeds" -max_len=131072
for t in blob_decode index_decode manifest_decode sealed_blob_decode keyfile_decode; do
  run proto "$t" "$decoder_secs"
done
