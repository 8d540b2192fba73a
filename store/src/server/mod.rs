//! The Image Storage gRPC server: `vmbackup.store.v1.ImageStore`, gRPC health and
//! reflection, on one listener. Every handler runs its file work on blocking threads.
//!
//! Message limits are raised well above a 4 MiB chunk (tonic's default is 4 MiB) and the
//! HTTP/2 windows widened so one client can stream chunks at memory speed. Uploads are
//! checked and written a few at a time per stream and downloads read a few chunks ahead,
//! so memory stays bounded by a handful of chunks per stream.

use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use vmbackup_proto::Digest;
use vmbackup_proto::store::v1 as pb;
use vmbackup_proto::store::v1::image_store_server::{ImageStore, ImageStoreServer};

use crate::access::{Access, Role};
use crate::batch::ChunkBatch;
use crate::chunk_store::ChunkStore;
use crate::error::{ErrorKind, StoreError};
use crate::sessions::SessionOwner;
use guard::audit;

mod guard;
mod index;
use crate::identity::{FORMAT_VERSION, StoreIdentity};

/// Largest gRPC message either side accepts: a 16 MiB chunk plus framing, with room.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 stream window.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2 connection window.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Largest HTTP/2 frame either side accepts. HTTP/2's default (16 KiB) splits a 4 MiB chunk
/// into 256 frames, each a separate buffer, wakeup and copy; 1 MiB frames make it four.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Most digests one MissingChunks or DownloadChunks request may name.
pub const MAX_DIGESTS_PER_REQUEST: usize = 16384;
/// Blob bytes being checked and written, or read ahead, at once per stream: enough requests
/// in flight that one stream reaches an object store's throughput rather than one
/// request's latency, bounded in bytes so large chunks cannot multiply memory.
pub const IN_FLIGHT_BYTES: u64 = 32 << 20;
/// Most chunks in flight per stream, whatever their size.
const MAX_IN_FLIGHT: usize = 16;

/// State shared by every request of one store server.
#[derive(Debug)]
pub struct StoreService {
    store: Arc<ChunkStore>,
    access: Arc<Access>,
    grants: guard::Grants,
    gc_margin: Duration,
    runs: Arc<crate::metrics::RunMetrics>,
    /// Chunk streams in progress: when the last ends, the heap's free pages are returned.
    activity: crate::daemon::malloc::Activity,
}

impl StoreService {
    /// Opens (or creates) the store under `data_dir`, answering the callers `auth` names.
    pub fn open(data_dir: PathBuf, chunk_size: u32, auth: &crate::access::AuthConfig) -> Result<Self, StoreError> {
        let store = ChunkStore::open(&data_dir, chunk_size)?;
        let access = Access::new(auth, &data_dir).map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e))?;
        Ok(Self::with_store(store, Arc::new(access)))
    }

    /// Serves an opened store to the callers `access` knows.
    pub fn with_store(store: ChunkStore, access: Arc<Access>) -> Self {
        Self {
            store: Arc::new(store),
            access,
            grants: guard::Grants::default(),
            gc_margin: crate::gc::DEFAULT_MARGIN,
            runs: Arc::default(),
            activity: crate::daemon::malloc::Activity::default(),
        }
    }

    /// Who may call this store (reloadable).
    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// Sets the default GC safety margin.
    pub fn with_gc_margin(mut self, margin: Duration) -> Self {
        self.gc_margin = margin;
        self
    }

    /// The store's identity.
    pub fn identity(&self) -> &StoreIdentity {
        self.store.identity()
    }

    /// The chunk store.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// The Prometheus registry of this store.
    pub fn metrics(&self) -> prometheus_client::registry::Registry {
        crate::metrics::store_registry(self.store.clone(), &self.runs)
    }

    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ChunkStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(|e| status(&e))
    }
}

/// gRPC status of a store error.
pub fn status(e: &StoreError) -> Status {
    let code = match e.kind() {
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::Corrupt | ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NoSpace => tonic::Code::ResourceExhausted,
        ErrorKind::Conflict => tonic::Code::FailedPrecondition,
        ErrorKind::Io => tonic::Code::Internal,
    };
    Status::new(code, e.full_message())
}

