//! Live backup of a running VM: `qemu-storage-daemon` serves the VM's disks with a writable
//! NBD export standing in for the guest and a QMP monitor. The guest writes during the
//! backup; the backup equals the disks at the snapshot instant, the guest's writes land in
//! the live disks, and the chain is flat again afterwards. If QEMU dies mid-backup, the
//! overlay is merged offline so no guest write is lost and nothing is left behind.

mod common;

use std::path::{Path, PathBuf};

use common::qsd::{BareQsd, Qsd};
use common::{AgentOptions, run_tool, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "e7f8091a2b3c4d5e6f708192a3b4c5d6";
const ROOT: &str = "f8091a2b3c4d5e6f708192a3b4c5d6e7";
const DATA: &str = "091a2b3c4d5e6f708192a3b4c5d6e7f8";

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".vmbackup-"))
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    _store: common::Daemon,
    agent: common::Daemon,
    bs: String,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root.qcow2");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "8M"]);
    let seed = dir.path().join("seed.raw");
    std::fs::write(&seed, common::pseudo_random(31, 6 << 20)).expect("seed");
    run_tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "qcow2", &p(&seed), &p(&root)]);
    let data = dir.path().join("data.raw");
    std::fs::write(&data, common::pseudo_random(32, 3 << 20)).expect("data");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    Setup { dir, root, data, _store: store, agent, bs }
}

fn vm(s: &Setup, qmp: &Path) -> pb::RegisterVmRequest {
    pb::RegisterVmRequest {
        uuid: VM.into(),
        qmp_socket: p(qmp),
        volumes: vec![
            common::volume_spec(ROOT, "Root", &s.root, "qcow2", 0),
            common::volume_spec(DATA, "Data", &s.data, "raw", 1),
        ],
        ..Default::default()
    }
}

/// Starts a slow backup and returns once it has read something.
async fn start_slow_backup(
    s: &Setup,
    qmp: &Path,
    group: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::VolumeBackupsReply>, tonic::Status>> {
    let mut c = common::backup_client(&s.agent).await;
    let req = pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: s.bs.clone(),
        name: "live".into(),
        resource_uuid: group.into(),
        volume_read_bandwidth: Some(3 << 20),
        vm: Some(vm(s, qmp)),
        ..Default::default()
    };
    let mut bg = c.clone();
    let running = tokio::spawn(async move { bg.create_vm_backup(req).await });
    common::wait_until_read(&mut c, group, 1).await;
    running
}

