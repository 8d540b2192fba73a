//! A chunk store reached in-process, behind the same seam as a store across the network,
//! without a gRPC hop: the agent's embedded Image Storage (a local directory), and Ceph
//! backup storages (a RADOS pool the agent writes directly, see [`super::ceph`]). The
//! agent's gRPC server for the embedded store serves the same [`ChunkStore`] (same
//! sessions, same locks, same GC), so other clients see exactly what this path writes.
//!
//! What differs from a remote store, and why it is safe: chunks this process encoded from
//! plaintext it hashed itself go in without being decoded and hashed a second time
//! ([`ChunkStore::insert_own_chunk_into`]); every other rule holds (durable writes, made
//! durable a batch at a time as a store server does for an upload stream, before the
//! writer finishes; a commit checks that every chunk and index it names is present;
//! sessions protect chunks from GC).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use vmbackup_proto::Digest;
use vmbackup_store::batch::ChunkBatch;
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::error::StoreError;

use super::seam::{ChunkReader, ChunkStream, ChunkWriter, OpenedSession, PutStats, StoreStatus, StoredGroup};
use crate::error::{AgentError, ErrorKind, Result};

/// Chunks read ahead of the consumer per download (in order): enough to hide a pool's
/// latency with a restore's several streams, few enough to bound memory (a restore at
/// parallelism 4 holds at most 12 blobs, 48 MiB at 4 MiB chunks).
const READ_AHEAD: usize = 2;

/// A chunk store, in-process.
#[derive(Debug, Clone)]
pub struct LocalStore {
    store: Arc<ChunkStore>,
    location: String,
    kind: &'static str,
}

impl LocalStore {
    /// The embedded Image Storage `store`, named `location` in messages (its gRPC URL).
    pub fn new(store: Arc<ChunkStore>, location: String) -> Self {
        Self { store, location, kind: "Image Storage" }
    }

    /// The store in a Ceph pool, named `location` in messages.
    pub fn ceph(store: Arc<ChunkStore>, location: String) -> Self {
        Self { store, location, kind: "Ceph backup storage" }
    }

    /// The store's uuid.
    pub fn store_uuid(&self) -> &str {
        &self.store.identity().store_uuid
    }

    /// Collects garbage (a Ceph pool: under the pool's GC lease, whichever host holds it).
    pub async fn garbage_collect(&self, margin: Duration) -> Result<vmbackup_store::gc::GcReport> {
        self.run("GarbageCollect", move |s| s.garbage_collect(margin)).await
    }

    /// Runs `f` on the chunk store on a blocking thread; its error names this store and `what`.
    async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(&ChunkStore) -> std::result::Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store.clone();
        let (location, kind) = (self.location.clone(), self.kind);
        tokio::task::spawn_blocking(move || f(&store)).await?.map_err(|e| error(kind, &location, what, e))
    }
}

/// The agent's error for a failed call of the embedded store: the same kind and message a
/// client of its gRPC server gets.
fn error(kind_name: &str, location: &str, what: &str, e: StoreError) -> AgentError {
    use vmbackup_store::error::ErrorKind as K;
    let kind = match e.kind() {
        K::NotFound => ErrorKind::NotFound,
        K::Corrupt | K::InvalidArgument => ErrorKind::InvalidArgument,
        K::NoSpace => ErrorKind::ResourceExhausted,
        K::Conflict => ErrorKind::FailedPrecondition,
        K::Io => ErrorKind::Internal,
    };
    AgentError::new(kind, format!("{kind_name} at {location} failed {what}: {}", e.full_message()))
}

fn group(g: vmbackup_store::chunk_store::StoredGroup) -> StoredGroup {
    StoredGroup { group_uuid: g.manifest.group_uuid, manifest: g.bytes, damaged: g.damaged }
}

#[tonic::async_trait]
impl ChunkReader for LocalStore {
    async fn get_index(&self, name: &str) -> Result<Vec<u8>> {
        let name = name.to_string();
        self.run("GetIndex", move |s| s.get_index(&name)).await
    }

    async fn download(&self, _index: &str, digests: &[Digest]) -> Result<ChunkStream> {
        // Reads start as the consumer asks for chunks and run on while it works on the one
        // it has: a stream holds at most READ_AHEAD chunks besides that one, each read into
        // a buffer the stream reuses once the consumer has let go of it.
        let (store, pool) = (self.clone(), Arc::new(BlobPool::default()));
        Ok(futures::stream::iter(digests.to_vec())
            .map(move |d| {
                let (store, pool) = (store.clone(), pool.clone());
                async move {
                    let mut buf = pool.take();
                    store
                        .run("DownloadChunks", move |s| s.get_chunk_into(&d, &mut buf).map(|()| buf))
                        .await
                        .map(|buf| (d, Bytes::from_owner(Pooled { buf, pool })))
                }
            })
            .buffered(READ_AHEAD)
            .boxed())
    }
}

