//! Volume snapshot groups end to end: on a stopped VM (qcow2 overlays on the files) and on
//! a running one (one QMP transaction, then block-commit on delete); create, update, query
//! and delete, including a delete where one of the two merges fails and the per-snapshot
//! results say so.

mod common;

use std::path::Path;

use common::qsd::Qsd;
use common::{AgentOptions, run_tool, start_agent};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient;

const VM: &str = "2c3d4e5f60718293a4b5c6d7e8f90a1b";
const ROOT: &str = "3d4e5f60718293a4b5c6d7e8f90a1b2c";
const DATA: &str = "4e5f60718293a4b5c6d7e8f90a1b2c3d";

type Groups = VolumeSnapshotGroupServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, common::Auth>,
>;

fn p(path: &Path) -> String {
    path.display().to_string()
}

struct Vm {
    dir: tempfile::TempDir,
    root: std::path::PathBuf,
    data: std::path::PathBuf,
    agent: common::Daemon,
}

async fn vm_with(qmp: Option<&Path>, dir: tempfile::TempDir) -> (Vm, Groups) {
    let root = dir.path().join("root.qcow2");
    let data = dir.path().join("data.raw");
    if !root.exists() {
        run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "4M"]);
        run_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 1M", &p(&root)]);
        std::fs::write(&data, common::pseudo_random(70, 2 << 20)).expect("data");
    }
    let agent = start_agent(dir.path(), AgentOptions::default());
    let session = common::session(&agent);
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&agent.url()).await,
        common::Auth(Some(format!("OAuth {session}"))),
    );
    let vol = |uuid: &str, kind: &str, path: &Path, format: &str, id: i32| pb::VolumeSpec {
        uuid: uuid.into(),
        name: format!("{kind}-volume"),
        install_path: p(path),
        format: format.into(),
        r#type: kind.into(),
        device_id: id,
    };
    vms.register_vm(pb::RegisterVmRequest {
        uuid: VM.into(),
        name: "web".into(),
        qmp_socket: qmp.map(p).unwrap_or_default(),
        volumes: vec![vol(ROOT, "Root", &root, "qcow2", 0), vol(DATA, "Data", &data, "raw", 1)],
        ..Default::default()
    })
    .await
    .expect("register");
    let groups = VolumeSnapshotGroupServiceClient::with_interceptor(
        common::channel(&agent.url()).await,
        common::Auth(Some(format!("OAuth {session}"))),
    );
    (Vm { dir, root, data, agent }, groups)
}

