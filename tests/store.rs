//! vmbackup-store as a process: chunks streamed in and out over gRPC, groups committed,
//! every kind of bad input refused without changing anything, SIGKILL at random points
//! during concurrent uploads and commits, and a full disk.

mod common;

use std::time::Duration;

use common::{Daemon, StoreClient, pseudo_random, start_store, store_client};
use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_proto::manifest::GroupManifest;
use vmbackup_proto::store::v1 as pb;

use common::store_calls::{CS, CS_U32, CS_U64, commit, one_volume_manifest, session, upload, uuid};

async fn download(c: &mut StoreClient, m: &GroupManifest) -> Vec<Vec<u8>> {
    let ix = c
        .get_index(pb::GetIndexRequest { name: m.volumes[0].index_name.clone() })
        .await
        .expect("index")
        .into_inner()
        .data;
    let ix = VolumeIndex::decode(&ix, 1 << 20).expect("decode index");
    let mut s = c
        .download_chunks(pb::DownloadChunksRequest {
            digests: ix.digests.iter().map(|d| d.0.to_vec()).collect(),
            index_name: String::new(),
        })
        .await
        .expect("download")
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.expect("chunk") {
        let d = Digest::from_slice(&chunk.digest).expect("digest");
        out.push(blob::decode_and_verify(&chunk.blob, &d, CS).expect("valid chunk"));
    }
    out
}

