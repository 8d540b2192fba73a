//! A backup served as a disk against a full restore, in one run: how soon the first byte of
//! an NBD export (ExportVmBackup) and of a live restore's overlay can be read, and how fast
//! the export reads sequentially (`qemu-img convert` of the export to a file, synced) beside
//! a full RestoreVmBackup of the same backup (synced). Medians of `VMBACKUP_BENCH_ROUNDS`
//! rounds (default 3) with min and max; reported, never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench export`
//! (`VMBACKUP_BENCH_MIB`, default 1024).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;
#[path = "support/samples.rs"]
mod samples;

use std::path::Path;
use std::time::Instant;

use vmbackup_proto::agent::v1 as pb;

const VM: &str = "2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d";
const ROOT: &str = "3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e";

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Seconds of a command (it must succeed).
fn secs_of(program: &str, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = std::process::Command::new(program).args(args).output().expect(program);
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed().as_secs_f64()
}

fn line(name: &str, v: &[f64], mib: Option<f64>) {
    let m = samples::median(v.to_vec());
    let (lo, hi) = (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
    match mib {
        Some(mib) => println!("{name:<44} {m:>8.3} s  (min {lo:.3}, max {hi:.3})  {:>7.0} MiB/s", mib / m),
        None => println!("{name:<44} {m:>8.3} s  (min {lo:.3}, max {hi:.3})"),
    }
}

#[tokio::main]
async fn main() {
    measure::wrapper_main();
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let rounds: usize = std::env::var("VMBACKUP_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let (v1, _) = corpus::two_versions(w, mib);
    let store = common::start_store_with(w, "store", None, 4 << 20);
    let cfg = w.join("agent.toml");
    std::fs::write(&cfg, format!("[volumes]\nroots = [\"{}\"]\n", w.display())).expect("config");
    let agent = common::start_agent(w, common::AgentOptions { config: Some(cfg), ..Default::default() });
    let bs = common::add_storage(&agent, &store, "bench").await;
    let mut c = common::backup_client(&agent).await;
    let group = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "bench".into(),
            vm: Some(pb::RegisterVmRequest {
                qmp_socket: p(&w.join("nobody.sock")),
                ..common::one_volume_vm(VM, ROOT, &v1, "raw")
            }),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories[0]
        .group_uuid
        .clone();
    println!("synthetic: {mib} MiB raw volume, one backup on a directory store (4 MiB chunks), {rounds} rounds");
    let (mut restore, mut export_call, mut first_byte, mut convert, mut live_ready, mut live_first) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        // A full restore, until its file is on disk.
        let out = w.join(format!("restored-{round}.raw"));
        let t = Instant::now();
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.clone(),
            backup_storage_uuid: bs.clone(),
            targets: vec![pb::RestoreTarget { volume_uuid: ROOT.into(), install_path: p(&out), format: "raw".into() }],
            ..Default::default()
        })
        .await
        .expect("restore");
        secs_of("sync", &[&p(&out)]);
        restore.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&out);

        // An export: the call, its first 4 KiB, then all of it read sequentially.
        let t = Instant::now();
        let e = c
            .export_vm_backup(pb::ExportVmBackupRequest {
                group_uuid: group.clone(),
                volume_uuid: ROOT.into(),
                backup_storage_uuid: bs.clone(),
                ..Default::default()
            })
            .await
            .expect("export")
            .into_inner();
        export_call.push(t.elapsed().as_secs_f64());
        secs_of("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &e.uri]);
        first_byte.push(t.elapsed().as_secs_f64());
        let copy = w.join(format!("copied-{round}.raw"));
        let t = Instant::now();
        secs_of("qemu-img", &["convert", "-f", "raw", "-O", "raw", &e.uri, &p(&copy)]);
        secs_of("sync", &[&p(&copy)]);
        convert.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&copy);
        c.stop_vm_backup_export(pb::StopVmBackupExportRequest { uuid: e.uuid }).await.expect("stop");

        // A live restore over the (stopped) VM's volume: until the overlay is in place, and
        // until its first 4 KiB are read through it, as a booting VM would.
        let job = format!("{:032x}", 0xbe00 + round);
        let t = Instant::now();
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.clone(),
            backup_storage_uuid: bs.clone(),
            revert: true,
            live: true,
            resource_uuid: job.clone(),
            ..Default::default()
        })
        .await
        .expect("live restore");
        live_ready.push(t.elapsed().as_secs_f64());
        secs_of("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", "read 0 4k", &p(&v1)]);
        live_first.push(t.elapsed().as_secs_f64());
        // No VM will start here: cancel the waiting copy and put the volume back.
        c.cancel_job(pb::CancelJobRequest { job_uuid: job }).await.expect("cancel");
        secs_of("qemu-img", &["convert", "-U", "-f", "qcow2", "-O", "raw", &p(&v1), &p(&w.join("back.raw"))]);
        std::fs::rename(w.join("back.raw"), &v1).expect("volume back");
        let vm = pb::RegisterVmRequest {
            qmp_socket: p(&w.join("nobody.sock")),
            ..common::one_volume_vm(VM, ROOT, &v1, "raw")
        };
        let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
            common::channel(&agent.url()).await,
            common::Auth(Some(format!("OAuth {}", common::session(&agent)))),
        );
        vms.register_vm(vm).await.expect("register again");
    }
    let size = Some(mib as f64);
    println!("\nmedian of {rounds} rounds (seconds)");
    line("full restore (until synced)", &restore, size);
    line("export: call answered", &export_call, None);
    line("export: first 4 KiB read", &first_byte, None);
    line("export: read in full by qemu-img (synced)", &convert, size);
    line("live restore: overlay in place", &live_ready, None);
    line("live restore: first 4 KiB through the overlay", &live_first, None);
}
