//! gRPC client of one vmbackup-store (an Image Storage backup storage).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use vmbackup_proto::store::v1 as pb;
use vmbackup_proto::store::v1::image_store_client::ImageStoreClient as PbClient;

use vmbackup_proto::Digest;

use crate::error::{AgentError, ErrorKind, Result};

/// How long a TCP connect to a store may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a short control call (Status, sessions) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest gRPC message accepted or sent; matches the store's limit.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

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

/// Digests asked per MissingChunks call (the store accepts up to 16384).
pub const MISSING_BATCH: usize = 8192;

/// An open write session on a store; keep-alives stop when it is dropped.
#[derive(Debug)]
pub struct StoreSession {
    /// Session id.
    pub id: String,
    /// Held only for its drop: stops the keep-alive task.
    _keep_alive: tokio_util::sync::DropGuard,
}

/// A connected client of one store.
#[derive(Debug, Clone)]
pub struct ImageStoreClient {
    url: String,
    inner: PbClient<Channel>,
}

impl ImageStoreClient {
    /// Connects to the store at `url` (`http://host:port`, or `https://…` with `tls`).
    pub async fn connect(url: &str, tls: &vmbackup_store::daemon::tls::ClientTls) -> Result<Self> {
        Self::connect_from(url, tls, None).await
    }

