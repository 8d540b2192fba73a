//! The Image Storage gRPC server: `vmbackup.store.v1.ImageStore`, gRPC health and
//! reflection, on one listener.
//!
//! Message limits are raised well above a 4 MiB chunk (tonic's default is 4 MiB) and the
//! HTTP/2 windows widened so one client can stream chunks at memory speed.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use vmbackup_proto::store::v1 as pb;
use vmbackup_proto::store::v1::image_store_server::{ImageStore, ImageStoreServer};

use crate::identity::{FORMAT_VERSION, StoreIdentity};

/// Largest gRPC message either side accepts: a 16 MiB chunk plus framing, with room.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 stream and connection windows.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2 connection window.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// State shared by every request of one store server.
#[derive(Debug)]
pub struct StoreService {
    identity: StoreIdentity,
    data_dir: PathBuf,
}

impl StoreService {
    /// Opens (or creates) the store under `data_dir`.
    pub fn open(data_dir: PathBuf, chunk_size: u32) -> std::io::Result<Self> {
        let identity = StoreIdentity::open_or_create(&data_dir, chunk_size)?;
        Ok(Self { identity, data_dir })
    }

    /// The store's identity.
    pub fn identity(&self) -> &StoreIdentity {
        &self.identity
    }
}

/// Total and available bytes of the filesystem holding `path`.
fn capacity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frag = st.fragment_size();
    Ok((st.blocks().saturating_mul(frag), st.blocks_available().saturating_mul(frag)))
}

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!("{method} is not implemented by this store version"))
}

#[tonic::async_trait]
impl ImageStore for StoreService {
    async fn status(&self, _r: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let dir = self.data_dir.clone();
        let (total, available) = tokio::task::spawn_blocking(move || capacity(&dir))
            .await
            .map_err(|e| Status::internal(format!("capacity task: {e}")))?
            .map_err(|e| Status::unavailable(format!("statvfs {}: {e}", self.data_dir.display())))?;
        Ok(Response::new(pb::StatusReply {
            store_uuid: self.identity.store_uuid.clone(),
            total_capacity: total,
            available_capacity: available,
            chunk_size: self.identity.chunk_size,
            format_version: FORMAT_VERSION,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            counters: Some(pb::StoreCounters::default()),
            group_count: 0,
        }))
    }

    async fn open_session(
        &self,
        _r: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionReply>, Status> {
        Err(not_yet("OpenSession"))
    }
    async fn keep_alive(&self, _r: Request<pb::KeepAliveRequest>) -> Result<Response<pb::KeepAliveReply>, Status> {
        Err(not_yet("KeepAlive"))
    }
    async fn close_session(
        &self,
        _r: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionReply>, Status> {
        Err(not_yet("CloseSession"))
    }
    async fn missing_chunks(
        &self,
        _r: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksReply>, Status> {
        Err(not_yet("MissingChunks"))
    }
    async fn upload_chunks(
        &self,
        _r: Request<tonic::Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadChunksReply>, Status> {
        Err(not_yet("UploadChunks"))
    }
    type DownloadChunksStream = tokio_stream::Empty<Result<pb::Chunk, Status>>;
    async fn download_chunks(
        &self,
        _r: Request<pb::DownloadChunksRequest>,
    ) -> Result<Response<Self::DownloadChunksStream>, Status> {
        Err(not_yet("DownloadChunks"))
    }
    async fn put_index(&self, _r: Request<pb::PutIndexRequest>) -> Result<Response<pb::PutIndexReply>, Status> {
        Err(not_yet("PutIndex"))
    }
    async fn get_index(&self, _r: Request<pb::GetIndexRequest>) -> Result<Response<pb::GetIndexReply>, Status> {
        Err(not_yet("GetIndex"))
    }
    async fn commit_group(&self, _r: Request<pb::CommitGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        Err(not_yet("CommitGroup"))
    }
    async fn list_groups(&self, _r: Request<pb::ListGroupsRequest>) -> Result<Response<pb::ListGroupsReply>, Status> {
        Err(not_yet("ListGroups"))
    }
    async fn get_group(&self, _r: Request<pb::GetGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        Err(not_yet("GetGroup"))
    }
    async fn delete_group(
        &self,
        _r: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupReply>, Status> {
        Err(not_yet("DeleteGroup"))
    }
    async fn garbage_collect(
        &self,
        _r: Request<pb::GarbageCollectRequest>,
    ) -> Result<Response<pb::GarbageCollectReply>, Status> {
        Err(not_yet("GarbageCollect"))
    }
    async fn verify(&self, _r: Request<pb::VerifyRequest>) -> Result<Response<pb::VerifyReply>, Status> {
        Err(not_yet("Verify"))
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmbackup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
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
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(store);
    router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned()).await
}
