//! vmbackup-store on the `s3` backend, over a real single-node Ceph with radosgw: an agent
//! backs up and restores through it, an incremental uploads only the changed chunk, the
//! objects are really in the bucket, a restarted store keeps its identity (which lives in
//! the bucket) and serves its groups, GC removes exactly the unused chunk, and bad
//! configuration (missing bucket, wrong secret, unreachable endpoint) is one clear line and
//! a quick non-zero exit. One cluster serves the whole file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::ceph::{CephCluster, CephOptions};
use common::store_calls::{CS, commit, session, upload};
use common::{AgentOptions, Daemon, pseudo_random, run_tool, start_agent, store_client};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const VM: &str = "7a1f0e8a7b2d4e6f8a9b0c1d2e3f4a5b";
const ROOT: &str = "8b2a1f9b8c3e4d7a9b0c1e2f3a4b5c6d";
const BUCKET: &str = "vmbackup-test";
const PREFIX: &str = "site-a";

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn qemu_io(img: &Path, cmd: &str) {
    run_tool("qemu-io", &["-f", "raw", "-c", cmd, &p(img)]);
}

/// A store config over `bucket` at `endpoint`, with the secret in a file.
fn s3_config(dir: &Path, name: &str, endpoint: &str, bucket: &str, key: &str, secret: &str) -> PathBuf {
    common::ceph::store_config(dir, name, endpoint, bucket, PREFIX, (key, secret), "", "")
}

fn bucket_keys(c: &CephCluster, prefix: &str) -> Vec<String> {
    c.bucket_keys(BUCKET, prefix)
}

/// The store's count of chunks its commits looked up in the bucket.
fn commit_lookups(store: &Daemon) -> u64 {
    let page = store.scrape();
    let line = page
        .lines()
        .find(|l| l.starts_with("vmbackup_store_commit_chunk_lookups_total "))
        .unwrap_or_else(|| panic!("no commit lookups in {page}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad sample {line}"))
}