#[allow(clippy::result_large_err)] // tonic's Status is the error type of every handler
fn digests(raw: &[Vec<u8>], field: &str) -> Result<Vec<Digest>, Status> {
    if raw.len() > MAX_DIGESTS_PER_REQUEST {
        return Err(Status::invalid_argument(format!(
            "{field}: {} digests; at most {MAX_DIGESTS_PER_REQUEST} per request",
            raw.len()
        )));
    }
    raw.iter()
        .enumerate()
        .map(|(i, d)| Digest::from_slice(d).map_err(|e| Status::invalid_argument(format!("{field}[{i}]: {e}"))))
        .collect()
}

fn group_info(g: crate::chunk_store::StoredGroup) -> pb::GroupInfo {
    pb::GroupInfo {
        group_uuid: g.manifest.group_uuid,
        manifest: g.bytes,
        damaged: g.damaged,
        namespace: g.meta.namespace,
        retain_until: g.meta.retain_until,
    }
}

type Settled = Result<Result<(bool, u64), StoreError>, tokio::task::JoinError>;

#[allow(clippy::result_large_err)]
/// Counts a finished upload into the reply; returns its blob bytes.
fn settle(res: Settled, reply: &mut pb::UploadChunksReply) -> Result<u64, Status> {
    let (new, len) = res.map_err(|e| Status::internal(format!("upload task failed: {e}")))?.map_err(|e| status(&e))?;
    if new {
        reply.chunks_stored += 1;
        reply.bytes_stored += len;
    } else {
        reply.chunks_already_present += 1;
    }
    Ok(len)
}

#[tonic::async_trait]
impl ImageStore for StoreService {
    async fn status(&self, r: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let p = self.access.authenticate(&r).await?;
        let who = p.clone();
        let backend = self.store.backend_description();
        // A backend that does not answer is UNAVAILABLE within seconds (agents then mark the
        // backup storage Disconnected), not a call that waits on retries.
        self.run(|s| s.probe()).await.map_err(|e| {
            Status::unavailable(format!("the store's backend {backend} does not answer: {}", e.message().trim()))
        })?;
        let admin = p.has(Role::Admin);
        let (capacity, groups, objects) = self
            .run(move |s| {
                let visible = s.count_groups(admin, &|ns| who.sees(ns))?;
                let objects = if admin { Some(s.stored_objects()?) } else { None };
                Ok((s.capacity()?, visible, objects))
            })
            .await?;
        let c = self.store.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(pb::StatusReply {
            store_uuid: self.identity().store_uuid.clone(),
            total_capacity: capacity.0,
            available_capacity: capacity.1,
            chunk_size: self.identity().chunk_size,
            format_version: FORMAT_VERSION,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            // Store-wide activity is an admin's to see: another namespace's uploads would
            // show in them.
            counters: p.has(Role::Admin).then(|| pb::StoreCounters {
                chunks_uploaded: get(&c.chunks_uploaded),
                bytes_uploaded: get(&c.bytes_uploaded),
                chunks_already_present: get(&c.chunks_already_present),
                chunks_reported_present: get(&c.chunks_reported_present),
                chunks_downloaded: get(&c.chunks_downloaded),
                bytes_downloaded: get(&c.bytes_downloaded),
                chunks_rejected: get(&c.chunks_rejected),
            }),
            group_count: u64::try_from(groups).unwrap_or(u64::MAX),
            open_sessions: if p.has(Role::Admin) {
                u32::try_from(self.store.sessions().count()).unwrap_or(u32::MAX)
            } else {
                0
            },
            principal: p.name.clone(),
            roles: p.roles.iter().map(|r| r.as_str().to_string()).collect(),
            namespace: p.namespace.clone().unwrap_or_else(|| "*".into()),
            dedup_scope: self.store.dedup_scope().as_str().to_string(),
            backend: self.store.backend_description(),
            objects: objects.map(|o| pb::StoredObjects {
                chunks: o.chunks,
                chunk_bytes: o.chunk_bytes,
                indexes: o.indexes,
                sessions: o.sessions,
                counted_at: o.counted_at.duration_since(std::time::SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            }),
        }))
    }

