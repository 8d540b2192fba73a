//! The chunk store library against a real directory: uploads are checked, commits are all
//! or nothing, GC removes exactly what no committed index names (never what an open session
//! reuses), and verify moves damaged chunks aside and flags their groups (concurrent
//! verifies keep each other's flags).

use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_proto::manifest::GroupManifest;
use vmbackup_store::backend::fs::FsBackend;
use vmbackup_store::backend::{Backend, ChunkInfo, ObjectInfo, ObjectKind};
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::error::{ErrorKind, Result};
use vmbackup_store::identity::StoreIdentity;
use vmbackup_store::sessions::SessionOwner;

const CS: u32 = 64 << 10;

fn store() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    (dir, s)
}

mod common;

use common::uuid;

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
    let m = common::one_volume_manifest(vb, index_name, &digest, ix.virtual_size, CS);
    let group = m.group_uuid.clone();
    (group, m.encode().expect("manifest"))
}

#[test]
fn upload_commit_download_round_trip() {
    let (_d, s) = store();
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    let chunks = vec![chunk(1), chunk(2), chunk(1)];
    let (group, manifest) = upload_group(&s, &session, &chunks);
    s.commit_group(&session, &manifest, 0).expect("commit");
    s.commit_group(&session, &manifest, 0).expect("committing the same manifest again is a no-op");
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
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
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

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
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
fn sealed_chunks_are_accepted_only_under_the_name_their_header_derives() {
    use vmbackup_proto::seal::ChunkKey;
    let (dir, s) = store();
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    let key = Arc::new(ChunkKey::new(&[9u8; 32]));
    let plain = chunk(7);
    let mut enc = blob::Encoder::with_key(1, Some(key.clone())).expect("encoder");
    let name = enc.name(&plain);
    let sealed = enc.encode_named(&plain, &name).expect("seal");
    // Under the plain chunk's name (planting): refused, nothing stored.
    let e = s.insert_chunk(&session, &Digest::of(&plain), &sealed).expect_err("planted");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("not stored under its name"), "{e}");
    assert!(walk(&dir.path().join("chunks")).is_empty());
    // Under its own name: accepted with the store's default settings.
    assert!(s.insert_chunk(&session, &name.digest, &sealed).expect("sealed chunk"), "new");
    assert!(s.missing(&session, &[Digest::of(&plain)]).expect("missing").len() == 1, "the plain name is free");

    // A version-2 sealed blob (named by its bare keyed hash, which a store cannot check) is
    // refused unless the store is told to accept them, and then stored.
    let v2 = hex(
        "564d424b43484e4b0200010003000000130000004098020725b5623c53f732fb0ef5278f2de3145a000102030405060708090a0b8c5b97f0422b69a776be17ea952573ecfc01e2",
    );
    let v2_name = ChunkKey::new(&[7u8; 32]).keyed_hash(b"abc");
    let e = s.insert_chunk(&session, &v2_name, &v2).expect_err("version 2 refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("accept_sealed_chunks"), "{e}");
    let legacy = ChunkStore::open(dir.path(), CS).expect("open").with_sealed_chunks(true);
    let (session, _) = legacy.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    assert!(legacy.insert_chunk(&session, &v2_name, &v2).expect("accepted when told"));
}

#[test]
fn commit_needs_every_chunk_and_index() {
    let (_d, s) = store();
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    let (group, manifest) = upload_group(&s, &session, &[chunk(5)]);
    let mut m = GroupManifest::decode(&manifest).expect("decode");

    // A chunk the index names was never uploaded.
    let missing = chunk(6);
    let mut ix = VolumeIndex::new([1; 16], u64::from(CS), CS, VolumeFormat::Raw).expect("index");
    ix.digests[0] = Digest::of(&missing);
    let bytes = ix.encode();
    m.volumes[0].index_name = format!("{}.vidx", uuid());
    let d = s.put_index(&session, &m.volumes[0].index_name, &bytes).expect("another index");
    m.volumes[0].index_digest = d.to_hex();
    let e = s.commit_group(&session, &m.encode().expect("encode"), 0).expect_err("missing chunk");
    assert!(e.to_string().contains(&Digest::of(&missing).to_hex()), "{e}");

    // An index that was never uploaded.
    m.volumes[0].index_name = format!("{}.vidx", uuid());
    let e = s.commit_group(&session, &m.encode().expect("encode"), 0).expect_err("missing index");
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
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    let (keep, manifest) = upload_group(&s, &session, &[chunk(10), chunk(11)]);
    s.commit_group(&session, &manifest, 0).expect("commit");
    let (gone, manifest) = upload_group(&s, &session, &[chunk(11), chunk(12)]);
    s.commit_group(&session, &manifest, 0).expect("commit");
    s.sessions().close(&session).expect("close session");
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
    let (old_session, _) = s.sessions().open("old", SessionOwner::local(), Duration::ZERO).expect("open session");
    let (old_group, manifest) = upload_group(&s, &old_session, &[chunk(20)]);
    s.commit_group(&old_session, &manifest, 0).expect("commit");
    s.sessions().close(&old_session).expect("close session");
    s.delete_group(&old_group).expect("delete");
    std::thread::sleep(Duration::from_millis(20));

    // A new session learns it is present (so will not upload it) ...
    let (session, _) = s.sessions().open("new", SessionOwner::local(), Duration::ZERO).expect("open session");
    assert!(s.missing(&session, &[Digest::of(&chunk(20))]).expect("missing").is_empty());
    // ... GC runs meanwhile ...
    let r = s.garbage_collect(Duration::ZERO).expect("gc");
    assert_eq!(r.chunks_removed, 0, "{r:?}");
    // ... and the session's group, which reuses it, commits and verifies clean.
    let (group, manifest) = upload_group(&s, &session, &[chunk(20), chunk(21)]);
    s.commit_group(&session, &manifest, 0).expect("commit");
    let r = s.verify(std::slice::from_ref(&group)).expect("verify");
    assert!(r.bad_chunks.is_empty() && r.damaged_groups.is_empty(), "{r:?}");
}

#[test]
fn verify_quarantines_a_corrupted_chunk_and_flags_its_group() {
    let (dir, s) = store();
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    let (group, manifest) = upload_group(&s, &session, &[chunk(30), chunk(31)]);
    s.commit_group(&session, &manifest, 0).expect("commit");
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
    let (session, _) = s.sessions().open("repair", SessionOwner::local(), Duration::ZERO).expect("open session");
    assert_eq!(s.missing(&session, &[victim]).expect("missing"), vec![victim]);
    s.insert_chunk(&session, &victim, &blob::encode(&chunk(31), 1).expect("encode")).expect("re-upload");
    let r = s.verify(std::slice::from_ref(&group)).expect("verify");
    assert!(r.damaged_groups.is_empty(), "{r:?}");
    assert!(!s.get_group(&group).expect("group").damaged);
}

/// A directory backend whose damage-mark writes (`meta/` puts) wait, up to a second, until
/// a second one arrives. Two verifies that read the marks and then write them without
/// holding a lock both reach the wait having read the same old marks, so the later write
/// drops the earlier one's group: the lost update is certain, not a matter of timing. A
/// store that serialises the updates lets only one writer in; it waits out the second and
/// goes on, and the other then starts from its result.
#[derive(Debug)]
struct MetaWritesMeet {
    inner: FsBackend,
    arrived: Mutex<usize>,
    both: Condvar,
}

impl Backend for MetaWritesMeet {
    fn has_chunk(&self, d: &Digest) -> Result<bool> {
        self.inner.has_chunk(d)
    }
    fn put_chunk(&self, d: &Digest, blob: &[u8]) -> Result<bool> {
        self.inner.put_chunk(d, blob)
    }
    fn get_chunk(&self, d: &Digest) -> Result<Vec<u8>> {
        self.inner.get_chunk(d)
    }
    fn touch_chunk(&self, d: &Digest) -> Result<bool> {
        self.inner.touch_chunk(d)
    }
    fn chunk_touched(&self, d: &Digest) -> Result<Option<SystemTime>> {
        self.inner.chunk_touched(d)
    }
    fn for_each_chunk(&self, f: &mut dyn FnMut(ChunkInfo) -> Result<()>) -> Result<()> {
        self.inner.for_each_chunk(f)
    }
    fn delete_chunk(&self, d: &Digest) -> Result<()> {
        self.inner.delete_chunk(d)
    }
    fn quarantine_chunk(&self, d: &Digest) -> Result<()> {
        self.inner.quarantine_chunk(d)
    }
    fn put_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        if kind == ObjectKind::Meta {
            let mut arrived = self.arrived.lock().expect("gate");
            *arrived += 1;
            self.both.notify_all();
            let (_arrived, _timeout) =
                self.both.wait_timeout_while(arrived, Duration::from_secs(1), |n| *n < 2).expect("gate");
        }
        self.inner.put_object(kind, name, bytes)
    }
    fn create_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<bool> {
        self.inner.create_object(kind, name, bytes)
    }
    fn get_object(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        self.inner.get_object(kind, name)
    }
    fn list_objects(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        self.inner.list_objects(kind)
    }
    fn delete_object(&self, kind: ObjectKind, name: &str) -> Result<()> {
        self.inner.delete_object(kind, name)
    }
    fn capacity(&self) -> Result<(u64, u64)> {
        self.inner.capacity()
    }
    fn mark_owner(&self, ns: &str, d: &Digest) -> Result<bool> {
        self.inner.mark_owner(ns, d)
    }
    fn is_owner(&self, ns: &str, d: &Digest) -> Result<bool> {
        self.inner.is_owner(ns, d)
    }
}

