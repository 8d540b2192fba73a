//! The chunk store library against a real directory: uploads are checked, commits are all
//! or nothing, GC removes exactly what no committed index names (never what an open session
//! reuses), and verify moves damaged chunks aside and flags their groups.

use std::time::Duration;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_proto::manifest::{FORMAT_VERSION, GroupManifest, VolumeEntry};
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::error::ErrorKind;

const CS: u32 = 64 << 10;

fn store() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    (dir, s)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn chunk(seed: u8) -> Vec<u8> {
    (0..CS).map(|i| seed.wrapping_add(i.to_le_bytes()[0]).wrapping_mul(31)).collect()
}

/// Uploads `chunks` in a session and returns the manifest bytes of a one-volume group.
fn upload_group(s: &ChunkStore, session: &str, chunks: &[Vec<u8>]) -> (String, Vec<u8>) {
    let mut ix = VolumeIndex::new([1; 16], u64::from(CS) * chunks.len() as u64, CS, VolumeFormat::Raw).expect("index");
    for (i, c) in chunks.iter().enumerate() {
        let d = Digest::of(c);
        ix.digests[i] = d;
        if !s.missing(session, &[d]).expect("missing").is_empty() {
            s.insert_chunk(session, &d, &blob::encode(c, 1).expect("encode")).expect("insert");
        }
    }
    let vb = uuid();
    let index_name = format!("{vb}.vidx");
    let encoded = ix.encode();
    let digest = s.put_index(session, &index_name, &encoded).expect("put index");
    let group = uuid();
    let m = GroupManifest {
        format_version: FORMAT_VERSION,
        group_uuid: group.clone(),
        vm_uuid: uuid(),
        name: "b".into(),
        description: String::new(),
        system_tags: vec![],
        user_tags: vec![],
        created: 1,
        chunk_size: CS,
        volumes: vec![VolumeEntry {
            volume_backup_uuid: vb,
            volume_uuid: uuid(),
            name: "root".into(),
            kind: "Root".into(),
            device_id: 0,
            virtual_size: ix.virtual_size,
            format: "raw".into(),
            index_name,
            index_digest: digest.to_hex(),
            stored_bytes: 0,
            deduplicated_bytes: 0,
        }],
    };
    (group, m.encode().expect("manifest"))
}

#[test]
fn upload_commit_download_round_trip() {
    let (_d, s) = store();
    let (session, _) = s.sessions().open("test", Duration::ZERO);
    let chunks = vec![chunk(1), chunk(2), chunk(1)];
    let (group, manifest) = upload_group(&s, &session, &chunks);
    s.commit_group(&session, &manifest).expect("commit");
    s.commit_group(&session, &manifest).expect("committing the same manifest again is a no-op");
    let g = s.get_group(&group).expect("get");
    assert!(!g.damaged);
    let ix =
        VolumeIndex::decode(&s.get_index(&g.manifest.volumes[0].index_name).expect("index"), 1000).expect("decode");
    for (i, d) in ix.digests.iter().enumerate() {
        let plain = blob::decode_and_verify(&s.get_chunk(d).expect("chunk"), d, CS as usize).expect("valid");
        assert_eq!(plain, chunks[i]);
    }
    assert_eq!(
        s.counters().chunks_uploaded.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the repeated chunk is stored once"
    );
    assert_eq!(s.list_groups().expect("list").len(), 1);
}

#[test]
fn poisoned_and_malformed_uploads_store_nothing() {
    let (dir, s) = store();
    let (session, _) = s.sessions().open("test", Duration::ZERO);
    let real = chunk(3);
    let claimed = Digest::of(&chunk(4));
    let e = s.insert_chunk(&session, &claimed, &blob::encode(&real, 1).expect("encode")).expect_err("poison");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains(&claimed.to_hex()), "{e}");
    let good = blob::encode(&real, 0).expect("encode");
    let e = s.insert_chunk(&session, &Digest::of(&real), &good[..good.len() - 1]).expect_err("truncated");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let big = vec![7u8; CS as usize + 1];
    let e = s.insert_chunk(&session, &Digest::of(&big), &blob::encode(&big, 0).expect("encode")).expect_err("too big");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(
        s.insert_chunk("no-such-session", &Digest::of(&real), &good).expect_err("session").kind(),
        ErrorKind::NotFound
    );
    let stored = walk(&dir.path().join("chunks"));
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).expect("dir") {
        let e = e.expect("entry").path();
        if e.is_dir() { out.extend(walk(&e)) } else { out.push(e) }
    }
    out
}

