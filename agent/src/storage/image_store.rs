//! gRPC client of one vmbackup-store (an Image Storage backup storage).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use vmbackup_proto::store::v1 as pb;
use vmbackup_proto::store::v1::image_store_client::ImageStoreClient as PbClient;

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

/// A connected client of one store.
#[derive(Debug, Clone)]
pub struct ImageStoreClient {
    url: String,
    inner: PbClient<Channel>,
}

impl ImageStoreClient {
    /// Connects to the store at `url` (`http://host:port`, or `https://…` with `tls`).
    pub async fn connect(url: &str, tls: &vmbackup_store::tls::ClientTls) -> Result<Self> {
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
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(64 << 20);
        let channel = endpoint.connect().await.map_err(|e| {
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

    fn call_error(&self, method: &str, s: tonic::Status) -> AgentError {
        let kind = match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => ErrorKind::Unavailable,
            tonic::Code::DeadlineExceeded => ErrorKind::Timeout,
            tonic::Code::NotFound => ErrorKind::NotFound,
            tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
            tonic::Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            tonic::Code::Unimplemented => ErrorKind::Unimplemented,
            _ => ErrorKind::Internal,
        };
        AgentError::new(kind, format!("Image Storage at {} failed {method}: {}", self.url, s.message()))
    }
}