#[test]
fn concurrent_verifies_of_different_groups_keep_both_damage_marks() {
    // Arrange: two committed groups, one with a chunk removed, one with a chunk corrupted.
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = StoreIdentity::open_or_create(dir.path(), CS).expect("identity");
    let backend = MetaWritesMeet {
        inner: FsBackend::open(dir.path()).expect("backend"),
        arrived: Mutex::new(0),
        both: Condvar::new(),
    };
    let s = ChunkStore::with_backend(Arc::new(backend), identity);
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("open session");
    let (removed, manifest) = upload_group(&s, &session, &[chunk(40), chunk(41)]);
    s.commit_group(&session, &manifest, 0).expect("commit");
    let (corrupted, manifest) = upload_group(&s, &session, &[chunk(42), chunk(43)]);
    s.commit_group(&session, &manifest, 0).expect("commit");
    let chunk_path = |seed: u8| {
        let hex = Digest::of(&chunk(seed)).to_hex();
        dir.path().join("chunks").join(&hex[..4]).join(hex)
    };
    std::fs::remove_file(chunk_path(41)).expect("remove a chunk");
    let mut bytes = std::fs::read(chunk_path(43)).expect("read");
    bytes[0] ^= 0x55;
    std::fs::write(chunk_path(43), bytes).expect("corrupt a chunk");

    // Act: verify each group on its own thread, both at once.
    let start = Barrier::new(2);
    let reports = std::thread::scope(|scope| {
        let run = |group: &str| {
            let (s, start, group) = (&s, &start, group.to_owned());
            scope.spawn(move || {
                start.wait();
                s.verify(std::slice::from_ref(&group))
            })
        };
        let (a, b) = (run(&removed), run(&corrupted));
        [a.join().expect("verify thread"), b.join().expect("verify thread")]
    });

    // Assert: each verify found its group, and both marks survive, in memory and on disk.
    let [a, b] = reports.map(|r| r.expect("verify"));
    assert_eq!(a.damaged_groups, vec![removed.clone()], "{a:?}");
    assert_eq!(b.damaged_groups, vec![corrupted.clone()], "{b:?}");
    let mut both = vec![removed.clone(), corrupted.clone()];
    both.sort();
    let damaged = |s: &ChunkStore| {
        // Listed oldest first, then by uuid: all were created at the same time.
        let listed: Vec<_> =
            s.list_groups().expect("list").into_iter().filter(|g| g.damaged).map(|g| g.manifest.group_uuid).collect();
        let got: Vec<_> = both.iter().filter(|g| s.get_group(g).expect("get").damaged).cloned().collect();
        (listed, got)
    };
    assert_eq!(damaged(&s), (both.clone(), both.clone()), "list and get report both groups damaged");
    drop(s);
    let reopened = ChunkStore::open(dir.path(), CS).expect("reopen");
    assert_eq!(damaged(&reopened), (both.clone(), both.clone()), "so does the store reopened");
    let file = std::fs::read(dir.path().join("meta").join("verify-state.json")).expect("marks file");
    let json: serde_json::Value = serde_json::from_slice(&file).expect("marks are JSON");
    assert_eq!(json, serde_json::json!({ "damagedGroups": both }), "both marks on disk");
}

