//! CreateVmBackup end to end: a VM with a qcow2 root volume and a raw data volume made by
//! qemu-img, backed up by a real agent into a real store.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use common::{AgentOptions, Auth, start_agent, start_store, storage_client, store_client};
use vmbackup_proto::Digest;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::digest::is_all_zero;
use vmbackup_proto::index::VolumeIndex;
use vmbackup_proto::store::v1 as spb;

const CS: usize = 64 << 10;
const VM: &str = "9ff17180fded31c2b9e4e5751ebcb2ba";
const ROOT: &str = "edc07fe8d8a335ec8aa00f23b88fc1c6";
const DATA: &str = "2ae6b881bb1239cd907d48993e86a2e8";

fn run(tool: &str, args: &[&str]) {
    common::run_tool(tool, args);
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.extend(["-c".to_string(), c.clone()]);
    }
    args.push(img.display().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &a);
}

/// Digests of the non-zero 64 KiB chunks of a volume, via qemu-img convert.
fn expected_digests(img: &Path, dir: &Path) -> Vec<Digest> {
    let raw = dir.join(format!("{}.raw", img.file_name().expect("name").to_string_lossy()));
    run("qemu-img", &["convert", "-O", "raw", &img.display().to_string(), &raw.display().to_string()]);
    let data = std::fs::read(&raw).expect("raw");
    data.chunks(CS).filter(|c| !is_all_zero(c)).map(Digest::of).collect()
}

