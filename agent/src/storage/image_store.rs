//! gRPC client of one vmbackup-store (an Image Storage backup storage).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use tonic::transport::{Channel, Endpoint};
use vmbackup_proto::store::v1 as pb;
use vmbackup_proto::store::v1::image_store_client::ImageStoreClient as PbClient;

use bytes::Bytes;
use futures::StreamExt;
use vmbackup_proto::Digest;
use vmbackup_proto::index::SparseIndex;

use super::seam::{
    ChunkReader, ChunkStream, ChunkWriter, IndexBytes, OpenedSession, PutStats, StoreStatus, StoredGroup,
};
use crate::error::{AgentError, ErrorKind, Result};

/// How long a TCP connect to a store may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a short control call (Status, sessions, MissingChunks) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a call that moves or checks a whole index or group may take (an index up or
/// down, CommitGroup, which checks every chunk the group names, list and delete).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// A request with a deadline (sent as `grpc-timeout`). Streams of chunks get none: an
/// upload or download lasts as long as its data takes, and a dead peer is found by the
/// connection's keep-alive instead.
fn deadline<T>(message: T, limit: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(limit);
    req
}
/// Largest gRPC message accepted or sent; matches the store's limit.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest index sent to a store that predates `PutIndexStream`: one message, with room
/// for its framing under [`MAX_MESSAGE_BYTES`].
const UNARY_INDEX_BYTES: u64 = (MAX_MESSAGE_BYTES - (1 << 20)) as u64;

/// Digests asked per MissingChunks call (the store accepts up to 16384).
pub const MISSING_BATCH: usize = 8192;

/// Encoded chunks waiting for the upload stream of one writer.
const UPLOAD_QUEUE: usize = 4;

/// Sends the storage's API token (`authorization: Bearer`) with every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(<redacted>)" } else { "Bearer(none)" })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Client = PbClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A connected client of one store.
#[derive(Debug, Clone)]
pub struct ImageStoreClient {
    url: String,
    inner: Client,
}

impl ImageStoreClient {
    /// Connects to the store at `url` (`http://host:port`, or `https://…` with `tls`),
    /// presenting `token` when given.
    pub async fn connect(
        url: &str,
        tls: &vmbackup_store::daemon::tls::ClientTls,
        token: Option<&super::credentials::Secret>,
    ) -> Result<Self> {
        Self::connect_from(url, tls, None, token).await
    }

