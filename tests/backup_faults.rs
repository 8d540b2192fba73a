//! Backups that are interrupted (CancelJob, SIGKILL of the agent), VMs sharing a base
//! image, and the agent's memory ceiling on a large sparse volume.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    AgentOptions, Daemon, add_storage, backup_client, chunks_uploaded, pseudo_random, run_tool, start_agent,
    start_store, start_store_with,
};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

fn create(vm: &pb::RegisterVmRequest, bs: &str, resource: &str, read_bw: Option<i64>) -> pb::CreateVmBackupRequest {
    pb::CreateVmBackupRequest {
        root_volume_uuid: vm.volumes[0].uuid.clone(),
        backup_storage_uuid: bs.into(),
        name: "b".into(),
        resource_uuid: resource.into(),
        volume_read_bandwidth: read_bw,
        vm: Some(vm.clone()),
        ..Default::default()
    }
}

/// A raw volume with `mib` MiB of incompressible data at its start.
fn random_raw(path: &Path, size: u64, mib: usize, seed: u64) {
    let mut f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
    for i in 0..mib {
        f.seek(SeekFrom::Start(u64::try_from(i).expect("fits") << 20)).expect("seek");
        f.write_all(&pseudo_random(seed * 100_000 + u64::try_from(i).expect("fits"), 1 << 20)).expect("write");
    }
    f.sync_all().expect("sync");
}

/// What most tests here start from: a raw volume of `size` bytes with `mib` MiB of random
/// data, a store, and an agent (with `config`, if any) that has the store as a storage.
struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    store: Daemon,
    agent: Daemon,
    bs: String,
    vm: pb::RegisterVmRequest,
}

async fn setup(size: u64, mib: usize, seed: u64, config: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    random_raw(&img, size, mib, seed);
    let store = start_store(dir.path(), "store");
    let mut options = AgentOptions::default();
    if let Some(text) = config {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("config");
        options.config = Some(path);
    }
    let agent = start_agent(dir.path(), options);
    let bs = add_storage(&agent, &store, "s").await;
    let vm = common::one_volume_vm("9ff17180fded31c2b9e4e5751ebcb2ba", "edc07fe8d8a335ec8aa00f23b88fc1c6", &img, "raw");
    Setup { dir, img, store, agent, bs, vm }
}

