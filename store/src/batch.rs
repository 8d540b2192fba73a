//! Chunks of one upload made durable together.
//!
//! Storing each chunk durably on its own costs a directory store two syncs per chunk (the
//! blob, then its directory entry), and the uploader waits for both before it goes on. A
//! [`ChunkBatch`] collects the chunks of one upload stream (or one embedded-store writer)
//! instead: each is written to `tmp/` with its writeback started and stays invisible; every
//! [`PUBLISH_CHUNKS`] chunks, [`PUBLISH_BYTES`] bytes or [`PUBLISH_AFTER`], and when the
//! upload ends ([`ChunkStore::publish`]), the pending ones are fsynced, renamed to their names and
//! their directories fsynced, one round of syncs for the lot.
//!
//! What stays true:
//! - **No chunk is visible before its bytes are durable.** MissingChunks reports a pending
//!   chunk missing, so no other session can rely on it; the uploading job's own workers do
//!   not ask twice for a digest.
//! - **A commit names only durable chunks.** The upload reports its chunks stored only after
//!   publishing them (the UploadChunks reply; the embedded writer's `finish`), and the
//!   commit checks that every chunk named is present under its name.
//! - **A crash loses only pending chunks**, which sit in `tmp/` and are removed at the next
//!   open; a resumed job asks the store again and sends what is missing.
//! - **GC cannot sweep a published chunk of a live session:** it is a new file whose mtime
//!   (its write) is after the session opened, and GC's cutoff precedes every live session.
//!
//! Backends without a cheaper batch (object stores, where each PUT is atomic and durable)
//! store each chunk at once, and a batch over them stays empty.

use std::sync::Mutex;

use vmbackup_proto::Digest;

use crate::backend::PendingChunk;
use crate::chunk_store::ChunkStore;
use crate::error::Result;

/// Pending chunks published together at most (bounds `tmp/` and the wait at the end).
pub const PUBLISH_CHUNKS: usize = 128;
/// Pending blob bytes published together at most.
pub const PUBLISH_BYTES: u64 = 256 << 20;
/// How long a chunk stays pending at most (checked as chunks arrive): a slow upload cut
/// off by a crash or a network outage loses at most this much of its work.
pub const PUBLISH_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// The chunks of one upload not yet published. Dropped unpublished, its chunks are removed.
#[derive(Debug, Default)]
pub struct ChunkBatch {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    chunks: Vec<PendingChunk>,
    bytes: u64,
    /// When the oldest pending chunk was added.
    since: Option<std::time::Instant>,
}

impl ChunkBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many chunks are pending.
    pub fn len(&self) -> usize {
        self.lock().chunks.len()
    }

    /// Whether no chunk is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a chunk of that name is pending here.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.lock().chunks.iter().any(|c| c.digest() == digest)
    }

    /// Adds a pending chunk; when that fills the batch, returns the chunks to publish now.
    pub(crate) fn add(&self, c: PendingChunk) -> Option<Vec<PendingChunk>> {
        let mut p = self.lock();
        p.bytes += c.len();
        p.chunks.push(c);
        let since = *p.since.get_or_insert_with(std::time::Instant::now);
        let full = p.chunks.len() >= PUBLISH_CHUNKS || p.bytes >= PUBLISH_BYTES || since.elapsed() >= PUBLISH_AFTER;
        full.then(|| Self::take_from(&mut p))
    }

    fn take(&self) -> Vec<PendingChunk> {
        Self::take_from(&mut self.lock())
    }

    fn take_from(p: &mut Pending) -> Vec<PendingChunk> {
        p.bytes = 0;
        p.since = None;
        std::mem::take(&mut p.chunks)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ChunkStore {
    /// [`ChunkStore::insert_chunk`] into `batch`: checked the same way, but durable and
    /// visible only once published (see the module doc). Returns whether it was new.
    pub fn insert_chunk_into(&self, batch: &ChunkBatch, session: &str, digest: &Digest, blob: &[u8]) -> Result<bool> {
        let owner = self.admit_chunk(session, digest, Some(blob))?;
        self.store_chunk(session, &owner, digest, blob, Some(batch))
    }

    /// [`ChunkStore::insert_own_chunk`] into `batch`.
    pub fn insert_own_chunk_into(
        &self,
        batch: &ChunkBatch,
        session: &str,
        digest: &Digest,
        blob: &[u8],
    ) -> Result<bool> {
        let owner = self.admit_chunk(session, digest, None)?;
        self.store_chunk(session, &owner, digest, blob, Some(batch))
    }

    /// Makes every chunk pending in `batch` durable and visible. On an error the chunks
    /// not yet under their names are removed, and the upload must fail.
    pub fn publish(&self, batch: &ChunkBatch) -> Result<()> {
        self.publish_pending(batch.take())
    }
}
