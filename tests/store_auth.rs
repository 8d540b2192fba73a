//! Who may call a vmbackup-store, tried as an attacker on the backup network would: every
//! RPC the store's reflection lists refuses a missing, wrong or revoked credential; writers
//! append to their own namespace only; readers restore only their namespace; retention
//! locks hold against admins until they expire; the agent's token never shows up in a
//! reply or a log line.

mod common;

use std::path::Path;
use std::time::Duration;

use common::store_calls::{CS, CS_U32, CS_U64, commit, session, upload};
use common::{AgentOptions, Daemon, StoreClient, pseudo_random, start_agent, store_client, store_client_with};
use tonic::Code;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const VM: &str = "5a1f0e3c9b2d4e6f8a7b6c5d4e3f2a1b";
const ROOT: &str = "6b2e1f4d0c3e5f7a9b8c7d6e5f4a3b2c";

/// A new token and its hash, from `vmbackup-store token`.
fn new_token() -> (String, String) {
    let out = std::process::Command::new(common::bin("vmbackup-store")).arg("token").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{key} in {text}"))
            .to_string()
    };
    (field("token"), field("token_blake3"))
}

struct Principal<'a> {
    name: &'a str,
    roles: &'a str,
    namespace: &'a str,
    hash: &'a str,
}

