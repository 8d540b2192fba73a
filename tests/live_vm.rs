//! Live backup of a real running VM: `qemu-system-x86_64` under TCG with a qcow2 root and a
//! raw data disk on virtio-scsi. The guest writes (HMP `qemu-io` on the scsi-hd devices)
//! during the backup, and between backups for an incremental that must read only the
//! chunks QEMU's dirty bitmaps mark. The VM keeps running on a flat chain throughout.

mod common;

use std::path::Path;

use common::qemu_vm::QemuVm;
use common::{AgentOptions, run_tool, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "7e8f90a1b2c3d4e5f60718293a4b5c6d";
const ROOT: &str = "8f90a1b2c3d4e5f60718293a4b5c6d7e";
const DATA: &str = "90a1b2c3d4e5f60718293a4b5c6d7e8f";

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_vm_backs_up_live_then_incrementally_from_its_dirty_bitmaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root.qcow2");
    let data = dir.path().join("data.raw");
    let seed = dir.path().join("seed.raw");
    std::fs::write(&seed, common::pseudo_random(90, 4 << 20)).expect("seed");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "6M"]);
    run_tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "qcow2", &p(&seed), &p(&root)]);
    std::fs::write(&data, common::pseudo_random(91, 2 << 20)).expect("data");
    // The disks as they are before the VM starts: what the first backup must hold.
    let (then_root, then_data) = (dir.path().join("then-root.raw"), dir.path().join("then-data.raw"));
    run_tool("qemu-img", &["convert", "-O", "raw", &p(&root), &p(&then_root)]);
    std::fs::copy(&data, &then_data).expect("copy");

    let vm_proc = QemuVm::start(dir.path(), &root, &data);
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let backup = |group: &str, limit: Option<i64>| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: "live".into(),
        resource_uuid: group.into(),
        volume_read_bandwidth: limit,
        vm: Some(pb::RegisterVmRequest {
            uuid: VM.into(),
            qmp_socket: p(&vm_proc.qmp),
            volumes: vec![
                common::volume_spec(ROOT, "Root", &root, "qcow2", 0),
                common::volume_spec(DATA, "Data", &data, "raw", 1),
            ],
            ..Default::default()
        }),
        ..Default::default()
    };

    // 1. A full live backup, slowed down so the guest can write while it runs.
    let first = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let mut bg = c.clone();
    let req = backup(first, Some(2 << 20));
    let running = tokio::spawn(async move { bg.create_vm_backup(req).await });
    common::wait_until_read(&mut c, first, 1).await;
    assert_eq!(vm_proc.guest_io("disk0", "write -P 0x71 0 64k"), "");
    assert_eq!(vm_proc.guest_io("disk1", "write -P 0x72 64k 64k"), "");
    running.await.expect("join").expect("live backup");
    let full = common::last_progress(&mut c, first).await;
    assert_eq!(full.bytes_read, (4 << 20) + (2 << 20), "{full:?}");
    // The guest's writes are on its disks, and its chain is flat again.
    assert_eq!(vm_proc.guest_io("disk0", "read -P 0x71 0 64k").matches("failed").count(), 0);
    assert_eq!(vm_proc.image_files(), [p(&data), p(&root)]);

    // 2. The guest writes one more chunk of each disk; the next backup reads only the
    //    chunks written since the first snapshot: those two, and the two written while the
    //    first backup ran (they came after its snapshot instant).
    assert_eq!(vm_proc.guest_io("disk0", "write -P 0x73 1M 64k"), "");
    assert_eq!(vm_proc.guest_io("disk1", "write -P 0x74 1M 64k"), "");
    let second = "b2c3d4e5f60718293a4b5c6d7e8f90a1";
    c.create_vm_backup(backup(second, None)).await.expect("incremental live backup");
    let inc = common::last_progress(&mut c, second).await;
    assert_eq!(inc.bytes_read, 4 * 65536, "only the dirty chunks are read: {inc:?}");
    assert_eq!(vm_proc.image_files(), [p(&data), p(&root)]);

    // 3. Both restore to what the disks held at their snapshot instants.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    for (group, want_root, want_data) in
        [(first, then_root.clone(), then_data.clone()), (second, out.join("now-root.raw"), out.join("now-data.raw"))]
    {
        if group == second {
            // Nothing was written since the second snapshot: the disks now are its state.
            assert_eq!(vm_proc.guest_io("disk0", "flush"), "");
            run_tool("qemu-img", &["convert", "-U", "-O", "raw", &p(&root), &p(&want_root)]);
            run_tool("qemu-img", &["convert", "-U", "-f", "raw", "-O", "raw", &p(&data), &p(&want_data)]);
        }
        let (r, d) = (out.join(format!("{group}-root.raw")), out.join(format!("{group}-data.raw")));
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.into(),
            backup_storage_uuid: bs.clone(),
            targets: vec![
                pb::RestoreTarget { volume_uuid: ROOT.into(), install_path: p(&r), format: "raw".into() },
                pb::RestoreTarget { volume_uuid: DATA.into(), install_path: p(&d), format: "raw".into() },
            ],
            ..Default::default()
        })
        .await
        .expect("restore");
        run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &p(&want_root), &p(&r)]);
        run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &p(&want_data), &p(&d)]);
    }
    let status = vm_proc.qmp("query-status", serde_json::Value::Null);
    assert_eq!(status["status"], "running", "the VM never stopped: {status}");
}