async fn restore_and_compare(s: &Setup, group: &str, wants: [(&str, &Path); 2]) {
    let mut c = common::backup_client(&s.agent).await;
    let out = s.dir.path().join(format!("restored-{group}"));
    std::fs::create_dir(&out).expect("mkdir");
    let targets = wants
        .iter()
        .map(|(v, _)| pb::RestoreTarget {
            volume_uuid: (*v).into(),
            install_path: p(&out.join(v)),
            format: "raw".into(),
        })
        .collect();
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group.into(),
        backup_storage_uuid: s.bs.clone(),
        targets,
        ..Default::default()
    })
    .await
    .expect("restore");
    for (v, want) in wants {
        run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &p(want), &p(&out.join(v))]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_vm_is_backed_up_at_the_snapshot_instant_and_its_chain_is_flat_after() {
    let s = setup().await;
    let qsd = Qsd::start(s.dir.path(), &s.root, &s.data);
    let (then_root, then_data) = (s.dir.path().join("then-root.raw"), s.dir.path().join("then-data.raw"));
    qsd.snapshot_to("root", &then_root);
    qsd.snapshot_to("data", &then_data);
    let group = "1a2b3c4d5e6f708192a3b4c5d6e7f809";
    let running = start_slow_backup(&s, &qsd.qmp, group).await;
    // The guest writes while the backup runs.
    qsd.guest_write("root", "0x77");
    qsd.guest_write("data", "0x78");
    running.await.expect("join").expect("live backup");

    restore_and_compare(&s, group, [(ROOT, &then_root), (DATA, &then_data)]).await;
    // The guest's writes are in the live disks, merged into the images, and no overlay
    // is left: the chain is flat again.
    run_tool("qemu-io", &["-f", "raw", "-c", "read -P 0x77 0 1M", &qsd.uri("root")]);
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));
    let info: serde_json::Value =
        serde_json::from_str(&run_tool("qemu-img", &["info", "-U", "--output=json", &p(&s.root)])).expect("info");
    assert!(info["backing-filename"].is_null(), "{info}");
    let read = run_tool("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", "read -P 0x77 0 1M", &p(&s.root)]);
    assert!(!read.contains("Pattern verification failed"), "{read}");
    let read = run_tool("qemu-io", &["-r", "-U", "-f", "raw", "-c", "read -P 0x78 0 1M", &p(&s.data)]);
    assert!(!read.contains("Pattern verification failed"), "{read}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_group_during_a_live_backup_of_the_vm_is_refused_naming_the_job() {
    use pb::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient;
    let s = setup().await;
    let qsd = Qsd::start(s.dir.path(), &s.root, &s.data);
    let group = "3c4d5e6f708192a3b4c5d6e7f8091a2b";
    let running = start_slow_backup(&s, &qsd.qmp, group).await;
    let mut groups = VolumeSnapshotGroupServiceClient::with_interceptor(
        common::channel(&s.agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&s.agent)))),
    );
    let ask = pb::CreateVolumeSnapshotGroupRequest {
        root_volume_uuid: ROOT.into(),
        name: "snap".into(),
        ..Default::default()
    };
    let e = groups.create_volume_snapshot_group(ask.clone()).await.expect_err("the VM's volumes are busy");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("in use by CreateVmBackup job {group}")), "{e:?}");
    running.await.expect("join").expect("the backup is unharmed");
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));

    // Once the backup ended, the same call succeeds, and its delete flattens the chain again.
    let taken = groups.create_volume_snapshot_group(ask).await.expect("free again").into_inner();
    let uuid = taken.inventory.expect("inventory").uuid;
    let results = groups
        .delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest { uuid, ..Default::default() })
        .await
        .expect("delete")
        .into_inner()
        .results;
    assert!(results.iter().all(|r| r.success), "{results:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_dying_mid_backup_loses_no_guest_write_and_leaves_nothing_behind() {
    let s = setup().await;
    let mut qsd = Qsd::start(s.dir.path(), &s.root, &s.data);
    let then_root = s.dir.path().join("then-root.raw");
    let then_data = s.dir.path().join("then-data.raw");
    qsd.snapshot_to("root", &then_root);
    qsd.snapshot_to("data", &then_data);
    let group = "2b3c4d5e6f708192a3b4c5d6e7f8091a";
    let running = start_slow_backup(&s, &qsd.qmp, group).await;
    qsd.guest_write("root", "0x66");
    qsd.child.kill().expect("kill qemu");
    qsd.child.wait().expect("reap");
    // The frozen images were consistent, so the backup completes; the overlay holding the
    // guest's last write is merged offline.
    running.await.expect("join").expect("backup of the frozen images");
    restore_and_compare(&s, group, [(ROOT, &then_root), (DATA, &then_data)]).await;
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));
    let read = run_tool("qemu-io", &["-f", "qcow2", "-c", "read -P 0x66 0 1M", &p(&s.root)]);
    assert!(!read.contains("Pattern verification failed"), "the guest's write survived: {read}");
    // QEMU restarts on the same images, and the next live backup succeeds.
    let qsd = Qsd::start(s.dir.path(), &s.root, &s.data);
    let mut c = common::backup_client(&s.agent).await;
    c.create_vm_backup(pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: s.bs.clone(),
        name: "after".into(),
        vm: Some(vm(&s, &qsd.qmp)),
        ..Default::default()
    })
    .await
    .expect("backup after the restart");
    assert!(leftovers(s.dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incremental_reads_only_what_the_dirty_bitmap_marks() {
    let s = setup().await;
    let qsd = BareQsd::start(s.dir.path(), &s.root, &s.data);
    let mut c = common::backup_client(&s.agent).await;
    let backup = |group: &str, qmp: &Path| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: s.bs.clone(),
        name: "daily".into(),
        resource_uuid: group.into(),
        vm: Some(vm(&s, qmp)),
        ..Default::default()
    };
    let first = "3c4d5e6f708192a3b4c5d6e7f8091a2b";
    c.create_vm_backup(backup(first, &qsd.qmp)).await.expect("full live backup");
    let full = common::last_progress(&mut c, first).await;
    assert_eq!(full.bytes_read, (6 << 20) + (3 << 20), "the first backup reads every data chunk");

    // The VM stops cleanly (its persistent bitmap is stored in the qcow2 root image), the
    // disks are written while it is down (qemu-io, like the guest would: the root image's
    // enabled bitmap records it), and the VM starts again. The raw data disk had only an
    // in-memory bitmap, gone with that QEMU: it is read in full.
    qsd.stop();
    run_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0xa1 1M 64k", &p(&s.root)]);
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0xa2 2148k 64k", &p(&s.data)]);
    let (then_root, then_data) = (s.dir.path().join("then-root.raw"), s.dir.path().join("then-data.raw"));
    run_tool("qemu-img", &["convert", "-O", "raw", &p(&s.root), &p(&then_root)]);
    std::fs::copy(&s.data, &then_data).expect("data");
    let qsd = BareQsd::start(s.dir.path(), &s.root, &s.data);

    let second = "4d5e6f708192a3b4c5d6e7f8091a2b3c";
    c.create_vm_backup(backup(second, &qsd.qmp)).await.expect("incremental live backup");
    let inc = common::last_progress(&mut c, second).await;
    assert_eq!(inc.bytes_read, 65536 + (3 << 20), "root: only the dirty chunk; data: in full ({inc:?})");
    restore_and_compare(&s, second, [(ROOT, &then_root), (DATA, &then_data)]).await;
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));

    // A third backup with no writes at all reads nothing from the root volume.
    let third = "5e6f708192a3b4c5d6e7f8091a2b3c4d";
    c.create_vm_backup(backup(third, &qsd.qmp)).await.expect("second incremental");
    let idle = common::last_progress(&mut c, third).await;
    assert_eq!(idle.bytes_read, 0, "no writes, nothing read: {idle:?}");
    drop(qsd);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_qcow2_volume_uses_its_own_persistent_bitmap() {
    let s = setup().await;
    let mut c = common::backup_client(&s.agent).await;
    // The VM is stopped: no QMP socket answers.
    let gone = s.dir.path().join("stopped.sock");
    let backup = |group: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: s.bs.clone(),
        name: "offline".into(),
        resource_uuid: group.into(),
        vm: Some(vm(&s, &gone)),
        ..Default::default()
    };
    let first = "6f708192a3b4c5d6e7f8091a2b3c4d5e";
    c.create_vm_backup(backup(first)).await.expect("full offline backup");
    assert_eq!(common::last_progress(&mut c, first).await.bytes_read, (6 << 20) + (3 << 20));
    // The backup left a bitmap recording in the qcow2 file; a write made by any QEMU tool
    // is marked in it.
    run_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0xb1 3M 64k", &p(&s.root)]);
    let then_root = s.dir.path().join("then-root.raw");
    run_tool("qemu-img", &["convert", "-O", "raw", &p(&s.root), &p(&then_root)]);

    let second = "708192a3b4c5d6e7f8091a2b3c4d5e6f";
    c.create_vm_backup(backup(second)).await.expect("incremental offline backup");
    let inc = common::last_progress(&mut c, second).await;
    assert_eq!(inc.bytes_read, 65536 + (3 << 20), "root: the marked chunk only; raw data: in full ({inc:?})");
    restore_and_compare(&s, second, [(ROOT, &then_root), (DATA, &s.data.clone())]).await;
    let info: serde_json::Value =
        serde_json::from_str(&run_tool("qemu-img", &["info", "--output=json", &p(&s.root)])).expect("info");
    let names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(names, [format!("vmbackup-{second}")], "only the bitmap the next backup follows is kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn disks_nothing_uses_are_read_as_they_are_and_nothing_is_left_behind() {
    let s = setup().await;
    // A QEMU that opened the disks but serves them to nobody: an overlay cannot take there.
    let qsd = BareQsd::start_unexported(s.dir.path(), &s.root, &s.data);
    let then_root = s.dir.path().join("then-root.raw");
    run_tool("qemu-img", &["convert", "-U", "-O", "raw", &p(&s.root), &p(&then_root)]);
    let mut c = common::backup_client(&s.agent).await;
    let backup = |group: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: s.bs.clone(),
        name: "unused".into(),
        resource_uuid: group.into(),
        vm: Some(vm(&s, &qsd.qmp)),
        ..Default::default()
    };
    let first = "81a2b3c4d5e6f708192a3b4c5d6e7f80";
    c.create_vm_backup(backup(first)).await.expect("a live backup of disks nothing uses succeeds");
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));
    let done = common::last_progress(&mut c, first).await;
    assert_eq!(done.state, "Succeeded", "{done:?}");
    restore_and_compare(&s, first, [(ROOT, &then_root), (DATA, &s.data)]).await;
    // The chain is as before (no overlay became the image), so the next backup works too.
    let info = run_tool("qemu-img", &["info", "-U", "--output=json", &p(&s.root)]);
    assert!(!info.contains("backing-filename"), "{info}");
    let second = "92b3c4d5e6f708192a3b4c5d6e7f8091";
    c.create_vm_backup(backup(second)).await.expect("second backup");
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));
    qsd.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_live_backup_has_its_overlays_merged_by_the_retry_and_no_write_is_lost() {
    let mut s = setup().await;
    let qsd = Qsd::start(s.dir.path(), &s.root, &s.data);
    let group = "4d5e6f708192a3b4c5d6e7f8091a2b3c";
    let running = start_slow_backup(&s, &qsd.qmp, group).await;
    // The guest writes into the overlays; then the agent dies before merging them back.
    qsd.guest_write("root", "0x55");
    s.agent.kill();
    assert!(running.await.expect("join").is_err(), "the call fails with the agent");
    assert!(!leftovers(s.dir.path()).is_empty(), "the VM runs on the killed backup's overlays");
    s.agent.restart();

    // The retry finds the overlays in the VM's block graph, merges them back, and backs up.
    let mut c = common::backup_client(&s.agent).await;
    c.create_vm_backup(pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: s.bs.clone(),
        name: "retry".into(),
        resource_uuid: group.into(),
        vm: Some(vm(&s, &qsd.qmp)),
        ..Default::default()
    })
    .await
    .expect("the retry merges what the killed run left and succeeds");
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));
    let info: serde_json::Value =
        serde_json::from_str(&run_tool("qemu-img", &["info", "-U", "--output=json", &p(&s.root)])).expect("info");
    assert!(info["backing-filename"].is_null(), "the chain is flat again: {info}");
    let read = run_tool("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", "read -P 0x55 0 1M", &p(&s.root)]);
    assert!(!read.contains("Pattern verification failed"), "the guest's write is in its image: {read}");
    // And the backup holds it.
    let now = s.dir.path().join("now-root.raw");
    qsd.snapshot_to("root", &now);
    let now_data = s.dir.path().join("now-data.raw");
    qsd.snapshot_to("data", &now_data);
    restore_and_compare(&s, group, [(ROOT, &now), (DATA, &now_data)]).await;
}