async fn status(c: &mut StoreClient) -> pb::StatusReply {
    c.status(pb::StatusRequest {}).await.expect("status").into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_stream_in_and_out_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let mut c = store_client(&store).await;
    let s = session(&mut c).await;
    let chunks: Vec<Vec<u8>> = (0..40).map(|i| pseudo_random(i % 30, CS)).collect();
    let m = upload(&mut c, &s, &chunks).await;
    let info = commit(&mut c, &s, &m).await.expect("commit");
    assert_eq!(info.group_uuid, m.group_uuid);
    assert_eq!(download(&mut c, &m).await, chunks);
    let st = status(&mut c).await;
    let counters = st.counters.expect("counters");
    assert_eq!((counters.chunks_uploaded, st.group_count), (30, 1), "{counters:?}");

    // A second group of the same data uploads nothing.
    let m2 = upload(&mut c, &s, &chunks).await;
    commit(&mut c, &s, &m2).await.expect("commit");
    let counters = status(&mut c).await.counters.expect("counters");
    // Every one of the 40 digests asked (30 distinct) is reported present.
    assert_eq!((counters.chunks_uploaded, counters.chunks_reported_present), (30, 40));
    let groups = c.list_groups(pb::ListGroupsRequest {}).await.expect("list").into_inner().groups;
    assert_eq!(groups.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let mut c = store_client(&store).await;
    let s = session(&mut c).await;
    let good = upload(&mut c, &s, &[pseudo_random(1, CS)]).await;
    commit(&mut c, &s, &good).await.expect("commit");
    let before = status(&mut c).await;

    // Chunk poisoning: bytes that do not hash to the claimed digest.
    let claimed = Digest::of(&pseudo_random(2, CS));
    let e = c
        .upload_chunks(tokio_stream::iter([pb::UploadChunk {
            session_id: s.clone(),
            digest: claimed.0.to_vec(),
            blob: blob::encode(&pseudo_random(3, CS), 1).expect("encode").into(),
        }]))
        .await
        .expect_err("poison");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains(&claimed.to_hex()), "{e:?}");

    // A truncated blob.
    let plain = pseudo_random(4, CS);
    let b = blob::encode(&plain, 0).expect("encode");
    let e = c
        .upload_chunks(tokio_stream::iter([pb::UploadChunk {
            session_id: s.clone(),
            digest: Digest::of(&plain).0.to_vec(),
            blob: b[..b.len() / 2].to_vec().into(),
        }]))
        .await
        .expect_err("truncated");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // A digest of the wrong length.
    let e = c
        .missing_chunks(pb::MissingChunksRequest { session_id: s.clone(), digests: vec![vec![1; 31]] })
        .await
        .expect_err("short digest");
    assert!(e.message().contains("digests[0]"), "{e:?}");

    // An oversized message: the client lets it out, the store refuses it.
    let mut big = pb::image_store_client::ImageStoreClient::new(common::channel(&store.url()).await)
        .max_encoding_message_size(128 << 20);
    let e = big
        .put_index(pb::PutIndexRequest {
            session_id: s.clone(),
            name: format!("{}.vidx", uuid()),
            data: vec![0; 65 << 20],
        })
        .await
        .expect_err("oversized");
    assert!(matches!(e.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange), "{e:?}");

    // An index in pieces that stops short of its total_len, or goes past it, stores nothing.
    let name = format!("{}.vidx", uuid());
    let encoded: bytes::Bytes =
        VolumeIndex::new([8; 16], 3 << 20, CS_U32, VolumeFormat::Raw).expect("index").encode().into();
    let mut pieces = vmbackup_proto::pieces::split(encoded.clone(), &s, &name);
    pieces[0].total_len += 1;
    let e = c.put_index_stream(tokio_stream::iter(pieces)).await.expect_err("short");
    assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("total_len"), "{e:?}");
    let mut pieces = vmbackup_proto::pieces::split(encoded.clone(), &s, &name);
    pieces[0].total_len -= 1;
    let e = c.put_index_stream(tokio_stream::iter(pieces)).await.expect_err("long");
    assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("total_len"), "{e:?}");
    let e = c.get_index_stream(pb::GetIndexRequest { name: name.clone() }).await.expect_err("nothing stored");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // Whole, it is stored, and reads back in pieces as the same bytes.
    c.put_index_stream(tokio_stream::iter(vmbackup_proto::pieces::split(encoded.clone(), &s, &name)))
        .await
        .expect("index in pieces");
    let mut back = vmbackup_proto::pieces::Assembler::default();
    let mut down = c.get_index_stream(pb::GetIndexRequest { name }).await.expect("read back").into_inner();
    while let Some(p) = down.message().await.expect("piece") {
        back.push(p).expect("well-formed piece");
    }
    assert_eq!(back.finish().expect("whole"), encoded.to_vec());

    // A commit naming a chunk that was never uploaded.
    let mut ix = VolumeIndex::new([9; 16], CS_U64, CS_U32, VolumeFormat::Raw).expect("index");
    let absent = Digest::of(&pseudo_random(5, CS));
    ix.digests[0] = absent;
    let mut bad = good.clone();
    bad.group_uuid = uuid();
    bad.volumes[0].volume_backup_uuid = uuid();
    bad.volumes[0].index_name = format!("{}.vidx", bad.volumes[0].volume_backup_uuid);
    bad.volumes[0].index_digest = c
        .put_index(pb::PutIndexRequest {
            session_id: s.clone(),
            name: bad.volumes[0].index_name.clone(),
            data: ix.encode(),
        })
        .await
        .expect("index")
        .into_inner()
        .digest;
    let e = commit(&mut c, &s, &bad).await.expect_err("missing chunk");
    assert!(e.message().contains(&absent.to_hex()), "{e:?}");

    // Unknown group, path traversal, unknown session.
    let e = c.get_group(pb::GetGroupRequest { group_uuid: uuid() }).await.expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c.get_index(pb::GetIndexRequest { name: "../store.json".into() }).await.expect_err("traversal");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c.delete_group(pb::DeleteGroupRequest { group_uuid: "../../x".into() }).await.expect_err("traversal");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .missing_chunks(pb::MissingChunksRequest { session_id: "nope".into(), digests: vec![] })
        .await
        .expect_err("session");
    assert_eq!(e.code(), tonic::Code::NotFound);

    let after = status(&mut c).await;
    assert_eq!(after.group_count, before.group_count);
    let (b, a) = (before.counters.expect("c"), after.counters.expect("c"));
    assert_eq!(a.chunks_uploaded, b.chunks_uploaded, "nothing stored");
    assert_eq!(a.chunks_rejected, b.chunks_rejected + 2);
    assert_eq!(download(&mut c, &good).await, vec![pseudo_random(1, CS)], "earlier group intact");
    assert!(!store.log_text().contains("panicked"));
}

