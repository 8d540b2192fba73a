//! The agent as an operator meets it: embedded Image Storage registered as `local`,
//! discovery through gRPC reflection, open health checks, vmbackupctl tables and JSON, and
//! methods of later features answering UNIMPLEMENTED with a ZStack code.

mod common;

use common::{AgentOptions, start_agent, storage_client, zstack_code};
use vmbackup_proto::agent::v1 as pb;

fn ctl(agent: &common::Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::bin("vmbackupctl"))
        .arg("--agent")
        .arg(agent.url())
        .arg("--session-file")
        .arg(agent.data_dir.join("session"))
        .args(args)
        .output()
        .expect("run vmbackupctl")
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_is_registered_once_as_local() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = start_agent(dir.path(), AgentOptions { embedded_store: true, config: None });
    let mut c = storage_client(&agent, Some(common::session(&agent))).await;
    let list = |r: pb::QueryBackupStorageReply| r.inventories;
    let first = list(c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect("q").into_inner());
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].name.as_str(), first[0].status.as_str()), ("local", "Connected"));
    assert!(agent.data_dir.join("store/store.json").exists());

    // A restart (new ephemeral port) keeps one record with the same uuid, following the port.
    agent.restart();
    let mut c = storage_client(&agent, Some(common::session(&agent))).await;
    let second = list(c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect("q").into_inner());
    assert_eq!(second.len(), 1);
    assert_eq!(
        (second[0].uuid.as_str(), second[0].store_uuid.as_str()),
        (first[0].uuid.as_str(), first[0].store_uuid.as_str())
    );
    assert_eq!(second[0].status, "Connected");

    // vmbackupctl: a table for people, JSON with ZStack's field names for scripts.
    let out = ctl(&agent, &["storage", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).expect("utf8");
    for needle in ["UUID", "NAME", "STATUS", "local", "Connected", &second[0].uuid] {
        assert!(table.contains(needle), "{needle:?} missing from\n{table}");
    }
    let out = ctl(&agent, &["--json", "storage", "query", "name=local"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let inv = &v["inventories"][0];
    assert_eq!(inv["name"], "local");
    assert_eq!(inv["type"], "ImageStoreBackupStorage");
    assert!(inv["totalCapacity"].is_string() || inv["totalCapacity"].is_number(), "{inv}");
    let created: vmbackup_proto::Timestamp =
        serde_json::from_value(inv["createDate"].clone()).expect("RFC 3339 createDate");
    assert_eq!(Some(created), second[0].create_date);
    let out = ctl(&agent, &["storage", "query", "colour=red"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SYS.1007") && err.contains("colour"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_store_takes_backups_in_process_and_restores_them_identically() {
    use vmbackup_proto::store::v1 as spb;
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    let mut data = common::pseudo_random(41, 6 << 20);
    data.extend(vec![0u8; 2 << 20]);
    std::fs::write(&img, &data).expect("volume");
    let agent = start_agent(dir.path(), AgentOptions { embedded_store: true, config: None });
    let mut c = storage_client(&agent, Some(common::session(&agent))).await;
    let local = c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect("q").into_inner();
    let (bs, url) = (local.inventories[0].uuid.clone(), local.inventories[0].url.clone());
    // The embedded store answers gRPC callers with its own admin token only.
    let token = std::fs::read_to_string(agent.data_dir.join("store/admin.token")).expect("embedded store token");
    let mut store = vmbackup_proto::store::v1::image_store_client::ImageStoreClient::with_interceptor(
        common::channel(&url).await,
        common::Auth(Some(format!("Bearer {}", token.trim()))),
    );
    let status = |r: tonic::Response<spb::StatusReply>| r.into_inner();

    let vm = common::one_volume_vm("7a8b9c0d1e2f30415263748596a7b8c9", "8b9c0d1e2f30415263748596a7b8c9da", &img, "raw");
    let mut b = common::backup_client(&agent).await;
    let backup = |name: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: vm.volumes[0].uuid.clone(),
        backup_storage_uuid: bs.clone(),
        name: name.into(),
        vm: Some(vm.clone()),
        ..Default::default()
    };
    let first = b.create_vm_backup(backup("full")).await.expect("backup").into_inner().inventories;
    let after_full = status(store.status(spb::StatusRequest {}).await.expect("status"));
    let counters = after_full.counters.expect("counters");
    assert!(counters.chunks_uploaded > 0 && counters.chunks_rejected == 0, "{counters:?}");
    assert_eq!(after_full.open_sessions, 0, "the backup's session was closed");

    // The same data again: nothing new is stored.
    b.create_vm_backup(backup("again")).await.expect("second backup");
    let again = status(store.status(spb::StatusRequest {}).await.expect("status")).counters.expect("counters");
    assert_eq!(again.chunks_uploaded, counters.chunks_uploaded);

    // The group verifies clean through the store's own server, and restores identically.
    let v = store
        .verify(spb::VerifyRequest { group_uuids: vec![first[0].group_uuid.clone()] })
        .await
        .expect("verify")
        .into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "{v:?}");
    let out = dir.path().join("restored.raw");
    b.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: first[0].group_uuid.clone(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: vm.volumes[0].uuid.clone(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore");
    assert!(std::fs::read(&out).expect("restored") == data, "the restored volume differs");
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_and_health_are_open_and_later_methods_are_unimplemented() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(dir.path(), AgentOptions::default());

    // Reflection needs no session: list the services like grpcurl does.
    let names = common::reflected_services(&agent.url()).await;
    for s in [
        "vmbackup.agent.v1.BackupStorageService",
        "vmbackup.agent.v1.VmBackupService",
        "vmbackup.agent.v1.VolumeSnapshotGroupService",
        "vmbackup.agent.v1.VmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    assert_eq!(names.len(), 6, "only the services the agent serves: {names:?}");
    assert!(!names.iter().any(|n| n.starts_with("vmbackup.store.")), "{names:?}");

    // Health needs no session either.
    let mut health = tonic_health::pb::health_client::HealthClient::new(common::channel(&agent.url()).await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // An empty AddCephBackupStorage: the first missing field named, SYS.1007, nothing recorded.
    let mut storages = common::storage_client(&agent, Some(common::session(&agent))).await;
    let e = storages.add_ceph_backup_storage(pb::AddCephBackupStorageRequest::default()).await.expect_err("empty");
    assert_eq!((e.code(), zstack_code(&e).as_str()), (tonic::Code::InvalidArgument, "SYS.1007"));
    assert!(e.message().contains("name"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_layouts_register_query_and_unregister() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = start_agent(dir.path(), AgentOptions::default());
    let token = Some(format!("OAuth {}", common::session(&agent)));
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&agent.url()).await,
        common::Auth(token.clone()),
    );
    // Under the test's directory, a volume root; the files need not exist yet.
    let vol = |uuid: &str, kind: &str, device_id: i32, format: &str| pb::VolumeSpec {
        uuid: uuid.into(),
        name: format!("{kind}-{device_id}"),
        install_path: dir.path().join(format!("images/{uuid}.{format}")).display().to_string(),
        format: format.into(),
        r#type: kind.into(),
        device_id,
    };
    let vm_a = "9ff17180fded31c2b9e4e5751ebcb2ba";
    let vm_b = "98ac921100b43981b493071b6430bb2b";
    let root_a = "edc07fe8d8a335ec8aa00f23b88fc1c6";
    let data_a = "2ae6b881bb1239cd907d48993e86a2e8";
    let reg = pb::RegisterVmRequest {
        uuid: vm_a.into(),
        name: "web-1".into(),
        volumes: vec![vol(data_a, "Data", 1, "raw"), vol(root_a, "Root", 0, "qcow2")],
        ..Default::default()
    };
    let inv = vms.register_vm(reg.clone()).await.expect("register").into_inner().inventory.expect("inventory");
    assert_eq!(inv.volumes.iter().map(|v| v.uuid.as_str()).collect::<Vec<_>>(), [root_a, data_a], "root first");
    assert_eq!(inv.volumes[0].vm_instance_uuid, vm_a);

    // A volume cannot belong to two VMs; the refused registration records nothing.
    let e = vms
        .register_vm(pb::RegisterVmRequest {
            uuid: vm_b.into(),
            volumes: vec![vol(root_a, "Root", 0, "qcow2")],
            ..Default::default()
        })
        .await
        .expect_err("volume of another VM");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let e = vms.register_vm(pb::RegisterVmRequest { volumes: vec![], ..reg.clone() }).await.expect_err("no volumes");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let q = |conds: &[&str]| pb::QueryVmRequest {
        conditions: conds.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let found = vms.query_vm(q(&[&format!("volumeUuid={data_a}")])).await.expect("query").into_inner();
    assert_eq!(found.inventories.len(), 1);
    assert_eq!(found.inventories[0], inv);
    assert!(vms.query_vm(q(&[&format!("uuid={vm_b}")])).await.expect("query").into_inner().inventories.is_empty());

    // Survives a restart; unregister removes it.
    agent.restart();
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&agent.url()).await,
        common::Auth(token),
    );
    let after = vms.query_vm(q(&[])).await.expect("query").into_inner().inventories;
    assert_eq!(after, vec![inv]);
    vms.unregister_vm(pb::UnregisterVmRequest { uuid: vm_a.into(), ..Default::default() }).await.expect("unregister");
    let e =
        vms.unregister_vm(pb::UnregisterVmRequest { uuid: vm_a.into(), ..Default::default() }).await.expect_err("gone");
    assert_eq!(e.code(), tonic::Code::NotFound);
}
