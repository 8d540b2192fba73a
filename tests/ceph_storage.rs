//! A Ceph backup storage as the seeds show it, on a real single-node Ceph (bluestore, so
//! the OSD can be killed and come back): the agent writes straight into the pool through
//! librados. Refused adds (wrong keyring, missing pool, unreachable monitors, a readable
//! keyring) leave nothing; the inventory carries the seed's Ceph fields from the cluster;
//! backup → restore is identical and an incremental writes one chunk object; SyncVmBackup
//! after losing the catalog rebuilds equal inventories from the pool; recover moves a backup
//! ImageStore → Ceph → ImageStore with only missing chunks travelling; a live backup of a
//! running VM (over QMP) lands in the pool and restores identical; an OSD killed
//! mid-backup is a clean error and the retry sends only what the pool lacks; a stopped
//! monitor is `Disconnected` (with that monitor's status) and fails a backup cleanly; a
//! `vmbackup-store` over the same pool serves the same store and collects its garbage.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ceph::CephCluster;
use common::host::Host;
use common::{Daemon, run_tool};
use vmbackup_proto::agent::v1 as pb;

/// The running VM of the live backup, and its disks.
const LIVE_VM: &str = "7a6b5c4d3e2f40518293a4b5c6d7e8f9";
const LIVE_ROOT: &str = "8b7c6d5e4f3a41628394a5b6c7d8e9f0";
const LIVE_DATA: &str = "9c8d7e6f5a4b42738495a6b7c8d9e0f1";
/// The agent's namespace prefix in the pool.
const PREFIX: &str = "vmbackup.";
const MIB: u64 = 1 << 20;
/// The pool store's chunk size (the agent creates it with the default).
const CHUNK: u64 = 4 * MIB;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Chunk objects in the pool.
fn pool_chunks(c: &CephCluster) -> usize {
    c.namespace_objects(&format!("{PREFIX}chunks"))
}

/// An agent of host `name` whose Ceph client reads no ceph.conf (the monitors come from
/// each storage) and gives up on a dead cluster after 5 s.
fn start_ceph_agent(dir: &Path, name: &str) -> Daemon {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("home");
    let cfg = home.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[volumes]\nroots = [\"{}\"]\n[ceph]\nconf = \"{}\"\ntimeout_seconds = 5\ngc_lease_seconds = 10\n",
            dir.display(),
            home.join("no-ceph.conf").display()
        ),
    )
    .expect("agent config");
    common::start_agent(&home, common::AgentOptions { config: Some(cfg), ..Default::default() })
}

fn add_request(name: &str, mon: &str, pool: &str, keyring: &Path) -> pb::AddCephBackupStorageRequest {
    pb::AddCephBackupStorageRequest {
        name: name.into(),
        description: "pool written by the agent".into(),
        mon_urls: vec![mon.into()],
        pool_name: pool.into(),
        ceph_client: "client.admin".into(),
        keyring_path: p(keyring),
        ..Default::default()
    }
}

async fn add(
    s: &common::StorageClient,
    r: pb::AddCephBackupStorageRequest,
) -> Result<pb::BackupStorageInventory, tonic::Status> {
    Ok(s.clone().add_ceph_backup_storage(r).await?.into_inner().inventory.expect("inventory"))
}

async fn query(s: &common::StorageClient, conditions: &[String]) -> Vec<pb::BackupStorageInventory> {
    let q = pb::QueryBackupStorageRequest { conditions: conditions.to_vec(), ..Default::default() };
    s.clone().query_backup_storage(q).await.expect("query").into_inner().inventories
}

async fn all_backups(c: &common::BackupClient) -> Vec<pb::VolumeBackupInventory> {
    let mut v = c
        .clone()
        .query_volume_backup(pb::QueryVolumeBackupRequest::default())
        .await
        .expect("query")
        .into_inner()
        .inventories;
    v.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    v
}