    async fn open_session(&self, r: Request<pb::OpenSessionRequest>) -> Result<Response<pb::OpenSessionReply>, Status> {
        let p = self.admit(&r, Role::Writer, "open a write session").await?;
        let peer = r.remote_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into());
        let r = r.into_inner();
        let owner = SessionOwner { principal: p.name.clone(), namespace: p.home().to_string() };
        let (client, ttl) = (r.client.clone(), Duration::from_secs(u64::from(r.ttl_seconds)));
        let (id, ttl) = self.run(move |s| s.sessions().open(&client, owner, ttl)).await?;
        tracing::info!(session = %id, client = %r.client, principal = %p.name, namespace = %p.home(), peer = %peer, "session opened");
        Ok(Response::new(pb::OpenSessionReply {
            session_id: id,
            ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
        }))
    }

    async fn keep_alive(&self, r: Request<pb::KeepAliveRequest>) -> Result<Response<pb::KeepAliveReply>, Status> {
        let p = self.admit(&r, Role::Writer, "keep a session alive").await?;
        self.own_session(&p, &r.get_ref().session_id).await?;
        let id = r.get_ref().session_id.clone();
        self.run(move |s| s.sessions().touch(&id)).await?;
        Ok(Response::new(pb::KeepAliveReply {}))
    }

    async fn close_session(
        &self,
        r: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionReply>, Status> {
        let p = self.admit(&r, Role::Writer, "close a session").await?;
        self.own_session(&p, &r.get_ref().session_id).await?;
        let id = r.get_ref().session_id.clone();
        self.run(move |s| s.sessions().close(&id)).await?;
        Ok(Response::new(pb::CloseSessionReply {}))
    }

    async fn missing_chunks(
        &self,
        r: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksReply>, Status> {
        let p = self.admit(&r, Role::Writer, "ask which chunks are missing").await?;
        let r = r.into_inner();
        self.own_session(&p, &r.session_id).await?;
        let ds = digests(&r.digests, "digests")?;
        let missing = self.run(move |s| s.missing(&r.session_id, &ds)).await?;
        Ok(Response::new(pb::MissingChunksReply { missing: missing.into_iter().map(|d| d.0.to_vec()).collect() }))
    }

    async fn upload_chunks(
        &self,
        r: Request<tonic::Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadChunksReply>, Status> {
        let p = self.admit(&r, Role::Writer, "upload chunks").await?;
        let _busy = self.activity.begin();
        let mut stream = r.into_inner();
        let mut reply = pb::UploadChunksReply::default();
        let mut in_flight = tokio::task::JoinSet::new();
        let mut bytes_in_flight = 0u64;
        let mut index = 0usize;
        let mut checked_session = String::new();
        // The stream's chunks are made durable together, before the reply says they are stored.
        let batch = Arc::new(ChunkBatch::new());
        while let Some(msg) = stream.message().await? {
            if msg.session_id != checked_session {
                self.own_session(&p, &msg.session_id).await?;
                checked_session.clone_from(&msg.session_id);
            }
            let digest = Digest::from_slice(&msg.digest)
                .map_err(|e| Status::invalid_argument(format!("chunk {index} of the stream: {e}")))?;
            let (store, batch) = (self.store.clone(), batch.clone());
            let len = u64::try_from(msg.blob.len()).unwrap_or(u64::MAX);
            bytes_in_flight += len;
            in_flight.spawn_blocking(move || {
                store.insert_chunk_into(&batch, &msg.session_id, &digest, &msg.blob).map(|new| (new, len))
            });
            while in_flight.len() >= MAX_IN_FLIGHT || bytes_in_flight >= IN_FLIGHT_BYTES {
                let Some(res) = in_flight.join_next().await else { break };
                bytes_in_flight -= settle(res, &mut reply)?;
            }
            index += 1;
        }
        while let Some(res) = in_flight.join_next().await {
            settle(res, &mut reply)?;
        }
        self.run(move |s| s.publish(&batch)).await?;
        Ok(Response::new(reply))
    }

    type DownloadChunksStream = ReceiverStream<Result<pb::Chunk, Status>>;

    async fn download_chunks(
        &self,
        r: Request<pb::DownloadChunksRequest>,
    ) -> Result<Response<Self::DownloadChunksStream>, Status> {
        let p = self.admit(&r, Role::Reader, "download chunks").await?;
        let ds = digests(&r.get_ref().digests, "digests")?;
        if !p.has(Role::Admin) {
            self.check_download(&p, &r.get_ref().index_name, &ds).await?;
        }
        // Reads run ahead of the network, as many at once as fit the byte budget at this
        // store's chunk size (blobs are never larger than a chunk plus framing).
        let ahead = usize::try_from(IN_FLIGHT_BYTES / u64::from(self.identity().chunk_size.max(1)))
            .unwrap_or(1)
            .clamp(1, MAX_IN_FLIGHT);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (store, busy) = (self.store.clone(), self.activity.begin());
        tokio::spawn(async move {
            let _busy = busy;
            let reads = futures::stream::iter(ds).map(move |d| {
                let s = store.clone();
                async move {
                    match tokio::task::spawn_blocking(move || s.get_chunk(&d)).await {
                        Ok(Ok(blob)) => Ok(pb::Chunk { digest: d.0.to_vec(), blob: blob.into() }),
                        Ok(Err(e)) => Err(status(&e)),
                        Err(e) => Err(Status::internal(format!("read task failed: {e}"))),
                    }
                }
            });
            let mut reads = std::pin::pin!(reads.buffered(ahead));
            while let Some(item) = reads.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn put_index(&self, r: Request<pb::PutIndexRequest>) -> Result<Response<pb::PutIndexReply>, Status> {
        let p = self.admit(&r, Role::Writer, "upload indexes").await?;
        let r = r.into_inner();
        self.own_session(&p, &r.session_id).await?;
        let d = self.run(move |s| s.put_index(&r.session_id, &r.name, &r.data)).await?;
        Ok(Response::new(pb::PutIndexReply { digest: d.to_hex() }))
    }

    async fn get_index(&self, r: Request<pb::GetIndexRequest>) -> Result<Response<pb::GetIndexReply>, Status> {
        let p = self.admit_any(&r, "read indexes").await?;
        let name = r.into_inner().name;
        self.visible_index(&p, &name).await?;
        let data = self.run(move |s| s.get_index(&name)).await?;
        Ok(Response::new(pb::GetIndexReply { data }))
    }

    async fn put_index_stream(
        &self,
        r: Request<tonic::Streaming<pb::IndexPiece>>,
    ) -> Result<Response<pb::PutIndexReply>, Status> {
        self.put_index_pieces(r).await
    }

    type GetIndexStreamStream = index::IndexPieces;

    async fn get_index_stream(
        &self,
        r: Request<pb::GetIndexRequest>,
    ) -> Result<Response<Self::GetIndexStreamStream>, Status> {
        Ok(Response::new(self.get_index_pieces(r).await?))
    }

    async fn commit_group(&self, r: Request<pb::CommitGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        let p = self.admit(&r, Role::Writer, "commit groups").await?;
        let r = r.into_inner();
        self.own_session(&p, &r.session_id).await?;
        let g = self
            .run(move |s| {
                let m = s.commit_group(&r.session_id, &r.manifest, r.retain_until)?;
                s.get_group(&m.group_uuid)
            })
            .await?;
        Ok(Response::new(group_info(g)))
    }

    async fn list_groups(&self, r: Request<pb::ListGroupsRequest>) -> Result<Response<pb::ListGroupsReply>, Status> {
        let p = self.admit_any(&r, "list groups").await?;
        let groups = self.run(|s| s.list_groups()).await?;
        let groups = groups.into_iter().filter(|g| p.sees(&g.meta.namespace)).map(group_info).collect();
        Ok(Response::new(pb::ListGroupsReply { groups }))
    }

    async fn get_group(&self, r: Request<pb::GetGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        let p = self.admit_any(&r, "read groups").await?;
        let uuid = r.into_inner().group_uuid;
        let id = uuid.clone();
        let g = self.run(move |s| s.get_group(&id)).await?;
        if !p.sees(&g.meta.namespace) {
            tracing::warn!(target: "audit", principal = %p.name, group = %uuid, "denied: group outside the namespace");
            return Err(Status::not_found(format!("group {uuid} not found")));
        }
        Ok(Response::new(group_info(g)))
    }

    async fn delete_group(&self, r: Request<pb::DeleteGroupRequest>) -> Result<Response<pb::DeleteGroupReply>, Status> {
        let p = self.admit(&r, Role::Admin, "delete groups").await?;
        let uuid = r.into_inner().group_uuid;
        let id = uuid.clone();
        let res = self.run(move |s| s.delete_group(&id)).await;
        self.grants.clear();
        audit(&p, "delete group", &uuid, &res);
        res?;
        Ok(Response::new(pb::DeleteGroupReply {}))
    }

    async fn garbage_collect(
        &self,
        r: Request<pb::GarbageCollectRequest>,
    ) -> Result<Response<pb::GarbageCollectReply>, Status> {
        let p = self.admit(&r, Role::Admin, "run garbage collection").await?;
        let margin = r.into_inner().safety_margin_seconds.map_or(self.gc_margin, Duration::from_secs);
        let res = self.run(move |s| s.garbage_collect(margin)).await;
        audit(&p, "garbage collect", "store", &res);
        let g = res?;
        self.runs.gc_runs.inc();
        self.runs.gc_chunks_removed.inc_by(g.chunks_removed);
        self.runs.gc_bytes_removed.inc_by(g.bytes_removed);
        self.runs.gc_last_bytes_kept.set(i64::try_from(g.bytes_kept).unwrap_or(i64::MAX));
        Ok(Response::new(pb::GarbageCollectReply {
            chunks_removed: g.chunks_removed,
            bytes_removed: g.bytes_removed,
            chunks_kept: g.chunks_kept,
            bytes_kept: g.bytes_kept,
            indexes_removed: g.indexes_removed,
            seconds: g.seconds,
        }))
    }

    async fn verify(&self, r: Request<pb::VerifyRequest>) -> Result<Response<pb::VerifyReply>, Status> {
        let p = self.admit(&r, Role::Admin, "verify").await?;
        let groups = r.into_inner().group_uuids;
        let what = if groups.is_empty() {
            "every chunk".to_string()
        } else {
            groups.iter().map(|g| crate::error::shorten(g)).collect::<Vec<_>>().join(",")
        };
        let res = self.run(move |s| s.verify(&groups)).await;
        audit(&p, "verify", &what, &res);
        let v = res?;
        self.runs.verify_runs.inc();
        self.runs.verify_chunks_checked.inc_by(v.chunks_checked);
        self.runs.verify_bad_chunks.inc_by(u64::try_from(v.bad_chunks.len()).unwrap_or(u64::MAX));
        self.runs.verify_last_damaged_groups.set(i64::try_from(v.damaged_groups.len()).unwrap_or(i64::MAX));
        Ok(Response::new(pb::VerifyReply {
            chunks_checked: v.chunks_checked,
            bad_chunks: v.bad_chunks.into_iter().map(|d| d.0.to_vec()).collect(),
            damaged_groups: v.damaged_groups,
            seconds: v.seconds,
        }))
    }

    async fn set_retention(&self, r: Request<pb::SetRetentionRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        let p = self.admit(&r, Role::Admin, "change retention locks").await?;
        let r = r.into_inner();
        let what = format!("{} until {}", r.group_uuid, r.retain_until);
        let res = self.run(move |s| s.set_retention(&r.group_uuid, r.retain_until)).await;
        audit(&p, "extend retention", &what, &res);
        Ok(Response::new(group_info(res?)))
    }
}

/// Serves the store on an already-bound listener until `shutdown` is cancelled.
pub async fn serve(
    service: Arc<StoreService>,
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ImageStoreServer<StoreService>>().await;
    // Reflection lists what this server serves, not the agent's API compiled into the same
    // descriptor set.
    use tonic::server::NamedService;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmbackup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(<ImageStoreServer<StoreService> as NamedService>::NAME)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|e| {
            // The descriptor sets are compiled in; failing here is a build defect.
            tracing::error!(error = %e, "gRPC reflection is unavailable");
            e
        })
        .ok();
    let store = ImageStoreServer::from_arc(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(store);
    router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned()).await
}