async fn status(store: &Daemon) -> spb::StatusReply {
    store_client(store).await.status(spb::StatusRequest {}).await.expect("status").into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn store_on_rgw_backs_up_restores_restarts_collects_and_refuses_bad_config() {
    let file_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let cluster = CephCluster::start(
        &dir.join("ceph"),
        CephOptions { rgw: true, client_timeout: Duration::from_secs(5), ..Default::default() },
    );
    let (code, body) = cluster.s3("PUT", &format!("/{BUCKET}"), None, &[]);
    assert_eq!(code, 200, "create bucket: {}", String::from_utf8_lossy(&body));
    let rgw = cluster.rgw_url().to_string();
    eprintln!("cluster with rgw up in {:.1}s", file_start.elapsed().as_secs_f64());

    // (d) bad configuration: one line each, quickly, nothing secret.
    let (key, secret) = (cluster.s3_access_key.clone(), cluster.s3_secret_key.clone());
    let missing = s3_config(dir, "missing", &rgw, "no-such-bucket", &key, &secret);
    common::ceph::expect_refused(
        dir,
        "opening the S3 store",
        "missing",
        &missing,
        &["no-such-bucket", "does not exist"],
        &[&secret],
    );
    let wrong = s3_config(dir, "wrong", &rgw, BUCKET, &key, "wrong-secret");
    common::ceph::expect_refused(dir, "opening the S3 store", "wrong", &wrong, &[BUCKET, "403"], &["wrong-secret"]);
    let unreachable = s3_config(dir, "unreachable", "http://127.0.0.1:9", BUCKET, &key, &secret);
    common::ceph::expect_refused(
        dir,
        "opening the S3 store",
        "unreachable",
        &unreachable,
        &["127.0.0.1:9"],
        &[&secret],
    );
    let plain = dir.join("plain.toml");
    std::fs::write(
        &plain,
        std::fs::read_to_string(&missing).expect("read").replace("allow_http = true", "allow_http = false"),
    )
    .expect("write");
    common::ceph::expect_refused(dir, "opening the S3 store", "plain", &plain, &["allow_http"], &[&secret]);
    assert!(bucket_keys(&cluster, &format!("{PREFIX}/")).is_empty(), "a refused start wrote nothing");

    // (a) backup, incremental, restore.
    let config = s3_config(dir, "store", &rgw, BUCKET, &key, &secret);
    let mut store = common::start_store_with_config(dir, "store", Some(&config));
    let st = status(&store).await;
    assert_eq!(st.backend, format!("s3://{BUCKET}/{PREFIX}"));
    assert_eq!(st.available_capacity, u64::MAX, "S3 has no capacity: unbounded");
    let uuid = st.store_uuid.clone();
    let img = dir.join("root.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&img), "4M"]);
    qemu_io(&img, "write -P 0x31 0 64k");
    qemu_io(&img, "write -P 0x34 64k 64k");
    for (i, byte) in [0x35, 0x36, 0x37].iter().enumerate() {
        qemu_io(&img, &format!("write -P {byte:#x} {}M 64k", i + 1));
    }
    let agent = start_agent(dir, AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s3").await;
    let vm = common::one_volume_vm(VM, ROOT, &img, "raw");
    let create = |name: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: name.into(),
        vm: Some(vm.clone()),
        ..Default::default()
    };
    let mut c = common::backup_client(&agent).await;
    let a = c.create_vm_backup(create("a")).await.expect("backup a").into_inner().inventories;
    let first = common::chunks_uploaded(&store).await;
    assert_eq!(first, 5, "five different 64 KiB chunks");
    let chunk_keys = bucket_keys(&cluster, &format!("{PREFIX}/chunks/"));
    assert_eq!(chunk_keys.len(), 5, "{chunk_keys:?}");
    let objects = status(&store).await.objects.expect("an admin sees the stored objects");
    assert_eq!((objects.chunks, objects.indexes), (5, 1), "{objects:?}");
    assert!(objects.chunk_bytes > 0 && objects.counted_at > 0, "{objects:?}");
    assert_eq!(commit_lookups(&store), 0, "the commit looked up none of the chunks its own session stored");
    assert!(chunk_keys.iter().all(|k| k.len() == PREFIX.len() + "/chunks/".len() + 5 + 64), "{chunk_keys:?}");
    let all = bucket_keys(&cluster, &format!("{PREFIX}/"));
    for want in [format!("{PREFIX}/store.json"), format!("{PREFIX}/groups/{}.json", a[0].group_uuid)] {
        assert!(all.contains(&want), "{want} not in {all:?}");
    }
    assert!(all.iter().any(|k| k.starts_with(&format!("{PREFIX}/indexes/"))), "{all:?}");
    let local: Vec<_> =
        std::fs::read_dir(&store.data_dir).expect("data dir").flatten().map(|e| e.file_name()).collect();
    assert_eq!(local, vec![std::ffi::OsString::from("admin.token")], "data_dir keeps only the admin token");

    qemu_io(&img, "write -P 0x32 0 64k");
    let b = c.create_vm_backup(create("b")).await.expect("backup b").into_inner().inventories;
    assert_eq!(common::chunks_uploaded(&store).await - first, 1, "the incremental uploads only the changed chunk");
    assert_eq!(bucket_keys(&cluster, &format!("{PREFIX}/chunks/")).len(), 6);

    // (b) the store killed and started again over the same bucket: same uuid, same groups,
    // and the agent restores through it.
    store.kill();
    store.restart();
    let st = status(&store).await;
    assert_eq!(st.store_uuid, uuid, "the identity lives in the bucket");
    assert_eq!(st.group_count, 2);
    let out = dir.join("restored.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: b[0].group_uuid.clone(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget { volume_uuid: ROOT.into(), install_path: p(&out), format: "raw".into() }],
        ..Default::default()
    })
    .await
    .expect("restore");
    assert!(std::fs::read(&out).expect("restored") == std::fs::read(&img).expect("image"), "restore differs");
    let cmp = Command::new("qemu-img").args(["compare", &p(&img), &p(&out)]).output().expect("qemu-img compare");
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stdout));

    // (c) delete a; GC removes exactly the chunk only a used; b verifies clean.
    c.delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: a[0].group_uuid.clone(), ..Default::default() })
        .await
        .expect("delete a");
    let mut sc = store_client(&store).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let gc = sc
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!((gc.chunks_removed, gc.chunks_kept), (1, 5), "{gc:?}");
    let left = bucket_keys(&cluster, &format!("{PREFIX}/chunks/"));
    assert_eq!(left.len(), 5, "{left:?}");
    assert_eq!(chunk_keys.iter().filter(|k| !left.contains(k)).count(), 1, "only a's own chunk went");
    let v = sc
        .verify(spb::VerifyRequest { group_uuids: vec![b[0].group_uuid.clone()] })
        .await
        .expect("verify")
        .into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty() && v.chunks_checked == 5, "{v:?}");
    assert_eq!(status(&store).await.group_count, 1);

    // (e) a commit looks up every chunk its session did not store or find here: those of
    // another session are counted as looked up, and one gone from the bucket is refused.
    let before = commit_lookups(&store);
    let first_session = session(&mut sc).await;
    let m = upload(&mut sc, &first_session, &[pseudo_random(71, CS), pseudo_random(72, CS)]).await;
    let other = session(&mut sc).await;
    commit(&mut sc, &other, &m).await.expect("commit of another session's present chunks");
    assert_eq!(commit_lookups(&store) - before, 2, "both chunks were looked up");
    let gone = pseudo_random(73, CS);
    let third = session(&mut sc).await;
    let m = upload(&mut sc, &third, std::slice::from_ref(&gone)).await;
    let hex = vmbackup_proto::Digest::of(&gone).to_hex();
    let (code, _) = cluster.s3("DELETE", &format!("/{BUCKET}/{PREFIX}/chunks/{}/{hex}", &hex[..4]), None, &[]);
    assert_eq!(code, 204, "delete the chunk behind the store's back");
    let fourth = session(&mut sc).await;
    let refused = commit(&mut sc, &fourth, &m).await.expect_err("a chunk gone from the bucket");
    assert!(refused.message().contains(&hex) && refused.message().contains("not in the store"), "{refused:?}");
    drop(agent);
    drop(store);
    eprintln!("s3_store: whole test {:.1}s", file_start.elapsed().as_secs_f64());
}