async fn groups(store: &Daemon) -> Vec<String> {
    let mut c = common::store_client(store).await;
    c.list_groups(spb::ListGroupsRequest {})
        .await
        .expect("list")
        .into_inner()
        .groups
        .into_iter()
        .map(|g| g.group_uuid)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_leaves_no_group_and_the_retry_sends_only_what_was_missing() {
    let Setup { dir: _dir, store, agent, bs, vm: v, .. } = setup(16 << 20, 12, 1, None).await;
    let resource = "22222222222222222222222222222222";

    // 12 MiB at 4 MiB/s: cancel after about a second.
    let mut c = backup_client(&agent).await;
    let req = create(&v, &bs, resource, Some(4 << 20));
    let running = tokio::spawn(async move { c.create_vm_backup(req).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut c = backup_client(&agent).await;
    c.cancel_job(pb::CancelJobRequest { job_uuid: resource.into() }).await.expect("cancel");
    let e = running.await.expect("task").expect_err("cancelled");
    assert_eq!(e.code(), tonic::Code::Cancelled, "{e:?}");
    assert!(groups(&store).await.is_empty(), "a cancelled backup leaves no group");
    let before = chunks_uploaded(&store).await;
    assert!(before > 0, "some chunks went up before the cancel");
    let mut w = c.watch_job(pb::WatchJobRequest { job_uuid: resource.into() }).await.expect("watch").into_inner();
    assert_eq!(w.message().await.expect("msg").expect("one").state, "Cancelled");

    // The retry completes and sends only the chunks the cancelled run did not.
    let inv = c.create_vm_backup(create(&v, &bs, resource, None)).await.expect("retry").into_inner().inventories;
    assert_eq!(inv[0].group_uuid, resource);
    assert_eq!(chunks_uploaded(&store).await, 12 * 16, "each 64 KiB chunk uploaded exactly once");
    let mut sc = common::store_client(&store).await;
    let st = sc.status(spb::StatusRequest {}).await.expect("status").into_inner().counters.expect("counters");
    assert_eq!(st.chunks_already_present, 0, "nothing was sent twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_backup_is_reported_failed_and_the_retry_succeeds() {
    let Setup { dir: _dir, store, mut agent, bs, vm: v, .. } = setup(16 << 20, 12, 2, None).await;
    let resource = "55555555555555555555555555555555";
    let mut c = backup_client(&agent).await;
    let req = create(&v, &bs, resource, Some(4 << 20));
    let running = tokio::spawn(async move { c.create_vm_backup(req).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    agent.kill();
    assert!(running.await.expect("task").is_err());
    agent.restart();
    let mut c = backup_client(&agent).await;
    let mut w = c.watch_job(pb::WatchJobRequest { job_uuid: resource.into() }).await.expect("watch").into_inner();
    let p = w.message().await.expect("msg").expect("one");
    assert_eq!(p.state, "Failed", "{p:?}");
    assert!(p.message.contains("agent stopped"), "{p:?}");
    assert!(groups(&store).await.is_empty());
    let inv = c.create_vm_backup(create(&v, &bs, resource, None)).await.expect("retry").into_inner().inventories;
    assert_eq!(inv.len(), 1);
    assert_eq!(groups(&store).await, vec![resource.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_vms_on_one_base_image_store_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    random_raw(&base, 8 << 20, 4, 3);
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for (img, pattern) in [(&a, "0x41"), (&b, "0x42")] {
        run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &img.display().to_string()],
        );
        run_tool("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {pattern} 6M 64k"), &img.display().to_string()]);
    }
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = add_storage(&agent, &store, "s").await;
    let mut c = backup_client(&agent).await;
    let va = common::one_volume_vm("9ff17180fded31c2b9e4e5751ebcb2ba", "edc07fe8d8a335ec8aa00f23b88fc1c6", &a, "qcow2");
    let vb = common::one_volume_vm("98ac921100b43981b493071b6430bb2b", "2ae6b881bb1239cd907d48993e86a2e8", &b, "qcow2");
    c.create_vm_backup(create(&va, &bs, "", None)).await.expect("backup a");
    assert_eq!(chunks_uploaded(&store).await, 4 * 16 + 1, "base chunks plus A's own");
    c.create_vm_backup(create(&vb, &bs, "", None)).await.expect("backup b");
    assert_eq!(chunks_uploaded(&store).await, 4 * 16 + 2, "B adds only its own chunk");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_on_a_64_gib_sparse_volume_with_2_gib_of_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("big.raw");
    let mut f = std::fs::File::create(&img).expect("create");
    f.set_len(64 << 30).expect("64 GiB sparse");
    // 2 GiB of distinct data in 64 MiB islands spread over the volume.
    for island in 0..32u64 {
        f.seek(SeekFrom::Start(island * (2 << 30))).expect("seek");
        for mib in 0..64u64 {
            f.write_all(&pseudo_random(island * 1000 + mib, 1 << 20)).expect("write");
        }
    }
    f.sync_all().expect("sync");
    drop(f);
    let store = start_store_with(dir.path(), "store", None, 4 << 20);
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = add_storage(&agent, &store, "s").await;
    let mut c = backup_client(&agent).await;
    let v = common::one_volume_vm("9ff17180fded31c2b9e4e5751ebcb2ba", "edc07fe8d8a335ec8aa00f23b88fc1c6", &img, "raw");
    let mut req = create(&v, &bs, "", None);
    req.system_tags = vec!["volumeLiveBackup::parallelismDegree::4".into()];
    let inv = c.create_vm_backup(req).await.expect("backup").into_inner().inventories;
    assert_eq!(inv[0].size, 64 << 30);
    assert_eq!(chunks_uploaded(&store).await, 512, "2 GiB in 4 MiB chunks");
    let peak = common::peak_rss_kib(agent.pid());
    assert!(peak < 256 << 10, "agent peak RSS {peak} KiB exceeds 256 MiB");
    eprintln!("agent peak RSS backing up 2 GiB of a 64 GiB volume: {} MiB", peak >> 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_while_the_first_attempt_runs_joins_it() {
    let Setup { dir: _dir, store, agent, bs, vm: v, .. } = setup(8 << 20, 6, 4, None).await;
    let resource = "66666666666666666666666666666666";
    let mut first = backup_client(&agent).await;
    let req = create(&v, &bs, resource, Some(6 << 20));
    let a = tokio::spawn(async move { first.create_vm_backup(req).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut second = backup_client(&agent).await;
    let joined = second.create_vm_backup(create(&v, &bs, resource, None)).await.expect("join").into_inner().inventories;
    let original = a.await.expect("task").expect("first attempt").into_inner().inventories;
    assert_eq!(joined, original);
    assert_eq!(groups(&store).await, vec![resource.to_string()]);
    assert_eq!(chunks_uploaded(&store).await, 6 * 16, "the data went up once");
}

/// Open sessions on a store, once the agent's background close (if any) has landed.
async fn settled_open_sessions(store: &Daemon) -> u32 {
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

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_commit_closes_the_store_session_and_gc_is_not_held_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    random_raw(&img, 8 << 20, 8, 7);
    let store = start_store(dir.path(), "store");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).expect("a");
    std::fs::create_dir_all(&b_dir).expect("b");
    // Both agents read the one image beside their directories.
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("[volumes]\nroots = [{:?}]\n", dir.path().display().to_string())).expect("config");
    let a = start_agent(&a_dir, AgentOptions { config: Some(config.clone()), ..Default::default() });
    let b = start_agent(&b_dir, AgentOptions { config: Some(config), ..Default::default() });
    let (bs_a, bs_b) = (add_storage(&a, &store, "s").await, add_storage(&b, &store, "s").await);
    let v = common::one_volume_vm("5d0e6bb3a7a44f0e8e0d0f6f21d9b0c1", "6a3c1f0e2b7d4c5e9f8a1b2c3d4e5f60", &img, "raw");
    let resource = "33333333333333333333333333333333";

    // Agent a commits the group; agent b, whose catalog does not know it, backs up under the
    // same uuid: its commit is refused by the store, after its session asked for every chunk.
    backup_client(&a).await.create_vm_backup(create(&v, &bs_a, resource, None)).await.expect("first backup");
    let chunks = chunks_uploaded(&store).await;
    assert!(chunks > 0);
    let e = backup_client(&b).await.create_vm_backup(create(&v, &bs_b, resource, None)).await.expect_err("conflict");
    assert!(e.message().contains("CommitGroup"), "the commit failed: {e:?}");
    assert_eq!(settled_open_sessions(&store).await, 0, "the failed backup's session was closed");

    // With no session left open, GC's cutoff is its own start: once the group is gone, every
    // chunk goes, including those b's session was told were present.
    let mut sc = common::store_client(&store).await;
    sc.delete_group(spb::DeleteGroupRequest { group_uuid: resource.into() }).await.expect("delete");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let gc = sc
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!((gc.chunks_removed, gc.chunks_kept), (chunks, 0), "{gc:?}");
}

/// Chunk files in a store's directory (readable while the store is down).
fn chunk_files(store: &Daemon) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map_or(0, |rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
    }
    walk(&store.data_dir.join("chunks"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_restarted_mid_backup_is_waited_for_and_the_same_job_sends_only_what_it_lacks() {
    let Setup { dir, img, mut store, agent, bs, vm: v } = setup(16 << 20, 12, 9, None).await;
    let resource = "77777777777777777777777777777777";

    // 12 MiB at 4 MiB/s; the store is killed after about a second and is back two later.
    let mut c = backup_client(&agent).await;
    let req = create(&v, &bs, resource, Some(4 << 20));
    let running = tokio::spawn(async move { c.create_vm_backup(req).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.kill();
    let kept = chunk_files(&store);
    assert!(kept > 0 && kept < 12 * 16, "the store was killed mid-backup ({kept} chunks on disk)");
    let mut w = backup_client(&agent)
        .await
        .watch_job(pb::WatchJobRequest { job_uuid: resource.into() })
        .await
        .expect("watch")
        .into_inner();
    let waiting = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(p) = w.message().await.expect("progress") {
            if p.message.contains("waiting for the Image Storage") {
                return p;
            }
        }
        panic!("the job ended without waiting for its store");
    })
    .await
    .expect("the job says it waits for the store");
    assert_eq!(waiting.state, "Running", "{waiting:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    store.restart();

    // The same call succeeds: no retry by the caller.
    let inv = running.await.expect("task").expect("the backup survived the store's restart").into_inner().inventories;
    assert_eq!(inv[0].group_uuid, resource);
    assert_eq!(groups(&store).await, vec![resource.to_string()]);
    // The restarted store received exactly the chunks it lacked, each once.
    let mut sc = common::store_client(&store).await;
    let st = sc.status(spb::StatusRequest {}).await.expect("status").into_inner().counters.expect("counters");
    assert_eq!(st.chunks_uploaded, 12 * 16 - kept, "only the chunks the store lacked were sent: {st:?}");
    assert_eq!(st.chunks_already_present, 0, "nothing was sent twice: {st:?}");
    assert_eq!(chunk_files(&store), 12 * 16);
    let v = sc.verify(spb::VerifyRequest { group_uuids: vec![] }).await.expect("verify").into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "{v:?}");
    assert_eq!(settled_open_sessions(&store).await, 0, "the resumed session was closed");
    // Chunks settled before the outage were asked about, not read again: a job that started
    // over would have read the `kept` chunks' bytes twice.
    let mut w = backup_client(&agent)
        .await
        .watch_job(pb::WatchJobRequest { job_uuid: resource.into() })
        .await
        .expect("watch")
        .into_inner();
    let done = w.message().await.expect("progress").expect("final state");
    assert_eq!(done.state, "Succeeded", "{done:?}");
    let read = u64::try_from(done.bytes_read).expect("bytes read");
    assert!(read >= 12 << 20 && read < (12 << 20) + kept * (64 << 10), "read {read} bytes ({kept} chunks kept)");

    // And it restores identical.
    let out = dir.path().join("restored.raw");
    let mut c = backup_client(&agent).await;
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: resource.into(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: "edc07fe8d8a335ec8aa00f23b88fc1c6".into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore");
    assert_eq!(std::fs::read(&out).expect("restored"), std::fs::read(&img).expect("image"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_stays_away_fails_the_backup_after_the_configured_wait_and_leaves_nothing() {
    let Setup { dir: _dir, mut store, agent, bs, vm: v, .. } =
        setup(16 << 20, 12, 10, Some("store_outage_seconds = 3\n")).await;
    let resource = "88888888888888888888888888888888";
    let mut c = backup_client(&agent).await;
    let req = create(&v, &bs, resource, Some(4 << 20));
    let running = tokio::spawn(async move { c.create_vm_backup(req).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.kill();
    let started = std::time::Instant::now();
    let e = running.await.expect("task").expect_err("the store never came back");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "the job waited for its store ({waited:?})");
    assert!(e.message().contains("did not answer again within 3 s"), "{e:?}");
    assert_eq!(common::zstack_code(&e), "SYS.1006", "{e:?}");
    store.restart();
    assert!(groups(&store).await.is_empty(), "nothing is visible");
    // The caller's retry completes and sends only what the store lacks.
    let before = chunk_files(&store);
    backup_client(&agent).await.create_vm_backup(create(&v, &bs, resource, None)).await.expect("retry");
    assert_eq!(chunks_uploaded(&store).await, 12 * 16 - before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_during_a_store_outage_waits_for_the_store_and_the_catalog_follows_it() {
    let Setup { dir: _dir, mut store, agent, bs, vm: v, .. } = setup(4 << 20, 2, 11, None).await;
    let resource = "99999999999999999999999999999999";
    let mut c = backup_client(&agent).await;
    c.create_vm_backup(create(&v, &bs, resource, None)).await.expect("backup");
    store.kill();
    let mut d = backup_client(&agent).await;
    let deleting = tokio::spawn(async move {
        d.delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: resource.into(), ..Default::default() }).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!deleting.is_finished(), "the delete waits for the store instead of failing");
    store.restart();
    deleting.await.expect("task").expect("the delete completes once the store is back");
    assert!(groups(&store).await.is_empty(), "the store no longer has the group");
    let q =
        c.query_volume_backup(pb::QueryVolumeBackupRequest::default()).await.expect("query").into_inner().inventories;
    assert!(q.is_empty(), "the catalog follows the store: {q:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_the_agent_died_in_is_finished_at_its_next_start() {
    let Setup { dir: _dir, mut store, mut agent, bs, vm: v, .. } = setup(4 << 20, 2, 12, None).await;
    let resource = "abababababababababababababababab";
    backup_client(&agent).await.create_vm_backup(create(&v, &bs, resource, None)).await.expect("backup");
    // The delete is asked while the store is away, and the agent dies while it waits.
    store.kill();
    let mut d = backup_client(&agent).await;
    let deleting = tokio::spawn(async move {
        d.delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: resource.into(), ..Default::default() }).await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.kill();
    assert!(deleting.await.expect("task").is_err(), "the call died with the agent");
    store.restart();
    assert_eq!(groups(&store).await, vec![resource.to_string()], "the store still has the group");
    // The next start finishes what was asked: the store deletes it and the catalog follows.
    agent.restart();
    assert!(groups(&store).await.is_empty(), "the delete was finished at start-up");
    let q = catalog(&agent).await;
    assert!(q.is_empty(), "the catalog follows the store: {q:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_the_store_refuses_stays_refused_after_a_restart() {
    let Setup { dir: _dir, store, mut agent, bs, vm: v, .. } = setup(4 << 20, 1, 13, None).await;
    let resource = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";
    let mut req = create(&v, &bs, resource, None);
    req.system_tags = vec!["backup::retentionLock::seconds::2".into()];
    backup_client(&agent).await.create_vm_backup(req).await.expect("locked backup");
    let e = backup_client(&agent)
        .await
        .delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: resource.into(), ..Default::default() })
        .await
        .expect_err("the store refuses: the group is locked");
    assert!(e.message().contains("retention-locked"), "{e:?}");
    // A refusal is an outcome: once the lock has run out, the next start does not delete the
    // group behind the operator's back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.restart();
    assert_eq!(groups(&store).await, vec![resource.to_string()]);
    let q = catalog(&agent).await;
    assert_eq!(q.len(), 1, "the catalog still lists the locked group: {q:?}");
}

/// Every volume backup the agent's catalog lists.
async fn catalog(agent: &Daemon) -> Vec<pb::VolumeBackupInventory> {
    let mut c = backup_client(agent).await;
    c.query_volume_backup(pb::QueryVolumeBackupRequest::default()).await.expect("query").into_inner().inventories
}