#[test]
fn commit_needs_every_chunk_and_index() {
    let (_d, s) = store();
    let (session, _) = s.sessions().open("test", Duration::ZERO);
    let (group, manifest) = upload_group(&s, &session, &[chunk(5)]);
    let mut m = GroupManifest::decode(&manifest).expect("decode");

    // A chunk the index names was never uploaded.
    let missing = chunk(6);
    let mut ix = VolumeIndex::new([1; 16], u64::from(CS), CS, VolumeFormat::Raw).expect("index");
    ix.digests[0] = Digest::of(&missing);
    let bytes = ix.encode();
    let d = s.put_index(&session, &m.volumes[0].index_name, &bytes).expect("replace index");
    m.volumes[0].index_digest = d.to_hex();
    let e = s.commit_group(&session, &m.encode().expect("encode")).expect_err("missing chunk");
    assert!(e.to_string().contains(&Digest::of(&missing).to_hex()), "{e}");

    // An index that was never uploaded.
    m.volumes[0].index_name = format!("{}.vidx", uuid());
    let e = s.commit_group(&session, &m.encode().expect("encode")).expect_err("missing index");
    assert!(e.to_string().contains("never uploaded"), "{e}");
    assert_eq!(s.get_group(&group).expect_err("not visible").kind(), ErrorKind::NotFound);
    assert!(s.list_groups().expect("list").is_empty());

    assert_eq!(s.delete_group(&uuid()).expect_err("unknown").kind(), ErrorKind::NotFound);
    assert_eq!(s.get_group("../../etc/passwd").expect_err("traversal").kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.get_index("../store.json").expect_err("traversal").kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.put_index(&session, "../x.vidx", &bytes).expect_err("traversal").kind(), ErrorKind::InvalidArgument);
}

#[test]
fn gc_removes_exactly_the_unreferenced_chunks() {
    let (_d, s) = store();
    let (session, _) = s.sessions().open("test", Duration::ZERO);
    let (keep, manifest) = upload_group(&s, &session, &[chunk(10), chunk(11)]);
    s.commit_group(&session, &manifest).expect("commit");
    let (gone, manifest) = upload_group(&s, &session, &[chunk(11), chunk(12)]);
    s.commit_group(&session, &manifest).expect("commit");
    s.sessions().close(&session);
    s.delete_group(&gone).expect("delete");
    std::thread::sleep(Duration::from_millis(20));
    let r = s.garbage_collect(Duration::ZERO).expect("gc");
    assert_eq!((r.chunks_removed, r.chunks_kept), (1, 2), "{r:?}");
    let r = s.verify(&[]).expect("verify");
    assert!(r.bad_chunks.is_empty() && r.damaged_groups.is_empty(), "{r:?}");
    assert!(!s.get_group(&keep).expect("kept").damaged);
}

#[test]
fn gc_never_sweeps_what_an_open_session_reuses() {
    let (_d, s) = store();
    // An old, unreferenced chunk: uploaded by a session whose group was deleted.
    let (old_session, _) = s.sessions().open("old", Duration::ZERO);
    let (old_group, manifest) = upload_group(&s, &old_session, &[chunk(20)]);
    s.commit_group(&old_session, &manifest).expect("commit");
    s.sessions().close(&old_session);
    s.delete_group(&old_group).expect("delete");
    std::thread::sleep(Duration::from_millis(20));

    // A new session learns it is present (so will not upload it) ...
    let (session, _) = s.sessions().open("new", Duration::ZERO);
    assert!(s.missing(&session, &[Digest::of(&chunk(20))]).expect("missing").is_empty());
    // ... GC runs meanwhile ...
    let r = s.garbage_collect(Duration::ZERO).expect("gc");
    assert_eq!(r.chunks_removed, 0, "{r:?}");
    // ... and the session's group, which reuses it, commits and verifies clean.
    let (group, manifest) = upload_group(&s, &session, &[chunk(20), chunk(21)]);
    s.commit_group(&session, &manifest).expect("commit");
    let r = s.verify(std::slice::from_ref(&group)).expect("verify");
    assert!(r.bad_chunks.is_empty() && r.damaged_groups.is_empty(), "{r:?}");
}

#[test]
fn verify_quarantines_a_corrupted_chunk_and_flags_its_group() {
    let (dir, s) = store();
    let (session, _) = s.sessions().open("test", Duration::ZERO);
    let (group, manifest) = upload_group(&s, &session, &[chunk(30), chunk(31)]);
    s.commit_group(&session, &manifest).expect("commit");
    let victim = Digest::of(&chunk(31));
    let hex = victim.to_hex();
    let path = dir.path().join("chunks").join(&hex[..4]).join(&hex);
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, bytes).expect("corrupt");

    let r = s.verify(&[]).expect("verify");
    assert_eq!(r.bad_chunks, vec![victim]);
    assert_eq!(r.damaged_groups, vec![group.clone()]);
    assert!(!path.exists(), "moved out of the store");
    assert_eq!(std::fs::read_dir(dir.path().join("bad")).expect("bad").count(), 1, "kept aside");
    assert!(s.get_group(&group).expect("group").damaged);

    // Uploading the chunk again repairs the group; a verify clears the flag.
    let (session, _) = s.sessions().open("repair", Duration::ZERO);
    assert_eq!(s.missing(&session, &[victim]).expect("missing"), vec![victim]);
    s.insert_chunk(&session, &victim, &blob::encode(&chunk(31), 1).expect("encode")).expect("re-upload");
    let r = s.verify(std::slice::from_ref(&group)).expect("verify");
    assert!(r.damaged_groups.is_empty(), "{r:?}");
    assert!(!s.get_group(&group).expect("group").damaged);
}
