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

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::format_error::FormatError;
use vmbackup_proto::index::{self, VolumeIndex};
use vmbackup_proto::manifest::{GroupManifest, is_index_name};

use crate::backend::fs::FsBackend;
use crate::backend::{Backend, ObjectKind};
use crate::error::{ErrorKind, Result, StoreError};
use crate::group_state::GroupState;
use crate::identity::StoreIdentity;
use crate::sessions::Sessions;

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
}

fn bump(c: &AtomicU64, n: u64) {
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
    /// Idle chunk decoders, one per check running at once at most (each keeps a zstd
    /// context and a chunk-sized buffer, so checks allocate nothing per chunk).
    decoders: Mutex<Vec<blob::Decoder>>,
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
            decoders: Mutex::default(),
        }
    }

    /// Checks that `blob` decodes to at most one chunk of plaintext hashing to `digest`.
    pub fn check_blob(&self, blob_bytes: &[u8], digest: &Digest) -> std::result::Result<(), FormatError> {
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
        self.sessions.touch(session)?;
        let mut missing = Vec::new();
        let mut present = 0u64;
        for d in digests {
            if d.is_zero_chunk() {
                continue;
            }
            let _guard = self.shard_lock(d);
            if self.backend.touch_chunk(d)? {
                present += 1;
            } else {
                missing.push(*d);
            }
        }
        bump(&self.counters.chunks_reported_present, present);
        Ok(missing)
    }

    /// Stores an uploaded chunk after checking it: the blob must decode, its plaintext must
    /// hash to `digest` and fit the chunk size. Returns whether it was new.
    pub fn insert_chunk(&self, session: &str, digest: &Digest, blob_bytes: &[u8]) -> Result<bool> {
        self.sessions.touch(session)?;
        if digest.is_zero_chunk() {
            return Err(StoreError::new(ErrorKind::InvalidArgument, "the zero-chunk marker is not a chunk name"));
        }
        if let Err(e) = self.check_blob(blob_bytes, digest) {
            bump(&self.counters.chunks_rejected, 1);
            return Err(StoreError::new(ErrorKind::Corrupt, format!("chunk {digest} refused: {e}")));
        }
        self.store_chunk(digest, blob_bytes)
    }

    /// Stores a chunk that this process encoded itself from plaintext whose digest it
    /// computed (the agent's embedded store): the blob is not decoded and hashed a second
    /// time. Everything that crosses a process boundary goes through [`Self::insert_chunk`].
    /// Durability is the same. Returns whether it was new.
    pub fn insert_own_chunk(&self, session: &str, digest: &Digest, blob_bytes: &[u8]) -> Result<bool> {
        self.sessions.touch(session)?;
        if digest.is_zero_chunk() {
            return Err(StoreError::new(ErrorKind::InvalidArgument, "the zero-chunk marker is not a chunk name"));
        }
        self.store_chunk(digest, blob_bytes)
    }

    /// Writes a chunk durably under its shard lock and counts it; the caller has checked it.
    fn store_chunk(&self, digest: &Digest, blob_bytes: &[u8]) -> Result<bool> {
        let _guard = self.shard_lock(digest);
        let new = self.backend.put_chunk(digest, blob_bytes)?;
        if new {
            bump(&self.counters.chunks_uploaded, 1);
            bump(&self.counters.bytes_uploaded, u64::try_from(blob_bytes.len()).unwrap_or(u64::MAX));
        } else {
            bump(&self.counters.chunks_already_present, 1);
        }
        Ok(new)
    }

    /// A chunk's blob.
    pub fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>> {
        let b = self.backend.get_chunk(digest)?;
        bump(&self.counters.chunks_downloaded, 1);
        bump(&self.counters.bytes_downloaded, u64::try_from(b.len()).unwrap_or(u64::MAX));
        Ok(b)
    }

    fn check_index_name(name: &str) -> Result<()> {
        if is_index_name(name) {
            Ok(())
        } else {
            Err(StoreError::new(ErrorKind::InvalidArgument, format!("index name {name:?} is not <32 hex>.vidx")))
        }
    }

    fn decode_index(&self, name: &str, bytes: &[u8]) -> Result<VolumeIndex> {
        let ix = VolumeIndex::decode(bytes, index::MAX_CHUNKS)
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

    /// Stores a volume index (validated first); returns its digest.
    pub fn put_index(&self, session: &str, name: &str, bytes: &[u8]) -> Result<Digest> {
        self.sessions.touch(session)?;
        Self::check_index_name(name)?;
        self.decode_index(name, bytes)?;
        self.backend.put_object(ObjectKind::Index, name, bytes)?;
        Ok(vmbackup_proto::index::index_digest(bytes))
    }

    /// A stored index.
    pub fn get_index(&self, name: &str) -> Result<Vec<u8>> {
        Self::check_index_name(name)?;
        self.backend.get_object(ObjectKind::Index, name)
    }

    /// Commits a group: visible only if every index and chunk it names is present.
    /// Committing the same manifest again is a no-op; another manifest under a committed
    /// group uuid is a conflict.
    pub fn commit_group(&self, session: &str, manifest_bytes: &[u8]) -> Result<GroupManifest> {
        self.sessions.touch(session)?;
        let manifest = GroupManifest::decode(manifest_bytes)
            .map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let name = format!("{}.json", manifest.group_uuid);
        match self.backend.get_object(ObjectKind::Manifest, &name) {
            Ok(existing) if existing == manifest_bytes => return Ok(manifest),
            Ok(_) => {
                return Err(StoreError::new(
                    ErrorKind::Conflict,
                    format!("group {} is already committed with another manifest", manifest.group_uuid),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if manifest.chunk_size != self.identity.chunk_size {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "manifest chunk size {} differs from the store's {}",
                    manifest.chunk_size, self.identity.chunk_size
                ),
            ));
        }
        let mut checked = HashSet::new();
        for v in &manifest.volumes {
            let bytes = self.backend.get_object(ObjectKind::Index, &v.index_name).map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    StoreError::new(
                        ErrorKind::InvalidArgument,
                        format!("index {} of volume backup {} was never uploaded", v.index_name, v.volume_backup_uuid),
                    )
                } else {
                    e
                }
            })?;
            let digest = vmbackup_proto::index::index_digest(&bytes).to_hex();
            if digest != v.index_digest {
                return Err(StoreError::new(
                    ErrorKind::InvalidArgument,
                    format!("index {} has digest {digest}, the manifest says {}", v.index_name, v.index_digest),
                ));
            }
            let ix = self.decode_index(&v.index_name, &bytes)?;
            if ix.virtual_size != v.virtual_size {
                return Err(StoreError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "index {} covers {} bytes, the manifest says {}",
                        v.index_name, ix.virtual_size, v.virtual_size
                    ),
                ));
            }
            for d in ix.referenced() {
                if checked.insert(*d) && !self.backend.has_chunk(d)? {
                    return Err(StoreError::new(
                        ErrorKind::InvalidArgument,
                        format!("chunk {d} of volume backup {} is not in the store", v.volume_backup_uuid),
                    ));
                }
            }
        }
        self.backend.put_object(ObjectKind::Manifest, &name, manifest_bytes)?;
        tracing::info!(group = %manifest.group_uuid, volumes = manifest.volumes.len(), chunks = checked.len(), "group committed");
        Ok(manifest)
    }

    fn group_name(uuid: &str) -> Result<String> {
        if uuid.len() == 32 && uuid.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(format!("{}.json", uuid.to_ascii_lowercase()))
        } else {
            Err(StoreError::new(ErrorKind::InvalidArgument, format!("group uuid {uuid:?} is not 32 hex digits")))
        }
    }

    /// A committed group.
    pub fn get_group(&self, uuid: &str) -> Result<StoredGroup> {
        let bytes = self.backend.get_object(ObjectKind::Manifest, &Self::group_name(uuid)?).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                StoreError::new(ErrorKind::NotFound, format!("group {uuid} not found"))
            } else {
                e
            }
        })?;
        let manifest = GroupManifest::decode(&bytes)
            .map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("manifest of group {uuid}: {e}")))?;
        let damaged = self.group_state.is_damaged(&manifest.group_uuid)?;
        Ok(StoredGroup { manifest, bytes, damaged })
    }

    /// Every committed group, oldest first. A manifest that cannot be read is reported in
    /// the log and skipped, so one damaged file does not hide every other group.
    pub fn list_groups(&self) -> Result<Vec<StoredGroup>> {
        let damaged = self.group_state.damaged()?;
        let mut out = Vec::new();
        for o in self.backend.list_objects(ObjectKind::Manifest)? {
            let Some(uuid) = o.name.strip_suffix(".json") else { continue };
            let bytes = match self.backend.get_object(ObjectKind::Manifest, &o.name) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match GroupManifest::decode(&bytes) {
                Ok(manifest) => {
                    let is_damaged = damaged.contains(uuid);
                    out.push(StoredGroup { manifest, bytes, damaged: is_damaged });
                }
                Err(e) => tracing::error!(manifest = %o.name, error = %e, "unreadable group manifest skipped"),
            }
        }
        out.sort_by(|a, b| {
            a.manifest.created.cmp(&b.manifest.created).then(a.manifest.group_uuid.cmp(&b.manifest.group_uuid))
        });
        Ok(out)
    }

    /// Deletes a group: its manifest, then its indexes. Chunks are left to GC.
    pub fn delete_group(&self, uuid: &str) -> Result<()> {
        let group = self.get_group(uuid)?;
        self.backend.delete_object(ObjectKind::Manifest, &Self::group_name(uuid)?)?;
        for v in &group.manifest.volumes {
            self.backend.delete_object(ObjectKind::Index, &v.index_name)?;
        }
        tracing::info!(group = %uuid, "group deleted");
        Ok(())
    }
}
