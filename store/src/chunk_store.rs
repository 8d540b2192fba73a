//! The chunk store: content-addressed chunks, volume indexes and group manifests over a
//! [`Backend`], with the rules that keep committed backups intact.
//!
//! - A chunk is stored only after its blob decodes and its plaintext hashes to its name and
//!   fits the chunk size (chunk poisoning is refused, nothing is stored).
//! - A group is visible exactly when its manifest is written, and it is written only when
//!   every index it names is present with the named digest and every chunk those indexes
//!   name is present.
//! - Chunks a session reuses or uploads are touched under the chunk's shard lock; GC's
//!   sweep checks and deletes under the same lock, so a chunk cannot be reported present
//!   and then swept (see [`crate::gc`]).
//! - Which groups are damaged is the store's own state (`group_state.rs`): read once,
//!   cached, and changed only under its lock, so concurrent verifies keep each other's
//!   marks.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::format_error::FormatError;
use vmbackup_proto::index::{self, SparseIndex};
use vmbackup_proto::manifest::{GroupManifest, is_index_name};

use crate::backend::fs::FsBackend;
use crate::backend::{Backend, ObjectKind, Staged};
use crate::error::{ErrorKind, Result, StoreError};
use crate::group_state::GroupState;
use crate::identity::StoreIdentity;
use crate::sessions::{SessionOwner, Sessions};

/// How far deduplication reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupScope {
    /// A chunk any namespace uploaded is reused by every other: least space, but a writer
    /// can learn whether some other namespace stores a chunk whose content it can guess
    /// (MissingChunks answers "present").
    #[default]
    Store,
    /// A namespace reuses only chunks it uploaded itself: MissingChunks, upload replies and
    /// commits behave as if no other namespace existed. The bytes are still stored once.
    Namespace,
}

impl DedupScope {
    /// Its name in configs and replies.
    pub fn as_str(self) -> &'static str {
        match self {
            DedupScope::Store => "store",
            DedupScope::Namespace => "namespace",
        }
    }
}

/// Objects in the backend, as counted by [`ChunkStore::stored_objects`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredObjects {
    /// Chunk objects.
    pub chunks: u64,
    /// Their blob bytes.
    pub chunk_bytes: u64,
    /// Index objects.
    pub indexes: u64,
    /// Sessions recorded in a shared bucket (else open here).
    pub sessions: u64,
    /// When counted.
    pub counted_at: std::time::SystemTime,
}

/// How long a count of stored objects is reused.
pub const OBJECT_COUNT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Monotonic counters since the store opened.
#[derive(Debug, Default)]
pub struct Counters {
    /// Chunks written by uploads.
    pub chunks_uploaded: AtomicU64,
    /// Blob bytes written by uploads.
    pub bytes_uploaded: AtomicU64,
    /// Uploaded chunks that were already present.
    pub chunks_already_present: AtomicU64,
    /// Chunks MissingChunks reported present.
    pub chunks_reported_present: AtomicU64,
    /// Chunks served to readers.
    pub chunks_downloaded: AtomicU64,
    /// Blob bytes served.
    pub bytes_downloaded: AtomicU64,
    /// Uploads refused (bad blob or wrong digest).
    pub chunks_rejected: AtomicU64,
    /// Chunks commits looked up in the backend (not those their session confirmed here).
    pub commit_lookups: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A chunk store.
#[derive(Debug)]
pub struct ChunkStore {
    pub(crate) backend: Arc<dyn Backend>,
    identity: StoreIdentity,
    sessions: Sessions,
    shard_locks: Box<[Mutex<()>]>,
    pub(crate) gc_running: Mutex<()>,
    /// Damaged-group marks, written by verify, reported by group reads.
    pub(crate) group_state: GroupState,
    counters: Counters,
    dedup: DedupScope,
    accept_sealed: bool,
    default_retention: Option<std::time::Duration>,
    /// Serialises load-modify-persist of group metas (retention changes).
    pub(crate) meta_lock: Mutex<()>,
    /// Idle chunk decoders, one per check running at once at most (each keeps a zstd
    /// context and a chunk-sized buffer, so checks allocate nothing per chunk).
    decoders: Mutex<Vec<blob::Decoder>>,
    /// The last count of stored objects, and how long it took.
    object_count: Mutex<Option<(StoredObjects, std::time::Duration)>>,
}

/// A group as stored.
#[derive(Debug, Clone)]
pub struct StoredGroup {
    /// The manifest.
    pub manifest: GroupManifest,
    /// Its encoded bytes, as committed.
    pub bytes: Vec<u8>,
    /// Whether verify found a chunk of it missing or bad.
    pub damaged: bool,
    /// Its namespace and retention lock.
    pub meta: crate::group_meta::GroupMeta,
}

impl ChunkStore {
    /// Opens (creating) a store in a local directory.
    pub fn open(root: &Path, chunk_size: u32) -> Result<Self> {
        let identity = StoreIdentity::open_or_create(root, chunk_size)
            .map_err(|e| StoreError::io(format!("opening store identity in {}", root.display()), e))?;
        let backend = FsBackend::open(root)?;
        Ok(Self::with_backend(Arc::new(backend), identity))
    }

