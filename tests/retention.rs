//! Retention: PruneVmBackup over real backups on a real store. A dry run lists what would go
//! and why the rest stays; the prune deletes through DeleteVmBackup's path, keeps a
//! retention-locked group, and the store's GC then reclaims exactly the chunk only the
//! pruned group held. (Which groups a policy keeps over long histories is decided by a pure
//! function, tested with fixed times in `agent/src/retention.rs`.)

mod common;

use std::io::{Seek, SeekFrom, Write};

use common::{AgentOptions, start_agent, start_store};
use serde_json::json;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const VM: &str = "3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b";
const ROOT: &str = "4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c";

fn rewrite_first_chunk(path: &std::path::Path, seed: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(&common::pseudo_random(seed, 64 << 10)).expect("write");
    f.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_what_the_policy_and_locks_say_and_gc_reclaims_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(7, 1 << 20)).expect("image");
    let store = start_store(dir.path(), "s");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[retention.s]\nkeep_last = 1\n").expect("config");
    let agent = start_agent(dir.path(), AgentOptions { embedded_store: false, config: Some(config) });
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let vm = common::one_volume_vm(VM, ROOT, &img, "raw");
    let backup = |name: &str, tags: Vec<String>| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: name.into(),
        vm: Some(vm.clone()),
        system_tags: tags,
        ..Default::default()
    };
    let group = |inv: Vec<pb::VolumeBackupInventory>| inv[0].group_uuid.clone();

    // a: locked for an hour; b and c each rewrite the first chunk, so b's is b's alone.
    let a = group(
        c.create_vm_backup(backup("a", vec!["backup::retentionLock::seconds::3600".into()]))
            .await
            .expect("a")
            .into_inner()
            .inventories,
    );
    rewrite_first_chunk(&img, 8);
    let b = group(c.create_vm_backup(backup("b", vec![])).await.expect("b").into_inner().inventories);
    rewrite_first_chunk(&img, 9);
    let cc = group(c.create_vm_backup(backup("c", vec![])).await.expect("c").into_inner().inventories);

    // A policy that keeps nothing is refused.
    let e = c
        .prune_vm_backup(pb::PruneVmBackupRequest {
            backup_storage_uuid: bs.clone(),
            policy: Some(pb::RetentionPolicy::default()),
            ..Default::default()
        })
        .await
        .expect_err("empty policy");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Dry run: c is the last one, a is locked, b would go; nothing is deleted.
    let dry = c
        .prune_vm_backup(pb::PruneVmBackupRequest {
            backup_storage_uuid: bs.clone(),
            policy: Some(pb::RetentionPolicy { keep_last: 1, ..Default::default() }),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("dry run")
        .into_inner()
        .decisions;
    let fates: Vec<(&str, bool, bool)> = dry.iter().map(|d| (d.group_uuid.as_str(), d.keep, d.deleted)).collect();
    assert_eq!(fates, [(cc.as_str(), true, false), (b.as_str(), false, false), (a.as_str(), true, false)]);
    assert_eq!(dry[0].reasons, ["last 1"]);
    assert!(dry[2].reasons[0].starts_with("locked until "), "{:?}", dry[2]);
    assert!(dry.iter().all(|d| d.root_volume_uuid == ROOT && d.create_date.is_some()));
    let count = |c: &mut common::BackupClient| {
        let mut c = c.clone();
        async move {
            c.query_volume_backup(pb::QueryVolumeBackupRequest { count: true, ..Default::default() })
                .await
                .expect("count")
                .into_inner()
                .total
        }
    };
    assert_eq!(count(&mut c).await, Some(3), "a dry run deletes nothing");

    // The prune itself over REST, with the storage's configured policy ([retention.s]).
    let http = {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    };
    let auth = format!("OAuth {}", common::session(&agent));
    let accepted: serde_json::Value = http
        .put(format!("{}/zstack/v1/vm-backups/backup-storage/{bs}/actions", agent.rest_url()))
        .header("Authorization", &auth)
        .body(json!({"pruneVmBackup": {}}).to_string())
        .send()
        .await
        .expect("prune")
        .text()
        .await
        .map(|t| serde_json::from_str(&t).expect("json"))
        .expect("body");
    let location = accepted["location"].as_str().expect("location").to_string();
    let result = loop {
        let r = http.get(&location).header("Authorization", &auth).send().await.expect("poll");
        if r.status().as_u16() != 202 {
            assert_eq!(r.status().as_u16(), 200);
            break serde_json::from_str::<serde_json::Value>(&r.text().await.expect("body")).expect("json");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let decisions = result["decisions"].as_array().expect("decisions");
    let deleted: Vec<&str> =
        decisions.iter().filter(|d| d["deleted"] == true).map(|d| d["groupUuid"].as_str().expect("g")).collect();
    assert_eq!(deleted, [b.as_str()], "{result}");
    assert_eq!(count(&mut c).await, Some(2));

    // GC reclaims the one chunk only b held.
    let mut sc = common::store_client(&store).await;
    let gc = sc
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!(gc.chunks_removed, 1, "{gc:?}");
}
