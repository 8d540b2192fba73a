//! The seam between the backup engines (backup, restore, recover, delete, sync) and the
//! places chunks live. The engines see only these traits; each kind of backup storage
//! implements them:
//!
//! | trait | what | implemented by |
//! |---|---|---|
//! | [`ChunkReader`] | volume indexes and chunk blobs, in order | Image Storage client, [`super::metered::Metered`] |
//! | [`ChunkWriter`] | chunk blobs of one session, durable at [`ChunkWriter::finish`] | Image Storage upload stream, mounted store directory (fsInfo), [`super::metered::Metered`] |
//! | [`Store`] | sessions, batched `missing`, indexes, commit, groups | Image Storage client |
//!
//! A [`Session`] is the guard of an open write session: it keeps the session alive while
//! it lives and closes it on every path, success or failure (an explicit [`Session::close`],
//! or a close sent from its drop), so no session lingers until its TTL and holds back a
//! store's GC cutoff.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use vmbackup_proto::Digest;
use vmbackup_proto::index::SparseIndex;
use vmbackup_proto::store::v1::INDEX_PIECE_BYTES;

use crate::error::{AgentError, ErrorKind, Result};

/// What a store says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// The store's persistent uuid.
    pub store_uuid: String,
    /// Bytes.
    pub total_capacity: i64,
    /// Bytes.
    pub available_capacity: i64,
    /// Fixed chunk size of the store.
    pub chunk_size: u32,
}

/// A committed group as a store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGroup {
    /// Group uuid.
    pub group_uuid: String,
    /// The encoded group manifest.
    pub manifest: Vec<u8>,
    /// Whether the store's verify found a chunk of it missing or bad.
    pub damaged: bool,
}

/// A volume index to store: encoded already (a copy, a re-keyed index), or sparse and
/// encoded piece by piece as it is sent, so a backup never holds the encoding of a huge
/// sparse volume's index whole.
#[derive(Debug, Clone)]
pub enum IndexBytes {
    /// The encoded index.
    Whole(Bytes),
    /// The non-zero chunks; encoded on the way out.
    Sparse(Arc<SparseIndex>),
}

impl IndexBytes {
    /// Bytes of the encoded index.
    pub fn encoded_len(&self) -> u64 {
        match self {
            IndexBytes::Whole(b) => u64::try_from(b.len()).unwrap_or(u64::MAX),
            IndexBytes::Sparse(ix) => ix.encoded_len(),
        }
    }

    /// The encoded index in pieces of the store API's `INDEX_PIECE_BYTES`.
    pub fn pieces(&self) -> Box<dyn Iterator<Item = Bytes> + Send + Sync> {
        match self {
            IndexBytes::Whole(b) => {
                Box::new(vmbackup_proto::pieces::split(b.clone(), "", "").into_iter().map(|p| p.data))
            }
            IndexBytes::Sparse(ix) => Box::new(ix.clone().pieces(INDEX_PIECE_BYTES).map(Bytes::from)),
        }
    }

    /// The whole encoded index, for stores that check an index in one piece.
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            IndexBytes::Whole(b) => b.to_vec(),
            IndexBytes::Sparse(ix) => ix.clone().pieces(INDEX_PIECE_BYTES).flatten().collect(),
        }
    }
}

impl From<Vec<u8>> for IndexBytes {
    fn from(v: Vec<u8>) -> Self {
        IndexBytes::Whole(v.into())
    }
}

impl From<SparseIndex> for IndexBytes {
    fn from(ix: SparseIndex) -> Self {
        IndexBytes::Sparse(Arc::new(ix))
    }
}

/// Chunk blobs `(digest, encoded blob)`, in the order they were asked for.
pub type ChunkStream = BoxStream<'static, Result<(Digest, Bytes)>>;

/// How many chunks one [`ChunkWriter`] stored and found present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutStats {
    /// Chunks written.
    pub stored: u64,
    /// Chunks the storage already had.
    pub already_present: u64,
}

/// A write session a store opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedSession {
    /// Session id.
    pub id: String,
    /// How long the store keeps it without a keep-alive.
    pub ttl: Duration,
}

/// Reads what a backup storage holds.
#[tonic::async_trait]
pub trait ChunkReader: Send + Sync + std::fmt::Debug {
    /// The encoded volume index `name`.
    async fn get_index(&self, name: &str) -> Result<Vec<u8>>;
    /// Volume index `name`, checked, holding only its non-zero chunks. Readers that can
    /// stream an index decode it as it arrives, never holding its encoding whole.
    async fn get_sparse_index(&self, name: &str) -> Result<SparseIndex> {
        let bytes = self.get_index(name).await?;
        SparseIndex::decode(&bytes, vmbackup_proto::index::MAX_CHUNKS)
            .map_err(|e| AgentError::new(ErrorKind::Internal, format!("index {name}: {e}")))
    }
    /// The blobs of `digests`, in that order, read for index `index` (a store lets a
    /// caller that is not its admin read only chunks an index of its namespace names).
    async fn download(&self, index: &str, digests: &[Digest]) -> Result<ChunkStream>;
}

