//! Many store servers over one bucket: sessions, reuse journals, a GC lease and a sweep
//! fence kept in the bucket itself, so no server's memory or disk holds state that matters.
//!
//! A store server keeps sessions in memory for speed, but with a shared backend every
//! session is also a record in the bucket, and every time a session comes to depend on a
//! chunk that already existed (MissingChunks said "present", or an upload found it there)
//! the server first writes that fact into the bucket. GC, which may run on any server,
//! reads those facts; the two sides meet by the rule "write, then read" (below).
//!
//! ## Objects (keys under the store's prefix)
//!
//! | key | what | written by |
//! |---|---|---|
//! | `sessions/<id>.json` | [`SessionRecord`]: owner, start, `expiresMs` | open; renewed while in use; deleted at close |
//! | `journal/<id>/<server>-<n>` | digest list: chunks session `<id>` was told present or found present on upload | before the answer |
//! | `gc/lease-<epoch>.json` | [`gc::Lease`]: holder, `expiresMs`, phase | create-only by the GC that wins `<epoch>`; renewed by it alone |
//! | `gc/fence-<epoch>` | digest list: every chunk GC `<epoch>` may delete | create-only, before any delete |
//! | `gc/doomed-<epoch>` | digest list: what it will delete (fence minus what is kept) | create-only, before any delete |
//!
//! `<epoch>` is 20 decimal digits, so the newest sorts last. Every digest list is the
//! line `vmbackup-digests-v1` (`\n`-terminated) followed by 32-byte BLAKE3 digests, nothing
//! else ([`encode_digests`]); a list whose length after the header is not a multiple of 32
//! is refused.
//!
//! ## Sessions
//!
//! A session record carries `expiresMs` (the server's clock). A server renews the record
//! whenever a call on the session finds less than two thirds of its TTL left, and never
//! lets the session live in its memory past the expiry last written to the bucket: a
//! server that cannot renew stops serving the session. A session unknown to a server (it
//! was opened on another one) is adopted from its record while the record is live, so any
//! server serves any session. GC counts a session live until `expiresMs` plus the margin.
//!
//! ## GC
//!
//! 1. **Lease**: create `gc/lease-<n+1>.json` with `If-None-Match: *`, where `<n>` is the
//!    newest lease, and only if that one is released or expired (plus the margin). Two
//!    contenders create the same key: exactly one succeeds. The holder renews it every
//!    third of its TTL and stops deleting the moment its own clock passes the expiry it
//!    last wrote minus a safety second.
//! 2. **Cutoff** = min(now, start of the oldest live session of any server) − margin.
//! 3. **Mark**: every chunk a committed index names.
//! 4. **Candidates**: listed chunks, not marked, `LastModified` before the cutoff.
//! 5. **Fence**: publish the candidates (`gc/fence-<n>`).
//! 6. **Keep**: read every journal, then list the manifests again and mark the groups
//!    committed since step 3; drop all those digests from the candidates, publish what is
//!    left (`gc/doomed-<n>`).
//! 7. **Delete**: for each doomed chunk, HEAD it and delete it only if its `LastModified`
//!    is still the one listed in step 4 (a chunk deleted and uploaded again since is
//!    kept). Each DELETE is sent once, without retries, so a late retry can never remove
//!    a chunk uploaded after the first attempt; a failed one is left for the next run.
//! 8. Delete the fence, unreferenced old indexes and group metas, dead sessions' records
//!    and journals, older leases; release the lease.
//!
//! ## Why a chunk a live session relies on is never deleted
//!
//! A server, before telling a session a chunk is present (or accepting an upload that
//! found the chunk there): **writes** the journal entry, **then reads** the fence. GC
//! **writes** the fence, **then reads** the journals. With S3's read-after-write
//! consistency, at least one side sees the other's write:
//! - GC saw the journal: the chunk is kept.
//! - The server saw the fence, and the chunk is doomed (or the doomed list is not out
//!   yet): MissingChunks answers "missing", and an upload tries again every 200 ms until
//!   the chunk was deleted (its create then succeeds, a new object) or the fence is gone.
//!   A chunk in the fence but not in the doomed list is safe.
//!
//! A chunk *created* by an upload needs no journal entry: it is newer than any cutoff whose
//! listing could have seen an older copy (that copy was deleted first, by the only DELETE
//! GC sends for it), and a session live when GC started moves the cutoff before its own
//! start. Groups committed during the run are found by the second listing (step 6): a
//! commit after that listing comes from a session whose journal, still present at step 6
//! because a session is closed only after its commit, was read.
//!
//! The same two rules let a commit skip its lookup of the chunks its session confirmed on
//! the same server (created by its uploads, or journaled for it past the fence; kept in
//! that server's memory, see [`crate::sessions`]): GC keeps them while the session lives,
//! and the session is live when it commits: the commit reads the session's record first
//! and refuses a session closed through another server or expired. It looks up every other chunk its
//! manifest names, so a full backup of new data costs a HEAD and a PUT per chunk, not two
//! HEADs and a PUT. Only GC and verify's quarantine delete chunks; a chunk verify finds
//! damaged between its upload and the commit leaves that group for the next verify to
//! report, as it would if the damage came a moment after the commit.
//!
//! ## What runs concurrently with what (across servers)
//!
//! | | backup (sessions, uploads, commit) | restore, list | delete group | GC | verify |
//! |---|---|---|---|---|---|
//! | backup | yes: content-addressed create-only chunks | yes | yes | yes: journal-then-fence (above) | yes |
//! | restore, list | | yes | yes: a group is gone once its manifest is | yes: committed groups are marked | yes |
//! | delete group | | | yes | yes: GC deletes only chunks no remaining group names | yes |
//! | GC | | | | no: one lease holder; the others are refused (FAILED_PRECONDITION) | yes |
//! | verify | | | | | yes |
//!
//! ## Assumptions, stated
//!
//! - The server's read-after-write and list-after-write consistency (Ceph RGW on one
//!   site, AWS S3 since 2020, MinIO). Multi-site RGW replication is asynchronous: run one
//!   zone's servers per bucket.
//! - Clocks of the store servers and the S3 server agree within the GC margin (default
//!   5 minutes; NTP does far better): session starts and expiries are server clocks,
//!   `LastModified` is the S3 server's.