/// Bytes the agent's finished backups sent, from its metrics.
fn bytes_sent(agent: &Daemon) -> u64 {
    agent
        .scrape()
        .lines()
        .filter(|l| {
            l.starts_with("vmbackup_agent_job_bytes")
                && l.contains("method=\"CreateVmBackup\"")
                && l.contains("kind=\"sent\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Reconnects until the storage is Connected again after `what` came back (at most 90 s);
/// returns when the wait began.
async fn wait_connected(h: &Host, what: &str) -> Instant {
    let back = Instant::now();
    loop {
        match h.reconnect().await {
            Ok(st) if st == "Connected" => return back,
            other if back.elapsed() < Duration::from_secs(90) => {
                eprintln!("{what} not yet back: {other:?}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => panic!("{what} did not come back within 90 s: {other:?}"),
        }
    }
}

/// A raw image of `mib` MiB with `byte` written at each of `at` (MiB offsets, 64 KiB each).
fn image(path: &Path, mib: u64, writes: &[(u64, u8)]) {
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(path), &format!("{mib}M")]);
    for (at, byte) in writes {
        run_tool("qemu-io", &["-f", "raw", "-c", &format!("write -P {byte:#x} {at}M 64k"), &p(path)]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ceph_backup_storage_end_to_end() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut cluster = CephCluster::start_crashable(dir);
    let mut agent = start_ceph_agent(dir, "h1");
    let s = common::storage_client(&agent, Some(common::session(&agent))).await;
    let mon = format!("root:s3cr3t-pw@127.0.0.1/?monPort={}", cluster.mon_v1.port());

    // Refused adds: one clear error each, nothing recorded.
    let bad_key = CephCluster::wrong_keyring(dir);
    let open_key = dir.join("open.keyring");
    std::fs::copy(&cluster.keyring, &open_key).expect("copy keyring");
    std::fs::set_permissions(&open_key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let refusals: Vec<(pb::AddCephBackupStorageRequest, tonic::Code, Vec<&str>)> = vec![
        (add_request("k", &mon, &cluster.pool, &bad_key), tonic::Code::Unavailable, vec!["client.admin", "connect"]),
        (
            add_request("p", &mon, "no-such-pool", &cluster.keyring),
            tonic::Code::FailedPrecondition,
            vec!["no-such-pool", "does not exist"],
        ),
        (
            add_request("m", "127.0.0.1:1", &cluster.pool, &cluster.keyring),
            tonic::Code::Unavailable,
            vec!["127.0.0.1:1", "connect"],
        ),
        (
            add_request("o", &mon, &cluster.pool, &open_key),
            tonic::Code::InvalidArgument,
            vec!["readable by every user"],
        ),
        (
            add_request("u", "root:s3cr3t-pw@bad host!", &cluster.pool, &cluster.keyring),
            tonic::Code::InvalidArgument,
            vec!["monUrls"],
        ),
        (add_request("i", &mon, "bad/pool", &cluster.keyring), tonic::Code::InvalidArgument, vec!["poolName"]),
    ];
    for (req, code, needles) in refusals {
        let started = Instant::now();
        let e = add(&s, req.clone()).await.expect_err(&req.name);
        eprintln!("refused {} in {:.1}s: {}", req.name, started.elapsed().as_secs_f64(), e.message());
        assert_eq!(e.code(), code, "{}: {e:?}", req.name);
        for n in needles {
            assert!(e.message().contains(n), "{}: {n:?} not in {:?}", req.name, e.message());
        }
        assert!(!e.message().contains("s3cr3t"), "a password in an error: {}", e.message());
        assert!(started.elapsed() < Duration::from_secs(30), "{} took too long", req.name);
    }
    assert!(query(&s, &[]).await.is_empty(), "a refused add records nothing");
    assert_eq!(pool_chunks(&cluster), 0);

    // The inventory of the seed's Ceph sample, from the cluster.
    let bs_uuid = "c0ffee00c0ffee00c0ffee00c0ffee00".to_string();
    let mut req = add_request("ceph-bs", &mon, &cluster.pool, &cluster.keyring);
    req.resource_uuid = bs_uuid.clone();
    let inv = add(&s, req.clone()).await.expect("add ceph");
    eprintln!("inventory: {inv:?}");
    assert_eq!((inv.uuid.as_str(), inv.r#type.as_str(), inv.url.as_str()), (bs_uuid.as_str(), "Ceph", "not used"));
    assert_eq!((inv.state.as_str(), inv.status.as_str()), ("Enabled", "Connected"));
    assert_eq!(inv.fsid, cluster.fsid);
    assert_eq!(inv.pool_name, cluster.pool);
    assert_eq!(inv.pool_replicated_size, 1);
    assert!(inv.total_capacity > 0 && inv.available_capacity > 0 && inv.pool_available_capacity > 0, "{inv:?}");
    assert!(inv.create_date.is_some() && inv.last_op_date.is_some());
    assert_eq!(inv.mons.len(), 1);
    let m = &inv.mons[0];
    assert_eq!((m.hostname.as_str(), m.mon_addr.as_str()), ("127.0.0.1", "127.0.0.1"));
    assert_eq!(m.mon_port, u32::from(cluster.mon_v1.port()));
    assert_eq!((m.ssh_username.as_str(), m.ssh_port, m.ssh_password.as_str()), ("root", 22, ""));
    assert_eq!((m.status.as_str(), m.backup_storage_uuid.as_str()), ("Connected", bs_uuid.as_str()));
    assert_eq!(m.mon_uuid.len(), 32);
    assert!(m.create_date.is_some() && m.last_op_date.is_some());
    assert_eq!(add(&s, req.clone()).await.expect("idempotent add").uuid, bs_uuid, "a retried add returns the record");
    // The JSON form has every field of the seeds' Ceph sample, sshPassword empty.
    let out = std::process::Command::new(common::bin("vmbackupctl"))
        .arg("--agent")
        .arg(agent.url())
        .arg("--session-file")
        .arg(agent.data_dir.join("session"))
        .args(["--json", "storage", "query", &format!("uuid={bs_uuid}")])
        .output()
        .expect("run vmbackupctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let json = &v["inventories"][0];
    for field in [
        "attachedZoneUuids",
        "availableCapacity",
        "createDate",
        "description",
        "fsid",
        "lastOpDate",
        "mons",
        "name",
        "poolAvailableCapacity",
        "poolName",
        "poolReplicatedSize",
        "poolUsedCapacity",
        "state",
        "status",
        "totalCapacity",
        "type",
        "url",
        "uuid",
    ] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
    for field in [
        "backupStorageUuid",
        "createDate",
        "hostname",
        "lastOpDate",
        "monAddr",
        "monPort",
        "monUuid",
        "sshPassword",
        "sshPort",
        "sshUsername",
        "status",
    ] {
        assert!(json["mons"][0].get(field).is_some(), "mons[].{field} missing from {json}");
    }
    assert_eq!(
        (&json["url"], &json["mons"][0]["sshPassword"]),
        (&serde_json::json!("not used"), &serde_json::json!(""))
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cr3t"));
    let mut second = req.clone();
    second.resource_uuid = String::new();
    second.name = "again".into();
    let dup = add(&s, second).await.expect_err("one pool, one record");
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup:?}");
    for (cond, n) in [
        (format!("fsid={}", cluster.fsid), 1),
        (format!("poolName={}", cluster.pool), 1),
        ("poolReplicatedSize=1".to_string(), 1),
        ("poolReplicatedSize>1".to_string(), 0),
        ("type=Ceph".to_string(), 1),
    ] {
        assert_eq!(query(&s, std::slice::from_ref(&cond)).await.len(), n, "{cond}");
    }

    // Backup → restore; an incremental writes one chunk object.
    let h = Host { c: common::backup_client(&agent).await, s: s.clone(), bs: bs_uuid.clone() };
    let img = dir.join("img.raw");
    image(&img, 16, &[(0, 0x31), (4, 0x32), (8, 0x33)]);
    let g1 = h.backup(&img, "g1", (None, None)).await.expect("backup");
    assert_eq!(pool_chunks(&cluster), 3, "three distinct non-zero chunks");
    h.restore_equals(&g1, &dir.join("r1.raw"), &img).await;
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x41 12M 64k", &p(&img)]);
    let g2 = h.backup(&img, "g2", (None, None)).await.expect("incremental");
    assert_eq!(pool_chunks(&cluster), 4, "the incremental wrote only the changed chunk");
    h.restore_equals(&g2, &dir.join("r2.raw"), &img).await;

    // SyncVmBackup after losing the catalog rebuilds equal inventories from the pool.
    let before = all_backups(&h.c).await;
    assert_eq!(before.len(), 2);
    agent.stop();
    for f in ["catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"] {
        let _ = std::fs::remove_file(agent.data_dir.join(f));
    }
    agent.restart();
    let s = common::storage_client(&agent, Some(common::session(&agent))).await;
    let h = Host { c: common::backup_client(&agent).await, s: s.clone(), bs: bs_uuid.clone() };
    assert!(query(&s, &[]).await.is_empty() && all_backups(&h.c).await.is_empty(), "the catalog is gone");
    add(&s, req.clone()).await.expect("add the pool again");
    h.c.clone()
        .sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: bs_uuid.clone(), ..Default::default() })
        .await
        .expect("sync");
    assert_eq!(all_backups(&h.c).await, before, "every inventory comes back equal");

    // Recover ImageStore → Ceph → ImageStore: only missing chunks travel, every byte kept.
    let mut store = common::start_store_with(dir, "image-store", None, 4 << 20);
    let image_bs = common::add_storage(&agent, &store, "image store").await;
    let hi = Host { bs: image_bs.clone(), ..h.clone() };
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x51 8M 64k", &p(&img)]);
    let g3 = hi.backup(&img, "g3", (None, None)).await.expect("backup to the image store");
    let recover = |group: &str, from: &str, to: &str| pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
        group_uuid: group.into(),
        src_backup_storage_uuid: from.into(),
        dst_backup_storage_uuid: to.into(),
        ..Default::default()
    };
    h.c.clone()
        .recover_vm_backup_from_image_store_backup_storage(recover(&g3, &image_bs, &bs_uuid))
        .await
        .expect("to ceph");
    assert_eq!(pool_chunks(&cluster), 5, "only the chunk the pool lacked travelled");
    h.c.clone()
        .delete_vm_backup(pb::DeleteVmBackupRequest {
            group_uuid: g3.clone(),
            backup_storage_uuids: vec![image_bs.clone()],
            ..Default::default()
        })
        .await
        .expect("delete from the image store");
    let gc = common::host::gc(&store).await.expect("gc the image store");
    assert!(gc.chunks_removed >= 4, "{gc:?}");
    let uploaded = common::chunks_uploaded(&store).await;
    h.c.clone()
        .recover_vm_backup_from_image_store_backup_storage(recover(&g3, &bs_uuid, &image_bs))
        .await
        .expect("back");
    let back = common::chunks_uploaded(&store).await - uploaded;
    eprintln!("recover back to the image store uploaded {back} chunks");
    assert!((1..=4).contains(&back), "{back}");
    h.c.clone()
        .delete_vm_backup(pb::DeleteVmBackupRequest {
            group_uuid: g3.clone(),
            backup_storage_uuids: vec![bs_uuid.clone()],
            ..Default::default()
        })
        .await
        .expect("delete from ceph");
    hi.restore_equals(&g3, &dir.join("r3.raw"), &img).await;
    store.kill();

    // A live backup of a running VM (qemu-storage-daemon standing in for QEMU, over QMP)
    // into the pool, restored identical.
    let (lroot, ldata) = (dir.join("live-root.qcow2"), dir.join("live-data.raw"));
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&lroot), "8M"]);
    run_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x61 0 2M", &p(&lroot)]);
    std::fs::write(&ldata, common::pseudo_random(41, 3 << 20)).expect("data");
    let qsd_dir = dir.join("qsd");
    std::fs::create_dir_all(&qsd_dir).expect("qsd dir");
    let qsd = common::qsd::BareQsd::start(&qsd_dir, &lroot, &ldata);
    let before_live = pool_chunks(&cluster);
    let live_vm = pb::RegisterVmRequest {
        uuid: LIVE_VM.into(),
        qmp_socket: p(&qsd.qmp),
        volumes: vec![
            common::volume_spec(LIVE_ROOT, "Root", &lroot, "qcow2", 0),
            common::volume_spec(LIVE_DATA, "Data", &ldata, "raw", 1),
        ],
        ..Default::default()
    };
    let glive =
        h.c.clone()
            .create_vm_backup(pb::CreateVmBackupRequest {
                root_volume_uuid: LIVE_ROOT.into(),
                backup_storage_uuid: bs_uuid.clone(),
                name: "live".into(),
                vm: Some(live_vm),
                ..Default::default()
            })
            .await
            .expect("live backup into the pool")
            .into_inner()
            .inventories[0]
            .group_uuid
            .clone();
    let live_chunks = pool_chunks(&cluster) - before_live;
    assert_eq!(live_chunks, 2, "one chunk of each disk");
    let out = dir.join("live-out");
    std::fs::create_dir_all(&out).expect("mkdir");
    h.c.clone()
        .restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: glive.clone(),
            backup_storage_uuid: bs_uuid.clone(),
            targets: [LIVE_ROOT, LIVE_DATA]
                .iter()
                .map(|v| pb::RestoreTarget {
                    volume_uuid: (*v).into(),
                    install_path: p(&out.join(v)),
                    format: "raw".into(),
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect("restore the live backup");
    for (want, v, fmt) in [(&lroot, LIVE_ROOT, "qcow2"), (&ldata, LIVE_DATA, "raw")] {
        run_tool("qemu-img", &["compare", "-U", "-f", fmt, "-F", "raw", &p(want), &p(&out.join(v))]);
    }
    drop(qsd);

    // The OSD killed mid-backup: a clean error, no committed group lost; once it is back the
    // retry sends only the chunks the pool lacks.
    let big = dir.join("big.raw");
    std::fs::write(&big, common::pseudo_random(7, 64 << 20)).expect("image");
    let committed = all_backups(&h.c).await;
    let chunks_before = pool_chunks(&cluster);
    let doomed = {
        let (h, big) = (h.clone(), big.clone());
        tokio::spawn(async move { h.backup(&big, "osd-crash", (None, Some(8 << 20))).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool_chunks(&cluster) < chunks_before + 3 {
        assert!(Instant::now() < deadline, "no upload progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop_osd();
    let stopped = Instant::now();
    let err = doomed.await.expect("join").expect_err("a backup with the OSD down fails");
    eprintln!("backup with the OSD down failed after {:.1}s: {}", stopped.elapsed().as_secs_f64(), err.message());
    assert!(stopped.elapsed() < Duration::from_secs(90), "no hang");
    cluster.start_osd();
    let back = wait_connected(&h, "the OSD").await;
    assert_eq!(all_backups(&h.c).await, committed, "no committed backup lost, nothing of the failed one visible");
    let stored = pool_chunks(&cluster) - chunks_before;
    let sent = bytes_sent(&agent);
    let g4 = loop {
        match h.backup(&big, "retry", (None, None)).await {
            Ok(g) => break g,
            Err(e) if back.elapsed() < Duration::from_secs(120) => {
                eprintln!("retry failed, again: {}", e.message());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => panic!("the retry failed: {e:?}"),
        }
    };
    let resent = bytes_sent(&agent) - sent;
    let lacked = 16 - u64::try_from(stored).expect("count");
    eprintln!("{stored} chunks were in the pool; the retry sent {resent} bytes for {lacked}");
    assert!(resent >= lacked * CHUNK && resent <= lacked * (CHUNK + 4096), "sent {resent} for {lacked} chunks");
    assert_eq!(pool_chunks(&cluster), chunks_before + 16);
    h.restore_equals(&g4, &dir.join("r4.raw"), &big).await;

    // A stopped monitor: Reconnect says Disconnected with that monitor's status, a backup
    // fails cleanly; back up again once the monitor is.
    cluster.stop_mon();
    let started = Instant::now();
    let e = h.backup(&img, "no-mon", (None, None)).await.expect_err("a backup without the monitor fails");
    eprintln!("backup without the monitor failed in {:.1}s: {}", started.elapsed().as_secs_f64(), e.message());
    assert!(started.elapsed() < Duration::from_secs(60));
    let e = h.reconnect().await.expect_err("no monitor");
    eprintln!("reconnect without the monitor: {}", e.message());
    assert!(e.message().contains(&format!("127.0.0.1:{} Disconnected", cluster.mon_v1.port())), "{}", e.message());
    let inv = query(&s, &[format!("uuid={bs_uuid}")]).await.remove(0);
    assert_eq!((inv.status.as_str(), inv.mons[0].status.as_str()), ("Disconnected", "Disconnected"));
    let e = h.backup(&img, "no-mon", (None, None)).await.expect_err("a Disconnected storage takes no backup");
    assert!(e.message().contains("Disconnected"), "{}", e.message());
    cluster.start_mon();
    wait_connected(&h, "the monitor").await;
    let inv = query(&s, &[format!("uuid={bs_uuid}")]).await.remove(0);
    assert_eq!(inv.mons[0].status, "Connected");

    // A vmbackup-store over the same pool serves the same store, and collects the garbage
    // of the backups deleted through the agent: the chunk only g3 had, and the live
    // backup's. g4's chunks stay:
    // they are newer than the start of the session the OSD crash left in the pool, which
    // protects them until it expires (the shared-store protocol's rule for a dead writer).
    let config = dir.join("pool-store.toml");
    std::fs::write(
        &config,
        format!(
            "backend = \"rados\"\ngc_safety_margin_seconds = 1\n[rados]\nconf = \"{}\"\nkeyring = \"{}\"\npool = \"{}\"\n\
             timeout_seconds = 5\ngc_lease_seconds = 4\n",
            p(&cluster.conf),
            p(&cluster.keyring),
            cluster.pool
        ),
    )
    .expect("config");
    let pool_store = common::start_store_with_config(dir, "pool-store", Some(&config));
    let st = common::host::status(&pool_store).await;
    assert_eq!(st.store_uuid, query(&s, &[]).await.into_iter().find(|i| i.uuid == bs_uuid).expect("ceph").store_uuid);
    let mut served = common::host::groups(&pool_store).await;
    served.sort();
    let mut ours = vec![g1.clone(), g2.clone(), g4.clone(), glive.clone()];
    ours.sort();
    assert_eq!(served, ours, "the store serves what the agent wrote");
    let e = s
        .clone()
        .delete_backup_storage(pb::DeleteBackupStorageRequest { uuid: bs_uuid.clone(), ..Default::default() })
        .await
        .expect_err("permissive delete refuses while backups are there");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    h.delete(&g4).await;
    h.delete(&g1).await;
    h.delete(&glive).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = pool_chunks(&cluster);
    let gc = common::host::gc(&pool_store).await.expect("gc of the pool");
    eprintln!("pool gc: {gc:?}");
    assert_eq!(pool_chunks(&cluster), before - usize::try_from(gc.chunks_removed).expect("count"));
    assert_eq!((gc.chunks_removed, gc.chunks_kept), (1 + live_chunks as u64, 20), "{gc:?}");
    common::host::verify_clean(&pool_store, "after gc").await;
    h.restore_equals(&g2, &dir.join("r5.raw"), &dir.join("r2.raw")).await;

    // The agent collects the pool's garbage itself on a schedule ([ceph]
    // gc_interval_seconds), under the same lease: once g2 is deleted its four chunks go.
    std::fs::write(
        dir.join("h1").join("agent.toml"),
        format!(
            "[volumes]\nroots = [\"{}\"]\n[ceph]\nconf = \"{}\"\ntimeout_seconds = 5\ngc_lease_seconds = 10\n\
             gc_interval_seconds = 2\ngc_safety_margin_seconds = 0\n",
            dir.display(),
            dir.join("h1").join("no-ceph.conf").display()
        ),
    )
    .expect("agent config");
    agent.restart();
    h.delete(&g2).await;
    let before = pool_chunks(&cluster);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool_chunks(&cluster) > before - 4 {
        assert!(Instant::now() < deadline, "the agent's GC did not remove g2's chunks:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(pool_chunks(&cluster), before - 4, "exactly g2's chunks");
    assert!(agent.log_text().contains("garbage collected"), "the collection is audited");
    s.clone()
        .delete_backup_storage(pb::DeleteBackupStorageRequest {
            uuid: bs_uuid.clone(),
            delete_mode: "Enforcing".into(),
            ..Default::default()
        })
        .await
        .expect("enforcing delete");
    assert!(query(&s, &[format!("uuid={bs_uuid}")]).await.is_empty());
    assert!(pool_chunks(&cluster) >= 4, "deleting the record keeps the data in the pool");

    assert!(!agent.log_text().contains("s3cr3t"), "the monitor password reached the log");
    eprintln!("ceph_storage: whole test {:.1}s", t0.elapsed().as_secs_f64());
}
