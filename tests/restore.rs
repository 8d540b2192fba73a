//! RestoreVmBackup beyond raw files: qcow2 targets, reverting a stopped VM's own volumes,
//! refusing volumes a running QEMU holds, and agent crashes in the middle of a restore or a
//! recover. Real agent, real stores, images made and checked by qemu-img.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentOptions, BackupClient, Daemon, run_tool, start_agent, start_store, zstack_code};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "4c1f0e8a7b2d4e6f8a9b0c1d2e3f4a5b";
const ROOT: &str = "5d2a1f9b8c3e4d7a9b0c1e2f3a4b5c6d";
const DATA: &str = "6e3b2a0c9d4f5e8b0c1d2f3a4b5c6d7e";

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let img = p(img);
    args.push(&img);
    run_tool("qemu-io", &args);
}

fn compare(a: &Path, b: &Path) {
    let r = Command::new("qemu-img").args(["compare", &p(a), &p(b)]).output().expect("qemu-img compare");
    assert!(r.status.success(), "{} vs {}: {}", a.display(), b.display(), String::from_utf8_lossy(&r.stdout));
}

/// A VM with a qcow2 root (over a raw backing file) and a raw data volume, backed up once.
struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    _store: Daemon,
    agent: Daemon,
    bs: String,
    group: String,
}

async fn fixture(data_size: &str, data_writes: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&base), "4M"]);
    qemu_io(&base, "raw", &["write -P 0x41 0 2M"]);
    let root = dir.path().join("root.qcow2");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &p(&root), "6M"]);
    qemu_io(&root, "qcow2", &["write -P 0x42 1M 100k", "write -z 0 64k", "write -P 0x43 5M 4097"]);
    let data = dir.path().join("data.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&data), data_size]);
    qemu_io(&data, "raw", data_writes);
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let vm = pb::RegisterVmRequest {
        uuid: VM.into(),
        volumes: vec![
            common::volume_spec(ROOT, "Root", &root, "qcow2", 0),
            common::volume_spec(DATA, "Data", &data, "raw", 1),
        ],
        ..Default::default()
    };
    let mut c = common::backup_client(&agent).await;
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "nightly".into(),
            vm: Some(vm),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    let group = inv[0].group_uuid.clone();
    Fixture { dir, root, data, _store: store, agent, bs, group }
}

fn target(volume: &str, path: &Path, format: &str) -> pb::RestoreTarget {
    pb::RestoreTarget { volume_uuid: volume.into(), install_path: p(path), format: format.into() }
}

