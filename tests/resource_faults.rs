//! Resources that fail under a job: a source volume that answers EIO part way (a loop device
//! whose backing file was cut short) and a restore target whose filesystem fills up (a small
//! tmpfs). Each must end in a clear error naming what failed, leave nothing half-visible (no
//! group, no open session, no partial target) and let the next run succeed once the fault is
//! gone. Needs root (losetup, mount).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{AgentOptions, add_storage, backup_client, pseudo_random, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const VM: &str = "0b7c2f4e9d8a4b3c8e1f2a3b4c5d6e7f";
const ROOT: &str = "1c8d3e5f0a9b4c4d9f2e3b4c5d6e7f80";

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): these tests need util-linux and root"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed (these tests need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over `file`, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        Loop(sh("losetup", &["-f", "--show", &file.display().to_string()]))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A tmpfs of `size` mounted at `dir`, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        sh("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", &dir.display().to_string()]);
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn store_groups(store: &common::Daemon) -> Vec<String> {
    let mut c = common::store_client(store).await;
    let g = c.list_groups(spb::ListGroupsRequest {}).await.expect("list groups").into_inner().groups;
    g.into_iter().map(|g| g.group_uuid).collect()
}

async fn open_sessions(store: &common::Daemon) -> u32 {
    let mut c = common::store_client(store).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let open = c.status(spb::StatusRequest {}).await.expect("status").into_inner().open_sessions;
        if open == 0 || std::time::Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map_or_else(|_| Vec::new(), |rd| rd.flatten().map(|e| e.path()).collect())
}

fn backup_request(vm: &pb::RegisterVmRequest, bs: &str, resource: &str) -> pb::CreateVmBackupRequest {
    pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.into(),
        name: "resources".into(),
        resource_uuid: resource.into(),
        vm: Some(vm.clone()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_answers_eio_part_way_fails_the_backup_cleanly_and_the_next_run_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk.img");
    let mut data = Vec::new();
    for i in 0..16u64 {
        data.extend(pseudo_random(500 + i, 1 << 20));
    }
    std::fs::write(&backing, &data).expect("backing file");
    let device = Loop::attach(&backing);
    // The device keeps its 16 MiB; reads past the backing file's first 6 MiB now fail (EIO).
    sh("truncate", &["-s", "6M", &backing.display().to_string()]);

    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = add_storage(&agent, &store, "s").await;
    let vm = common::one_volume_vm(VM, ROOT, Path::new(&device.0), "raw");
    let mut c = backup_client(&agent).await;
    let resource = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
    let e = c.create_vm_backup(backup_request(&vm, &bs, resource)).await.expect_err("the source fails part way");
    let text = e.message();
    assert!(text.contains(&device.0), "the error names the device: {text}");
    assert!(text.to_lowercase().contains("input/output error"), "the error says what failed: {text}");
    assert!(text.contains("offset"), "the error names where: {text}");
    assert!(store_groups(&store).await.is_empty(), "nothing is visible");
    assert_eq!(open_sessions(&store).await, 0, "the failed job's session was closed");
    // Chunks the cut upload stream left pending are removed once the store sees it end.
    let tmp = store.data_dir.join("tmp");
    for _ in 0..100 {
        if files_under(&tmp).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(files_under(&tmp).is_empty(), "no temporary chunk left on the store");
    let q =
        c.query_volume_backup(pb::QueryVolumeBackupRequest::default()).await.expect("query").into_inner().inventories;
    assert!(q.is_empty(), "the catalog records nothing: {q:?}");

    // The fault is gone (the file has its size again; its tail now reads as zeros): the same
    // request succeeds and restores to exactly what the device holds now.
    sh("truncate", &["-s", "16M", &backing.display().to_string()]);
    c.create_vm_backup(backup_request(&vm, &bs, resource)).await.expect("the retry succeeds");
    assert_eq!(store_groups(&store).await, vec![resource.to_string()]);
    let out = dir.path().join("restored.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: resource.into(),
        backup_storage_uuid: bs,
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore");
    let mut expected = data[..6 << 20].to_vec();
    expected.resize(16 << 20, 0);
    assert!(std::fs::read(&out).expect("restored") == expected, "the restore equals the device's content");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_target_that_fills_up_fails_cleanly_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    let mut data = Vec::new();
    for i in 0..12u64 {
        data.extend(pseudo_random(700 + i, 1 << 20));
    }
    std::fs::write(&img, &data).expect("image");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = add_storage(&agent, &store, "s").await;
    let vm = common::one_volume_vm(VM, ROOT, &img, "raw");
    let mut c = backup_client(&agent).await;
    let group = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
    c.create_vm_backup(backup_request(&vm, &bs, group)).await.expect("backup");

    let small = Tmpfs::mount(&dir.path().join("small"), "4m");
    let restore = |path: PathBuf, resource: &str| pb::RestoreVmBackupRequest {
        group_uuid: group.into(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: path.display().to_string(),
            format: "raw".into(),
        }],
        resource_uuid: resource.into(),
        ..Default::default()
    };
    let target = small.0.join("restored.raw");
    let e = c.restore_vm_backup(restore(target.clone(), "")).await.expect_err("12 MiB do not fit in 4 MiB");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "a full filesystem is said as such: {e:?}");
    assert!(e.message().contains("No space left on device"), "{e:?}");
    assert!(e.message().contains("restored.raw"), "the error names the target: {e:?}");
    assert!(files_under(&small.0).is_empty(), "no target and no partial file left: {:?}", files_under(&small.0));

    // With room (the same place, remounted larger), the restore completes.
    drop(small);
    let big = Tmpfs::mount(&dir.path().join("small"), "32m");
    c.restore_vm_backup(restore(target.clone(), "")).await.expect("restore with room");
    assert!(std::fs::read(&target).expect("restored") == data, "restored identical");
    drop(big);
}
