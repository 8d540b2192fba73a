//! Where chunks, indexes and manifests are kept: a small trait that a local directory
//! ([`fs::FsBackend`]) implements and an object store can implement too.
//!
//! The contract is what an object store can give: no rename, no directories, and a
//! conditional create (`If-None-Match: *` on S3, a hard link on a directory). Chunks are
//! content-addressed, so writing one twice is harmless; indexes and manifests are created
//! once and never replaced.

pub mod fs;
pub mod rados;
pub mod s3;

use std::path::PathBuf;
use std::time::SystemTime;

use vmbackup_proto::Digest;

use crate::error::{ErrorKind, Result, StoreError};

/// Named objects beside the chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// Volume indexes (`<volume-backup-uuid>.vidx`).
    Index,
    /// Group manifests (`<group-uuid>.json`).
    Manifest,
    /// Store bookkeeping (e.g. `verify-state.json`).
    Meta,
    /// What the store keeps about a group beside its manifest (`<group-uuid>.json`:
    /// namespace, retention lock); written before the manifest.
    GroupMeta,
}

impl ObjectKind {
    /// The top-level directory (fs), key prefix (S3) or namespace suffix (RADOS) of this
    /// kind: one layout across backends.
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Index => "indexes",
            ObjectKind::Manifest => "groups",
            ObjectKind::Meta => "meta",
            ObjectKind::GroupMeta => "group-meta",
        }
    }
}

/// A stored chunk as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Its name.
    pub digest: Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// Last time it was written or touched.
    pub touched: SystemTime,
}

/// A stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its name.
    pub name: String,
    /// Last write.
    pub modified: SystemTime,
}

/// What [`Backend::stage_chunk`] did with a chunk.
#[derive(Debug)]
pub enum Staged {
    /// It was already stored (and is touched now).
    Present,
    /// It is stored durably now.
    Stored,
    /// It is written aside: neither durable nor visible until [`Backend::publish_chunks`].
    Pending(PendingChunk),
}

/// A chunk written aside by [`Backend::stage_chunk`], its writeback started. Dropped
/// without being published, it is removed: it never becomes visible.
#[derive(Debug)]
pub struct PendingChunk {
    digest: Digest,
    len: u64,
    file: std::fs::File,
    /// Where it waits (None once published).
    path: Option<PathBuf>,
}

impl PendingChunk {
    /// A chunk `digest` of `len` blob bytes written to `file` at `path`.
    pub(crate) fn new(digest: Digest, len: u64, file: std::fs::File, path: PathBuf) -> Self {
        Self { digest, len, file, path: Some(path) }
    }

    /// Its name.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Its blob's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether its blob is empty (never, for a valid blob).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn file(&self) -> &std::fs::File {
        &self.file
    }

    pub(crate) fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// It has been moved to its name: nothing to remove on drop.
    pub(crate) fn published(mut self) {
        self.path = None;
    }
}

impl Drop for PendingChunk {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Storage of chunk blobs and named objects. Every method may be called from many threads.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Whether a chunk is stored.
    fn has_chunk(&self, digest: &Digest) -> Result<bool>;
    /// Which of `digests` are stored, in order. Object stores look them up concurrently.
    fn has_chunks(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        digests.iter().map(|d| self.has_chunk(d)).collect()
    }
    /// Stores a chunk durably unless present; returns whether it was written.
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<bool>;
    /// Stores a chunk unless present, like [`Backend::put_chunk`], but may leave it pending:
    /// written aside with its writeback started, neither durable nor visible until
    /// [`Backend::publish_chunks`] makes a batch of them durable and visible together (a
    /// directory: one round of syncs for many chunks instead of two syncs for each).
    /// Backends without a cheaper batch store it at once (the default).
    fn stage_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<Staged> {
        Ok(if self.put_chunk(digest, blob)? { Staged::Stored } else { Staged::Present })
    }
    /// Makes pending chunks durable, then visible under their names, then their names
    /// durable. On an error, those not yet renamed are removed (none is ever visible
    /// before its bytes are durable).
    fn publish_chunks(&self, chunks: Vec<PendingChunk>) -> Result<()> {
        match chunks.first() {
            None => Ok(()),
            Some(c) => Err(StoreError::new(
                ErrorKind::Io,
                format!("chunk {} is pending on a backend that leaves no chunk pending", c.digest()),
            )),
        }
    }
    /// A stored chunk's blob (NotFound if absent).
    fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>>;
    /// A stored chunk's blob into `buf` (cleared first), reusing its capacity where the
    /// backend can.
    fn get_chunk_into(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.get_chunk(digest)?;
        Ok(())
    }
    /// Marks a chunk as used now; returns false if it is absent.
    fn touch_chunk(&self, digest: &Digest) -> Result<bool>;
    /// Last write or touch of a chunk (None if absent).
    fn chunk_touched(&self, digest: &Digest) -> Result<Option<SystemTime>>;
    /// Calls `f` for every stored chunk.
    fn for_each_chunk(&self, f: &mut dyn FnMut(ChunkInfo) -> Result<()>) -> Result<()>;
    /// Removes a chunk (absent is fine).
    fn delete_chunk(&self, digest: &Digest) -> Result<()>;
    /// Moves a damaged chunk aside, out of the store, for inspection.
    fn quarantine_chunk(&self, digest: &Digest) -> Result<()>;
    /// Writes a named object atomically and durably (replacing one of that name).
    fn put_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()>;
    /// Creates a named object atomically and durably unless one of that name exists (never
    /// replacing it); returns whether it was created. Manifests and indexes are written so.
    fn create_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<bool>;
    /// Reads a named object (NotFound if absent).
    fn get_object(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>>;
    /// Lists objects of a kind.
    fn list_objects(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;
    /// Removes a named object durably (absent is fine).
    fn delete_object(&self, kind: ObjectKind, name: &str) -> Result<()>;
    /// Total and available bytes.
    fn capacity(&self) -> Result<(u64, u64)>;
    /// Records that `namespace` has uploaded `digest` (the per-namespace dedup scope);
    /// returns whether the record is new. Losing one only costs a re-upload.
    fn mark_owner(&self, namespace: &str, digest: &Digest) -> Result<bool>;
    /// Whether `namespace` has uploaded `digest`.
    fn is_owner(&self, namespace: &str, digest: &Digest) -> Result<bool>;
    /// Checks, quickly, that the backend answers (Status runs it first, so an unreachable
    /// bucket is an error within seconds, never a hang).
    fn probe(&self) -> Result<()> {
        Ok(())
    }
    /// Where the store is, for Status and logs: `fs` or `s3://bucket/prefix` (no secrets).
    fn describe(&self) -> String {
        "fs".into()
    }
}