pub mod gc;
pub mod sessions;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use vmbackup_proto::Digest;

use crate::error::{ErrorKind, Result, StoreError};

pub use sessions::SessionRecord;

/// The first line of every digest list.
pub const DIGESTS_HEADER: &[u8] = b"vmbackup-digests-v1\n";
/// Default lifetime of a GC lease without renewal.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

/// An object as listed: key relative to the store's prefix, size, last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Key under the store's prefix (`gc/lease-…json`).
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Last write, by the object server's clock.
    pub modified: SystemTime,
}

/// What the protocol needs from the bucket. Keys are relative to the store's prefix.
pub trait SharedObjects: Send + Sync + std::fmt::Debug {
    /// Writes (replacing) an object.
    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
    /// Creates an object only if absent (`If-None-Match: *`); false when it exists.
    fn put_create(&self, key: &str, bytes: Vec<u8>) -> Result<bool>;
    /// Reads an object (NotFound when absent).
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Every object whose key starts with `prefix` (which ends in `/`).
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// Deletes an object (absent is fine), retrying transient failures.
    fn delete(&self, key: &str) -> Result<()>;
    /// Deletes many objects (absent ones are fine); object stores batch them.
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }
    /// A chunk's `LastModified` (None when absent).
    fn chunk_modified(&self, digest: &Digest) -> Result<Option<SystemTime>>;
    /// Deletes a chunk with exactly one request, never retried.
    fn delete_chunk_once(&self, digest: &Digest) -> Result<()>;
}

/// Encodes a digest list.
pub fn encode_digests<'a>(digests: impl IntoIterator<Item = &'a Digest>) -> Vec<u8> {
    let mut out = DIGESTS_HEADER.to_vec();
    for d in digests {
        out.extend_from_slice(&d.0);
    }
    out
}

/// Decodes a digest list; `what` names it in errors.
pub fn decode_digests(bytes: &[u8], what: &str) -> Result<Vec<Digest>> {
    let corrupt = |m: String| StoreError::new(ErrorKind::Corrupt, format!("{what}: {m}"));
    let body = bytes.strip_prefix(DIGESTS_HEADER).ok_or_else(|| corrupt("no vmbackup-digests-v1 header".into()))?;
    if body.len() % 32 != 0 {
        return Err(corrupt(format!("{} bytes after the header, not a multiple of 32", body.len())));
    }
    body.chunks_exact(32).map(|c| Digest::from_slice(c).map_err(|e| corrupt(e.to_string()))).collect()
}

/// What a server must not rely on right now: the chunks of a GC that may be deleting.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    /// The GC's epoch (0: none).
    pub epoch: u64,
    /// Chunks that may be deleted.
    pub chunks: std::sync::Arc<HashSet<Digest>>,
}