    /// A store over any backend.
    pub fn with_backend(backend: Arc<dyn Backend>, identity: StoreIdentity) -> Self {
        Self {
            group_state: GroupState::new(backend.clone()),
            backend,
            identity,
            sessions: Sessions::default(),
            shard_locks: (0..256).map(|_| Mutex::new(())).collect(),
            gc_running: Mutex::new(()),
            counters: Counters::default(),
            dedup: DedupScope::Store,
            accept_sealed: false,
            default_retention: None,
            meta_lock: Mutex::new(()),
            decoders: Mutex::default(),
            object_count: Mutex::default(),
        }
    }

    /// Coordinates with the other store servers over the same bucket: sessions, reuse
    /// journals and GC go through `shared` (see [`crate::shared`]).
    pub fn with_shared(mut self, shared: Arc<crate::shared::Shared>) -> Self {
        self.sessions = Sessions::shared(shared);
        self
    }

    /// Sets how far deduplication reaches.
    pub fn with_dedup_scope(mut self, scope: DedupScope) -> Self {
        self.dedup = scope;
        self
    }

    /// Accepts version-2 sealed chunks (written by the first encrypting agents) from remote
    /// writers. Off by default: their names are not derived from their headers, so the store
    /// cannot tell them from plain chunks' names, and a writer could plant an unreadable blob
    /// under the name of a plain chunk another writer will skip uploading. Current sealed
    /// chunks (version 3) carry what derives their name and are always accepted.
    pub fn with_sealed_chunks(mut self, accept: bool) -> Self {
        self.accept_sealed = accept;
        self
    }

    /// Whether version-2 sealed chunks are accepted from remote writers.
    pub fn accepts_sealed(&self) -> bool {
        self.accept_sealed
    }

    /// Locks every new group against deletion for `d` after its commit (None: no default).
    pub fn with_default_retention(mut self, d: Option<std::time::Duration>) -> Self {
        self.default_retention = d.filter(|d| !d.is_zero());
        self
    }

    /// The default retention lock of new groups.
    pub fn default_retention(&self) -> Option<std::time::Duration> {
        self.default_retention
    }

    /// How far deduplication reaches.
    pub fn dedup_scope(&self) -> DedupScope {
        self.dedup
    }

    /// Whether a stored `d` counts for `namespace`: always in the store scope, and in the
    /// per-namespace scope when that namespace uploaded it.
    pub(crate) fn visible_to(&self, namespace: &str, d: &Digest) -> Result<bool> {
        Ok(self.dedup == DedupScope::Store || self.backend.is_owner(namespace, d)?)
    }

    /// Checks that `blob` decodes to at most one chunk of plaintext hashing to `digest`, or,
    /// sealed, that its framing, lengths and CRC hold and its header derives `digest` (all a
    /// store can check without the key); says which.
    pub fn check_blob(&self, blob_bytes: &[u8], digest: &Digest) -> std::result::Result<blob::Checked, FormatError> {
        let idle = self.decoders.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let mut decoder = match idle {
            Some(d) => d,
            None => blob::Decoder::new()?,
        };
        let checked = decoder.verify(blob_bytes, digest, self.max_plain());
        self.decoders.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(decoder);
        checked
    }

    /// Identity (uuid, chunk size).
    pub fn identity(&self) -> &StoreIdentity {
        &self.identity
    }

    /// Open sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Where the store is: `fs` or `s3://bucket/prefix`.
    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }

    /// Checks quickly that the backend answers.
    pub fn probe(&self) -> Result<()> {
        self.backend.probe()
    }

