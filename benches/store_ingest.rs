//! Ingest throughput of a vmbackup-store over loopback: several client streams upload
//! distinct 4 MiB chunks (pre-encoded, half compressible text, half random) into a real
//! store process; prints MiB/s of chunk bytes accepted. Reported, never asserted.
//!
//! Run: `cargo build --release --bins && cargo bench --bench store_ingest`
//! (`VMBACKUP_BENCH_MIB` sets the volume, default 1024).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::store::v1 as pb;

const CHUNK: usize = 4 << 20;

fn chunk(i: u64) -> Vec<u8> {
    if i.is_multiple_of(2) {
        common::pseudo_random(i, CHUNK)
    } else {
        let words = b"volume backup chunk store zstd blake3 qemu kvm host ";
        let mut v: Vec<u8> = words.iter().cycle().take(CHUNK).copied().collect();
        v[..8].copy_from_slice(&i.to_le_bytes());
        v
    }
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let chunks = mib / 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::start_store_with(dir.path(), "store", None, 4 << 20);
    let encoded: Vec<(Digest, Vec<u8>)> = (0..chunks)
        .map(|i| {
            let c = chunk(i);
            (Digest::of(&c), blob::encode(&c, 1).expect("encode"))
        })
        .collect();
    let stored: u64 = encoded.iter().map(|(_, b)| b.len() as u64).sum();
    for streams in [1usize, 2, 4] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = common::start_store_with(dir.path(), "store", None, 4 << 20);
        let mut c = common::store_client(&store).await;
        let session = c
            .open_session(pb::OpenSessionRequest { client: "bench".into(), ttl_seconds: 0 })
            .await
            .expect("session")
            .into_inner()
            .session_id;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..streams {
            let mine: Vec<pb::UploadChunk> = encoded
                .iter()
                .skip(s)
                .step_by(streams)
                .map(|(d, b)| pb::UploadChunk {
                    session_id: session.clone(),
                    digest: d.0.to_vec(),
                    blob: b.clone().into(),
                })
                .collect();
            let mut client = common::store_client(&store).await;
            tasks.push(tokio::spawn(
                async move { client.upload_chunks(tokio_stream::iter(mine)).await.expect("upload") },
            ));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "store ingest, {streams} stream(s): {mib} MiB logical ({:.0} MiB stored) in {secs:.2}s = {:.0} MiB/s logical, {:.0} MiB/s stored",
            stored as f64 / 1048576.0,
            mib as f64 / secs,
            stored as f64 / 1048576.0 / secs
        );
    }
    drop(store);
}
