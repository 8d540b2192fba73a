//! Achieved rate / set rate for each of the four bandwidth parameters at a few settings:
//! each run moves about 3 seconds' worth of incompressible data through a real store and
//! agent on loopback (backups for volumeReadBandwidth and networkWriteBandwidth, restores
//! for volumeWriteBandwidth and networkReadBandwidth). Target: 0.95 to 1.02. Reported,
//! never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench limits`

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use vmbackup_proto::agent::v1 as pb;

const MIB: i64 = 1 << 20;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::start_store_with(dir.path(), "store", None, 4 << 20);
    let agent = common::start_agent(dir.path(), common::AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "bench").await;
    let mut c = common::backup_client(&agent).await;
    println!("{:<24} {:>10} {:>12} {:>8}", "limit", "set MiB/s", "got MiB/s", "ratio");
    let mut n = 0u64;
    for rate_mib in [8i64, 32, 128] {
        let rate = rate_mib * MIB;
        let size = usize::try_from(3 * rate).expect("fits");
        let (mut last_group, mut last_root) = (String::new(), String::new());
        for limit in ["volumeReadBandwidth", "networkWriteBandwidth"] {
            n += 1;
            let img = dir.path().join(format!("v{n}.raw"));
            std::fs::write(&img, common::pseudo_random(n, size)).expect("image");
            let (job, root) = (format!("{n:032x}"), format!("{:032x}", n + 1000));
            let t0 = Instant::now();
            c.create_vm_backup(pb::CreateVmBackupRequest {
                root_volume_uuid: root.clone(),
                backup_storage_uuid: bs.clone(),
                name: limit.into(),
                resource_uuid: job.clone(),
                volume_read_bandwidth: (limit == "volumeReadBandwidth").then_some(rate),
                network_write_bandwidth: (limit == "networkWriteBandwidth").then_some(rate),
                vm: Some(common::one_volume_vm(&format!("{:032x}", n + 2000), &root, &img, "raw")),
                ..Default::default()
            })
            .await
            .expect("backup");
            let secs = t0.elapsed().as_secs_f64();
            let p = common::last_progress(&mut c, &job).await;
            let bytes = if limit == "volumeReadBandwidth" { p.bytes_read } else { p.bytes_sent };
            let got = bytes as f64 / secs / MIB as f64;
            println!("{limit:<24} {rate_mib:>10} {got:>12.1} {:>8.3}", got / rate_mib as f64);
            last_group = job;
            last_root = format!("{:032x}", n + 1000);
            std::fs::remove_file(&img).expect("rm");
        }
        for limit in ["volumeWriteBandwidth", "networkReadBandwidth"] {
            n += 1;
            let job = format!("{n:032x}");
            let out = dir.path().join(format!("r{n}.raw"));
            let t0 = Instant::now();
            c.restore_vm_backup(pb::RestoreVmBackupRequest {
                group_uuid: last_group.clone(),
                backup_storage_uuid: bs.clone(),
                targets: vec![pb::RestoreTarget {
                    volume_uuid: last_root.clone(),
                    install_path: out.display().to_string(),
                    format: "raw".into(),
                }],
                volume_write_bandwidth: (limit == "volumeWriteBandwidth").then_some(rate),
                network_read_bandwidth: (limit == "networkReadBandwidth").then_some(rate),
                resource_uuid: job.clone(),
                ..Default::default()
            })
            .await
            .expect("restore");
            let secs = t0.elapsed().as_secs_f64();
            let p = common::last_progress(&mut c, &job).await;
            let bytes = if limit == "volumeWriteBandwidth" { p.bytes_written } else { p.bytes_received };
            let got = bytes as f64 / secs / MIB as f64;
            println!("{limit:<24} {rate_mib:>10} {got:>12.1} {:>8.3}", got / rate_mib as f64);
            std::fs::remove_file(&out).expect("rm");
        }
    }
}