    /// Connects to the store at `url`, from `source` when given (the backup network).
    pub async fn connect_from(
        url: &str,
        tls: &vmbackup_store::daemon::tls::ClientTls,
        source: Option<&super::netbind::SourceAddr>,
        token: Option<&super::credentials::Secret>,
    ) -> Result<Self> {
        let bearer =
            match token {
                None => Bearer(None),
                Some(t) => Bearer(Some(format!("Bearer {}", t.expose()).parse().map_err(|_| {
                    AgentError::invalid("token", "is not valid in gRPC metadata (printable ASCII only)")
                })?)),
            };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| AgentError::invalid("url", format!("{url:?} is not a valid endpoint URL")).with_source(e))?;
        if url.starts_with("https://") {
            let host =
                endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let config = tls.load(&host).map_err(|e| {
                AgentError::new(ErrorKind::Internal, "store TLS configuration is unusable").with_source(e)
            })?;
            endpoint = endpoint.tls_config(config).map_err(|e| {
                AgentError::invalid("url", format!("TLS towards {url} cannot be set up")).with_source(e)
            })?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            // What the agent lets the store send ahead on downloads: a stream may hold one
            // whole chunk in flight (4 MiB and framing), the connection four of them, so a
            // restore's streams stay busy and its buffers bounded.
            .initial_stream_window_size(6 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(vmbackup_store::server::MAX_FRAME_BYTES);
        let connected = match source {
            None => endpoint.connect().await,
            Some(src) => {
                let src = src.clone();
                let default_port = if url.starts_with("https://") { 443 } else { 80 };
                endpoint
                    .connect_with_connector(tower::service_fn(move |uri: tonic::transport::Uri| {
                        let src = src.clone();
                        async move {
                            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                            let port = uri.port_u16().unwrap_or(default_port);
                            let stream = super::netbind::connect(&src, host, port).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
            }
        };
        let channel = connected.map_err(|e| {
            // ZStack's OPERATION_ERROR, as its own disconnected backup storages answer
            // (BS.1003 is its allocation error, not reachability).
            AgentError::new(ErrorKind::Unavailable, format!("cannot reach Image Storage at {url}"))
                .with_source(e)
                .from_store()
        })?;
        let inner = PbClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { url: url.to_string(), inner })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The error of a failed call, naming the store and the method.
    pub fn call_error(&self, method: &str, s: tonic::Status) -> AgentError {
        call_error(&self.url, method, s)
    }

    fn client(&self) -> Client {
        self.inner.clone()
    }

    /// The pieces of index `name`, or None from a store that predates GetIndexStream.
    async fn index_stream(&self, name: &str) -> Result<Option<tonic::Streaming<pb::IndexPiece>>> {
        let req = pb::GetIndexRequest { name: name.to_string() };
        match self.client().get_index_stream(deadline(req, LONG_CALL_TIMEOUT)).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(self.call_error("GetIndexStream", s)),
        }
    }

    /// Index `name` in one message (at most 64 MiB), from a store without GetIndexStream.
    async fn get_index_unary(&self, name: &str) -> Result<Vec<u8>> {
        let req = pb::GetIndexRequest { name: name.to_string() };
        let r = self.client().get_index(deadline(req, LONG_CALL_TIMEOUT)).await;
        Ok(r.map_err(|s| self.call_error("GetIndex", s))?.into_inner().data)
    }

    fn bad_index(&self, name: &str, why: &str) -> AgentError {
        AgentError::new(ErrorKind::Internal, format!("Image Storage at {} sent a bad index {name}: {why}", self.url))
            .from_store()
    }
}

/// The error of a failed call to the store at `url`, naming the method.
fn call_error(url: &str, method: &str, s: tonic::Status) -> AgentError {
    let kind = match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => ErrorKind::Unavailable,
        tonic::Code::DeadlineExceeded => ErrorKind::Timeout,
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        // The store refused the agent's credential or its role: the control plane's session
        // is fine, the storage's token (or certificate) is not (SYS.1006, never ID.1001).
        tonic::Code::FailedPrecondition | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            ErrorKind::FailedPrecondition
        }
        // The agent cancels by dropping its calls, which yields no status: a CANCELLED
        // status is the connection or the store ending the call (a reset, a shutdown).
        tonic::Code::Cancelled => ErrorKind::Unavailable,
        tonic::Code::Unimplemented => ErrorKind::Unimplemented,
        _ => ErrorKind::Internal,
    };
    AgentError::new(kind, format!("Image Storage at {url} failed {method}: {}", s.message())).from_store()
}

/// `index` as the pieces of a PutIndexStream, the first naming the session and the index.
/// (Sync as well as Send: tonic's client stream needs both.)
fn index_pieces(
    index: &IndexBytes,
    session: &str,
    name: &str,
) -> impl futures::Stream<Item = pb::IndexPiece> + Send + Sync + 'static {
    let total_len = index.encoded_len();
    let mut first = Some((session.to_string(), name.to_string()));
    let pieces = index.pieces().map(move |data| match first.take() {
        Some((session_id, name)) => pb::IndexPiece { session_id, name, total_len, data },
        None => pb::IndexPiece { data, ..Default::default() },
    });
    tokio_stream::iter(pieces)
}

fn group(g: pb::GroupInfo) -> StoredGroup {
    StoredGroup { group_uuid: g.group_uuid, manifest: g.manifest, damaged: g.damaged }
}

#[tonic::async_trait]
impl ChunkReader for ImageStoreClient {
    async fn get_index(&self, name: &str) -> Result<Vec<u8>> {
        let Some(mut pieces) = self.index_stream(name).await? else {
            return self.get_index_unary(name).await;
        };
        let mut index = vmbackup_proto::pieces::Assembler::default();
        while let Some(piece) = pieces.message().await.map_err(|s| self.call_error("GetIndexStream", s))? {
            index.push(piece).map_err(|e| self.bad_index(name, &e))?;
        }
        index.finish().map_err(|e| self.bad_index(name, &e))
    }

    async fn get_sparse_index(&self, name: &str) -> Result<SparseIndex> {
        let mut decoder = vmbackup_proto::index::Decoder::new(vmbackup_proto::index::MAX_CHUNKS);
        match self.index_stream(name).await? {
            Some(mut pieces) => {
                while let Some(piece) = pieces.message().await.map_err(|s| self.call_error("GetIndexStream", s))? {
                    decoder.feed(&piece.data).map_err(|e| self.bad_index(name, &e.to_string()))?;
                }
            }
            None => {
                decoder.feed(&self.get_index_unary(name).await?).map_err(|e| self.bad_index(name, &e.to_string()))?
            }
        }
        decoder.finish().map_err(|e| self.bad_index(name, &e.to_string()))
    }

