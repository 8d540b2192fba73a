//! Garbage collection and verification of a store holding a million chunks: how long each
//! takes and how much memory it needs (`cargo bench -p vmbackup-store --bench gc_scale`).
//!
//! The store is a real directory store filled through the chunk store's own upload path
//! (checked blobs, one fsync per chunk, sessions, indexes, committed groups), on several
//! threads because each upload waits for its fsync. Every chunk is small (its content is
//! its number) so the figures show the per-chunk cost of GC's mark and sweep, not of reading
//! data. Half of the groups are then deleted and GC runs: it touches the half still named
//! and removes the rest. A second GC finds nothing to remove; verify then reads every chunk.
//!
//! Peak memory is this process's VmHWM, reset (`clear_refs`) before each measured step, so
//! it is what that step needed on top of the store's own state.
//!
//! Settings: `VMBACKUP_BENCH_CHUNKS` (default 1 000 000), `VMBACKUP_BENCH_GROUP_CHUNKS`
//! (chunks named by each group, default 25 000), `VMBACKUP_BENCH_DIR` (where the store goes;
//! default a temporary directory), `VMBACKUP_BENCH_THREADS` (uploaders, default 4).

use std::time::{Duration, Instant};

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::sessions::SessionOwner;

#[path = "../tests/common/mod.rs"]
mod common;

const CHUNK_SIZE: u32 = 64 << 10;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// This process's peak resident set since the last [`reset_peak`], in MiB.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib / 1024.0
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmRSS in /proc/self/status")
        / 1024.0
}

/// The content of chunk `n`: its number, so every chunk is distinct.
fn content(n: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..8].copy_from_slice(&n.to_le_bytes());
    c[8..].copy_from_slice(b"gc-scale");
    c
}

/// Uploads chunks `first..first + count` in one session and commits a group naming them.
fn upload_group(s: &ChunkStore, first: u64, count: u64) -> String {
    let (session, _) = s.sessions().open("gc-scale", SessionOwner::local(), Duration::ZERO).expect("open a session");
    let virtual_size = u64::from(CHUNK_SIZE) * count;
    let mut ix = VolumeIndex::new([7; 16], virtual_size, CHUNK_SIZE, VolumeFormat::Raw).expect("index");
    for (slot, n) in (first..first + count).enumerate() {
        let c = content(n);
        let d = Digest::of(&c);
        s.insert_chunk(&session, &d, &blob::encode(&c, 1).expect("encode")).expect("upload a chunk");
        ix.digests[slot] = d;
    }
    let vb = common::uuid();
    let index_name = format!("{vb}.vidx");
    let digest = s.put_index(&session, &index_name, &ix.encode()).expect("store the index");
    let m = common::one_volume_manifest(vb, index_name, &digest, virtual_size, CHUNK_SIZE);
    s.commit_group(&session, &m.encode().expect("manifest"), 0).expect("commit");
    s.sessions().close(&session).expect("close the session");
    m.group_uuid
}

fn main() {
    let chunks = setting("VMBACKUP_BENCH_CHUNKS", 1_000_000);
    let per_group = setting("VMBACKUP_BENCH_GROUP_CHUNKS", 25_000).max(1);
    let threads = setting("VMBACKUP_BENCH_THREADS", 4).max(1);
    let groups = chunks.div_ceil(per_group);
    let _tmp;
    let dir = match std::env::var_os("VMBACKUP_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            _tmp = tempfile::tempdir().expect("tempdir");
            _tmp.path().to_path_buf()
        }
    };
    let store_dir = dir.join("gc-scale-store");
    let _ = std::fs::remove_dir_all(&store_dir);
    let s = ChunkStore::open(&store_dir, CHUNK_SIZE).expect("open the store");

    // Fill: `groups` groups of `per_group` chunks, on `threads` uploaders.
    let timer = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(0);
    let made = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let g = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if g >= groups {
                        break;
                    }
                    let first = g * per_group;
                    let uuid = upload_group(&s, first, per_group.min(chunks - first));
                    made.lock().expect("lock").push((g, uuid));
                }
            });
        }
    });
    let fill = timer.elapsed();
    let mut made = made.into_inner().expect("lock");
    made.sort();
    println!(
        "filled: {chunks} chunks in {groups} groups in {:.0} s ({:.0} chunks/s, {threads} uploaders)",
        fill.as_secs_f64(),
        chunks as f64 / fill.as_secs_f64()
    );

    // Every other group goes: half the chunks are garbage.
    for (_, g) in made.iter().step_by(2) {
        s.delete_group(g).expect("delete a group");
    }
    let kept_groups = made.len() / 2;
    std::thread::sleep(Duration::from_millis(20));

    println!("| step | chunks removed | chunks kept | seconds | chunks/s | peak RSS MiB | RSS before MiB |");
    println!("|---|---|---|---|---|---|---|");
    for step in ["GC (half garbage)", "GC (nothing to remove)"] {
        let before = rss_mib();
        reset_peak();
        let r = s.garbage_collect(Duration::ZERO).expect("gc");
        let peak = peak_mib();
        let seen = r.chunks_removed + r.chunks_kept;
        println!(
            "| {step} | {} | {} | {:.1} | {:.0} | {peak:.0} | {before:.0} |",
            r.chunks_removed,
            r.chunks_kept,
            r.seconds,
            seen as f64 / r.seconds
        );
    }
    let before = rss_mib();
    reset_peak();
    let timer = Instant::now();
    let v = s.verify(&[]).expect("verify");
    let secs = timer.elapsed().as_secs_f64();
    let peak = peak_mib();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "verify found damage: {v:?}");
    println!(
        "| verify ({kept_groups} groups) | - | {} | {secs:.1} | {:.0} | {peak:.0} | {before:.0} |",
        v.chunks_checked,
        v.chunks_checked as f64 / secs
    );
}