    /// Connects to the store at `url`, from `source` when given (the backup network).
    pub async fn connect_from(
        url: &str,
        tls: &vmbackup_store::daemon::tls::ClientTls,
        source: Option<&super::netbind::SourceAddr>,
    ) -> Result<Self> {
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
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            // What the agent lets the store send ahead on downloads: a stream may hold one
            // whole chunk in flight (4 MiB and framing), the connection four of them, so a
            // restore's streams stay busy and its buffers bounded.
            .initial_stream_window_size(6 << 20)
            .initial_connection_window_size(16 << 20);
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
            AgentError::new(ErrorKind::Unavailable, format!("cannot reach Image Storage at {url}"))
                .with_code("BS.1003", "Backup storage is unreachable")
                .with_source(e)
        })?;
        let inner = PbClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { url: url.to_string(), inner })
    }

    /// The store's identity and capacity.
    pub async fn status(&mut self) -> Result<StoreStatus> {
        let reply =
            self.inner.status(pb::StatusRequest {}).await.map_err(|s| self.call_error("Status", s))?.into_inner();
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

    /// Opens a write session and keeps it alive (KeepAlive at a third of its TTL) until the
    /// returned guard is closed or dropped.
    pub async fn open_session(&mut self, client: &str) -> Result<StoreSession> {
        let reply = self
            .inner
            .open_session(pb::OpenSessionRequest { client: client.to_string(), ttl_seconds: 0 })
            .await
            .map_err(|s| self.call_error("OpenSession", s))?
            .into_inner();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (mut c, id, token) = (self.inner.clone(), reply.session_id.clone(), cancel.clone());
        let period = Duration::from_secs(u64::from(reply.ttl_seconds.max(3)) / 3);
        let url = self.url.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = c.keep_alive(pb::KeepAliveRequest { session_id: id.clone() }).await {
                    tracing::warn!(store = %url, session = %id, error = %e.message(), "session keep-alive failed");
                }
            }
        });
        Ok(StoreSession { id: reply.session_id, _keep_alive: cancel.drop_guard() })
    }

    /// Closes a session (its chunks lose GC protection once uncommitted work is abandoned).
    pub async fn close_session(&mut self, session: StoreSession) -> Result<()> {
        let id = session.id.clone();
        drop(session);
        self.inner
            .close_session(pb::CloseSessionRequest { session_id: id })
            .await
            .map_err(|s| self.call_error("CloseSession", s))?;
        Ok(())
    }

    /// Which digests the store lacks (asked in batches the store accepts).
    pub async fn missing(&mut self, session: &StoreSession, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = Vec::new();
        for batch in digests.chunks(MISSING_BATCH) {
            let reply = self
                .inner
                .missing_chunks(pb::MissingChunksRequest {
                    session_id: session.id.clone(),
                    digests: batch.iter().map(|d| d.0.to_vec()).collect(),
                })
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

    /// Asks about one digest: Some(digest) when the store lacks it.
    pub async fn missing_one(&mut self, session_id: &str, digest: Digest) -> Result<Option<Digest>> {
        let reply = self
            .inner
            .missing_chunks(pb::MissingChunksRequest {
                session_id: session_id.to_string(),
                digests: vec![digest.0.to_vec()],
            })
            .await
            .map_err(|s| self.call_error("MissingChunks", s))?
            .into_inner();
        Ok(if reply.missing.is_empty() { None } else { Some(digest) })
    }

    /// Streams chunks (digest, encoded blob) to the store until `chunks` ends.
    pub async fn upload(
        &mut self,
        session_id: &str,
        chunks: impl futures::Stream<Item = (Digest, bytes::Bytes)> + Send + 'static,
    ) -> Result<pb::UploadChunksReply> {
        use futures::StreamExt;
        let id = session_id.to_string();
        let stream =
            chunks.map(move |(d, blob)| pb::UploadChunk { session_id: id.clone(), digest: d.0.to_vec(), blob });
        let mut c = self.inner.clone();
        // Uploads may take long: no per-call deadline beyond the transfer itself.
        let mut req = tonic::Request::new(stream);
        req.set_timeout(Duration::from_secs(24 * 3600));
        Ok(c.upload_chunks(req).await.map_err(|s| self.call_error("UploadChunks", s))?.into_inner())
    }

    /// Stores a volume index; returns its digest.
    pub async fn put_index(&mut self, session: &StoreSession, name: &str, data: Vec<u8>) -> Result<Digest> {
        let reply = self
            .inner
            .put_index(pb::PutIndexRequest { session_id: session.id.clone(), name: name.to_string(), data })
            .await
            .map_err(|s| self.call_error("PutIndex", s))?
            .into_inner();
        reply.digest.parse().map_err(|e| {
            AgentError::new(ErrorKind::Internal, format!("Image Storage at {} sent a bad index digest", self.url))
                .with_source(e)
        })
    }

    /// A volume index.
    pub async fn get_index(&mut self, name: &str) -> Result<Vec<u8>> {
        let req = pb::GetIndexRequest { name: name.to_string() };
        Ok(self.inner.get_index(req).await.map_err(|s| self.call_error("GetIndex", s))?.into_inner().data)
    }

    /// Commits a group manifest.
    pub async fn commit(&mut self, session: &StoreSession, manifest: Vec<u8>) -> Result<pb::GroupInfo> {
        let req = pb::CommitGroupRequest { session_id: session.id.clone(), manifest };
        Ok(self.inner.commit_group(req).await.map_err(|s| self.call_error("CommitGroup", s))?.into_inner())
    }

    /// Every committed group.
    pub async fn list_groups(&mut self) -> Result<Vec<pb::GroupInfo>> {
        Ok(self
            .inner
            .list_groups(pb::ListGroupsRequest {})
            .await
            .map_err(|s| self.call_error("ListGroups", s))?
            .into_inner()
            .groups)
    }

    /// One committed group.
    pub async fn get_group(&mut self, group_uuid: &str) -> Result<pb::GroupInfo> {
        let req = pb::GetGroupRequest { group_uuid: group_uuid.to_string() };
        Ok(self.inner.get_group(req).await.map_err(|s| self.call_error("GetGroup", s))?.into_inner())
    }

    /// Deletes a group (its chunks are reclaimed by the store's GC).
    pub async fn delete_group(&mut self, group_uuid: &str) -> Result<()> {
        let req = pb::DeleteGroupRequest { group_uuid: group_uuid.to_string() };
        self.inner.delete_group(req).await.map_err(|s| self.call_error("DeleteGroup", s))?;
        Ok(())
    }

    /// Streams the blobs of `digests`, in order.
    pub async fn download(&mut self, digests: &[Digest]) -> Result<tonic::Streaming<pb::Chunk>> {
        let req = pb::DownloadChunksRequest { digests: digests.iter().map(|d| d.0.to_vec()).collect() };
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_secs(24 * 3600));
        Ok(self.inner.download_chunks(req).await.map_err(|s| self.call_error("DownloadChunks", s))?.into_inner())
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The error of a failed call, naming the store and the method.
    pub fn call_error(&self, method: &str, s: tonic::Status) -> AgentError {
        let kind = match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => ErrorKind::Unavailable,
            tonic::Code::DeadlineExceeded => ErrorKind::Timeout,
            tonic::Code::NotFound => ErrorKind::NotFound,
            tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
            tonic::Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            tonic::Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            tonic::Code::Cancelled => ErrorKind::Cancelled,
            tonic::Code::Unimplemented => ErrorKind::Unimplemented,
            _ => ErrorKind::Internal,
        };
        AgentError::new(kind, format!("Image Storage at {} failed {method}: {}", self.url, s.message()))
    }
}