    async fn download(&self, index: &str, digests: &[Digest]) -> Result<ChunkStream> {
        let req = pb::DownloadChunksRequest {
            digests: digests.iter().map(|d| d.0.to_vec()).collect(),
            index_name: index.to_string(),
        };
        let stream = self
            .client()
            .download_chunks(tonic::Request::new(req))
            .await
            .map_err(|s| self.call_error("DownloadChunks", s))?
            .into_inner();
        let url = self.url.clone();
        Ok(stream
            .map(move |item| {
                let chunk = item.map_err(|s| call_error(&url, "DownloadChunks", s))?;
                let digest = Digest::from_slice(&chunk.digest).map_err(|e| {
                    AgentError::new(ErrorKind::Unavailable, format!("Image Storage at {url} sent a bad chunk digest"))
                        .with_source(e)
                })?;
                Ok((digest, chunk.blob))
            })
            .boxed())
    }
}

#[tonic::async_trait]
impl super::seam::Store for ImageStoreClient {
    fn location(&self) -> &str {
        &self.url
    }

    async fn status(&self) -> Result<StoreStatus> {
        let reply = self
            .client()
            .status(deadline(pb::StatusRequest {}, CALL_TIMEOUT))
            .await
            .map_err(|s| self.call_error("Status", s))?
            .into_inner();
        if reply.store_uuid.is_empty() {
            return Err(AgentError::new(
                ErrorKind::Unavailable,
                format!("Image Storage at {} sent no store uuid", self.url),
            ));
        }
        Ok(StoreStatus {
            store_uuid: reply.store_uuid,
            total_capacity: i64::try_from(reply.total_capacity).unwrap_or(i64::MAX),
            available_capacity: i64::try_from(reply.available_capacity).unwrap_or(i64::MAX),
            chunk_size: reply.chunk_size,
        })
    }

    async fn open_session(&self, client: &str) -> Result<OpenedSession> {
        let reply = self
            .client()
            .open_session(deadline(pb::OpenSessionRequest { client: client.to_string(), ttl_seconds: 0 }, CALL_TIMEOUT))
            .await
            .map_err(|s| self.call_error("OpenSession", s))?
            .into_inner();
        Ok(OpenedSession { id: reply.session_id, ttl: Duration::from_secs(u64::from(reply.ttl_seconds.max(3))) })
    }

    async fn keep_alive(&self, session: &str) -> Result<()> {
        let req = pb::KeepAliveRequest { session_id: session.to_string() };
        self.client().keep_alive(deadline(req, CALL_TIMEOUT)).await.map_err(|s| self.call_error("KeepAlive", s))?;
        Ok(())
    }

    async fn close_session(&self, session: &str) -> Result<()> {
        let req = pb::CloseSessionRequest { session_id: session.to_string() };
        self.client()
            .close_session(deadline(req, CALL_TIMEOUT))
            .await
            .map_err(|s| self.call_error("CloseSession", s))?;
        Ok(())
    }

    async fn missing(&self, session: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = Vec::new();
        let mut c = self.client();
        for batch in digests.chunks(MISSING_BATCH) {
            let reply = c
                .missing_chunks(deadline(
                    pb::MissingChunksRequest {
                        session_id: session.to_string(),
                        digests: batch.iter().map(|d| d.0.to_vec()).collect(),
                    },
                    CALL_TIMEOUT,
                ))
                .await
                .map_err(|s| self.call_error("MissingChunks", s))?
                .into_inner();
            for m in reply.missing {
                missing.push(Digest::from_slice(&m).map_err(|e| {
                    AgentError::new(ErrorKind::Internal, format!("Image Storage at {} sent a bad digest", self.url))
                        .with_source(e)
                })?);
            }
        }
        Ok(missing)
    }

    async fn writer(&self, session: &str) -> Result<Box<dyn ChunkWriter>> {
        let (tx, rx) = mpsc::channel::<(Digest, Bytes)>(UPLOAD_QUEUE);
        let id = session.to_string();
        let stream = ReceiverStream::new(rx).map(move |(d, blob)| pb::UploadChunk {
            session_id: id.clone(),
            digest: d.0.to_vec(),
            blob,
        });
        let (mut c, url) = (self.client(), self.url.clone());
        let req = tonic::Request::new(stream);
        let ended = Arc::new(Mutex::new(None));
        let why = ended.clone();
        let task = tokio::spawn(async move {
            let reply = c.upload_chunks(req).await.map_err(|s| {
                let e = call_error(&url, "UploadChunks", s);
                *why.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.detached());
                e
            })?;
            let reply = reply.into_inner();
            Ok(PutStats { stored: reply.chunks_stored, already_present: reply.chunks_already_present })
        });
        Ok(Box::new(UploadStream { tx: Some(tx), task: Some(task), ended, url: self.url.clone() }))
    }

