//! Reading a qcow2 image: vmbackup's reader with one and with four threads against QEMU's
//! reader on the same image (`qemu-img bench`, 1 and 4 requests in flight) and against
//! `qemu-img convert` to a raw file on tmpfs (1 and 8 coroutines). The image
//! is 256 MiB with 3/4 of it allocated (half of that incompressible, half a repeating
//! pattern), the rest unallocated; readers skip what the allocation map says is not there,
//! as a backup does. Reported, never asserted: `cargo bench -p vmbackup-agent --bench
//! volume_read`.

#![allow(missing_docs)]

use std::path::Path;
use std::process::Command;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vmbackup_agent::volume::{self, ExtentKind, Limits, VolumeSource};

const SIZE: u64 = 256 << 20;
const PIECE: u64 = 4 << 20;

fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} not found ({e})"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn make_image(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; usize::try_from(SIZE).expect("fits")];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        match i % 4 {
            0 => {
                for b in chunk.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
                }
            }
            1 | 2 => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = u8::try_from(j % 251).unwrap_or(0)),
            _ => {}
        }
    }
    std::fs::write(&raw, &data).expect("write raw");
    let img = dir.join("bench.qcow2");
    run("qemu-img", &["convert", "-q", "-O", "qcow2", raw.to_str().expect("utf-8"), img.to_str().expect("utf-8")]);
    std::fs::remove_file(&raw).expect("rm");
    img
}

/// Reads every data piece of `v` with `threads` threads; returns bytes read.
fn read_with(v: &dyn VolumeSource, threads: usize) -> u64 {
    let mut pieces = Vec::new();
    for e in v.extents(0, v.virtual_size()).expect("extents") {
        if e.kind == ExtentKind::Data {
            let mut at = e.offset;
            while at < e.offset + e.len {
                let n = PIECE.min(e.offset + e.len - at);
                pieces.push((at, n));
                at += n;
            }
        }
    }
    let pieces = &pieces;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut buf = vec![0u8; usize::try_from(PIECE).expect("fits")];
                    let mut total = 0;
                    for &(at, n) in pieces.iter().skip(t).step_by(threads) {
                        let b = &mut buf[..usize::try_from(n).expect("fits")];
                        v.read_at(at, b).expect("read");
                        total += n;
                    }
                    total
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    })
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_image(dir.path());
    let v = volume::open(&img, None, &Limits::default()).expect("open");
    let mut g = c.benchmark_group("qcow2_read_256MiB");
    g.throughput(Throughput::Bytes(SIZE)).sample_size(10);
    for threads in [1, 4] {
        g.bench_function(format!("vmbackup_{threads}_thread"), |b| b.iter(|| read_with(v.as_ref(), threads)));
    }
    let path = img.to_str().expect("utf-8");
    // qemu-img bench: QEMU's own read path, 64 sequential 4 MiB requests, 1 or 4 in flight.
    let count = (SIZE / PIECE).to_string();
    for depth in ["1", "4"] {
        g.bench_function(format!("qemu-img_bench_depth{depth}"), |b| {
            b.iter(|| run("qemu-img", &["bench", "-f", "qcow2", "-c", &count, "-s", "4M", "-d", depth, path]))
        });
    }
    // qemu-img convert into a raw file on tmpfs: what users run to copy an image out.
    let shm = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let out = shm.path().join("out.raw");
    let out = out.to_str().expect("utf-8");
    for m in ["1", "8"] {
        g.bench_function(format!("qemu-img_convert_m{m}_to_tmpfs"), |b| {
            b.iter(|| run("qemu-img", &["convert", "-m", m, "-f", "qcow2", "-O", "raw", path, out]))
        });
    }
    g.finish();
}

/// The allocation-map walk alone (what a backup plans from): a 64 GiB qcow2 image with
/// 64 KiB of data at every GiB, so the walk crosses every L1 entry and reads 64 L2 tables.
fn map_walk(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("sparse.qcow2");
    let path = img.to_str().expect("utf-8");
    run("qemu-img", &["create", "-q", "-f", "qcow2", path, "64G"]);
    let writes: Vec<String> = (0..64).map(|i| format!("write -P 0x5a {i}G 64k")).collect();
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(path);
    run("qemu-io", &args);
    let v = volume::open(&img, None, &Limits::default()).expect("open");
    let mut g = c.benchmark_group("qcow2_map_walk_64GiB");
    g.throughput(Throughput::Bytes(v.virtual_size()));
    g.bench_function("vmbackup_extents", |b| b.iter(|| v.extents(0, v.virtual_size()).expect("extents").len()));
    g.bench_function("qemu-img_map", |b| b.iter(|| run("qemu-img", &["map", "--output=json", path])));
    g.finish();
}

criterion_group!(benches, bench, map_walk);
criterion_main!(benches);
