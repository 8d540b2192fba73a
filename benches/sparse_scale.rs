//! Memory flat in volume size: the same data (`VMBACKUP_BENCH_MIB`, default 2048, in 1 MiB
//! pieces spread evenly) in a 64 GiB and in a 4 TiB sparse raw volume, each backed up once to
//! a store with 4 MiB chunks, in one run. Reports the backup's time and the agent's peak RSS
//! (VmHWM, a fresh agent per volume); reported, never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench sparse_scale`.

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use vmbackup_proto::agent::v1 as pb;

const VM: &str = "4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";
const ROOT: &str = "5d6e7f8a9b0c1d2e3f4a5b6c7d8e9fa0";

/// A sparse raw volume of `size` bytes with `mib` MiB of incompressible data spread evenly.
fn volume(path: &Path, size: u64, mib: u64) {
    let mut f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
    let stride = size / mib;
    for i in 0..mib {
        f.seek(SeekFrom::Start(i * stride)).expect("seek");
        f.write_all(&common::pseudo_random(i + 1, 1 << 20)).expect("write");
    }
    f.sync_all().expect("sync");
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    println!("{:<28} {:>10} {:>12} {:>14}", "volume", "data", "backup s", "agent peak RSS");
    for (label, size) in [("64 GiB sparse", 64u64 << 30), ("4 TiB sparse", 4u64 << 40)] {
        let work = tempfile::tempdir().expect("tempdir");
        let w = work.path();
        let img = w.join("volume.raw");
        volume(&img, size, mib);
        let store = common::start_store_with(w, "store", None, 4 << 20);
        let cfg = w.join("agent.toml");
        std::fs::write(&cfg, format!("[volumes]\nroots = [\"{}\"]\n", w.display())).expect("config");
        let agent = common::start_agent(w, common::AgentOptions { config: Some(cfg), ..Default::default() });
        let bs = common::add_storage(&agent, &store, "bench").await;
        let mut c = common::backup_client(&agent).await;
        let t = Instant::now();
        c.create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs,
            name: "scale".into(),
            vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
            ..Default::default()
        })
        .await
        .expect("backup");
        let secs = t.elapsed().as_secs_f64();
        println!("{label:<28} {:>6} MiB {secs:>12.1} {:>10} MiB", mib, common::peak_rss_kib(agent.pid()) >> 10);
    }
}