fn write_config(path: &Path, principals: &[Principal<'_>]) {
    // Failures are slowed down to at most 200 ms here (5 s by default) so that trying every
    // method with bad credentials stays quick.
    let mut text = String::from("[auth]\nmax_failure_delay_ms = 200\n");
    for p in principals {
        text.push_str(&format!(
            "[[auth.principal]]\nname = \"{}\"\nroles = {}\nnamespace = \"{}\"\ntoken_blake3 = \"{}\"\n",
            p.name, p.roles, p.namespace, p.hash
        ));
    }
    std::fs::write(path, text).expect("config");
}

/// Every method of the store's service, from its gRPC reflection, with whether the client
/// and the server stream.
async fn reflected_methods(url: &str) -> Vec<(String, bool, bool)> {
    use prost::Message;
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    const SERVICE: &str = "vmbackup.store.v1.ImageStore";
    let mut refl = ServerReflectionClient::new(common::channel(url).await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(SERVICE.into())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter([req])).await.expect("reflection").into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let mut methods = Vec::new();
    for bytes in files.file_descriptor_proto {
        let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("descriptor");
        for s in file.service.iter().filter(|s| format!("{}.{}", file.package(), s.name()) == SERVICE) {
            for m in &s.method {
                methods.push((m.name().to_string(), m.client_streaming(), m.server_streaming()));
            }
        }
    }
    assert!(methods.len() >= 15, "the store serves at least its 15 methods: {methods:?}");
    methods
}

fn with_auth<T>(authorization: Option<&str>, mut r: tonic::Request<T>) -> tonic::Request<T> {
    if let Some(a) = authorization {
        r.metadata_mut().insert("authorization", a.parse().expect("ascii"));
    }
    r
}

/// Calls `method` with an empty message and `authorization` (None: no metadata) and
/// returns the status code the store answered with.
async fn call_raw(url: &str, method: &(String, bool, bool), authorization: Option<&str>) -> Code {
    let channel = common::channel(url).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/vmbackup.store.v1.ImageStore/{}", method.0).parse().expect("path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = match (method.1, method.2) {
        (false, false) => grpc.unary(with_auth(authorization, tonic::Request::new(())), path, codec).await.map(|_| ()),
        (true, false) => grpc
            .client_streaming(with_auth(authorization, tonic::Request::new(tokio_stream::iter(vec![()]))), path, codec)
            .await
            .map(|_| ()),
        (false, true) => {
            match grpc.server_streaming(with_auth(authorization, tonic::Request::new(())), path, codec).await {
                Ok(r) => r.into_inner().message().await.map(|_| ()),
                Err(e) => Err(e),
            }
        }
        (true, true) => panic!("no bidirectional method expected: {method:?}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn hup(d: &Daemon) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(d.pid()).expect("pid")), nix::sys::signal::SIGHUP)
        .expect("SIGHUP");
}

async fn wait_for_log(d: &Daemon, needle: &str, times: usize) {
    for _ in 0..500 {
        if d.log_text().matches(needle).count() >= times {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{needle:?} never appeared {times} times in the log:\n{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_refuses_missing_wrong_and_revoked_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("store.toml");
    let (token, hash) = new_token();
    write_config(
        &config,
        &[Principal { name: "host-a", roles: r#"["writer", "reader"]"#, namespace: "host-a", hash: &hash }],
    );
    let store = common::start_store_with_config(dir.path(), "store", Some(&config));
    let url = store.url();
    let methods = reflected_methods(&url).await;
    let (wrong, _) = new_token();
    for m in &methods {
        assert_eq!(call_raw(&url, m, None).await, Code::Unauthenticated, "{} without a credential", m.0);
        let bearer = format!("Bearer {wrong}");
        assert_eq!(call_raw(&url, m, Some(&bearer)).await, Code::Unauthenticated, "{} with a wrong token", m.0);
        let basic = format!("Basic {token}");
        assert_eq!(call_raw(&url, m, Some(&basic)).await, Code::Unauthenticated, "{} with another scheme", m.0);
    }
    // Health stays open, for load balancers and systemd checks.
    let mut health = tonic_health::pb::health_client::HealthClient::new(common::channel(&url).await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health is open");

    // The token works, and Status says who the caller is.
    let mut c = store_client_with(&store, Some(&token)).await;
    let st = c.status(spb::StatusRequest {}).await.expect("status").into_inner();
    assert_eq!((st.principal.as_str(), st.namespace.as_str()), ("host-a", "host-a"));
    assert_eq!(st.roles, ["writer", "reader"]);

    // Revoked by a reload: refused at the next call, without a restart.
    let (_, other_hash) = new_token();
    write_config(
        &config,
        &[Principal { name: "host-b", roles: r#"["writer"]"#, namespace: "host-b", hash: &other_hash }],
    );
    hup(&store);
    wait_for_log(&store, "configuration reloaded", 1).await;
    let bearer = format!("Bearer {token}");
    for m in &methods {
        assert_eq!(call_raw(&url, m, Some(&bearer)).await, Code::Unauthenticated, "{} with a revoked token", m.0);
    }
    // A reload with a broken config keeps the principals it had.
    std::fs::write(&config, "[auth]\n[[auth.principal]]\nname = \"x\"\nroles = [\"writer\"]\n").expect("config");
    hup(&store);
    wait_for_log(&store, "reload refused", 1).await;
    let mut admin = store_client(&store).await;
    admin.status(spb::StatusRequest {}).await.expect("the admin token still works");

    // Failures were logged with the peer, slowed down after the first few, and the token
    // itself never appears in the log.
    let log = store.log_text();
    assert!(log.contains("authentication failed") && log.contains("127.0.0.1"), "{log}");
    assert!(log.lines().any(|l| l.contains("authentication failed") && !l.contains("delay_ms=0")), "{log}");
    assert!(!log.contains(&token) && !log.contains(&wrong), "a token leaked into the log");
}

/// Writes `content` as a raw image and registers it as the root volume of VM.
fn image(dir: &Path, seed: u64) -> std::path::PathBuf {
    let img = dir.join("root.raw");
    std::fs::write(&img, pseudo_random(seed, 16 * CS)).expect("image");
    img
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_append_to_their_namespace_and_readers_restore_only_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("store.toml");
    let (token_a, hash_a) = new_token();
    let (token_b, hash_b) = new_token();
    let (token_w, hash_w) = new_token();
    write_config(
        &config,
        &[
            Principal { name: "host-a", roles: r#"["writer", "reader"]"#, namespace: "host-a", hash: &hash_a },
            Principal { name: "restorer-b", roles: r#"["reader"]"#, namespace: "host-b", hash: &hash_b },
            Principal { name: "writer-b", roles: r#"["writer"]"#, namespace: "host-b", hash: &hash_w },
        ],
    );
    let store = common::start_store_with_config(dir.path(), "store", Some(&config));

    // host-a's agent backs up, incrementally too, and restores through its own token.
    let agent = start_agent(dir.path(), AgentOptions::default());
    let mut storages = common::storage_client(&agent, Some(common::session(&agent))).await;
    let bs = storages
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "shared".into(),
            url: store.url(),
            token: token_a.clone(),
            ..Default::default()
        })
        .await
        .expect("add with a writer token")
        .into_inner()
        .inventory
        .expect("inventory")
        .uuid;
    let img = image(dir.path(), 1);
    let mut c = common::backup_client(&agent).await;
    let backup = |group: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: "b".into(),
        resource_uuid: group.into(),
        vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
        ..Default::default()
    };
    let g1 = "a1111111111111111111111111111111";
    c.create_vm_backup(backup(g1)).await.expect("full backup as a writer");
    let before = common::chunks_uploaded(&store).await;
    let mut data = std::fs::read(&img).expect("image");
    data[3 * CS..4 * CS].copy_from_slice(&pseudo_random(99, CS));
    std::fs::write(&img, &data).expect("change one chunk");
    let g2 = "a2222222222222222222222222222222";
    c.create_vm_backup(backup(g2)).await.expect("incremental backup as a writer");
    assert_eq!(common::chunks_uploaded(&store).await - before, 1, "the incremental sent only the changed chunk");
    let out = dir.path().join("restored.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: g2.into(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore within the namespace");
    assert_eq!(std::fs::read(&out).expect("restored"), data);

    // The admin sees host-a's groups filed under host-a.
    let mut admin = store_client(&store).await;
    let all = admin.list_groups(spb::ListGroupsRequest {}).await.expect("list").into_inner().groups;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|g| g.namespace == "host-a"), "{all:?}");
    let victim = all.iter().find(|g| g.group_uuid == g1).expect("g1").clone();
    let manifest: serde_json::Value = serde_json::from_slice(&victim.manifest).expect("manifest");
    let index = manifest["volumes"][0]["indexName"].as_str().expect("index name").to_string();

    // A writer may not delete, collect, verify, lock, or read its own namespace's chunks.
    let mut a = store_client_with(&store, Some(&token_a)).await;
    let denied = |r: Result<_, tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    };
    denied(a.delete_group(spb::DeleteGroupRequest { group_uuid: g1.into() }).await.map(|_| ()), "delete");
    denied(a.garbage_collect(spb::GarbageCollectRequest::default()).await.map(|_| ()), "gc");
    denied(a.verify(spb::VerifyRequest::default()).await.map(|_| ()), "verify");
    denied(
        a.set_retention(spb::SetRetentionRequest { group_uuid: g1.into(), retain_until: u64::MAX }).await.map(|_| ()),
        "retention",
    );
    let mut wb = store_client_with(&store, Some(&token_w)).await;
    let chunks = vmbackup_proto::index::VolumeIndex::decode(
        &a.get_index(spb::GetIndexRequest { name: index.clone() }).await.expect("own index").into_inner().data,
        1 << 20,
    )
    .expect("index")
    .digests;
    denied(
        wb.download_chunks(spb::DownloadChunksRequest {
            digests: vec![chunks[0].0.to_vec()],
            index_name: index.clone(),
        })
        .await
        .map(|_| ()),
        "a writer without the reader role downloads",
    );

    // Another namespace sees nothing of host-a: not in lists, not by uuid, not by index.
    let mut rb = store_client_with(&store, Some(&token_b)).await;
    assert!(rb.list_groups(spb::ListGroupsRequest {}).await.expect("list").into_inner().groups.is_empty());
    let st = rb.status(spb::StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(st.group_count, 0, "Status counts only the caller's namespace");
    assert!(st.counters.is_none(), "store-wide counters are an admin's");
    let e = rb.get_group(spb::GetGroupRequest { group_uuid: g1.into() }).await.expect_err("other namespace");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rb.get_index(spb::GetIndexRequest { name: index.clone() }).await.expect_err("other namespace");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rb.get_index_stream(spb::GetIndexRequest { name: index.clone() }).await.expect_err("other namespace");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rb
        .download_chunks(spb::DownloadChunksRequest { digests: vec![chunks[0].0.to_vec()], index_name: index.clone() })
        .await
        .expect_err("another namespace's index");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rb
        .download_chunks(spb::DownloadChunksRequest { digests: vec![chunks[0].0.to_vec()], index_name: String::new() })
        .await
        .expect_err("no index named");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A writer cannot use another principal's session, nor overwrite an existing index.
    let s_a = session(&mut a).await;
    let e = wb.keep_alive(spb::KeepAliveRequest { session_id: s_a.clone() }).await.expect_err("someone else's session");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let s_w = session(&mut wb).await;
    let e = wb
        .put_index(spb::PutIndexRequest {
            session_id: s_w.clone(),
            name: index.clone(),
            data: vmbackup_proto::index::VolumeIndex::new(
                [7; 16],
                CS_U64,
                CS_U32,
                vmbackup_proto::index::VolumeFormat::Raw,
            )
            .expect("index")
            .encode(),
        })
        .await
        .expect_err("overwrite");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let other =
        vmbackup_proto::index::VolumeIndex::new([7; 16], CS_U64, CS_U32, vmbackup_proto::index::VolumeFormat::Raw)
            .expect("index")
            .encode();
    let e = wb
        .put_index_stream(tokio_stream::iter(vmbackup_proto::pieces::split(other.into(), &s_w, &index)))
        .await
        .expect_err("overwrite in pieces");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let pieces = vmbackup_proto::pieces::split(vec![0; 100].into(), &s_a, "x.vidx");
    let e = wb.put_index_stream(tokio_stream::iter(pieces)).await.expect_err("someone else's session, in pieces");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // writer-b's own backup lands in host-b, where restorer-b sees it and host-a does not.
    let m = upload(&mut wb, &s_w, &[pseudo_random(5, CS)]).await;
    let g = commit(&mut wb, &s_w, &m).await.expect("writer-b commits");
    assert_eq!(g.namespace, "host-b");
    let seen = rb.list_groups(spb::ListGroupsRequest {}).await.expect("list").into_inner().groups;
    assert_eq!(seen.iter().map(|g| g.group_uuid.as_str()).collect::<Vec<_>>(), [m.group_uuid.as_str()]);
    assert!(
        !a.list_groups(spb::ListGroupsRequest {})
            .await
            .expect("list")
            .into_inner()
            .groups
            .iter()
            .any(|g| g.namespace == "host-b")
    );
    rb.download_chunks(spb::DownloadChunksRequest {
        digests: vec![vmbackup_proto::Digest::of(&pseudo_random(5, CS)).0.to_vec()],
        index_name: m.volumes[0].index_name.clone(),
    })
    .await
    .expect("restorer-b reads its namespace")
    .into_inner()
    .message()
    .await
    .expect("chunk")
    .expect("one chunk");

    // The admin deletes; the agent's token was never returned, logged or stored in the open.
    admin.delete_group(spb::DeleteGroupRequest { group_uuid: g1.into() }).await.expect("admin deletes");
    let q = storages.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect("query").into_inner();
    let reply = serde_json::to_string(&q).expect("json");
    for secret in [&token_a, &token_b, &token_w] {
        assert!(!reply.contains(secret.as_str()), "a token in the Query reply");
        assert!(!agent.log_text().contains(secret.as_str()), "a token in the agent log");
        assert!(!store.log_text().contains(secret.as_str()), "a token in the store log");
    }
    use std::os::unix::fs::PermissionsExt;
    let kept = agent.data_dir.join("credentials").join(format!("{bs}.token"));
    assert_eq!(std::fs::metadata(&kept).expect("kept token").permissions().mode() & 0o777, 0o600);
    let audit = store.log_text();
    assert!(audit.lines().any(|l| l.contains("delete group") && l.contains("local-admin")), "{audit}");
    assert!(audit.lines().any(|l| l.contains("denied") && l.contains("host-a")), "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retention_lock_holds_against_the_admin_until_it_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::start_store(dir.path(), "store");
    let mut admin: StoreClient = store_client(&store).await;
    let s = session(&mut admin).await;
    let m = upload(&mut admin, &s, &[pseudo_random(41, CS), pseudo_random(42, CS)]).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let g = admin
        .commit_group(spb::CommitGroupRequest {
            session_id: s.clone(),
            manifest: m.encode().expect("encode"),
            retain_until: now + 3,
        })
        .await
        .expect("commit with a lock")
        .into_inner();
    assert_eq!(g.retain_until, now + 3);
    admin.close_session(spb::CloseSessionRequest { session_id: s }).await.expect("close");
    let e = admin.delete_group(spb::DeleteGroupRequest { group_uuid: g.group_uuid.clone() }).await.expect_err("locked");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("retention-locked"), "{e:?}");
    let e = admin
        .set_retention(spb::SetRetentionRequest { group_uuid: g.group_uuid.clone(), retain_until: now + 1 })
        .await
        .expect_err("shorten");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let g2 = admin
        .set_retention(spb::SetRetentionRequest { group_uuid: g.group_uuid.clone(), retain_until: now + 4 })
        .await
        .expect("extend")
        .into_inner();
    assert_eq!(g2.retain_until, now + 4);
    let gc = admin
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!(gc.chunks_removed, 0, "GC keeps every chunk of the locked group");
    let v = admin.verify(spb::VerifyRequest { group_uuids: vec![g.group_uuid.clone()] }).await.expect("verify");
    assert!(v.into_inner().bad_chunks.is_empty());
    while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() <= now + 4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    admin.delete_group(spb::DeleteGroupRequest { group_uuid: g.group_uuid.clone() }).await.expect("expired");
    let gc = admin
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!(gc.chunks_removed, 2, "after expiry, delete and GC reclaim the group's chunks");
    let log = store.log_text();
    assert!(log.lines().any(|l| l.contains("extend retention") && l.contains("local-admin")), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_asks_for_a_retention_lock_and_delete_is_refused_until_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(dir.path(), AgentOptions { embedded_store: true, config: None });
    let storages = common::storage_client(&agent, Some(common::session(&agent)))
        .await
        .query_backup_storage(pb::QueryBackupStorageRequest::default())
        .await
        .expect("query")
        .into_inner()
        .inventories;
    let bs = storages.first().expect("the embedded store").uuid.clone();
    let img = image(dir.path(), 3);
    let mut c = common::backup_client(&agent).await;
    let group = "c3333333333333333333333333333333";
    c.create_vm_backup(pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs,
        name: "locked".into(),
        resource_uuid: group.into(),
        vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
        system_tags: vec!["backup::retentionLock::seconds::3600".into()],
        ..Default::default()
    })
    .await
    .expect("backup with a lock");
    for mode in ["Permissive", "Enforcing"] {
        let e = c
            .delete_vm_backup(pb::DeleteVmBackupRequest {
                group_uuid: group.into(),
                delete_mode: mode.into(),
                ..Default::default()
            })
            .await
            .expect_err("locked");
        assert_eq!(e.code(), Code::FailedPrecondition, "{mode}: {e:?}");
        assert!(e.message().contains("retention-locked"), "{mode}: {e:?}");
    }
    let left = c
        .query_volume_backup(pb::QueryVolumeBackupRequest {
            conditions: vec![format!("groupUuid={group}")],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
        .inventories;
    assert_eq!(left.len(), 1, "the locked backup is still listed");
    let e = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            name: "bad".into(),
            system_tags: vec!["backup::retentionLock::seconds::forever".into()],
            ..Default::default()
        })
        .await
        .expect_err("bad tag");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_namespace_dedup_tells_a_writer_nothing_about_other_namespaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("store.toml");
    let (token_a, hash_a) = new_token();
    let (token_b, hash_b) = new_token();
    write_config(
        &config,
        &[
            Principal { name: "host-a", roles: r#"["writer"]"#, namespace: "host-a", hash: &hash_a },
            Principal { name: "host-b", roles: r#"["writer"]"#, namespace: "host-b", hash: &hash_b },
        ],
    );
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("dedup_scope = \"namespace\"\n{text}")).expect("config");
    let store = common::start_store_with_config(dir.path(), "store", Some(&config));
    let mut a = store_client_with(&store, Some(&token_a)).await;
    let mut b = store_client_with(&store, Some(&token_b)).await;
    assert_eq!(a.status(spb::StatusRequest {}).await.expect("status").into_inner().dedup_scope, "namespace");
    let secret = pseudo_random(77, CS);
    let s = session(&mut a).await;
    let m = upload(&mut a, &s, std::slice::from_ref(&secret)).await;
    commit(&mut a, &s, &m).await.expect("host-a commits");
    // host-b guesses the content: the store says it is missing, exactly as if host-a had
    // never stored it, and counts host-b's upload as new.
    let s = session(&mut b).await;
    let digest = vmbackup_proto::Digest::of(&secret);
    let missing = b
        .missing_chunks(spb::MissingChunksRequest { session_id: s.clone(), digests: vec![digest.0.to_vec()] })
        .await
        .expect("missing")
        .into_inner()
        .missing;
    assert_eq!(missing, vec![digest.0.to_vec()], "another namespace's chunk is reported missing");
    let up = b
        .upload_chunks(tokio_stream::iter([spb::UploadChunk {
            session_id: s.clone(),
            digest: digest.0.to_vec(),
            blob: vmbackup_proto::blob::encode(&secret, 1).expect("encode").into(),
        }]))
        .await
        .expect("upload")
        .into_inner();
    assert_eq!((up.chunks_stored, up.chunks_already_present), (1, 0), "the reply does not reveal host-a's chunk");
}