    async fn put_index(&self, session: &str, name: &str, index: IndexBytes) -> Result<Digest> {
        let total_len = index.encoded_len();
        let pieces = index_pieces(&index, session, name);
        let reply = match self.client().put_index_stream(deadline(pieces, LONG_CALL_TIMEOUT)).await {
            Ok(r) => r.into_inner(),
            // A store that predates PutIndexStream takes an index as one message.
            Err(s) if s.code() == tonic::Code::Unimplemented && total_len <= UNARY_INDEX_BYTES => {
                let data = index.to_vec();
                let req = pb::PutIndexRequest { session_id: session.to_string(), name: name.to_string(), data };
                let r = self.client().put_index(deadline(req, LONG_CALL_TIMEOUT)).await;
                r.map_err(|s| self.call_error("PutIndex", s))?.into_inner()
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                return Err(AgentError::new(
                    ErrorKind::Unimplemented,
                    format!(
                        "Image Storage at {} cannot take index {name} of {} bytes: it serves no PutIndexStream and \
                         one message carries at most {UNARY_INDEX_BYTES}; upgrade the store",
                        self.url, total_len
                    ),
                ));
            }
            Err(s) => return Err(self.call_error("PutIndexStream", s)),
        };
        reply.digest.parse().map_err(|e| {
            AgentError::new(ErrorKind::Internal, format!("Image Storage at {} sent a bad index digest", self.url))
                .with_source(e)
        })
    }

    async fn commit(&self, session: &str, manifest: Vec<u8>, retain_until: u64) -> Result<()> {
        let req = pb::CommitGroupRequest { session_id: session.to_string(), manifest, retain_until };
        self.client()
            .commit_group(deadline(req, LONG_CALL_TIMEOUT))
            .await
            .map_err(|s| self.call_error("CommitGroup", s))?;
        Ok(())
    }

    async fn list_groups(&self) -> Result<Vec<StoredGroup>> {
        let reply = self
            .client()
            .list_groups(deadline(pb::ListGroupsRequest {}, LONG_CALL_TIMEOUT))
            .await
            .map_err(|s| self.call_error("ListGroups", s))?;
        Ok(reply.into_inner().groups.into_iter().map(group).collect())
    }

    async fn get_group(&self, group_uuid: &str) -> Result<StoredGroup> {
        let req = pb::GetGroupRequest { group_uuid: group_uuid.to_string() };
        Ok(group(
            self.client()
                .get_group(deadline(req, CALL_TIMEOUT))
                .await
                .map_err(|s| self.call_error("GetGroup", s))?
                .into_inner(),
        ))
    }

    async fn delete_group(&self, group_uuid: &str) -> Result<()> {
        let req = pb::DeleteGroupRequest { group_uuid: group_uuid.to_string() };
        self.client()
            .delete_group(deadline(req, LONG_CALL_TIMEOUT))
            .await
            .map_err(|s| self.call_error("DeleteGroup", s))?;
        Ok(())
    }
}

/// One UploadChunks stream: `put` queues a blob for it, `finish` ends it and waits for the
/// store's reply (every chunk durable). Dropped unfinished, the stream is aborted and the
/// store keeps nothing it had not already made durable.
struct UploadStream {
    tx: Option<mpsc::Sender<(Digest, Bytes)>>,
    task: Option<tokio::task::JoinHandle<Result<PutStats>>>,
    /// Why the stream ended, once it ended with an error.
    ended: Arc<Mutex<Option<AgentError>>>,
    url: String,
}

#[tonic::async_trait]
impl ChunkWriter for UploadStream {
    async fn put(&self, digest: Digest, blob: Bytes) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send((digest, blob)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        let why =
            self.ended.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(AgentError::detached);
        Err(why.unwrap_or_else(|| {
            AgentError::new(
                ErrorKind::Unavailable,
                format!("the upload stream to the Image Storage at {} ended early", self.url),
            )
            .from_store()
        }))
    }

    async fn finish(mut self: Box<Self>) -> Result<PutStats> {
        drop(self.tx.take());
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(PutStats::default()),
        }
    }
}

impl Drop for UploadStream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
