//! Chunks uploaded in a batch against a real directory: invisible (reported missing, not
//! committable) until published, then present and committable; a full batch publishes
//! itself; a batch dropped unpublished leaves nothing behind; a present chunk is not
//! written again; a bad blob is refused as outside a batch.

use std::path::Path;
use std::time::Duration;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_store::batch::{ChunkBatch, PUBLISH_CHUNKS};
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::error::ErrorKind;
use vmbackup_store::sessions::SessionOwner;

mod common;

const CS: u32 = 64 << 10;

fn chunk(seed: u32) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..CS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn files(p: &Path) -> usize {
    std::fs::read_dir(p).expect("list").count()
}

/// A group naming `chunks` (index uploaded), ready to commit.
fn manifest(s: &ChunkStore, session: &str, chunks: &[Vec<u8>]) -> Vec<u8> {
    let n = u64::try_from(chunks.len()).expect("count");
    let mut ix = VolumeIndex::new([1; 16], u64::from(CS) * n, CS, VolumeFormat::Raw).expect("index");
    for (i, c) in chunks.iter().enumerate() {
        ix.digests[i] = Digest::of(c);
    }
    let vb = common::uuid();
    let name = format!("{vb}.vidx");
    let digest = s.put_index(session, &name, &ix.encode()).expect("put index");
    common::one_volume_manifest(vb, name, &digest, ix.virtual_size, CS).encode().expect("manifest")
}

#[test]
fn batched_chunks_are_invisible_until_published_then_committable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("session");
    let chunks: Vec<Vec<u8>> = (1..=3).map(chunk).collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
    let batch = ChunkBatch::new();
    for (c, d) in chunks.iter().zip(&digests) {
        assert!(s.insert_chunk_into(&batch, &session, d, &blob::encode(c, 1).expect("encode")).expect("insert"));
    }
    assert_eq!(batch.len(), 3);
    assert_eq!(files(&dir.path().join("tmp")), 3, "pending chunks wait in tmp/");
    assert_eq!(s.missing(&session, &digests).expect("missing"), digests, "pending chunks are reported missing");
    let m = manifest(&s, &session, &chunks);
    let e = s.commit_group(&session, &m, 0).expect_err("a group naming pending chunks");
    assert!(e.to_string().contains(&digests[0].to_hex()), "{e}");

    s.publish(&batch).expect("publish");
    assert!(batch.is_empty());
    assert_eq!(files(&dir.path().join("tmp")), 0);
    assert!(s.missing(&session, &digests).expect("missing").is_empty());
    s.commit_group(&session, &m, 0).expect("commit");
    for (c, d) in chunks.iter().zip(&digests) {
        assert_eq!(blob::decode_and_verify(&s.get_chunk(d).expect("read"), d, CS as usize).expect("decode"), *c);
    }

    // Present now: not written again, not pending.
    let again = blob::encode(&chunks[0], 1).expect("encode");
    assert!(!s.insert_chunk_into(&batch, &session, &digests[0], &again).expect("insert"));
    assert!(batch.is_empty());
    assert_eq!(files(&dir.path().join("tmp")), 0);
}

#[test]
fn a_full_batch_publishes_itself_and_a_dropped_one_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("session");
    let batch = ChunkBatch::new();
    let mut digests = Vec::new();
    for seed in 0..u32::try_from(PUBLISH_CHUNKS).expect("small") {
        let c = chunk(seed + 100);
        let d = Digest::of(&c);
        s.insert_own_chunk_into(&batch, &session, &d, &blob::encode(&c, 1).expect("encode")).expect("insert");
        digests.push(d);
    }
    assert!(batch.is_empty(), "the chunk that filled the batch published it");
    assert!(s.missing(&session, &digests).expect("missing").is_empty());

    let lost: Vec<Digest> = (0..2)
        .map(|seed| {
            let c = chunk(seed + 900);
            let d = Digest::of(&c);
            s.insert_own_chunk_into(&batch, &session, &d, &blob::encode(&c, 1).expect("encode")).expect("insert");
            d
        })
        .collect();
    assert_eq!(files(&dir.path().join("tmp")), 2);
    drop(batch);
    assert_eq!(files(&dir.path().join("tmp")), 0, "an unpublished batch removes its files");
    assert_eq!(s.missing(&session, &lost).expect("missing"), lost);
}

#[test]
fn a_bad_blob_is_refused_in_a_batch_and_nothing_is_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(dir.path(), CS).expect("open");
    let (session, _) = s.sessions().open("test", SessionOwner::local(), Duration::ZERO).expect("session");
    let batch = ChunkBatch::new();
    let c = chunk(7);
    let claimed = Digest::of(b"another chunk");
    let e =
        s.insert_chunk_into(&batch, &session, &claimed, &blob::encode(&c, 1).expect("encode")).expect_err("poisoned");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains(&claimed.to_hex()), "{e}");
    assert!(batch.is_empty());
    assert_eq!(files(&dir.path().join("tmp")), 0);
}