    /// Counts what the backend holds. A count that took more than a second (over S3 a
    /// count lists every chunk key) is reused while younger than [`OBJECT_COUNT_MAX_AGE`].
    pub fn stored_objects(&self) -> Result<StoredObjects> {
        let now = std::time::SystemTime::now();
        let cached = *self.object_count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = |(c, took): &(StoredObjects, std::time::Duration)| {
            *took > std::time::Duration::from_secs(1)
                && now.duration_since(c.counted_at).is_ok_and(|a| a < OBJECT_COUNT_MAX_AGE)
        };
        if let Some((c, _)) = cached.filter(fresh) {
            return Ok(c);
        }
        let timer = std::time::Instant::now();
        let mut c = StoredObjects { chunks: 0, chunk_bytes: 0, indexes: 0, sessions: 0, counted_at: now };
        self.backend.for_each_chunk(&mut |i| {
            c.chunks += 1;
            c.chunk_bytes += i.size;
            Ok(())
        })?;
        c.indexes = u64::try_from(self.backend.list_objects(ObjectKind::Index)?.len()).unwrap_or(u64::MAX);
        c.sessions = match self.sessions.shared_protocol() {
            Some(shared) => u64::try_from(shared.all_sessions()?.len()).unwrap_or(u64::MAX),
            None => u64::try_from(self.sessions.count()).unwrap_or(u64::MAX),
        };
        *self.object_count.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((c, timer.elapsed()));
        Ok(c)
    }

    /// Total and available bytes.
    pub fn capacity(&self) -> Result<(u64, u64)> {
        self.backend.capacity()
    }

    /// The lock guarding check-and-touch / check-and-delete of a chunk.
    pub(crate) fn shard_lock(&self, d: &Digest) -> MutexGuard<'_, ()> {
        self.shard_locks[usize::from(d.0[0])].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn max_plain(&self) -> usize {
        usize::try_from(self.identity.chunk_size).unwrap_or(usize::MAX)
    }

    /// Which of `digests` are absent. Present ones are touched so GC keeps them for the
    /// session.
    pub fn missing(&self, session: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let owner = self.sessions.touch(session)?;
        let asked: Vec<Digest> = digests.iter().filter(|d| !d.is_zero_chunk()).copied().collect();
        if let Some(shared) = self.sessions.shared_protocol() {
            return self.missing_shared(shared, session, &owner, &asked);
        }
        let mut missing = Vec::new();
        let mut present = 0u64;
        for d in &asked {
            let _guard = self.shard_lock(d);
            if self.visible_to(&owner.namespace, d)? && self.backend.touch_chunk(d)? {
                present += 1;
            } else {
                missing.push(*d);
            }
        }
        bump(&self.counters.chunks_reported_present, present);
        Ok(missing)
    }

    /// MissingChunks over a shared bucket: which are present (looked up concurrently),
    /// journal those, then read the fence; a present chunk a running GC may delete is
    /// reported missing (see [`crate::shared`]).
    fn missing_shared(
        &self,
        shared: &crate::shared::Shared,
        session: &str,
        owner: &SessionOwner,
        asked: &[Digest],
    ) -> Result<Vec<Digest>> {
        let found = self.backend.has_chunks(asked)?;
        let mut present = Vec::new();
        let mut missing = Vec::new();
        for (d, here) in asked.iter().zip(found) {
            let visible = here && self.visible_to(&owner.namespace, d)?;
            if visible { present.push(*d) } else { missing.push(*d) }
        }
        if !present.is_empty() {
            // Only what is present: a full backup of new data writes no journal at all
            // (journaling every digest asked, while looking them up, cost a PUT per call
            // and made full backups slower on radosgw).
            shared.journal(session, &present)?;
            let fence = shared.fence()?;
            let before = present.len();
            present.retain(|d| {
                if fence.holds(d) {
                    missing.push(*d);
                    false
                } else {
                    true
                }
            });
            if present.len() < before {
                tracing::info!(
                    fenced = before - present.len(),
                    epoch = fence.epoch,
                    "chunks a running GC may delete reported missing"
                );
            }
        }
        // Journaled and past the fence: kept by GC while the session lives.
        self.sessions.confirm(session, &present);
        bump(&self.counters.chunks_reported_present, u64::try_from(present.len()).unwrap_or(u64::MAX));
        Ok(missing)
    }

    /// Stores an uploaded chunk after checking it: the blob must decode, its plaintext must
    /// hash to `digest` and fit the chunk size. Returns whether it was new.
    pub fn insert_chunk(&self, session: &str, digest: &Digest, blob_bytes: &[u8]) -> Result<bool> {
        let owner = self.admit_chunk(session, digest, Some(blob_bytes))?;
        self.store_chunk(session, &owner, digest, blob_bytes, None)
    }