impl Fence {
    /// Whether `d` may be deleted.
    pub fn holds(&self, d: &Digest) -> bool {
        self.chunks.contains(d)
    }
}

/// The shared-bucket protocol of one store server.
#[derive(Debug)]
pub struct Shared {
    pub(crate) objects: std::sync::Arc<dyn SharedObjects>,
    /// This server's id in journal keys and leases.
    pub(crate) server: String,
    /// Lease lifetime.
    pub(crate) lease_ttl: Duration,
    /// Margin for clocks and liveness (the GC margin).
    pub(crate) margin: Mutex<Duration>,
    /// Fence lists read, by key (they never change).
    fence_cache: Mutex<Vec<(String, std::sync::Arc<HashSet<Digest>>)>>,
    journal_seq: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The protocol over `objects`.
    pub fn new(objects: std::sync::Arc<dyn SharedObjects>) -> Self {
        Self {
            objects,
            server: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            margin: Mutex::new(crate::gc::DEFAULT_MARGIN),
            fence_cache: Mutex::default(),
            journal_seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sets the GC lease lifetime.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_secs(3));
        self
    }

    /// The margin for clocks and liveness.
    pub fn margin(&self) -> Duration {
        *self.margin.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the margin (the store's GC margin).
    pub fn set_margin(&self, m: Duration) {
        *self.margin.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = m;
    }

    /// Records that session `id` relies on `digests` (they were present). Written before
    /// the answer; see the module doc.
    pub fn journal(&self, session: &str, digests: &[Digest]) -> Result<()> {
        if digests.is_empty() {
            return Ok(());
        }
        let n = self.journal_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("journal/{session}/{}-{n:010}", self.server);
        self.objects.put(&key, encode_digests(digests))
    }

    /// The fence of a GC that may be deleting now, read from the bucket (never cached:
    /// the read must follow the caller's journal write). Empty when none.
    pub fn fence(&self) -> Result<Fence> {
        let listed = self.objects.list("gc/")?;
        let Some(lease) = gc::newest_lease(&listed) else { return Ok(Fence::default()) };
        let (epoch, lease_written) = lease;
        let alive_until = lease_written + self.lease_ttl + self.margin();
        if SystemTime::now() > alive_until {
            return Ok(Fence::default());
        }
        let has = |name: String| listed.iter().any(|l| l.key == name).then_some(name);
        let Some(fence_key) = has(gc::fence_key(epoch)) else { return Ok(Fence::default()) };
        // Once the doomed list is out, only it matters; before, every candidate does.
        let key = has(gc::doomed_key(epoch)).unwrap_or(fence_key);
        Ok(Fence { epoch, chunks: self.digest_set(&key)? })
    }

    fn digest_set(&self, key: &str) -> Result<std::sync::Arc<HashSet<Digest>>> {
        let mut cache = self.fence_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, set)) = cache.iter().find(|(k, _)| k == key) {
            return Ok(set.clone());
        }
        let set = std::sync::Arc::new(decode_digests(&self.objects.get(key)?, key)?.into_iter().collect());
        cache.push((key.to_string(), std::sync::Arc::clone(&set)));
        let excess = cache.len().saturating_sub(4);
        cache.drain(..excess);
        Ok(set)
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A time read from a bucket object: a value past what `SystemTime` holds (a damaged or
/// hostile object) becomes a far-future time instead of a panic.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .filter(|t| t.checked_add(Duration::from_secs(1 << 32)).is_some())
        .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_lists_round_trip_and_refuse_damage() {
        let ds = [Digest::of(b"a"), Digest::of(b"b")];
        let bytes = encode_digests(&ds);
        assert_eq!(&bytes[..DIGESTS_HEADER.len()], b"vmbackup-digests-v1\n");
        assert_eq!(bytes.len(), DIGESTS_HEADER.len() + 64);
        assert_eq!(decode_digests(&bytes, "x").expect("decodes"), ds);
        assert!(
            decode_digests(&bytes[..bytes.len() - 1], "x").expect_err("refused").to_string().contains("multiple of 32")
        );
        assert!(decode_digests(b"other\n", "x").expect_err("refused").to_string().contains("header"));
        assert!(decode_digests(DIGESTS_HEADER, "x").expect("empty").is_empty());
    }

    #[test]
    fn digest_list_golden_bytes() {
        // The format is a contract: this is the exact encoding of one digest.
        let d = Digest::of(b"vmbackup");
        let mut want = b"vmbackup-digests-v1\n".to_vec();
        want.extend_from_slice(blake3::hash(b"vmbackup").as_bytes());
        assert_eq!(encode_digests([&d]), want);
    }
}
