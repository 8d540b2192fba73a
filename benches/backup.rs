//! End-to-end backup throughput: a real store and agent on loopback back up a generated
//! corpus (full), then a copy with 5% of its regions rewritten (incremental, no dirty
//! bitmap), at parallelism 1, 2 and 4. Prints MiB/s of logical size, MiB per CPU-second of
//! agent and store together, and each process's peak RSS. Then the incremental version is
//! restored to a raw and to a qcow2 file (each restore's peak RSS is its own: the peaks are
//! reset before it), and recovered to a second store (its stored size and peak RSS are the
//! second store's). Reported, never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench backup`
//! (`VMBACKUP_BENCH_MIB`, default 4096: the volume size; `VMBACKUP_BENCH_EMBEDDED=1` backs
//! up into the agent's embedded store, in-process, instead of a separate store process;
//! `VMBACKUP_BENCH_PAUSE=<seconds>` waits before the first backup and prints the daemons'
//! pids, to attach a profiler; `VMBACKUP_BENCH_CORPUS=real` backs up an ext4 image of /usr
//! of `VMBACKUP_BENCH_MIB` MiB and its copy with 5% of its regions rewritten instead of the
//! synthetic volume). Every step starts after a `sync`, so none pays for the
//! writeback of what came before it; a backup line also gives its seconds and CPU seconds
//! (the agent's share in brackets).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;

use std::path::Path;
use std::time::Instant;