async fn restore(
    c: &mut BackupClient,
    f: &Fixture,
    targets: Vec<pb::RestoreTarget>,
    revert: bool,
) -> Result<pb::RestoreVmBackupReply, tonic::Status> {
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: f.group.clone(),
        backup_storage_uuid: f.bs.clone(),
        targets,
        revert,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

fn check_clean(img: &Path) {
    let report = run_tool("qemu-img", &["check", "--output=json", &p(img)]);
    let r: serde_json::Value = serde_json::from_str(&report).expect("check json");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(r[key].as_u64().unwrap_or(0), 0, "qemu-img check {}: {report}", img.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_to_qcow2_is_identical_and_clean() {
    let f = fixture("5M", &["write -P 0x44 64k 64k", "write -P 0x45 4M 1M"]).await;
    let mut c = common::backup_client(&f.agent).await;
    let out = f.dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let (root_q, data_q) = (out.join("root.qcow2"), out.join("data.qcow2"));
    let reply = restore(&mut c, &f, vec![target(ROOT, &root_q, "qcow2"), target(DATA, &data_q, "qcow2")], false)
        .await
        .expect("restore");
    assert_eq!(reply.inventories.len(), 2);
    for (src, restored) in [(&f.root, &root_q), (&f.data, &data_q)] {
        compare(src, restored);
        check_clean(restored);
        let info: serde_json::Value =
            serde_json::from_str(&run_tool("qemu-img", &["info", "--output=json", &p(restored)])).expect("info");
        assert_eq!(info["format"], "qcow2");
        assert!(info["backing-filename"].is_null(), "a restored volume stands alone");
    }
    // Only data clusters are allocated: the data volume holds 1 MiB + 64 KiB of data.
    let map = run_tool("qemu-img", &["map", "--output=json", &p(&data_q)]);
    let allocated: u64 = serde_json::from_str::<serde_json::Value>(&map)
        .expect("map")
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().expect("length"))
        .sum();
    assert_eq!(allocated, (1 << 20) + (64 << 10));
    // An existing target is refused and left alone.
    let e = restore(&mut c, &f, vec![target(DATA, &data_q, "qcow2")], false).await.expect_err("exists");
    assert!(e.message().contains("already exists"), "{e:?}");
    compare(&f.data, &data_q);
}

#[tokio::test(flavor = "multi_thread")]
async fn revert_puts_the_backed_up_volumes_back_and_keeps_their_mode() {
    let f = fixture("5M", &["write -P 0x44 64k 64k", "write -P 0x45 4M 1M"]).await;
    let keep = f.dir.path().join("keep");
    std::fs::create_dir(&keep).expect("mkdir");
    let (root_then, data_then) = (keep.join("root.raw"), keep.join("data.raw"));
    run_tool("qemu-img", &["convert", "-O", "raw", &p(&f.root), &p(&root_then)]);
    std::fs::copy(&f.data, &data_then).expect("copy");
    // The VM runs on and changes both volumes.
    qemu_io(&f.root, "qcow2", &["write -P 0x99 0 1M", "write -z 1M 100k"]);
    qemu_io(&f.data, "raw", &["write -P 0x98 0 3M"]);
    std::fs::set_permissions(&f.data, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let mut c = common::backup_client(&f.agent).await;

    let reply = restore(&mut c, &f, vec![], true).await.expect("revert");
    assert_eq!(reply.inventories.len(), 2);
    compare(&root_then, &f.root);
    compare(&data_then, &f.data);
    check_clean(&f.root);
    let mode = std::fs::metadata(&f.data).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "the reverted volume keeps its mode");
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("vmbackup-partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn revert_is_refused_while_a_running_qemu_holds_the_volume() {
    let f = fixture("5M", &["write -P 0x44 64k 64k"]).await;
    qemu_io(&f.data, "raw", &["write -P 0x97 0 64k"]);
    let before = std::fs::read(&f.data).expect("read");
    // qemu-io keeps the image open read-write, with QEMU's locks, while its input is open.
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "raw", &p(&f.data)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io not found: install qemu-utils");
    let mut c = common::backup_client(&f.agent).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match restore(&mut c, &f, vec![target(DATA, Path::new("/ignored"), "")], true).await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                // qemu-io had not taken its locks yet: put the changed bytes back and retry.
                std::fs::write(&f.data, &before).expect("rewrite");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => panic!("a volume held by QEMU was reverted"),
        }
    };
    assert_eq!((e.code(), zstack_code(&e).as_str()), (tonic::Code::FailedPrecondition, "SYS.1006"), "{e:?}");
    assert!(e.message().contains("volume in use by a running VM"), "{e:?}");
    assert_eq!(std::fs::read(&f.data).expect("read"), before, "the volume is untouched");
    qemu.stdin.take().expect("stdin").write_all(b"quit\n").expect("quit");
    assert!(qemu.wait().expect("wait").success());
}

#[tokio::test(flavor = "multi_thread")]
async fn revert_is_refused_while_a_backup_of_the_volume_runs() {
    let f = fixture("12M", &["write -P 0x44 0 8M"]).await;
    let before = std::fs::read(&f.data).expect("read");
    let resource = "5e6f708192a3b4c5d6e7f8091a2b3c4d";
    // A second backup of the VM, slowed down so it still reads when the revert comes.
    let mut c = common::backup_client(&f.agent).await;
    let (mut bg, bs) = (c.clone(), f.bs.clone());
    let running = tokio::spawn(async move {
        bg.create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs,
            name: "slow".into(),
            resource_uuid: resource.into(),
            volume_read_bandwidth: Some(2 << 20),
            ..Default::default()
        })
        .await
    });
    common::wait_until_read(&mut c, resource, 1).await;
    let e = restore(&mut c, &f, vec![target(DATA, Path::new("/ignored"), "")], true).await.expect_err("busy");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let holder = format!("volume {DATA} is in use by CreateVmBackup job {resource}");
    assert!(e.message().contains(&holder), "{e:?}");
    assert_eq!(std::fs::read(&f.data).expect("read"), before, "the volume is untouched");
    running.await.expect("join").expect("the backup completes");
    // Once the backup ended the volume is free again.
    restore(&mut c, &f, vec![target(DATA, Path::new("/ignored"), "")], true).await.expect("revert");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_restore_leaves_no_volume_and_the_retry_completes() {
    let noise = common::pseudo_random(7, 24 << 20);
    let f = fixture("24M", &[]).await;
    std::fs::write(&f.data, &noise).expect("data");
    // Back up again so the group holds 24 MiB of incompressible data.
    let mut f = f;
    let mut c = common::backup_client(&f.agent).await;
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: f.bs.clone(),
            name: "noise".into(),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    f.group = inv[0].group_uuid.clone();
    let out = f.dir.path().join("restored.raw");
    let job = "7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d";
    let req = pb::RestoreVmBackupRequest {
        group_uuid: f.group.clone(),
        backup_storage_uuid: f.bs.clone(),
        targets: vec![target(DATA, &out, "raw")],
        volume_write_bandwidth: Some(4 << 20),
        resource_uuid: job.into(),
        ..Default::default()
    };
    let mut bg = c.clone();
    let r = req.clone();
    let running = tokio::spawn(async move { bg.restore_vm_backup(r).await });
    // Kill it once some, but not all, data is written.
    let mut w = loop {
        match c.watch_job(pb::WatchJobRequest { job_uuid: job.into() }).await {
            Ok(s) => break s.into_inner(),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    loop {
        let p = w.message().await.expect("progress").expect("running");
        if p.bytes_written >= 4 << 20 {
            assert!(p.bytes_written < 24 << 20, "{p:?}");
            break;
        }
    }
    f.agent.kill();
    assert!(running.await.expect("join").is_err(), "the call fails with the agent");
    assert!(!out.exists(), "a killed restore must not leave a volume that looks complete");
    let partial = f.dir.path().join("restored.raw.vmbackup-partial");
    assert!(partial.exists(), "the killed restore was writing its partial file");

    f.agent.restart();
    assert!(!partial.exists(), "the restarted agent removed the partial file the killed restore left");
    let mut c = common::backup_client(&f.agent).await;
    let p = c
        .watch_job(pb::WatchJobRequest { job_uuid: job.into() })
        .await
        .expect("watch")
        .into_inner()
        .message()
        .await
        .expect("msg")
        .expect("state");
    assert_eq!(p.state, "Failed", "{p:?}");
    let retry = pb::RestoreVmBackupRequest { resource_uuid: String::new(), volume_write_bandwidth: None, ..req };
    c.restore_vm_backup(retry).await.expect("retry");
    compare(&f.data, &out);
    assert!(!f.dir.path().join("restored.raw.vmbackup-partial").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_recover_publishes_nothing_and_the_retry_sends_only_the_rest() {
    let mut f = fixture("64M", &[]).await;
    std::fs::write(&f.data, common::pseudo_random(11, 64 << 20)).expect("data");
    let mut c = common::backup_client(&f.agent).await;
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: f.bs.clone(),
            name: "noise".into(),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    f.group = inv[0].group_uuid.clone();
    // Every chunk on the source belongs to this group (the first group's are a subset).
    let distinct = common::chunks_uploaded(&f._store).await;
    let dst_store = start_store(f.dir.path(), "dst");
    let dst = common::add_storage(&f.agent, &dst_store, "dst").await;
    let req = pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
        group_uuid: f.group.clone(),
        src_backup_storage_uuid: f.bs.clone(),
        dst_backup_storage_uuid: dst.clone(),
        ..Default::default()
    };
    let (mut bg, r) = (c.clone(), req.clone());
    let running = tokio::spawn(async move { bg.recover_vm_backup_from_image_store_backup_storage(r).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::chunks_uploaded(&dst_store).await < distinct / 8 {
        assert!(Instant::now() < deadline, "the recover made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.agent.kill();
    let sent_before = common::chunks_uploaded(&dst_store).await;
    assert!(sent_before < distinct, "killed too late to test anything ({sent_before} of {distinct})");
    assert!(running.await.expect("join").is_err());
    let mut store = common::store_client(&dst_store).await;
    let groups = store.list_groups(vmbackup_proto::store::v1::ListGroupsRequest {}).await.expect("groups");
    assert!(groups.into_inner().groups.is_empty(), "an incomplete copy must not be visible");

    f.agent.restart();
    let mut c = common::backup_client(&f.agent).await;
    let q = c
        .query_volume_backup(pb::QueryVolumeBackupRequest {
            conditions: vec![format!("groupUuid={}", f.group)],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
        .inventories;
    assert!(q.iter().all(|v| v.backup_storage_refs.len() == 1), "no ref to the destination yet: {q:?}");
    let rec = c.recover_vm_backup_from_image_store_backup_storage(req).await.expect("retry").into_inner();
    assert!(rec.inventories.iter().all(|v| v.backup_storage_refs.len() == 2));
    assert_eq!(common::chunks_uploaded(&dst_store).await, distinct, "each chunk crossed exactly once");
    // The copy restores on its own.
    let out = f.dir.path().join("from-dst.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: f.group.clone(),
        backup_storage_uuid: dst,
        targets: vec![target(DATA, &out, "raw")],
        ..Default::default()
    })
    .await
    .expect("restore from the copy");
    compare(&f.data, &out);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_image_flavour_restores_identically_to_raw_and_qcow2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    let writes = ["write -P 0x11 0 64k", "write -P 0x22 300k 100k", "write -P 0x33 1M 4097", "write -z 2M 128k"];
    let mut flavours: Vec<(PathBuf, &str)> = Vec::new();
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("c512.qcow2", "cluster_size=512"),
        ("c2m.qcow2", "cluster_size=2M"),
        ("extl2.qcow2", "extended_l2=on"),
        ("prealloc.qcow2", "preallocation=metadata"),
    ] {
        let img = d(name);
        run_tool("qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, &p(&img), "3M"]);
        qemu_io(&img, "qcow2", &writes);
        flavours.push((img, "qcow2"));
    }
    let img = d("datafile.qcow2");
    let opts = format!("data_file={}", p(&d("datafile.data")));
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opts, &p(&img), "3M"]);
    qemu_io(&img, "qcow2", &writes);
    flavours.push((img, "qcow2"));
    let plain = d("plain.qcow2");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&plain), "3M"]);
    qemu_io(&plain, "qcow2", &writes);
    let zstd = d("zstd.qcow2");
    run_tool("qemu-img", &["convert", "-q", "-c", "-O", "qcow2", "-o", "compression_type=zstd", &p(&plain), &p(&zstd)]);
    flavours.push((zstd, "qcow2"));
    let odd = d("odd.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&odd), "1052673"]);
    qemu_io(&odd, "raw", &["write -P 0x44 1044480 8193"]);
    flavours.push((odd, "raw"));
    let top = d("top.qcow2");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &p(&plain), "-F", "qcow2", &p(&top), "4M"]);
    qemu_io(&top, "qcow2", &["write -z 0 64k", "write -P 0x55 3M 4k"]);
    flavours.push((top, "qcow2"));

    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let uuid = |i: usize| format!("{i:02}a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4");
    let volumes: Vec<pb::VolumeSpec> = flavours
        .iter()
        .enumerate()
        .map(|(i, (img, fmt))| {
            common::volume_spec(
                &uuid(i),
                if i == 0 { "Root" } else { "Data" },
                img,
                fmt,
                i32::try_from(i).expect("few"),
            )
        })
        .collect();
    let mut c = common::backup_client(&agent).await;
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: uuid(0),
            backup_storage_uuid: bs.clone(),
            name: "matrix".into(),
            vm: Some(pb::RegisterVmRequest { uuid: VM.into(), volumes, ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    assert_eq!(inv.len(), flavours.len());
    for format in ["raw", "qcow2"] {
        let out = dir.path().join(format!("out-{format}"));
        std::fs::create_dir(&out).expect("mkdir");
        let targets =
            (0..flavours.len()).map(|i| target(&uuid(i), &out.join(format!("{i}.{format}")), format)).collect();
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: inv[0].group_uuid.clone(),
            backup_storage_uuid: bs.clone(),
            targets,
            ..Default::default()
        })
        .await
        .expect("restore");
        for (i, (img, _)) in flavours.iter().enumerate() {
            let restored = out.join(format!("{i}.{format}"));
            compare(img, &restored);
            if format == "qcow2" {
                check_clean(&restored);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_held_several_times_is_downloaded_once_and_written_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 KiB chunks: one pattern at four chunk offsets, one other chunk, and a ragged tail
    // (the volume is not a multiple of 4 KiB, so its last chunk cannot go to the disk directly).
    let vol = dir.path().join("dup.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&vol), "1049000"]);
    qemu_io(
        &vol,
        "raw",
        &[
            "write -P 0x51 0 64k",
            "write -P 0x51 128k 64k",
            "write -P 0x51 512k 64k",
            "write -P 0x51 960k 64k",
            "write -P 0x52 256k 64k",
            "write -P 0x53 1048576 424",
        ],
    );
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "dup".into(),
            vm: Some(common::one_volume_vm(VM, ROOT, &vol, "raw")),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    let before = common::store_counters(&store).await.chunks_downloaded;
    for format in ["raw", "qcow2"] {
        let out = dir.path().join(format!("restored.{format}"));
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: inv[0].group_uuid.clone(),
            backup_storage_uuid: bs.clone(),
            targets: vec![target(ROOT, &out, format)],
            system_tags: vec!["volumeLiveBackup::parallelismDegree::3".into()],
            ..Default::default()
        })
        .await
        .expect("restore");
        compare(&vol, &out);
    }
    // Three distinct data chunks per restore: the repeated one once, the other, the tail.
    assert_eq!(common::store_counters(&store).await.chunks_downloaded - before, 2 * 3);
}

/// A restore's memory is bounded by its parallelism, not by the volume: 1 GiB of
/// incompressible data (every blob a whole 4 MiB chunk, the most a restore can hold per
/// chunk in flight) restored at parallelism 4, from a separate store and from the agent's
/// embedded one, each after a backup (what the agent kept from the backup counts too).
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_at_parallelism_4_stays_within_its_memory_bound() {
    const CEILING_MIB: u64 = 128;
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("random.raw");
    let mut f = std::fs::File::create(&img).expect("create");
    for mib in 0..1024u64 {
        f.write_all(&common::pseudo_random(mib + 1, 1 << 20)).expect("write");
    }
    f.sync_all().expect("sync");
    drop(f);
    let store = start_store(dir.path(), "store");
    for embedded in [false, true] {
        let agent_dir = dir.path().join(if embedded { "embedded" } else { "separate" });
        std::fs::create_dir(&agent_dir).expect("agent dir");
        let cfg = agent_dir.join("agent.toml");
        std::fs::write(&cfg, format!("[volumes]\nroots = [\"{}\"]\n", dir.path().display())).expect("config");
        let agent = start_agent(&agent_dir, AgentOptions { embedded_store: embedded, config: Some(cfg) });
        let bs = if embedded {
            common::embedded_storage(&agent).await
        } else {
            common::add_storage(&agent, &store, "s").await
        };
        let mut c = common::backup_client(&agent).await;
        let tags = vec!["volumeLiveBackup::parallelismDegree::4".to_string()];
        let inv = c
            .create_vm_backup(pb::CreateVmBackupRequest {
                root_volume_uuid: ROOT.into(),
                backup_storage_uuid: bs.clone(),
                name: "random".into(),
                vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
                system_tags: tags.clone(),
                ..Default::default()
            })
            .await
            .expect("backup")
            .into_inner()
            .inventories;
        // The restore's own peak, from what the agent holds once the backup is over.
        std::fs::write(format!("/proc/{}/clear_refs", agent.pid()), "5").expect("reset the peak RSS");
        let out = agent_dir.join("restored.raw");
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: inv[0].group_uuid.clone(),
            backup_storage_uuid: bs,
            targets: vec![target(ROOT, &out, "raw")],
            system_tags: tags,
            ..Default::default()
        })
        .await
        .expect("restore");
        let peak = common::peak_rss_kib(agent.pid()) >> 10;
        let which = if embedded { "embedded store" } else { "separate store" };
        eprintln!("restore of 1 GiB of incompressible data at parallelism 4, {which}: agent peak RSS {peak} MiB");
        assert!(
            peak <= CEILING_MIB,
            "restoring from the {which}, the agent peaked at {peak} MiB, over {CEILING_MIB} MiB"
        );
        compare(&img, &out);
    }
}
