//! The chunk store's namespace, retention and append-only rules, on a real directory:
//! groups are filed into the committing session's namespace, a retention lock refuses
//! delete until it expires and is only extended, an index is written once, and the
//! per-namespace dedup scope answers as if no other namespace existed.

use std::time::Duration;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_proto::manifest::GroupManifest;
use vmbackup_store::chunk_store::{ChunkStore, DedupScope};
use vmbackup_store::error::ErrorKind;
use vmbackup_store::group_meta::unix_now;
use vmbackup_store::sessions::SessionOwner;

const CS: u32 = 64 << 10;

mod common;

use common::uuid;

fn owner(ns: &str) -> SessionOwner {
    SessionOwner { principal: format!("p-{ns}"), namespace: ns.into() }
}

fn session(s: &ChunkStore, ns: &str) -> String {
    s.sessions().open("test", owner(ns), Duration::ZERO).expect("open session").0
}

/// Uploads one chunk of `seed` bytes (if missing) and an index naming it; returns the
/// manifest, whether MissingChunks called it missing, and whether the upload was new.
fn group(s: &ChunkStore, session: &str, seed: u8) -> (String, Vec<u8>, bool, bool) {
    let c: Vec<u8> = (0..CS).map(|i| seed ^ i.to_le_bytes()[0]).collect();
    let d = Digest::of(&c);
    let missing = !s.missing(session, &[d]).expect("missing").is_empty();
    let new = s.insert_chunk(session, &d, &blob::encode(&c, 1).expect("encode")).expect("insert");
    let mut ix = VolumeIndex::new([1; 16], u64::from(CS), CS, VolumeFormat::Raw).expect("index");
    ix.digests[0] = d;
    let vb = uuid();
    let index_name = format!("{vb}.vidx");
    let digest = s.put_index(session, &index_name, &ix.encode()).expect("put index");
    let m = common::one_volume_manifest(vb, index_name, &digest, ix.virtual_size, CS);
    let g = m.group_uuid.clone();
    (g, m.encode().expect("manifest"), missing, new)
}

#[test]
fn groups_are_filed_into_the_sessions_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    let a = session(&s, "host-a");
    let (g, m, _, _) = group(&s, &a, 1);
    s.commit_group(&a, &m, 0).expect("commit");
    let stored = s.get_group(&g).expect("get");
    assert_eq!(stored.meta.namespace, "host-a");
    let index = &stored.manifest.volumes[0].index_name;
    assert_eq!(s.index_namespace(index).expect("lookup").as_deref(), Some("host-a"));
    // The same manifest committed from another namespace is not a way to adopt the group.
    let b = session(&s, "host-b");
    let e = s.commit_group(&b, &m, 0).expect_err("other namespace");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(s.get_group(&g).expect("get").meta.namespace, "host-a");
}

#[test]
fn an_index_is_written_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    let a = session(&s, "host-a");
    let (g, m, _, _) = group(&s, &a, 2);
    s.commit_group(&a, &m, 0).expect("commit");
    let name = s.get_group(&g).expect("get").manifest.volumes[0].index_name.clone();
    let before = s.get_index(&name).expect("index");
    let other = VolumeIndex::new([2; 16], u64::from(CS), CS, VolumeFormat::Raw).expect("index").encode();
    let e = s.put_index(&a, &name, &other).expect_err("overwrite");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    s.put_index(&a, &name, &before).expect("the same bytes again is a no-op");
    assert_eq!(s.get_index(&name).expect("index"), before);
}

#[test]
fn a_retention_lock_refuses_delete_until_it_expires_and_only_grows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    let a = session(&s, "host-a");
    let (g, m, _, _) = group(&s, &a, 3);
    let until = unix_now() + 2;
    s.commit_group(&a, &m, until).expect("commit");
    let e = s.delete_group(&g).expect_err("locked");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("retention-locked"), "{e}");
    let e = s.set_retention(&g, until - 1).expect_err("shorten");
    assert!(e.to_string().contains("only ever extended"), "{e}");
    // GC keeps every chunk of the locked group.
    let gc = s.garbage_collect(Duration::ZERO).expect("gc");
    assert_eq!(gc.chunks_removed, 0);
    s.set_retention(&g, until + 1).expect("extend");
    assert_eq!(s.get_group(&g).expect("get").meta.retain_until, until + 1);
    std::thread::sleep(Duration::from_secs(4));
    s.delete_group(&g).expect("delete after expiry");
    assert_eq!(s.get_group(&g).expect_err("gone").kind(), ErrorKind::NotFound);
}

#[test]
fn the_default_retention_applies_to_every_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open").with_default_retention(Some(Duration::from_secs(3600)));
    let a = session(&s, "host-a");
    let (g, m, _, _) = group(&s, &a, 4);
    s.commit_group(&a, &m, 0).expect("commit");
    let lock = s.get_group(&g).expect("get").meta.retain_until;
    assert!(lock >= unix_now() + 3500, "default lock applied: {lock}");
    assert!(s.delete_group(&g).is_err());
}

#[test]
fn per_namespace_dedup_answers_as_if_other_namespaces_did_not_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open").with_dedup_scope(DedupScope::Namespace);
    let a = session(&s, "host-a");
    let (_, m, missing, new) = group(&s, &a, 5);
    assert!(missing && new);
    s.commit_group(&a, &m, 0).expect("commit");
    // host-b holds the same content: it is told the chunk is missing, and its upload counts
    // as new, exactly as if host-a had never stored it.
    let b = session(&s, "host-b");
    let (_, m_b, missing, new) = group(&s, &b, 5);
    assert!(missing, "another namespace's chunk is reported missing");
    assert!(new, "the upload reply does not reveal the other namespace's chunk");
    s.commit_group(&b, &m_b, 0).expect("commit");
    // A third namespace cannot commit a manifest naming the chunk without uploading it.
    let c = session(&s, "host-c");
    let (_, _, _, _) = group(&s, &c, 6);
    let mut forged = GroupManifest::decode(&m).expect("decode");
    forged.group_uuid = uuid();
    let e = s.commit_group(&c, &forged.encode().expect("encode"), 0).expect_err("not uploaded by host-c");
    assert!(e.to_string().contains("is not in the store"), "{e}");
    // In the store-wide scope the same question is answered "present".
    let dir2 = tempfile::tempdir().expect("tempdir");
    let wide = ChunkStore::open(dir2.path(), CS).expect("open");
    let a = session(&wide, "host-a");
    group(&wide, &a, 7);
    let b = session(&wide, "host-b");
    let (_, _, missing, _) = group(&wide, &b, 7);
    assert!(!missing, "store-wide dedup reuses another namespace's chunk");
}