fn files_in(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() { out.extend(files_in(&path)) } else { out.push(path) }
        }
    }
    out
}

/// One writer: repeatedly uploads a group of fresh and shared chunks and commits it,
/// recording what it sent for commit and what was acknowledged.
async fn writer(
    url: String,
    token: String,
    id: u64,
    sent: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<GroupManifest>>>,
) {
    let Ok(ch) = tonic::transport::Channel::from_shared(url).expect("url").connect().await else { return };
    let mut c =
        pb::image_store_client::ImageStoreClient::with_interceptor(ch, common::Auth(Some(format!("Bearer {token}"))))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
    for round in 0u64.. {
        let Ok(s) = c.open_session(pb::OpenSessionRequest { client: format!("w{id}"), ttl_seconds: 0 }).await else {
            return;
        };
        let s = s.into_inner().session_id;
        let chunks: Vec<Vec<u8>> =
            (0..8).map(|i| pseudo_random(if i < 2 { i } else { id * 1_000_000 + round * 10 + i }, CS)).collect();
        let result = std::panic::AssertUnwindSafe(async {
            let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
            let uploads: Vec<pb::UploadChunk> = chunks
                .iter()
                .zip(&digests)
                .map(|(c, d)| pb::UploadChunk {
                    session_id: s.clone(),
                    digest: d.0.to_vec(),
                    blob: blob::encode(c, 1).expect("encode").into(),
                })
                .collect();
            c.upload_chunks(tokio_stream::iter(uploads)).await?;
            let mut ix = VolumeIndex::new([9; 16], CS_U64 * 8, CS_U32, VolumeFormat::Raw).expect("index");
            ix.digests.copy_from_slice(&digests);
            let vb = uuid();
            let name = format!("{vb}.vidx");
            let digest = c
                .put_index(pb::PutIndexRequest { session_id: s.clone(), name: name.clone(), data: ix.encode() })
                .await?
                .into_inner()
                .digest;
            let m = one_volume_manifest(vb, name, digest, ix.virtual_size);
            sent.lock().expect("lock").push(m.group_uuid.clone());
            c.commit_group(pb::CommitGroupRequest {
                session_id: s.clone(),
                manifest: m.encode().expect("encode"),
                retain_until: 0,
            })
            .await?;
            acked.lock().expect("lock").push(m);
            Ok::<(), tonic::Status>(())
        })
        .await;
        if result.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_no_committed_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = start_store(dir.path(), "store");
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<GroupManifest>::new()));
    let mut rng = 0x1234_5678_u64;
    for point in 0..24 {
        let writers: Vec<_> = (0..3)
            .map(|w| {
                tokio::spawn(writer(
                    store.url(),
                    common::store_token(&store),
                    point * 10 + w,
                    sent.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(20 + rng % 250)).await;
        store.kill();
        for w in writers {
            let _ = w.await;
        }
        check_after_crash(&mut store, &sent, &acked, point).await;
    }
    assert!(acked.lock().expect("lock").len() >= 10, "the writers committed too little to prove anything");
}

async fn check_after_crash(
    store: &mut Daemon,
    sent: &std::sync::Mutex<Vec<String>>,
    acked: &std::sync::Mutex<Vec<GroupManifest>>,
    point: u64,
) {
    let tmp = files_in(&store.data_dir.join("tmp"));
    store.restart();
    assert!(
        files_in(&store.data_dir.join("tmp")).is_empty(),
        "point {point}: temp files left after restart (before: {tmp:?})"
    );
    let mut c = store_client(store).await;
    let visible: Vec<String> = c
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list")
        .into_inner()
        .groups
        .into_iter()
        .map(|g| g.group_uuid)
        .collect();
    let sent = sent.lock().expect("lock").clone();
    for g in &visible {
        assert!(sent.contains(g), "point {point}: group {g} is visible but was never sent for commit");
    }
    let acked = acked.lock().expect("lock").clone();
    for m in &acked {
        assert!(visible.contains(&m.group_uuid), "point {point}: committed group {} lost", m.group_uuid);
    }
    let v = c.verify(pb::VerifyRequest { group_uuids: vec![] }).await.expect("verify").into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "point {point}: {v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn full_disk_is_resource_exhausted_and_recoverable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .output()
        .expect("mount: run the tests as root on Linux");
    assert!(
        out.status.success(),
        "mounting a 3 MiB tmpfs failed (tests need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());

    let store = start_store(&mnt, "store");
    let mut c = store_client(&store).await;
    let s = session(&mut c).await;
    let first = upload(&mut c, &s, &[pseudo_random(100, CS), pseudo_random(101, CS)]).await;
    commit(&mut c, &s, &first).await.expect("commit while there is room");

    // Random (incompressible) chunks until the filesystem is full.
    let mut seed = 1000;
    let err = loop {
        let chunk = pseudo_random(seed, CS);
        seed += 1;
        let r = c
            .upload_chunks(tokio_stream::iter([pb::UploadChunk {
                session_id: s.clone(),
                digest: Digest::of(&chunk).0.to_vec(),
                blob: blob::encode(&chunk, 1).expect("encode").into(),
            }]))
            .await;
        if let Err(e) = r {
            break e;
        }
        assert!(seed < 1200, "3 MiB filesystem never filled");
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(files_in(&store.data_dir.join("tmp")).is_empty(), "a failed write leaves no temp file");
    assert_eq!(download(&mut c, &first).await.len(), 2, "earlier group intact");

    // Free space by deleting what the failed backup left behind (GC), then write again.
    let gc = c.garbage_collect(pb::GarbageCollectRequest { safety_margin_seconds: Some(0) }).await;
    drop(gc);
    c.close_session(pb::CloseSessionRequest { session_id: s.clone() }).await.expect("close");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let gc =
        c.garbage_collect(pb::GarbageCollectRequest { safety_margin_seconds: Some(0) }).await.expect("gc").into_inner();
    assert!(gc.chunks_removed > 0, "{gc:?}");
    let s = session(&mut c).await;
    let again = upload(&mut c, &s, &[pseudo_random(200, CS)]).await;
    commit(&mut c, &s, &again).await.expect("the store serves again once space is freed");
}

#[tokio::test(flavor = "multi_thread")]
async fn vmbackupctl_reports_status_groups_gc_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let mut c = store_client(&store).await;
    let s = session(&mut c).await;
    let m = upload(&mut c, &s, &[pseudo_random(7, CS)]).await;
    commit(&mut c, &s, &m).await.expect("commit");
    let ctl = |args: &[&str]| {
        std::process::Command::new(common::bin("vmbackupctl"))
            .arg("store")
            .arg("--store")
            .arg(store.url())
            .arg("--token-file")
            .arg(store.data_dir.join("admin.token"))
            .args(args)
            .output()
            .expect("run")
    };
    let out = ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("STORE UUID") && text.contains("64.0 KiB"), "{text}");
    assert!(text.contains("local-admin (admin; namespace *)"), "{text}");
    let out = ctl(&["groups"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&m.group_uuid));
    let out = ctl(&["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 bad, 0 damaged groups"));
    let until = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let out = ctl(&["retain", &m.group_uuid, "--until", &until.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ctl(&["groups"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&until.to_string()), "the lock is listed");
    let out = ctl(&["delete", &m.group_uuid]);
    assert!(!out.status.success(), "a locked group is not deleted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("retention-locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(common::bin("vmbackupctl"))
        .args(["--json", "store", "--store", &store.url(), "--token-file"])
        .arg(store.data_dir.join("admin.token"))
        .args(["gc", "--safety-margin-seconds", "0"])
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // The session is still open, so its chunk is kept (pbjson writes u64 as a string).
    assert_eq!(v["chunksKept"], "1", "{v}");
    assert_eq!(v["chunksRemoved"], "0", "nothing removed, and the field is there: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_only_the_services_the_store_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let names = common::reflected_services(&store.url()).await;
    assert_eq!(names, ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "vmbackup.store.v1.ImageStore"]);
}
