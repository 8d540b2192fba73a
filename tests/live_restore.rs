//! Live restore: a VM whose disks were lost runs from its backup at once. RestoreVmBackup
//! with `live` puts qcow2 overlays of the backup's NBD exports at the VM's install paths and
//! returns; QEMU (TCG) starts on them, the guest writes while the agent copies the rest in
//! (paced by volumeWriteBandwidth), and at the end each disk is the backup plus exactly the
//! guest's writes, with no backing file.

mod common;

use std::path::Path;

use common::qemu_vm::QemuVm;
use common::{AgentOptions, run_tool, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f";
const ROOT: &str = "9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a";
const DATA: &str = "0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b";
const JOB: &str = "1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c";

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn qcow2_with(dir: &Path, path: &Path, seed: u64, size: &str, data_len: usize) {
    let raw = dir.join(format!("seed-{seed}.raw"));
    std::fs::write(&raw, common::pseudo_random(seed, data_len)).expect("seed");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(path), size]);
    run_tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "qcow2", &p(&raw), &p(path)]);
}

fn contents(path: &Path, out: &Path) -> Vec<u8> {
    run_tool("qemu-img", &["convert", "-U", "-O", "raw", &p(path), &p(out)]);
    std::fs::read(out).expect("raw")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_runs_from_its_backup_at_once_and_ends_on_independent_disks_with_its_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, data) = (dir.path().join("root.qcow2"), dir.path().join("data.qcow2"));
    qcow2_with(dir.path(), &root, 61, "4M", 3 << 20);
    qcow2_with(dir.path(), &data, 62, "2M", 2 << 20);
    let mut want_root = contents(&root, &dir.path().join("want-root.raw"));
    let mut want_data = contents(&data, &dir.path().join("want-data.raw"));
    let qmp = dir.path().join("vm.sock");
    let store = start_store(dir.path(), "s");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let vm_spec = pb::RegisterVmRequest {
        uuid: VM.into(),
        qmp_socket: p(&qmp),
        volumes: vec![
            common::volume_spec(ROOT, "Root", &root, "qcow2", 0),
            common::volume_spec(DATA, "Data", &data, "qcow2", 1),
        ],
        ..Default::default()
    };
    let group = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "before".into(),
            vm: Some(vm_spec),
            ..Default::default()
        })
        .await
        .expect("offline backup")
        .into_inner()
        .inventories[0]
        .group_uuid
        .clone();

    // The disks are lost.
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "4M"]);
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&data), "2M"]);

    // A live restore answers at once; the disks are overlays of the backup.
    let started = std::time::Instant::now();
    let reply = c
        .restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.clone(),
            backup_storage_uuid: bs.clone(),
            revert: true,
            live: true,
            volume_write_bandwidth: Some(1 << 20),
            resource_uuid: JOB.into(),
            ..Default::default()
        })
        .await
        .expect("live restore")
        .into_inner();
    assert_eq!(reply.job_uuid, JOB);
    eprintln!("live restore answered in {:?}", started.elapsed());
    let info = run_tool("qemu-img", &["info", "-U", "--output=json", &p(&root)]);
    assert!(info.contains("nbd+unix://"), "{info}");

    // The VM starts on them and the guest writes while the copy runs.
    let vm = QemuVm::start_with(dir.path(), &root, &data, qmp.clone(), &[]);
    assert_eq!(vm.guest_io("disk0", "write -P 0x77 0 64k"), "");
    assert_eq!(vm.guest_io("disk1", "write -P 0x78 1M 64k"), "");
    want_root[..64 << 10].fill(0x77);
    want_data[1 << 20..(1 << 20) + (64 << 10)].fill(0x78);
    // The guest reads what the copy has not reached yet (the data disk comes second)
    // through the overlay from the backup.
    let read = vm.guest_io("disk1", "read 1536k 64k");
    assert!(!read.contains("failed"), "{read}");

    let end = common::last_progress(&mut c, JOB).await;
    assert_eq!(end.state, "Succeeded", "{end:?}");
    assert_eq!(vm.image_files(), [p(&data), p(&root)], "no disk depends on the backup any more");
    // QEMU writes its qcow2 metadata back on a flush; read the files after one.
    assert_eq!(vm.guest_io("disk0", "flush"), "");
    assert_eq!(vm.guest_io("disk1", "flush"), "");
    for (path, want, out) in [(&root, &want_root, "got-root.raw"), (&data, &want_data, "got-data.raw")] {
        let info = run_tool("qemu-img", &["info", "-U", "--output=json", &p(path)]);
        assert!(!info.contains("backing-filename"), "{info}");
        let got = contents(path, &dir.path().join(out));
        let first = got.iter().zip(want.iter()).position(|(a, b)| a != b);
        assert!(
            got == *want,
            "{} is the backup plus the guest's writes (lengths {} {}, first difference at {first:?})",
            p(path),
            got.len(),
            want.len()
        );
    }
    let exports =
        c.query_vm_backup_export(pb::QueryVmBackupExportRequest {}).await.expect("exports").into_inner().inventories;
    assert!(exports.is_empty(), "the exports end with the copy: {exports:?}");
}