/// Two store processes over one directory (as two servers over one bucket) commit the same
/// group uuid with different manifests at the same moment: the manifest is created once,
/// never replaced, so exactly one commit wins and the other is a conflict, many times over.
#[test]
fn racing_commits_of_one_group_never_overwrite_each_other() {
    let (dir, a) = store();
    let b = Arc::new(ChunkStore::open(dir.path(), CS).expect("second store over the same directory"));
    let a = Arc::new(a);
    for round in 0..20u8 {
        let (sa, _) = a.sessions().open("a", SessionOwner::local(), Duration::ZERO).expect("open session");
        let (sb, _) = b.sessions().open("b", SessionOwner::local(), Duration::ZERO).expect("open session");
        let (_, manifest) = upload_group(&a, &sa, &[chunk(round)]);
        let mut theirs = GroupManifest::decode(&manifest).expect("decode");
        theirs.name = "other".into();
        let theirs = theirs.encode().expect("encode");
        let barrier = Arc::new(Barrier::new(2));
        let race = |s: Arc<ChunkStore>, session: String, m: Vec<u8>| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                s.commit_group(&session, &m, 0).map(|_| m)
            })
        };
        let ta = race(a.clone(), sa, manifest.clone());
        let tb = race(b.clone(), sb, theirs.clone());
        let results = [ta.join().expect("a"), tb.join().expect("b")];
        let won: Vec<&Vec<u8>> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one commit wins: {results:?}");
        let lost = results.iter().find_map(|r| r.as_ref().err()).expect("one loses");
        assert_eq!(lost.kind(), ErrorKind::Conflict, "{lost}");
        let group = GroupManifest::decode(won[0]).expect("decode").group_uuid;
        assert_eq!(&a.get_group(&group).expect("get").bytes, won[0], "the winner's manifest is the stored one");
    }
}
