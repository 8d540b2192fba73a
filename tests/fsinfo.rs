//! The fsInfo system tag: chunks go straight into the Image Storage's data directory
//! through a filesystem the agent mounts for the job, and the store commits the group
//! after checking every chunk on its own disk. There is no NFS server here, so the test
//! uses a local mount type (`none` with `bind`) over the store's directory: the same code
//! path (mount, write with the store's directory backend, commit over gRPC, unmount).

mod common;

use common::{AgentOptions, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const VM: &str = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5";
const ROOT: &str = "b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6";

fn chunk_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("chunks"))
        .expect("chunks")
        .flatten()
        .map(|shard| std::fs::read_dir(shard.path()).map(|r| r.count()).unwrap_or(0))
        .sum()
}

fn mounts_under(dir: &std::path::Path) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    mounts.lines().filter(|l| l.contains(&dir.display().to_string())).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_go_through_the_mounted_store_directory_and_the_store_commits_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(100, 2 << 20)).expect("image");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let req = |group: &str, url: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: "fs".into(),
        resource_uuid: group.into(),
        system_tags: vec![format!("fsInfo::type::none::url::{url}::options::bind")],
        vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
        ..Default::default()
    };

    // A path that does not exist, and a directory that is not this store: clean errors,
    // nothing committed, nothing left mounted.
    let e = c
        .create_vm_backup(req("c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7", "/nonexistent/store"))
        .await
        .expect_err("no such export");
    assert!(e.message().contains("fsInfo: mount"), "{e:?}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let e = c
        .create_vm_backup(req("d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8", &empty.display().to_string()))
        .await
        .expect_err("not a store");
    assert!(e.message().contains("does not hold a vmbackup store"), "{e:?}");
    assert_eq!(mounts_under(dir.path()), 0, "nothing stays mounted");

    let group = "e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9";
    let inv = c
        .create_vm_backup(req(group, &store.data_dir.display().to_string()))
        .await
        .expect("backup through the mounted store")
        .into_inner()
        .inventories;
    assert_eq!(inv[0].group_uuid, group);
    assert_eq!(mounts_under(dir.path()), 0, "unmounted after the job");
    // Nothing came over the upload stream; the chunks are in the store's directory, and the
    // store committed the group after checking them.
    assert_eq!(common::chunks_uploaded(&store).await, 0);
    assert_eq!(chunk_files(&store.data_dir), 32, "2 MiB of random data in 64 KiB chunks");
    let mut sc = common::store_client(&store).await;
    let groups = sc.list_groups(spb::ListGroupsRequest {}).await.expect("groups").into_inner().groups;
    assert_eq!(groups.len(), 1);
    let v = sc.verify(spb::VerifyRequest::default()).await.expect("verify").into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "{v:?}");
    let out = dir.path().join("restored.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group.into(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore");
    assert_eq!(std::fs::read(&out).expect("restored"), std::fs::read(&img).expect("image"));
}