/// Blob buffers of one download, reused: a chunk-sized buffer allocated afresh per chunk
/// is memory mapped and faulted in again each time (the agent maps chunk-sized buffers,
/// see `vmbackup_store::daemon::malloc`).
#[derive(Debug, Default)]
struct BlobPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BlobPool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default()
    }
}

/// A downloaded blob; its buffer goes back to the download's pool when the last `Bytes`
/// holding it is dropped.
#[derive(Debug)]
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BlobPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Never more buffers than a stream holds at once.
        if free.len() <= READ_AHEAD {
            free.push(buf);
        }
    }
}

#[tonic::async_trait]
impl super::seam::Store for LocalStore {
    fn location(&self) -> &str {
        &self.location
    }

    async fn status(&self) -> Result<StoreStatus> {
        let (total, available) = self.run("Status", |s| s.capacity()).await?;
        Ok(StoreStatus {
            store_uuid: self.store_uuid().to_string(),
            total_capacity: i64::try_from(total).unwrap_or(i64::MAX),
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            chunk_size: self.store.identity().chunk_size,
        })
    }

    async fn open_session(&self, client: &str) -> Result<OpenedSession> {
        // A directory keeps sessions in memory; a pool also records them in the pool (I/O).
        let client = client.to_string();
        let owner = vmbackup_store::sessions::SessionOwner::local();
        let (id, ttl) = self.run("OpenSession", move |s| s.sessions().open(&client, owner, Duration::ZERO)).await?;
        Ok(OpenedSession { id, ttl })
    }

    async fn keep_alive(&self, session: &str) -> Result<()> {
        let session = session.to_string();
        self.run("KeepAlive", move |s| s.sessions().touch(&session).map(|_| ())).await
    }

    async fn close_session(&self, session: &str) -> Result<()> {
        let session = session.to_string();
        self.run("CloseSession", move |s| s.sessions().close(&session)).await
    }

    async fn missing(&self, session: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let (session, digests) = (session.to_string(), digests.to_vec());
        self.run("MissingChunks", move |s| s.missing(&session, &digests)).await
    }

    async fn writer(&self, session: &str) -> Result<Box<dyn ChunkWriter>> {
        Ok(Box::new(LocalWriter {
            store: self.clone(),
            session: session.to_string(),
            batch: Arc::default(),
            stats: Default::default(),
        }))
    }

    async fn put_index(&self, session: &str, name: &str, index: super::IndexBytes) -> Result<Digest> {
        let (session, name) = (session.to_string(), name.to_string());
        // The chunk store checks an index whole: this holds its encoding for the call.
        self.run("PutIndex", move |s| s.put_index(&session, &name, &index.to_vec())).await
    }

    async fn commit(&self, session: &str, manifest: Vec<u8>, retain_until: u64) -> Result<()> {
        let session = session.to_string();
        self.run("CommitGroup", move |s| s.commit_group(&session, &manifest, retain_until)).await.map(|_| ())
    }

    async fn list_groups(&self) -> Result<Vec<StoredGroup>> {
        Ok(self.run("ListGroups", |s| s.list_groups()).await?.into_iter().map(group).collect())
    }

    async fn get_group(&self, group_uuid: &str) -> Result<StoredGroup> {
        let g = group_uuid.to_string();
        self.run("GetGroup", move |s| s.get_group(&g)).await.map(group)
    }

    async fn delete_group(&self, group_uuid: &str) -> Result<()> {
        let g = group_uuid.to_string();
        self.run("DeleteGroup", move |s| s.delete_group(&g)).await
    }
}

/// Chunks of one session written straight into the chunk store; workers write in
/// parallel. They become durable and visible a batch at a time (see
/// [`vmbackup_store::batch`]), all of them by the time `finish` returns.
#[derive(Debug)]
struct LocalWriter {
    store: LocalStore,
    session: String,
    batch: Arc<ChunkBatch>,
    stats: std::sync::Mutex<PutStats>,
}

#[tonic::async_trait]
impl ChunkWriter for LocalWriter {
    async fn put(&self, digest: Digest, blob: Bytes) -> Result<()> {
        let (session, batch) = (self.session.clone(), self.batch.clone());
        let new =
            self.store.run("UploadChunks", move |s| s.insert_own_chunk_into(&batch, &session, &digest, &blob)).await?;
        let mut stats = self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if new {
            stats.stored += 1;
        } else {
            stats.already_present += 1;
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<PutStats> {
        let batch = self.batch.clone();
        self.store.run("UploadChunks", move |s| s.publish(&batch)).await?;
        Ok(*self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}
