//! The four bandwidth parameters and the host-wide caps, as ceilings: a transfer is never
//! faster than its limit (+5%, plus one burst of at most 1/20 s of the rate), checked from
//! the job's own byte counters and the elapsed time. Several workers share a job's limit,
//! and several jobs share a host cap. (A slow machine only makes transfers slower, so these
//! cannot flake that way.)

mod common;

use std::time::{Duration, Instant};

use common::{AgentOptions, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const MIB: i64 = 1 << 20;

/// `bytes` moved in `took` stayed under `rate` (+5%, one burst allowed).
fn assert_ceiling(what: &str, bytes: i64, took: Duration, rate: i64) {
    let burst = (rate / 20).clamp(4096, MIB) as f64;
    let floor = (bytes as f64 - burst) / (rate as f64 * 1.05);
    assert!(bytes > 2 * rate, "{what}: too few bytes ({bytes}) to measure a rate of {rate}");
    assert!(
        took.as_secs_f64() >= floor,
        "{what}: {bytes} bytes in {took:?} is faster than {rate} B/s (+5%): at least {floor:.2} s expected"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_limit_is_a_ceiling_for_backup_and_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let rate = 3 * MIB;
    let mut group = String::new();
    for (i, (name, read, net)) in
        [("volumeReadBandwidth", Some(rate), None), ("networkWriteBandwidth", None, Some(rate))].into_iter().enumerate()
    {
        // New random data each time, so every byte is read and sent.
        let img = dir.path().join(format!("v{i}.raw"));
        std::fs::write(&img, common::pseudo_random(40 + i as u64, 8 << 20)).expect("image");
        let job = format!("{i}0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5");
        let t0 = Instant::now();
        c.create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: format!("{i}1b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
            backup_storage_uuid: bs.clone(),
            name: name.into(),
            resource_uuid: job.clone(),
            volume_read_bandwidth: read,
            network_write_bandwidth: net,
            system_tags: vec!["volumeLiveBackup::parallelismDegree::4".into()],
            vm: Some(common::one_volume_vm(
                &format!("{i}2b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
                &format!("{i}1b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
                &img,
                "raw",
            )),
            ..Default::default()
        })
        .await
        .expect("backup");
        let took = t0.elapsed();
        let p = common::last_progress(&mut c, &job).await;
        let bytes = if read.is_some() { p.bytes_read } else { p.bytes_sent };
        assert_ceiling(name, bytes, took, rate);
        group = job;
    }
    for (i, (name, write, net)) in
        [("volumeWriteBandwidth", Some(rate), None), ("networkReadBandwidth", None, Some(rate))].into_iter().enumerate()
    {
        let job = format!("{i}3b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5");
        let t0 = Instant::now();
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.clone(),
            backup_storage_uuid: bs.clone(),
            targets: vec![pb::RestoreTarget {
                volume_uuid: "11b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5".into(),
                install_path: dir.path().join(format!("restored{i}.raw")).display().to_string(),
                format: "raw".into(),
            }],
            volume_write_bandwidth: write,
            network_read_bandwidth: net,
            resource_uuid: job.clone(),
            system_tags: vec!["volumeLiveBackup::parallelismDegree::4".into()],
            ..Default::default()
        })
        .await
        .expect("restore");
        let took = t0.elapsed();
        let p = common::last_progress(&mut c, &job).await;
        let bytes = if write.is_some() { p.bytes_written } else { p.bytes_received };
        assert_ceiling(name, bytes, took, rate);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_jobs_share_the_host_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    let cap = 4 * MIB;
    std::fs::write(&config, format!("[limits]\nvolume_read_bandwidth = {cap}\n")).expect("config");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions { config: Some(config), ..Default::default() });
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut jobs = Vec::new();
    let t0 = Instant::now();
    for i in 0..3u64 {
        let img = dir.path().join(format!("vm{i}.raw"));
        std::fs::write(&img, common::pseudo_random(60 + i, 5 << 20)).expect("image");
        let mut c = common::backup_client(&agent).await;
        let bs = bs.clone();
        jobs.push(tokio::spawn(async move {
            let job = format!("{i}4b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5");
            c.create_vm_backup(pb::CreateVmBackupRequest {
                root_volume_uuid: format!("{i}5b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
                backup_storage_uuid: bs,
                name: "shared".into(),
                resource_uuid: job.clone(),
                system_tags: vec!["volumeLiveBackup::parallelismDegree::2".into()],
                vm: Some(common::one_volume_vm(
                    &format!("{i}6b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
                    &format!("{i}5b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
                    &img,
                    "raw",
                )),
                ..Default::default()
            })
            .await
            .expect("backup");
            common::last_progress(&mut c, &job).await.bytes_read
        }));
    }
    let mut total = 0;
    for j in jobs {
        total += j.await.expect("join");
    }
    assert_eq!(total, 15 * MIB);
    assert_ceiling("host volume_read_bandwidth shared by 3 jobs", total, t0.elapsed(), cap);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parallelism_tag_on_the_storage_caps_its_concurrent_backups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let mut storages = common::storage_client(&agent, Some(common::session(&agent))).await;
    let bs = storages
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "one-at-a-time".into(),
            url: store.url(),
            token: common::store_token(&store),
            system_tags: vec!["volumeLiveBackup::parallelismDegree::1".into()],
            ..Default::default()
        })
        .await
        .expect("add")
        .into_inner()
        .inventory
        .expect("inventory")
        .uuid;
    let imgs: Vec<_> = (0..2u64)
        .map(|i| {
            let img = dir.path().join(format!("vm{i}.raw"));
            std::fs::write(&img, common::pseudo_random(80 + i, 4 << 20)).expect("image");
            img
        })
        .collect();
    let req = |i: usize, limit: Option<i64>| pb::CreateVmBackupRequest {
        root_volume_uuid: format!("{i}7b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
        backup_storage_uuid: bs.clone(),
        name: "capped".into(),
        resource_uuid: format!("{i}8b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
        volume_read_bandwidth: limit,
        vm: Some(common::one_volume_vm(
            &format!("{i}9b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
            &format!("{i}7b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"),
            &imgs[i],
            "raw",
        )),
        ..Default::default()
    };
    let mut c = common::backup_client(&agent).await;
    let mut bg = c.clone();
    let first = req(0, Some(MIB));
    let running = tokio::spawn(async move { bg.create_vm_backup(first).await });
    let job = "08b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5";
    common::wait_until_read(&mut c, job, 1).await;
    let e = c.create_vm_backup(req(1, None)).await.expect_err("a second backup on this storage");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("1 backups already run"), "{e:?}");
    running.await.expect("join").expect("first backup");
    c.create_vm_backup(req(1, None)).await.expect("the second once the first is done");
}