use measure::{cpu_seconds, peak_rss_mib};
use vmbackup_proto::agent::v1 as pb;

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let corpus = tempfile::tempdir().expect("tempdir");
    let (v1, v2) = if std::env::var("VMBACKUP_BENCH_CORPUS").is_ok_and(|c| c == "real") {
        corpus::prefault_free_memory();
        println!("corpus: {mib} MiB ext4 image of /usr, second version with 5% of 4 MiB regions rewritten");
        corpus::real_versions(corpus.path(), mib)
    } else {
        println!("corpus: {mib} MiB raw volume, second version with 5% of 4 MiB regions rewritten");
        corpus::two_versions(corpus.path(), mib)
    };
    println!(
        "{:<12} {:>3} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "operation", "par", "MiB/s", "MiB/CPU-s", "agent MiB", "store MiB", "stored MiB"
    );
    // VMBACKUP_BENCH_PAR=4 runs one parallelism only; VMBACKUP_BENCH_BACKUP_ONLY=1 skips the
    // restores and the recover (for profiling a backup).
    let pars: Vec<u32> = match std::env::var("VMBACKUP_BENCH_PAR").ok().and_then(|v| v.parse().ok()) {
        Some(p) => vec![p],
        None => vec![1, 2, 4],
    };
    let backup_only = std::env::var_os("VMBACKUP_BENCH_BACKUP_ONLY").is_some();
    let embedded = std::env::var_os("VMBACKUP_BENCH_EMBEDDED").is_some();
    println!("store: {}", if embedded { "embedded in the agent" } else { "a separate process" });
    for parallelism in pars {
        let dir = tempfile::tempdir().expect("tempdir");
        let (agent, store, bs) = setup(dir.path(), corpus.path(), embedded).await;
        // The processes doing the work, and where the chunks land.
        let pids: Vec<u32> = std::iter::once(agent.pid()).chain(store.as_ref().map(common::Daemon::pid)).collect();
        let cpu_now = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
        let store_rss = || store.as_ref().map_or_else(|| "-".to_string(), |s| peak_rss_mib(s.pid()).to_string());
        let chunks = store.as_ref().map_or_else(|| agent.data_dir.join("store/chunks"), |s| s.data_dir.join("chunks"));
        let mut c = common::backup_client(&agent).await;
        if let Some(secs) = std::env::var("VMBACKUP_BENCH_PAUSE").ok().and_then(|v| v.parse().ok()) {
            // Time to attach a profiler to the daemons: `perf record -p <agent>,<store>`.
            println!(
                "pausing {secs} s: agent pid {}, store pid {:?}",
                agent.pid(),
                store.as_ref().map(common::Daemon::pid)
            );
            tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        }
        let mut group = String::new();
        for (op, img) in [("full", &v1), ("incremental", &v2)] {
            let req = pb::CreateVmBackupRequest {
                root_volume_uuid: "edc07fe8d8a335ec8aa00f23b88fc1c6".into(),
                backup_storage_uuid: bs.clone(),
                name: op.into(),
                system_tags: vec![format!("volumeLiveBackup::parallelismDegree::{parallelism}")],
                vm: Some(pb::RegisterVmRequest {
                    uuid: "9ff17180fded31c2b9e4e5751ebcb2ba".into(),
                    volumes: vec![pb::VolumeSpec {
                        uuid: "edc07fe8d8a335ec8aa00f23b88fc1c6".into(),
                        name: "ROOT".into(),
                        install_path: img.display().to_string(),
                        format: "raw".into(),
                        r#type: "Root".into(),
                        device_id: 0,
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            // Nothing written before (the corpus, the last step) is still queued for the disk.
            let synced = std::process::Command::new("sync").status().expect("sync");
            assert!(synced.success(), "sync failed: {synced}");
            let cpu0 = cpu_now();
            let agent_cpu0 = cpu_seconds(agent.pid());
            let start = Instant::now();
            let inv = c.create_vm_backup(req).await.expect("backup").into_inner().inventories;
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_now() - cpu0;
            let agent_cpu = cpu_seconds(agent.pid()) - agent_cpu0;
            let stored = dir_size(&chunks) as f64 / 1048576.0;
            println!(
                "{op:<12} {parallelism:>3} {:>10.0} {:>12.0} {:>10} {:>10} {:>12.0}   {secs:.2} s, CPU {cpu:.2} s ({agent_cpu:.2})",
                mib as f64 / secs,
                mib as f64 / cpu.max(0.01),
                peak_rss_mib(agent.pid()),
                store_rss(),
                stored
            );
            group = inv[0].group_uuid.clone();
        }
        if backup_only {
            continue;
        }
        // Restores of the incremental version, to a new raw file and to a new qcow2 file.
        for format in ["raw", "qcow2"] {
            let out = dir.path().join(format!("restored.{format}"));
            let req = pb::RestoreVmBackupRequest {
                group_uuid: group.clone(),
                backup_storage_uuid: bs.clone(),
                targets: vec![pb::RestoreTarget {
                    volume_uuid: "edc07fe8d8a335ec8aa00f23b88fc1c6".into(),
                    install_path: out.display().to_string(),
                    format: format.into(),
                }],
                system_tags: vec![format!("volumeLiveBackup::parallelismDegree::{parallelism}")],
                ..Default::default()
            };
            // Each restore's peak is its own (what the process kept from before included).
            pids.iter().for_each(|p| measure::reset_peak(*p));
            let cpu0 = cpu_now();
            let start = Instant::now();
            c.restore_vm_backup(req).await.expect("restore");
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_now() - cpu0;
            println!(
                "{:<12} {parallelism:>3} {:>10.0} {:>12.0} {:>10} {:>10} {:>12}",
                format!("restore {format}"),
                mib as f64 / secs,
                mib as f64 / cpu.max(0.01),
                peak_rss_mib(agent.pid()),
                store_rss(),
                "-"
            );
            std::fs::remove_file(&out).expect("rm");
        }
        // Recover: copy both groups to a second, empty store.
        let second = common::start_store_with(dir.path(), "second", None, 4 << 20);
        let dst = common::add_storage(&agent, &second, "second").await;
        let cpu0 = cpu_now() + cpu_seconds(second.pid());
        let start = Instant::now();
        c.recover_vm_backup_from_image_store_backup_storage(pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
            group_uuid: group.clone(),
            src_backup_storage_uuid: bs.clone(),
            dst_backup_storage_uuid: dst,
            ..Default::default()
        })
        .await
        .expect("recover");
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_now() + cpu_seconds(second.pid()) - cpu0;
        println!(
            "{:<12} {parallelism:>3} {:>10.0} {:>12.0} {:>10} {:>10} {:>12.0}",
            "recover",
            mib as f64 / secs,
            mib as f64 / cpu.max(0.01),
            peak_rss_mib(agent.pid()),
            peak_rss_mib(second.pid()),
            dir_size(&second.data_dir.join("chunks")) as f64 / 1048576.0
        );
    }
}

/// An agent and where it backs up: a separate store process, or its embedded store. The agent
/// may read the corpus (a volume root besides `dir`, which holds the restore targets).
async fn setup(dir: &Path, corpus: &Path, embedded: bool) -> (common::Daemon, Option<common::Daemon>, String) {
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, format!("[volumes]\nroots = [\"{}\"]\n", corpus.display())).expect("config");
    let config = Some(cfg);
    if embedded {
        let agent = common::start_agent(dir, common::AgentOptions { embedded_store: true, config });
        let bs = common::embedded_storage(&agent).await;
        return (agent, None, bs);
    }
    let store = common::start_store_with(dir, "store", None, 4 << 20);
    let agent = common::start_agent(dir, common::AgentOptions { config, ..Default::default() });
    let bs = common::add_storage(&agent, &store, "bench").await;
    (agent, Some(store), bs)
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