fn stored_chunks(store_dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    for shard in std::fs::read_dir(store_dir.join("chunks")).expect("chunks").flatten() {
        for c in std::fs::read_dir(shard.path()).expect("shard").flatten() {
            out.insert(c.file_name().to_string_lossy().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_dedups_and_sends_only_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir(&images).expect("mkdir");
    let root = images.join("root.qcow2");
    let data = images.join("data.raw");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &root.display().to_string(), "8M"]);
    qemu_io(&root, "qcow2", &["write -P 0x11 0 1M".into(), "write -P 0x12 3M 200k".into(), "write -z 5M 128k".into()]);
    run("qemu-img", &["create", "-q", "-f", "raw", &data.display().to_string(), "6M"]);
    // Two identical 64 KiB regions (dedup within the job) and a written-but-zero region.
    qemu_io(
        &data,
        "raw",
        &[
            "write -P 0x21 0 64k".into(),
            "write -P 0x21 1M 64k".into(),
            "write -P 0x00 2M 256k".into(),
            "write -P 0x22 4M 100k".into(),
        ],
    );

    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let token = Some(format!("OAuth {}", common::session(&agent)));
    let bs = storage_client(&agent, Some(common::session(&agent)))
        .await
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "store".into(),
            url: store.url(),
            token: common::store_token(&store),
            ..Default::default()
        })
        .await
        .expect("add storage")
        .into_inner()
        .inventory
        .expect("inventory");
    let mut vb = pb::vm_backup_service_client::VmBackupServiceClient::with_interceptor(
        common::channel(&agent.url()).await,
        Auth(token),
    );
    let vm = pb::RegisterVmRequest {
        uuid: VM.into(),
        name: "web-1".into(),
        volumes: vec![
            pb::VolumeSpec {
                uuid: ROOT.into(),
                name: "ROOT".into(),
                install_path: root.display().to_string(),
                format: "qcow2".into(),
                r#type: "Root".into(),
                device_id: 0,
            },
            pb::VolumeSpec {
                uuid: DATA.into(),
                name: "DATA".into(),
                install_path: data.display().to_string(),
                format: "raw".into(),
                r#type: "Data".into(),
                device_id: 1,
            },
        ],
        ..Default::default()
    };
    let create = |resource: &str, name: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.uuid.clone(),
        name: name.into(),
        description: "nightly".into(),
        resource_uuid: resource.into(),
        vm: Some(vm.clone()),
        system_tags: vec!["volumeLiveBackup::parallelismDegree::3".into()],
        ..Default::default()
    };
    let g1 = "11111111111111111111111111111111";
    let inv = vb.create_vm_backup(create(g1, "backup-1")).await.expect("backup").into_inner().inventories;

    // Inventories carry every seed field, root first.
    assert_eq!(inv.len(), 2);
    assert_eq!((inv[0].volume_uuid.as_str(), inv[0].r#type.as_str()), (ROOT, "Root"));
    assert_eq!((inv[1].volume_uuid.as_str(), inv[1].r#type.as_str()), (DATA, "Data"));
    for i in &inv {
        assert_eq!(
            (i.group_uuid.as_str(), i.state.as_str(), i.status.as_str(), i.description.as_str()),
            (g1, "Enabled", "Ready", "nightly")
        );
        assert_eq!(i.uuid.len(), 32);
        assert!(i.create_date.is_some() && i.last_op_date.is_some());
        let meta: serde_json::Value = serde_json::from_str(&i.metadata).expect("metadata is JSON");
        assert_eq!(meta["chunkSize"], 65536);
        assert_eq!(i.backup_storage_refs.len(), 1);
        assert_eq!(i.backup_storage_refs[0].backup_storage_uuid, bs.uuid);
        assert!(i.backup_storage_refs[0].install_path.ends_with(".vidx"));
    }
    assert_eq!((inv[0].size, inv[1].size), (8 << 20, 6 << 20));

    // The store holds exactly the digests of the non-zero chunks, and the indexes name them.
    let mut want: HashSet<String> = expected_digests(&root, dir.path()).into_iter().map(|d| d.to_hex()).collect();
    want.extend(expected_digests(&data, dir.path()).into_iter().map(|d| d.to_hex()));
    assert_eq!(stored_chunks(&store.data_dir), want);
    let mut sc = store_client(&store).await;
    for (i, img) in inv.iter().zip([&root, &data]) {
        let ix = sc
            .get_index(spb::GetIndexRequest { name: i.backup_storage_refs[0].install_path.clone() })
            .await
            .expect("index")
            .into_inner()
            .data;
        let ix = VolumeIndex::decode(&ix, 1 << 20).expect("decode");
        let raw = std::fs::read(dir.path().join(format!("{}.raw", img.file_name().expect("n").to_string_lossy())))
            .expect("raw");
        for (chunk, d) in raw.chunks(CS).zip(&ix.digests) {
            let expect = if is_all_zero(chunk) { Digest::ZERO_CHUNK } else { Digest::of(chunk) };
            assert_eq!(*d, expect);
        }
    }
    let uploaded = |st: spb::StatusReply| st.counters.expect("counters").chunks_uploaded;
    let after_first = uploaded(sc.status(spb::StatusRequest {}).await.expect("status").into_inner());
    assert_eq!(after_first, u64::try_from(want.len()).expect("fits"));

    // The retry with the same resourceUuid returns the same group.
    let again = vb.create_vm_backup(create(g1, "backup-1")).await.expect("retry").into_inner().inventories;
    assert_eq!(again, inv);

    // An unchanged VM uploads nothing.
    vb.create_vm_backup(create("", "backup-2")).await.expect("second backup");
    assert_eq!(uploaded(sc.status(spb::StatusRequest {}).await.expect("status").into_inner()), after_first);

    // Change 3 chunks: only those are sent.
    qemu_io(&root, "qcow2", &["write -P 0x99 0 4k".into(), "write -P 0x98 3M 4k".into()]);
    qemu_io(&data, "raw", &["write -P 0x97 4M 4k".into()]);
    let inv3 = vb.create_vm_backup(create("", "backup-3")).await.expect("third backup").into_inner().inventories;
    assert_eq!(uploaded(sc.status(spb::StatusRequest {}).await.expect("status").into_inner()), after_first + 3);
    let meta: serde_json::Value = serde_json::from_str(&inv3[0].metadata).expect("json");
    assert!(meta["deduplicatedBytes"].as_u64().expect("dedup") > 0, "{meta}");

    // Queries and the finished job's progress.
    let q = vb
        .query_volume_backup(pb::QueryVolumeBackupRequest {
            conditions: vec![format!("groupUuid={g1}")],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    assert_eq!(q.inventories.len(), 2);
    let all = vb
        .query_volume_backup(pb::QueryVolumeBackupRequest {
            conditions: vec![format!("volumeUuid={ROOT}")],
            count: true,
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner();
    assert_eq!(all.total, Some(3));
    let mut w = vb.watch_job(pb::WatchJobRequest { job_uuid: g1.into() }).await.expect("watch").into_inner();
    let p = w.message().await.expect("progress").expect("one message");
    assert_eq!(p.state, "Succeeded");
    assert_eq!(p.bytes_planned, 14 << 20);
    assert_eq!(p.bytes_read + p.bytes_zero, p.bytes_planned, "{p:?}");
    assert!(p.bytes_deduplicated >= 64 << 10, "{p:?}");

    // Bad requests: unknown storage, unknown volume, bad tags, too low a bandwidth.
    let mut bad = create("", "x");
    bad.backup_storage_uuid = "33333333333333333333333333333333".into();
    assert_eq!(vb.create_vm_backup(bad).await.expect_err("storage").code(), tonic::Code::NotFound);
    let mut bad = create("", "x");
    bad.vm = None;
    bad.root_volume_uuid = "44444444444444444444444444444444".into();
    assert_eq!(vb.create_vm_backup(bad).await.expect_err("volume").code(), tonic::Code::NotFound);
    let mut bad = create("", "x");
    bad.system_tags = vec!["volumeLiveBackup::parallelismDegree::0".into()];
    assert_eq!(vb.create_vm_backup(bad).await.expect_err("tag").code(), tonic::Code::InvalidArgument);
    let mut bad = create("", "x");
    bad.network_write_bandwidth = Some(10);
    let e = vb.create_vm_backup(bad).await.expect_err("bandwidth");
    assert!(e.message().contains("networkWriteBandwidth"), "{e:?}");
    let mut bad = create("", "x");
    if let Some(v) = bad.vm.as_mut() {
        v.volumes[1].install_path = "/nonexistent/data.raw".into();
    }
    let e = vb.create_vm_backup(bad).await.expect_err("missing file");
    assert!(e.message().contains("/nonexistent/data.raw"), "{e:?}");
    assert_eq!(
        uploaded(sc.status(spb::StatusRequest {}).await.expect("status").into_inner()),
        after_first + 3,
        "nothing sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vmbackupctl_registers_backs_up_lists_and_watches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img.display().to_string(), "2M"]);
    qemu_io(&img, "raw", &["write -P 0x5a 0 128k".into()]);
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let ctl = |args: &[&str]| {
        let out = Command::new(common::bin("vmbackupctl"))
            .arg("--agent")
            .arg(agent.url())
            .arg("--session-file")
            .arg(agent.data_dir.join("session"))
            .args(args)
            .output()
            .expect("run vmbackupctl");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    };
    let volume = format!("uuid={ROOT},path={},format=raw,type=Root,device=0", img.display());
    let table = ctl(&["vm", "register", "--uuid", VM, "--name", "web", "--volume", &volume]);
    assert!(table.contains(ROOT), "{table}");
    let group = "77777777777777777777777777777777";
    let json = ctl(&[
        "--json",
        "backup",
        "create",
        "--root-volume",
        ROOT,
        "--storage",
        &bs,
        "--name",
        "cli",
        "--resource-uuid",
        group,
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["inventories"][0]["groupUuid"], group, "{v}");
    let table = ctl(&["backup", "list", &format!("groupUuid={group}")]);
    assert!(table.contains(group) && table.contains("Ready"), "{table}");
    let last = ctl(&["--json", "job", "watch", group]);
    let p: serde_json::Value = serde_json::from_str(last.trim()).expect("json");
    assert_eq!(p["state"], "Succeeded", "{p}");
    assert_eq!(p["bytesRead"], "131072", "{p}");

    // restore to qcow2, recover to a second store, delete from the first, sync.
    let out = dir.path().join("restored.qcow2");
    let target = format!("volume={ROOT},path={},format=qcow2", out.display());
    let json = ctl(&["--json", "backup", "restore", "--group", group, "--storage", &bs, "--target", &target]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["inventories"][0]["volumeUuid"], ROOT, "{v}");
    run("qemu-img", &["compare", &img.display().to_string(), &out.display().to_string()]);
    let second = start_store(dir.path(), "second");
    let bs2 = common::add_storage(&agent, &second, "second").await;
    let table = ctl(&["backup", "recover", "--group", group, "--from", &bs, "--to", &bs2]);
    assert!(table.contains(group), "{table}");
    let said = ctl(&["backup", "delete", "--group", group, "--storage", &bs]);
    assert!(said.contains("deleted backup group"), "{said}");
    let said = ctl(&["backup", "sync", "--storage", &bs2]);
    assert!(said.contains("rebuilt"), "{said}");
    let json = ctl(&["--json", "backup", "list", &format!("groupUuid={group}")]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let refs = v["inventories"][0]["backupStorageRefs"].as_array().expect("refs").clone();
    assert_eq!(refs.len(), 1, "{v}");
    assert_eq!(refs[0]["backupStorageUuid"], bs2.as_str(), "{v}");

    // status: the agent and both stores on one screen.
    let table = ctl(&["status"]);
    assert!(table.contains("1 VMs registered, 1 volume backups"), "{table}");
    assert!(table.contains(&bs) && table.contains(&bs2) && table.contains("Connected"), "{table}");
    let v: serde_json::Value = serde_json::from_str(&ctl(&["--json", "status"])).expect("json");
    let storages = v["backupStorages"].as_array().expect("storages");
    assert_eq!(storages.len(), 2, "{v}");
    let groups: Vec<String> = storages.iter().map(|s| s["store"]["groupCount"].to_string()).collect();
    assert!(groups.contains(&"\"1\"".to_string()), "the second store holds the recovered group: {v}");
    // Completions and the manual page.
    assert!(ctl(&["completions", "bash"]).contains("_vmbackupctl()"));
    assert!(ctl(&["man"]).starts_with(".ie"), "roff");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_then_gc_reclaims_only_its_chunks_and_sync_rebuilds_the_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img.display().to_string(), "4M"]);
    // a = {0x31, 0x34}; b overwrites the first chunk: {0x32, 0x34}. Only 0x31 is a's alone.
    qemu_io(&img, "raw", &["write -P 0x31 0 64k".into(), "write -P 0x34 64k 64k".into()]);
    let store = start_store(dir.path(), "store");
    let mut agent = start_agent(dir.path(), AgentOptions::default());
    let bs_uuid = "88888888888888888888888888888888";
    let add = |agent: &common::Daemon| {
        let (url, token, store_token) = (store.url(), common::session(agent), common::store_token(&store));
        let agent_url = agent.url();
        async move {
            let mut c = pb::backup_storage_service_client::BackupStorageServiceClient::with_interceptor(
                common::channel(&agent_url).await,
                Auth(Some(format!("OAuth {token}"))),
            );
            c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
                name: "store".into(),
                url,
                token: store_token,
                resource_uuid: bs_uuid.into(),
                ..Default::default()
            })
            .await
            .expect("add storage");
        }
    };
    add(&agent).await;
    let vm = common::one_volume_vm(VM, ROOT, &img, "raw");
    let create = |name: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs_uuid.into(),
        name: name.into(),
        vm: Some(vm.clone()),
        ..Default::default()
    };
    let mut c = common::backup_client(&agent).await;
    let a = c.create_vm_backup(create("a")).await.expect("a").into_inner().inventories;
    qemu_io(&img, "raw", &["write -P 0x32 0 64k".into()]);
    let b = c.create_vm_backup(create("b")).await.expect("b").into_inner().inventories;
    let before = all_backups(&mut c).await;
    assert_eq!(before.len(), 2);

    // Sync: lose the catalog, restart, register the storage under its uuid again, sync.
    agent.stop();
    for f in ["catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"] {
        let _ = std::fs::remove_file(agent.data_dir.join(f));
    }
    agent.restart();
    add(&agent).await;
    let mut c = common::backup_client(&agent).await;
    assert!(all_backups(&mut c).await.is_empty());
    c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: bs_uuid.into(), ..Default::default() })
        .await
        .expect("sync");
    assert_eq!(all_backups(&mut c).await, before, "every inventory comes back equal");
    c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: bs_uuid.into(), ..Default::default() })
        .await
        .expect("sync again");
    assert_eq!(all_backups(&mut c).await, before, "a second sync changes nothing");

    // Delete group a; GC removes exactly the chunk only a used.
    c.delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: a[0].group_uuid.clone(), ..Default::default() })
        .await
        .expect("delete");
    let e = c
        .delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: a[0].group_uuid.clone(), ..Default::default() })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(all_backups(&mut c).await.len(), 1);
    let mut sc = store_client(&store).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let gc = sc
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!((gc.chunks_removed, gc.chunks_kept), (1, 2), "{gc:?}");
    let v = sc
        .verify(spb::VerifyRequest { group_uuids: vec![b[0].group_uuid.clone()] })
        .await
        .expect("verify")
        .into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "{v:?}");
}