/// Writes chunk blobs for one session; workers share it (`put` takes `&self`).
#[tonic::async_trait]
pub trait ChunkWriter: Send + Sync {
    /// Stores one encoded chunk blob.
    async fn put(&self, digest: Digest, blob: Bytes) -> Result<()>;
    /// Waits until every chunk put is durable on the storage.
    async fn finish(self: Box<Self>) -> Result<PutStats>;
}

/// A backup storage: sessions, chunks, indexes and group manifests.
#[tonic::async_trait]
pub trait Store: ChunkReader {
    /// Where it is, for messages (a URL).
    fn location(&self) -> &str;
    /// Identity, capacity and chunk size.
    async fn status(&self) -> Result<StoreStatus>;
    /// Opens a write session: chunks it uploads or is told are present are kept by GC.
    async fn open_session(&self, client: &str) -> Result<OpenedSession>;
    /// Renews a session.
    async fn keep_alive(&self, session: &str) -> Result<()>;
    /// Ends a session.
    async fn close_session(&self, session: &str) -> Result<()>;
    /// Which of `digests` the storage lacks (any number; implementations batch).
    async fn missing(&self, session: &str, digests: &[Digest]) -> Result<Vec<Digest>>;
    /// A writer of chunk blobs for `session`.
    async fn writer(&self, session: &str) -> Result<Box<dyn ChunkWriter>>;
    /// Stores a volume index; returns its digest.
    async fn put_index(&self, session: &str, name: &str, index: IndexBytes) -> Result<Digest>;
    /// Commits a group manifest: the group becomes visible, atomically.
    async fn commit(&self, session: &str, manifest: Vec<u8>, retain_until: u64) -> Result<()>;
    /// Every committed group.
    async fn list_groups(&self) -> Result<Vec<StoredGroup>>;
    /// One committed group.
    async fn get_group(&self, group_uuid: &str) -> Result<StoredGroup>;
    /// Deletes a group; its chunks are reclaimed by the storage's GC.
    async fn delete_group(&self, group_uuid: &str) -> Result<()>;
}

/// An open write session on a store, closed on every path.
#[derive(Debug)]
pub struct Session {
    store: Arc<dyn Store>,
    id: String,
    open: bool,
    _keep_alive: tokio_util::sync::DropGuard,
}

impl Session {
    /// Opens a session on `store` for `client` and keeps it alive (a keep-alive at a third
    /// of its TTL) until it is closed or dropped.
    pub async fn open(store: Arc<dyn Store>, client: &str) -> Result<Self> {
        let opened = store.open_session(client).await?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let (s, id, token) = (store.clone(), opened.id.clone(), cancel.clone());
        let period = (opened.ttl / 3).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = s.keep_alive(&id).await {
                    tracing::warn!(store = %s.location(), session = %id, error = %e, "session keep-alive failed");
                }
            }
        });
        Ok(Self { store, id: opened.id, open: true, _keep_alive: cancel.drop_guard() })
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The store it is open on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Which of `digests` the store lacks; the session protects them from GC from now on.
    /// The answer is checked to be a subset of the question (each digest at most once), so
    /// callers may count what the store had as `digests.len() - missing.len()`.
    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let missing = self.store.missing(&self.id, digests).await?;
        let asked: std::collections::HashSet<&Digest> = digests.iter().collect();
        let mut seen = std::collections::HashSet::with_capacity(missing.len());
        for d in &missing {
            if !asked.contains(d) || !seen.insert(*d) {
                return Err(crate::error::AgentError::new(
                    crate::error::ErrorKind::Internal,
                    format!(
                        "{} answered MissingChunks with chunk {d}, which was not asked for or was named twice",
                        self.store.location()
                    ),
                ));
            }
        }
        Ok(missing)
    }

    /// A writer of chunk blobs in this session.
    pub async fn writer(&self) -> Result<Box<dyn ChunkWriter>> {
        self.store.writer(&self.id).await
    }

    /// Stores a volume index.
    pub async fn put_index(&self, name: &str, index: impl Into<IndexBytes>) -> Result<Digest> {
        self.store.put_index(&self.id, name, index.into()).await
    }

    /// Commits the group manifest.
    pub async fn commit(&self, manifest: Vec<u8>, retain_until: u64) -> Result<()> {
        self.store.commit(&self.id, manifest, retain_until).await
    }

    /// Closes the session and waits for the store's answer.
    pub async fn close(mut self) -> Result<()> {
        self.open = false;
        self.store.close_session(&self.id).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        // Dropped on an error path: close it in the background, so the store's GC cutoff
        // is not held back for the session's TTL.
        let (store, id) = (self.store.clone(), std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = store.close_session(&id).await {
                        tracing::warn!(store = %store.location(), session = %id, error = %e, "closing an abandoned session failed; it expires with its TTL");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(store = %store.location(), session = %id, "session dropped outside the runtime; it expires with its TTL");
            }
        }
    }
}
