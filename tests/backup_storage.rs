//! Backup storage management end to end: real vmbackup-store and vmbackup-agent processes on
//! loopback, driven over gRPC as the control plane would.

mod common;

use common::{AgentOptions, StorageClient, start_agent, start_store, storage_client, zstack_code};
use vmbackup_proto::agent::v1 as pb;

const ZONE_A: &str = "140ebc2fbdb74ae197323a69d432f25e";
const ZONE_B: &str = "195ae9157b9248e3889cc56cfd7d0f8d";

async fn query(c: &mut StorageClient, conditions: &[&str]) -> Vec<String> {
    let r = c
        .query_backup_storage(pb::QueryBackupStorageRequest {
            conditions: conditions.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("query {conditions:?}: {s:?}"))
        .into_inner();
    let mut names: Vec<_> = r.inventories.into_iter().map(|i| i.name).collect();
    names.sort();
    names
}

async fn all(c: &mut StorageClient) -> Vec<pb::BackupStorageInventory> {
    c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect("query all").into_inner().inventories
}

async fn add(c: &mut StorageClient, req: pb::AddImageStoreBackupStorageRequest) -> pb::BackupStorageInventory {
    c.add_image_store_backup_storage(req).await.expect("add").into_inner().inventory.expect("inventory")
}

#[tokio::test(flavor = "multi_thread")]
async fn add_query_reconnect_delete_and_survive_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store_a = start_store(dir.path(), "store-a");
    let store_b = start_store(dir.path(), "store-b");
    let mut agent = start_agent(dir.path(), AgentOptions::default());
    let mut c = storage_client(&agent, Some(common::session(&agent))).await;

    // Add: one by hostname + port, one by url.
    let alpha = add(
        &mut c,
        pb::AddImageStoreBackupStorageRequest {
            name: "alpha".into(),
            description: "first store".into(),
            hostname: "127.0.0.1".into(),
            port: u32::from(store_a.addr.port()),
            token: common::store_token(&store_a),
            attached_zone_uuids: vec![ZONE_A.into()],
            ..Default::default()
        },
    )
    .await;
    let beta = add(
        &mut c,
        pb::AddImageStoreBackupStorageRequest {
            name: "beta".into(),
            url: store_b.url(),
            token: common::store_token(&store_b),
            attached_zone_uuids: vec![ZONE_B.into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(alpha.r#type, "ImageStoreBackupStorage");
    assert_eq!((alpha.state.as_str(), alpha.status.as_str()), ("Enabled", "Connected"));
    assert_eq!(alpha.url, store_a.url());
    assert_eq!(alpha.attached_zone_uuids, vec![ZONE_A.to_string()]);
    assert!(
        alpha.total_capacity > 0 && alpha.available_capacity > 0 && alpha.available_capacity <= alpha.total_capacity
    );
    assert!(alpha.create_date.is_some() && alpha.last_op_date.is_some());
    assert_eq!(alpha.uuid.len(), 32);
    assert_ne!(alpha.store_uuid, beta.store_uuid);

    // Every operator.
    let (lo, hi) = {
        let (pa, pb_) = (alpha.port, beta.port);
        if pa < pb_ { (("alpha", pa), ("beta", pb_)) } else { (("beta", pb_), ("alpha", pa)) }
    };
    assert_eq!(query(&mut c, &["name=alpha"]).await, ["alpha"]);
    assert_eq!(query(&mut c, &["name!=alpha"]).await, ["beta"]);
    assert_eq!(query(&mut c, &[&format!("port>{}", lo.1)]).await, [hi.0]);
    assert_eq!(query(&mut c, &[&format!("port<{}", hi.1)]).await, [lo.0]);
    assert_eq!(query(&mut c, &[&format!("port>={}", lo.1)]).await, ["alpha", "beta"]);
    assert_eq!(query(&mut c, &[&format!("port<={}", lo.1)]).await, [lo.0]);
    assert_eq!(query(&mut c, &["name?=alpha,gamma"]).await, ["alpha"]);
    assert_eq!(query(&mut c, &["name!?=alpha,gamma"]).await, ["beta"]);
    assert_eq!(query(&mut c, &["name~=%lph%"]).await, ["alpha"]);
    assert_eq!(query(&mut c, &["name!~=%lph%"]).await, ["beta"]);
    assert_eq!(query(&mut c, &["description is null"]).await, ["beta"]);
    assert_eq!(query(&mut c, &["description not null"]).await, ["alpha"]);
    assert_eq!(query(&mut c, &[&format!("attachedZoneUuids={ZONE_B}")]).await, ["beta"]);
    assert_eq!(query(&mut c, &[&format!("uuid={}", alpha.uuid), "status=Connected"]).await, ["alpha"]);
    assert_eq!(query(&mut c, &["totalCapacity>0", "type=ImageStoreBackupStorage"]).await, ["alpha", "beta"]);
    let created = alpha.create_date.expect("date");
    assert_eq!(query(&mut c, &[&format!("createDate>={}", created.seconds * 1000)]).await, ["alpha", "beta"]);

    // Paging, sorting, counting.
    let page = |sort_direction: &str, start, limit| pb::QueryBackupStorageRequest {
        sort_by: "name".into(),
        sort_direction: sort_direction.into(),
        start: Some(start),
        limit: Some(limit),
        ..Default::default()
    };
    let names = |r: pb::QueryBackupStorageReply| r.inventories.into_iter().map(|i| i.name).collect::<Vec<_>>();
    assert_eq!(names(c.query_backup_storage(page("desc", 0, 1)).await.expect("p").into_inner()), ["beta"]);
    assert_eq!(names(c.query_backup_storage(page("asc", 1, 5)).await.expect("p").into_inner()), ["beta"]);
    assert_eq!(names(c.query_backup_storage(page("asc", 0, 5)).await.expect("p").into_inner()), ["alpha", "beta"]);
    let counted = c
        .query_backup_storage(pb::QueryBackupStorageRequest { count: true, ..Default::default() })
        .await
        .expect("count")
        .into_inner();
    assert_eq!((counted.total, counted.inventories.len()), (Some(2), 0));
    let with_count = c
        .query_backup_storage(pb::QueryBackupStorageRequest {
            conditions: vec!["name=alpha".into()],
            reply_with_count: true,
            ..Default::default()
        })
        .await
        .expect("replyWithCount")
        .into_inner();
    assert_eq!((with_count.total, with_count.inventories.len()), (Some(1), 1));

    // Reconnect while the store is down: an error, and the record says Disconnected.
    store_a.kill();
    let e = c
        .reconnect_backup_storage(pb::ReconnectBackupStorageRequest { uuid: alpha.uuid.clone(), ..Default::default() })
        .await
        .expect_err("store is down");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(zstack_code(&e), "SYS.1006", "ZStack's OPERATION_ERROR: the store is unreachable");
    assert_eq!(query(&mut c, &["status=Disconnected"]).await, ["alpha"]);

    // Back up: Connected, capacities and lastOpDate refreshed.
    store_a.restart();
    let back = c
        .reconnect_backup_storage(pb::ReconnectBackupStorageRequest { uuid: alpha.uuid.clone(), ..Default::default() })
        .await
        .expect("reconnect")
        .into_inner()
        .inventory
        .expect("inventory");
    assert_eq!(back.status, "Connected");
    assert_eq!(back.store_uuid, alpha.store_uuid);
    assert!(back.available_capacity > 0);
    let millis =
        |t: &Option<vmbackup_proto::Timestamp>| t.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
    assert!(
        millis(&back.last_op_date) > millis(&alpha.last_op_date),
        "{:?} !> {:?}",
        back.last_op_date,
        alpha.last_op_date
    );
    assert_eq!(back.create_date, alpha.create_date);

    // Everything survives an agent restart.
    let before = all(&mut c).await;
    agent.restart();
    let mut c = storage_client(&agent, Some(common::session(&agent))).await;
    assert_eq!(all(&mut c).await, before);

    // Delete in both modes; the stores keep running and keep their data.
    c.delete_backup_storage(pb::DeleteBackupStorageRequest { uuid: beta.uuid.clone(), ..Default::default() })
        .await
        .expect("permissive delete of an unused storage");
    c.delete_backup_storage(pb::DeleteBackupStorageRequest {
        uuid: alpha.uuid.clone(),
        delete_mode: "Enforcing".into(),
        ..Default::default()
    })
    .await
    .expect("enforcing delete");
    assert!(all(&mut c).await.is_empty());
    assert!(store_b.data_dir.join("store.json").exists(), "delete never touches the store's data");
    let e = c
        .delete_backup_storage(pb::DeleteBackupStorageRequest { uuid: alpha.uuid.clone(), ..Default::default() })
        .await
        .expect_err("already gone");
    assert_eq!((e.code(), zstack_code(&e).as_str()), (tonic::Code::NotFound, "SYS.1003"));

    // A deleted storage can be added again (same store, new record).
    let again = add(
        &mut c,
        pb::AddImageStoreBackupStorageRequest {
            name: "beta".into(),
            url: store_b.url(),
            token: common::store_token(&store_b),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(again.store_uuid, beta.store_uuid);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let token = common::session(&agent);
    let mut c = storage_client(&agent, Some(token.clone())).await;
    let resource_uuid = "0123456789abcdef0123456789abcdef".to_string();
    let first = add(
        &mut c,
        pb::AddImageStoreBackupStorageRequest {
            name: "main".into(),
            url: store.url(),
            token: common::store_token(&store),
            resource_uuid: resource_uuid.clone(),
            ..Default::default()
        },
    )
    .await;
    let snapshot = all(&mut c).await;

    let expect_invalid = |r: Result<tonic::Response<pb::QueryBackupStorageReply>, tonic::Status>, needle: &str| {
        let e = r.expect_err("must be refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(zstack_code(&e), "SYS.1007");
        assert!(e.message().contains(needle), "{:?} does not mention {needle:?}", e.message());
    };
    let q = |conds: &[&str]| pb::QueryBackupStorageRequest {
        conditions: conds.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    expect_invalid(c.query_backup_storage(q(&["colour=red"])).await, "colour");
    expect_invalid(c.query_backup_storage(q(&["name"])).await, "malformed condition");
    expect_invalid(c.query_backup_storage(q(&["totalCapacity>lots"])).await, "not an integer");
    expect_invalid(
        c.query_backup_storage(pb::QueryBackupStorageRequest { sort_by: "nope".into(), ..Default::default() }).await,
        "sortBy",
    );

    // An injection attempt is just a value that matches nothing.
    assert!(query(&mut c, &["name=x' OR 1=1 --"]).await.is_empty());
    assert!(query(&mut c, &["uuid?=x') OR ('1'='1"]).await.is_empty());

    let add_err = |r: Result<tonic::Response<pb::BackupStorageReply>, tonic::Status>| r.expect_err("must be refused");

    let e = add_err(
        c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            url: store.url(),
            token: common::store_token(&store),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("name"), "{e:?}");

    let e = add_err(
        c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "x".into(),
            url: store.url(),
            token: common::store_token(&store),
            resource_uuid: "not-a-uuid".into(),
            ..Default::default()
        })
        .await,
    );
    assert!(e.message().contains("resourceUuid"), "{e:?}");

    let e = add_err(
        c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "x".into(),
            hostname: "bad host".into(),
            ..Default::default()
        })
        .await,
    );
    assert!(e.message().contains("hostname"), "{e:?}");

    // Unreachable: a loopback port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let e = add_err(
        c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "nowhere".into(),
            hostname: "127.0.0.1".into(),
            port: u32::from(closed),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&format!("127.0.0.1:{closed}")), "{e:?}");

    // Duplicate resourceUuid: the same request is an idempotent retry, another one a conflict.
    let retry = add(
        &mut c,
        pb::AddImageStoreBackupStorageRequest {
            name: "main".into(),
            url: store.url(),
            token: common::store_token(&store),
            resource_uuid: resource_uuid.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(retry, first);
    let e = add_err(
        c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "other".into(),
            url: store.url(),
            token: common::store_token(&store),
            resource_uuid: resource_uuid.clone(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("resourceUuid"), "{e:?}");

    // The same store cannot be registered twice.
    let e = add_err(
        c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "twice".into(),
            url: store.url(),
            token: common::store_token(&store),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    // Invalid uuids and modes on reconnect/delete.
    let e = c
        .reconnect_backup_storage(pb::ReconnectBackupStorageRequest { uuid: "xyz".into(), ..Default::default() })
        .await
        .expect_err("bad uuid");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("uuid"), "{e:?}");
    let e = c
        .delete_backup_storage(pb::DeleteBackupStorageRequest {
            uuid: first.uuid.clone(),
            delete_mode: "Sometimes".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad mode");
    assert!(e.message().contains("deleteMode"), "{e:?}");

    // Missing or wrong session.
    for token in [None, Some("0000".to_string()), Some(format!("{token}x"))] {
        let mut anon = storage_client(&agent, token.clone()).await;
        let e = anon.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect_err("no session");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e:?}");
        assert_eq!(zstack_code(&e), "ID.1001");
        let e = anon
            .delete_backup_storage(pb::DeleteBackupStorageRequest {
                uuid: first.uuid.clone(),
                delete_mode: "Enforcing".into(),
                ..Default::default()
            })
            .await
            .expect_err("no session");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    assert_eq!(all(&mut c).await, snapshot, "refused requests changed nothing");
    assert!(!agent.log_text().contains("panicked"), "agent panicked:\n{}", agent.log_text());
}