async fn all_backups(c: &mut common::BackupClient) -> Vec<pb::VolumeBackupInventory> {
    let mut v =
        c.query_volume_backup(pb::QueryVolumeBackupRequest::default()).await.expect("query").into_inner().inventories;
    v.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_to_raw_is_identical_sparse_and_refuses_damaged_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &base.display().to_string(), "6M"]);
    qemu_io(&base, "raw", &["write -P 0x41 0 2M".into()]);
    let root = dir.path().join("root.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &root.display().to_string(), "8M"]);
    qemu_io(&root, "qcow2", &["write -P 0x42 1M 100k".into(), "write -z 0 64k".into(), "write -P 0x43 7M 4097".into()]);
    let data = dir.path().join("data.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &data.display().to_string(), "5M"]);
    qemu_io(&data, "raw", &["write -P 0x44 64k 64k".into(), "write -P 0x45 4M 1M".into()]);
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let vm = pb::RegisterVmRequest {
        uuid: VM.into(),
        volumes: vec![
            pb::VolumeSpec {
                uuid: ROOT.into(),
                name: "ROOT".into(),
                install_path: root.display().to_string(),
                format: "qcow2".into(),
                r#type: "Root".into(),
                device_id: 0,
            },
            pb::VolumeSpec {
                uuid: DATA.into(),
                name: "DATA".into(),
                install_path: data.display().to_string(),
                format: "raw".into(),
                r#type: "Data".into(),
                device_id: 1,
            },
        ],
        ..Default::default()
    };
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "r".into(),
            vm: Some(vm),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    let group = inv[0].group_uuid.clone();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let target = |volume: &str, name: &str| pb::RestoreTarget {
        volume_uuid: volume.into(),
        install_path: out.join(name).display().to_string(),
        format: "raw".into(),
    };
    let reply = c
        .restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.clone(),
            backup_storage_uuid: bs.clone(),
            targets: vec![target(ROOT, "root.raw"), target(DATA, "data.raw")],
            ..Default::default()
        })
        .await
        .expect("restore")
        .into_inner();
    assert_eq!(reply.inventories.len(), 2);
    for (src, fmt, name) in [(&root, "qcow2", "root.raw"), (&data, "raw", "data.raw")] {
        let restored = out.join(name);
        let r = Command::new("qemu-img")
            .args(["compare", "-f", fmt, "-F", "raw", &src.display().to_string(), &restored.display().to_string()])
            .output()
            .expect("qemu-img compare");
        assert!(r.status.success(), "{name}: {}", String::from_utf8_lossy(&r.stdout));
        let meta = std::fs::metadata(&restored).expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < meta.len() / 2,
            "{name}: zero chunks must stay holes ({} of {} bytes allocated)",
            meta.blocks() * 512,
            meta.len()
        );
    }
    let mut w =
        c.watch_job(pb::WatchJobRequest { job_uuid: reply.job_uuid.clone() }).await.expect("watch").into_inner();
    let p = w.message().await.expect("msg").expect("one");
    assert_eq!((p.state.as_str(), p.bytes_written + p.bytes_zero), ("Succeeded", 13 << 20), "{p:?}");

    // A chunk damaged on the store: the restore fails naming it and the volume, leaving nothing.
    let data_chunk = Digest::of(&[0x45u8; CS]).to_hex();
    let path = store.data_dir.join("chunks").join(&data_chunk[..4]).join(&data_chunk);
    let mut bytes = std::fs::read(&path).expect("chunk file");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).expect("corrupt");
    let e = c
        .restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group,
            backup_storage_uuid: bs,
            targets: vec![target(DATA, "again.raw")],
            ..Default::default()
        })
        .await
        .expect_err("damaged chunk");
    assert!(e.message().contains(&data_chunk) && e.message().contains(DATA), "{e:?}");
    let left: Vec<_> = std::fs::read_dir(&out).expect("out").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "no partial or failed target left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn recover_sends_only_missing_chunks_and_the_copy_restores_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img.display().to_string(), "1M"]);
    let patterns = ["0x51", "0x52", "0x53", "0x54"];
    let writes: Vec<String> =
        patterns.iter().enumerate().map(|(i, p)| format!("write -P {p} {}k 64k", i * 64)).collect();
    qemu_io(&img, "raw", &writes);
    let other = dir.path().join("other.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &other.display().to_string(), "1M"]);
    qemu_io(&other, "raw", &["write -P 0x51 0 64k".into()]); // B will already hold this chunk
    let (store_a, store_b) = (start_store(dir.path(), "a"), start_store(dir.path(), "b"));
    let agent = start_agent(dir.path(), AgentOptions::default());
    let (a, b) = (common::add_storage(&agent, &store_a, "a").await, common::add_storage(&agent, &store_b, "b").await);
    let vm = |uuid: &str, root: &str, path: &Path| common::one_volume_vm(uuid, root, path, "raw");
    let mut c = common::backup_client(&agent).await;
    let backup = |vm: pb::RegisterVmRequest, bs: String| pb::CreateVmBackupRequest {
        root_volume_uuid: vm.volumes[0].uuid.clone(),
        backup_storage_uuid: bs,
        name: "x".into(),
        vm: Some(vm),
        ..Default::default()
    };
    let inv =
        c.create_vm_backup(backup(vm(VM, ROOT, &img), a.clone())).await.expect("backup to a").into_inner().inventories;
    c.create_vm_backup(backup(vm("98ac921100b43981b493071b6430bb2b", DATA, &other), b.clone()))
        .await
        .expect("backup to b");
    let group = inv[0].group_uuid.clone();
    let before = common::chunks_uploaded(&store_b).await;

    let rec = c
        .recover_vm_backup_from_image_store_backup_storage(pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
            group_uuid: group.clone(),
            src_backup_storage_uuid: a.clone(),
            dst_backup_storage_uuid: b.clone(),
            ..Default::default()
        })
        .await
        .expect("recover")
        .into_inner()
        .inventories;
    assert_eq!(common::chunks_uploaded(&store_b).await - before, 3, "only the chunks b lacked");
    let storages: HashSet<String> = rec[0].backup_storage_refs.iter().map(|r| r.backup_storage_uuid.clone()).collect();
    assert_eq!(storages, HashSet::from([a.clone(), b.clone()]));

    // Without the source copy, the destination restores on its own.
    c.delete_vm_backup(pb::DeleteVmBackupRequest {
        group_uuid: group.clone(),
        backup_storage_uuids: vec![a.clone()],
        ..Default::default()
    })
    .await
    .expect("delete from a");
    let out = dir.path().join("restored.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group,
        backup_storage_uuid: b,
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore from b");
    let r = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &img.display().to_string(), &out.display().to_string()])
        .output()
        .expect("compare");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
}