async fn create(groups: &mut Groups, name: &str) -> pb::VolumeSnapshotGroupInventory {
    groups
        .create_volume_snapshot_group(pb::CreateVolumeSnapshotGroupRequest {
            root_volume_uuid: ROOT.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .inventory
        .expect("inventory")
}

async fn registered_paths(vm: &Vm) -> Vec<String> {
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&vm.agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&vm.agent)))),
    );
    let r = vms.query_vm(pb::QueryVmRequest::default()).await.expect("query").into_inner();
    r.inventories[0].volumes.iter().map(|v| v.install_path.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_vms_group_freezes_its_files_and_merges_back() {
    let (vm, mut groups) = vm_with(None, tempfile::tempdir().expect("tempdir")).await;
    let before = std::fs::read(&vm.data).expect("data");
    let g = create(&mut groups, "nightly").await;
    assert_eq!((g.snapshot_count, g.vm_instance_uuid.as_str(), g.name.as_str()), (2, VM, "nightly"));
    let refs = &g.volume_snapshot_refs;
    assert_eq!(refs.len(), 2);
    assert_eq!((refs[0].device_id, refs[0].volume_type.as_str(), refs[0].volume_uuid.as_str()), (0, "Root", ROOT));
    assert_eq!((refs[1].device_id, refs[1].volume_type.as_str(), refs[1].volume_uuid.as_str()), (1, "Data", DATA));
    assert_eq!(refs[0].volume_snapshot_install_path, p(&vm.root), "the frozen file is the snapshot");
    assert_eq!(refs[1].volume_snapshot_name, "nightly-Data-volume");
    assert!(refs.iter().all(|r| !r.snapshot_deleted && r.volume_snapshot_group_uuid == g.uuid));
    // The volumes now run on overlays; writes to them leave the snapshot untouched.
    let overlays = registered_paths(&vm).await;
    assert!(overlays.iter().all(|o| o.contains("-snap-") && Path::new(o).exists()), "{overlays:?}");
    run_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x99 0 64k", &overlays[1]]);
    assert_eq!(std::fs::read(&vm.data).expect("data"), before, "the snapshot is frozen");

    // Update and query.
    let u = groups
        .update_volume_snapshot_group(pb::UpdateVolumeSnapshotGroupRequest {
            uuid: g.uuid.clone(),
            name: Some("renamed".into()),
            description: Some("before the upgrade".into()),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner()
        .inventory
        .expect("inventory");
    assert_eq!((u.name.as_str(), u.description.as_str()), ("renamed", "before the upgrade"));
    let q = groups
        .query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest {
            conditions: vec![format!("vmInstanceUuid={VM}"), "name=renamed".into()],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    assert_eq!(q.inventories.len(), 1);

    // Delete merges both overlays back: the writes are in the files, the overlays gone.
    let results = groups
        .delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest {
            uuid: g.uuid.clone(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.success && r.error.is_none()), "{results:?}");
    assert!(overlays.iter().all(|o| !Path::new(o).exists()));
    assert_eq!(registered_paths(&vm).await, [p(&vm.root), p(&vm.data)]);
    assert_eq!(&std::fs::read(&vm.data).expect("data")[..65536], &[0x99u8; 65536][..]);
    let q = groups.query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest::default()).await.expect("query");
    assert!(q.into_inner().inventories.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_where_one_merge_fails_reports_each_snapshot() {
    let (vm, mut groups) = vm_with(None, tempfile::tempdir().expect("tempdir")).await;
    let g = create(&mut groups, "two").await;
    let overlays = registered_paths(&vm).await;
    std::fs::remove_file(&overlays[1]).expect("lose the data overlay");
    let results = groups
        .delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest {
            uuid: g.uuid.clone(),
            ..Default::default()
        })
        .await
        .expect("delete answers per snapshot")
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    assert!(results[0].success && results[0].volume_uuid == ROOT, "{results:?}");
    assert!(!results[1].success && results[1].volume_uuid == DATA, "{results:?}");
    let err = results[1].error.as_ref().expect("error");
    assert!(err.details.contains("missing"), "{err:?}");
    let left = groups
        .query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest::default())
        .await
        .expect("query")
        .into_inner()
        .inventories;
    assert_eq!(left.len(), 1, "the group stays while a snapshot is not merged");
    assert_eq!(left[0].snapshot_count, 1);
    assert!(left[0].volume_snapshot_refs[0].snapshot_deleted && !left[0].volume_snapshot_refs[1].snapshot_deleted);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_vms_group_is_one_qmp_transaction_and_merges_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root.qcow2");
    let data = dir.path().join("data.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "4M"]);
    std::fs::write(&data, common::pseudo_random(71, 2 << 20)).expect("data");
    let qsd = Qsd::start(dir.path(), &root, &data);
    let (vm, mut groups) = vm_with(Some(&qsd.qmp), dir).await;
    let frozen = std::fs::read(&vm.data).expect("data");
    let g = create(&mut groups, "live").await;
    assert_eq!(g.snapshot_count, 2);
    let overlays = registered_paths(&vm).await;
    assert!(overlays.iter().all(|o| Path::new(o).exists()), "QEMU created the overlays: {overlays:?}");
    // The guest writes after the snapshot: into the overlays, not the frozen files.
    qsd.guest_write("data", "0x5a");
    assert_eq!(std::fs::read(&vm.data).expect("data"), frozen);
    let results = groups
        .delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest {
            uuid: g.uuid.clone(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner()
        .results;
    assert!(results.iter().all(|r| r.success), "{results:?}");
    assert!(overlays.iter().all(|o| !Path::new(o).exists()));
    assert_eq!(&std::fs::read(&vm.data).expect("data")[..1 << 20], &[0x5au8; 1 << 20][..], "merged live");
    run_tool("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 0 1M", &qsd.uri("data")]);
    drop(vm.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overlay_that_cannot_be_created_leaves_the_running_vm_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root.qcow2");
    let data = dir.path().join("data.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "4M"]);
    std::fs::write(&data, common::pseudo_random(72, 2 << 20)).expect("data");
    let qsd = Qsd::start(dir.path(), &root, &data);
    let (vm, mut groups) = vm_with(Some(&qsd.qmp), dir).await;
    let before = names(vm.dir.path());
    // A directory sits where the data volume's overlay would go: that snapshot fails, so
    // the whole transaction does, and no overlay is left behind.
    let group = "6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d";
    std::fs::create_dir(vm.dir.path().join(format!("data-snap-{}-1.qcow2", &group[..12]))).expect("blocker");
    let e = groups
        .create_volume_snapshot_group(pb::CreateVolumeSnapshotGroupRequest {
            root_volume_uuid: ROOT.into(),
            name: "doomed".into(),
            resource_uuid: group.into(),
            ..Default::default()
        })
        .await
        .expect_err("the overlay cannot be created");
    assert!(e.message().contains("QEMU refused transaction"), "{e:?}");
    let mut after = names(vm.dir.path());
    after.retain(|n| !n.starts_with("data-snap-"));
    assert_eq!(after, before, "no overlay left behind");
    assert_eq!(registered_paths(&vm).await, [p(&vm.root), p(&vm.data)]);
    // The VM runs on as before, and a later group works.
    qsd.guest_write("data", "0x3c");
    std::fs::remove_dir(vm.dir.path().join(format!("data-snap-{}-1.qcow2", &group[..12]))).expect("rmdir");
    let g = create(&mut groups, "after").await;
    assert_eq!(g.snapshot_count, 2);
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn vmbackupctl_takes_lists_and_deletes_groups() {
    let (vm, _groups) = vm_with(None, tempfile::tempdir().expect("tempdir")).await;
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(common::bin("vmbackupctl"))
            .args(["--agent", &vm.agent.url(), "--session-file"])
            .arg(vm.agent.data_dir.join("session"))
            .args(args)
            .output()
            .expect("vmbackupctl");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let json = ctl(&["--json", "snapshot-group", "create", "--root-volume", ROOT, "--name", "cli"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let uuid = v["inventories"][0]["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(v["inventories"][0]["snapshotCount"], 2, "{v}");
    let table = ctl(&["snapshot-group", "list", &format!("vmInstanceUuid={VM}")]);
    assert!(table.contains(&uuid) && table.contains(&p(&vm.root)) && table.contains(&p(&vm.data)), "{table}");
    let table = ctl(&["snapshot-group", "update", &uuid, "--name", "renamed"]);
    assert!(table.contains("renamed"), "{table}");
    let table = ctl(&["snapshot-group", "delete", &uuid]);
    assert_eq!(table.matches("true").count(), 2, "{table}");
}
