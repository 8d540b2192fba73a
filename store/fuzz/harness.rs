//! What the store does with hostile bytes, shared by the `ingest` fuzz target and the
//! replay test (`store/tests/fuzz_regressions.rs`): the input is a run of frames
//! `[kind u8][len u16 LE][bytes]`, each decoded as the gRPC request a client would send
//! (prost) and handed to the chunk store as the server does. Whatever the bytes, nothing
//! panics, and the store's invariants hold after every step:
//! - an accepted chunk reads back as a blob whose plaintext hashes to its name;
//! - a committed group's chunks are all present and verify clean;
//! - an index is never replaced by other bytes.

use std::sync::Mutex;
use std::time::Duration;

use prost::Message;
use vmbackup_proto::store::v1 as pb;
use vmbackup_proto::{Digest, blob};
use vmbackup_store::chunk_store::{ChunkStore, DedupScope};
use vmbackup_store::sessions::SessionOwner;

/// Chunk size of the fuzzed store.
pub const CS: u32 = 64 << 10;

/// Inputs run against one store before it is replaced by an empty one (so a long run
/// does not fill the disk with the chunks it accepted).
const INPUTS_PER_STORE: u32 = 2000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: ChunkStore,
    inputs: u32,
}

fn new_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ChunkStore::open(dir.path(), CS).expect("open").with_dedup_scope(DedupScope::Namespace);
    Fixture { _dir: dir, store, inputs: 0 }
}

/// Whether a failure is the machine's (a full disk), not the store's.
fn environmental(e: &vmbackup_store::error::StoreError) -> bool {
    e.kind() == vmbackup_store::error::ErrorKind::NoSpace
}

fn digests(raw: &[Vec<u8>]) -> Option<Vec<Digest>> {
    if raw.len() > 16384 {
        return None;
    }
    raw.iter().map(|d| Digest::from_slice(d).ok()).collect()
}

fn check_chunk(s: &ChunkStore, d: &Digest) {
    let stored = s.get_chunk(d).expect("an accepted chunk is readable");
    let plain = blob::decode(&stored, CS as usize).expect("an accepted chunk decodes");
    assert_eq!(Digest::of(&plain), *d, "an accepted chunk hashes to its name");
}

/// Runs one input against the shared store.
pub fn run(data: &[u8]) {
    static F: Mutex<Option<Fixture>> = Mutex::new(None);
    let mut guard = F.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.as_ref().is_none_or(|f| f.inputs >= INPUTS_PER_STORE) {
        *guard = Some(new_fixture());
    }
    let fixture = guard.as_mut().expect("made above");
    fixture.inputs += 1;
    let s = &fixture.store;
    let ns = if data.first().is_some_and(|b| b & 1 == 1) { "tenant-a" } else { "tenant-b" };
    let owner = SessionOwner { principal: ns.into(), namespace: ns.into() };
    let (session, _) = s.sessions().open("fuzz", owner, Duration::ZERO).expect("open session");
    let mut rest = data.get(1..).unwrap_or_default();
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let frame = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match kind % 7 {
            0 => {
                if let Ok(m) = pb::UploadChunk::decode(frame)
                    && let Ok(d) = Digest::from_slice(&m.digest)
                    && s.insert_chunk(&session, &d, &m.blob).is_ok()
                {
                    check_chunk(s, &d);
                }
            }
            1 => {
                if let Ok(m) = pb::MissingChunksRequest::decode(frame)
                    && let Some(ds) = digests(&m.digests)
                    && let Ok(missing) = s.missing(&session, &ds)
                {
                    assert!(missing.iter().all(|d| ds.contains(d)), "missing names only asked digests");
                }
            }
            2 => {
                if let Ok(m) = pb::PutIndexRequest::decode(frame) {
                    let before = s.get_index(&m.name).ok();
                    let put = s.put_index(&session, &m.name, &m.data);
                    if let Some(old) = before {
                        assert_eq!(s.get_index(&m.name).expect("still there"), old, "an index is written once");
                        assert!(put.is_err() || old == m.data);
                    }
                }
            }
            3 => {
                if let Ok(m) = pb::CommitGroupRequest::decode(frame)
                    && let Ok(g) = s.commit_group(&session, &m.manifest, m.retain_until)
                {
                    let v = s.verify(std::slice::from_ref(&g.group_uuid)).expect("verify");
                    assert!(v.bad_chunks.is_empty(), "a committed group verifies clean");
                }
            }
            4 => {
                if let Ok(m) = pb::DownloadChunksRequest::decode(frame) {
                    let _ = s.index_namespace(&m.index_name);
                    for d in digests(&m.digests).unwrap_or_default() {
                        let _ = s.get_chunk(&d);
                    }
                }
            }
            5 => {
                // Well-formed data, so the accepting paths are exercised too.
                let plain = &frame[..frame.len().min(CS as usize)];
                let d = Digest::of(plain);
                let b = blob::encode(plain, 1).expect("encode");
                match s.insert_chunk(&session, &d, &b) {
                    Ok(_) => check_chunk(s, &d),
                    Err(e) if environmental(&e) => {}
                    Err(e) => panic!("a well-formed chunk is refused: {e}"),
                }
            }
            _ => {
                // A well-formed blob with one byte changed: refused, or still the same chunk.
                let plain = &frame[..frame.len().min(CS as usize)];
                let d = Digest::of(plain);
                let mut b = blob::encode(plain, 1).expect("encode");
                if !b.is_empty() {
                    let at = usize::from(kind) % b.len();
                    b[at] ^= 0x5a;
                }
                if s.insert_chunk(&session, &d, &b).is_ok() {
                    check_chunk(s, &d);
                }
            }
        }
    }
    s.sessions().close(&session).expect("close session");
}