    /// Stores a chunk that this process encoded itself from plaintext whose digest it
    /// computed (the agent's embedded store): the blob is not decoded and hashed a second
    /// time. Everything that crosses a process boundary goes through [`Self::insert_chunk`].
    /// Durability is the same. Returns whether it was new.
    pub fn insert_own_chunk(&self, session: &str, digest: &Digest, blob_bytes: &[u8]) -> Result<bool> {
        let owner = self.admit_chunk(session, digest, None)?;
        self.store_chunk(session, &owner, digest, blob_bytes, None)
    }

    /// The session's owner if a chunk `digest` may be stored for it; with `blob`, the blob
    /// is checked too (see [`Self::insert_chunk`]).
    pub(crate) fn admit_chunk(&self, session: &str, digest: &Digest, blob: Option<&[u8]>) -> Result<SessionOwner> {
        let owner = self.sessions.touch(session)?;
        if digest.is_zero_chunk() {
            return Err(StoreError::new(ErrorKind::InvalidArgument, "the zero-chunk marker is not a chunk name"));
        }
        let Some(blob_bytes) = blob else { return Ok(owner) };
        match self.check_blob(blob_bytes, digest) {
            Err(e) => {
                bump(&self.counters.chunks_rejected, 1);
                Err(StoreError::new(ErrorKind::Corrupt, format!("chunk {digest} refused: {e}")))
            }
            Ok(blob::Checked::SealedUnbound(key)) if !self.accept_sealed => {
                bump(&self.counters.chunks_rejected, 1);
                Err(StoreError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "chunk {digest} is a version-2 sealed blob (key {key}), whose name this store cannot check: \
                         upgrade the agent (it writes version 3), or set accept_sealed_chunks = true once every \
                         writer is trusted not to plant chunks"
                    ),
                ))
            }
            Ok(_) => Ok(owner),
        }
    }

    /// Writes a chunk under its shard lock and counts it; the caller has checked it. Without
    /// a batch it is durable on return; with one it may be pending in the batch (see
    /// [`crate::batch`]). In the per-namespace scope a chunk is "new" when it is new to the
    /// session's namespace, so the reply says nothing about other namespaces.
    pub(crate) fn store_chunk(
        &self,
        session: &str,
        owner: &SessionOwner,
        digest: &Digest,
        blob_bytes: &[u8],
        batch: Option<&crate::batch::ChunkBatch>,
    ) -> Result<bool> {
        // Locally, uploads and GC's sweep meet at the shard lock; across servers, at the
        // journal and the fence.
        let mut new = match (self.sessions.shared_protocol(), batch) {
            (Some(shared), _) => self.put_chunk_shared(shared, session, digest, blob_bytes)?,
            (None, None) => {
                let _guard = self.shard_lock(digest);
                self.backend.put_chunk(digest, blob_bytes)?
            }
            (None, Some(batch)) => {
                // A chunk of one digest is checked, staged and added under its shard lock,
                // so an upload sending it twice stages it once.
                let full = {
                    let _guard = self.shard_lock(digest);
                    if batch.contains(digest) {
                        None
                    } else {
                        match self.backend.stage_chunk(digest, blob_bytes)? {
                            Staged::Present => None,
                            Staged::Stored => Some(None),
                            Staged::Pending(p) => Some(Some(batch.add(p))),
                        }
                    }
                };
                match full {
                    None => false,
                    Some(None) => true,
                    Some(Some(full)) => {
                        // Counted as uploaded when published: a batch lost to a cut stream
                        // and sent again counts once.
                        if let Some(full) = full {
                            self.publish_pending(full)?;
                        }
                        if self.dedup == DedupScope::Namespace {
                            self.backend.mark_owner(&owner.namespace, digest)?;
                        }
                        return Ok(true);
                    }
                }
            }
        };
        if self.dedup == DedupScope::Namespace {
            new |= self.backend.mark_owner(&owner.namespace, digest)?;
        }
        // Over a shared bucket: created for this session, or journaled for it.
        self.sessions.confirm(session, std::slice::from_ref(digest));
        if new {
            bump(&self.counters.chunks_uploaded, 1);
            bump(&self.counters.bytes_uploaded, u64::try_from(blob_bytes.len()).unwrap_or(u64::MAX));
        } else {
            bump(&self.counters.chunks_already_present, 1);
        }
        Ok(new)
    }

    /// Publishes pending chunks (see [`crate::batch`]) and counts them as uploaded.
    pub(crate) fn publish_pending(&self, chunks: Vec<crate::backend::PendingChunk>) -> Result<()> {
        let n = u64::try_from(chunks.len()).unwrap_or(u64::MAX);
        let bytes = chunks.iter().map(crate::backend::PendingChunk::len).sum();
        self.backend.publish_chunks(chunks)?;
        bump(&self.counters.chunks_uploaded, n);
        bump(&self.counters.bytes_uploaded, bytes);
        Ok(())
    }

    /// Uploads a chunk over a shared bucket. A new object needs nothing more; one that was
    /// already there is journaled, then the fence is read, and while a running GC may
    /// delete it the upload waits (200 ms steps) until GC deleted it (the next create
    /// succeeds) or kept it (see [`crate::shared`]).
    fn put_chunk_shared(
        &self,
        shared: &crate::shared::Shared,
        session: &str,
        digest: &Digest,
        blob_bytes: &[u8],
    ) -> Result<bool> {
        let started = std::time::Instant::now();
        loop {
            if self.backend.put_chunk(digest, blob_bytes)? {
                return Ok(true);
            }
            shared.journal(session, std::slice::from_ref(digest))?;
            let fence = shared.fence()?;
            if !fence.holds(digest) {
                return Ok(false);
            }
            if started.elapsed() > shared.lease_ttl * 4 + shared.margin() {
                return Err(StoreError::new(
                    ErrorKind::Conflict,
                    format!(
                        "chunk {digest} is held by garbage collection {} for too long; retry the upload",
                        fence.epoch
                    ),
                ));
            }
            tracing::debug!(chunk = %digest, epoch = fence.epoch, "upload waits for a running GC");
            std::thread::sleep(std::time::Duration::from_millis(200));
            self.sessions.touch(session)?;
        }
    }

    /// A chunk's blob.
    pub fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut b = Vec::new();
        self.get_chunk_into(digest, &mut b)?;
        Ok(b)
    }

    /// A stored chunk's blob into `buf`, reusing its capacity (a directory store reads the
    /// file straight into it).
    pub fn get_chunk_into(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        self.backend.get_chunk_into(digest, buf)?;
        bump(&self.counters.chunks_downloaded, 1);
        bump(&self.counters.bytes_downloaded, u64::try_from(buf.len()).unwrap_or(u64::MAX));
        Ok(())
    }

    pub(crate) fn check_index_name(name: &str) -> Result<()> {
        if is_index_name(name) {
            Ok(())
        } else {
            Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!("index name {} is not <32 hex>.vidx", crate::error::shorten(name)),
            ))
        }
    }

    pub(crate) fn decode_index(&self, name: &str, bytes: &[u8]) -> Result<SparseIndex> {
        let ix = SparseIndex::decode(bytes, index::MAX_CHUNKS)
            .map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("index {name}: {e}")))?;
        if ix.chunk_size != self.identity.chunk_size {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "index {name} uses {}-byte chunks; this store's are {}",
                    ix.chunk_size, self.identity.chunk_size
                ),
            ));
        }
        Ok(ix)
    }

    /// Stores a volume index (validated first); returns its digest. Indexes are written
    /// once: the same bytes again is a no-op, other bytes under an existing name are a
    /// conflict (a writer cannot rewrite a committed backup's index).
    pub fn put_index(&self, session: &str, name: &str, bytes: &[u8]) -> Result<Digest> {
        self.sessions.touch(session)?;
        Self::check_index_name(name)?;
        self.decode_index(name, bytes)?;
        match self.backend.get_object(ObjectKind::Index, name) {
            Ok(existing) if existing == bytes => {}
            Ok(_) => {
                return Err(StoreError::new(
                    ErrorKind::Conflict,
                    format!("index {name} already exists with other contents; indexes are written once"),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !self.backend.create_object(ObjectKind::Index, name, bytes)?
                    && self.backend.get_object(ObjectKind::Index, name)? != bytes
                {
                    return Err(StoreError::new(
                        ErrorKind::Conflict,
                        format!("index {name} was just written with other contents; indexes are written once"),
                    ));
                }
            }
            Err(e) => return Err(e),
        }
        Ok(vmbackup_proto::index::index_digest(bytes))
    }

    /// A stored index.
    pub fn get_index(&self, name: &str) -> Result<Vec<u8>> {
        Self::check_index_name(name)?;
        self.backend.get_object(ObjectKind::Index, name)
    }
}
