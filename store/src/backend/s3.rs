//! The S3 backend: one bucket (under an optional key prefix) of any S3-compatible server
//! (checked on Ceph RGW 16.2), through the `object_store` crate.
//!
//! ```text
//! <prefix>/store.json                     identity (uuid, chunk size, layout version):
//!                                         created once with a create-only PUT
//! <prefix>/chunks/<first 4 hex>/<64 hex>  chunk blobs (create-only PUT)
//! <prefix>/indexes/<name>.vidx            volume indexes
//! <prefix>/groups/<group-uuid>.json       group manifests
//! <prefix>/group-meta/<group-uuid>.json   a group's namespace and retention lock
//! <prefix>/meta/<name>                    store bookkeeping (verify-state.json)
//! <prefix>/owners/<ns>/<4 hex>/<64 hex>   empty: namespace <ns> uploaded that chunk
//! <prefix>/bad/<64 hex>                   chunks verify found damaged (copy, then delete)
//! ```
//!
//! A PUT is atomic on S3 (an object is either absent or complete), so there is no `tmp/`.
//! Chunks and owner marks are written with `If-None-Match: *` (RGW 16.2 answers 412 to a
//! second PUT of the key, which is "already present"). Manifests and indexes are created
//! the same way (`create_object`), manifests only after every chunk they name is confirmed
//! present, so two servers committing one group cannot overwrite each other; `put_object`
//! replaces, as the trait says, because group metas and `meta/` objects are rewritten.
//!
//! ## "Touched" without mtime, and many servers over one bucket
//!
//! S3 cannot change an object's time, so a chunk's "last touched" is its `LastModified`
//! and `touch_chunk` only checks that it is there. That is enough because, over a bucket,
//! the store never relies on touches: sessions, reuse journals and GC follow the shared
//! protocol of [`crate::shared`] (this backend is its [`SharedObjects`]), so any number of
//! store servers may serve one bucket and prefix.
//!
//! ## Capacity
//!
//! S3 has no capacity to report: [`Backend::capacity`] returns `(u64::MAX, u64::MAX)`
//! ("unbounded"). Agents store it saturated to `i64::MAX`, so a management plane that
//! picks backup storages by free space never sees an S3 store as full.
//!
//! ## Calls
//!
//! The trait is synchronous; every call runs on the backend's own small tokio runtime and
//! the calling thread waits for it (`futures::executor::block_on` of the spawned task), so
//! a call from any thread, async or not, neither panics nor needs the caller's runtime.
//! Requests are retried with backoff on 5xx and transport errors (bounded by
//! [`RETRY_TIMEOUT`]), each has a [`REQUEST_TIMEOUT`]; a 4xx error names the object key
//! and the status. Credentials are never logged.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use vmbackup_proto::Digest;

use super::{Backend, ChunkInfo, ObjectInfo, ObjectKind};
use crate::error::{ErrorKind, Result, StoreError};
use crate::identity::StoreIdentity;
use crate::shared::{Listed, SharedObjects};

/// Longest time one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest time to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time a request is retried (5xx, transport errors) before it fails.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time the reachability probe of Status waits.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests kept in flight by one batch lookup (MissingChunks, commit checks).
pub const LOOKUPS_IN_FLIGHT: usize = 32;
/// Longest time the check at start may take before the store refuses to start.
pub const START_CHECK_TIMEOUT: Duration = Duration::from_secs(8);

/// Where the bucket is and how to reach it.
#[derive(Clone, Default)]
pub struct S3Settings {
    /// `http(s)://host:port` of the S3 server.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Signing region.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (never logged, never in a reply).
    pub secret_access_key: String,
    /// Whether a plain `http://` endpoint is accepted.
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// A store in an S3 bucket.
pub struct S3Backend {
    client: Arc<AmazonS3>,
    /// The same bucket without retries: GC's chunk deletes (see [`crate::shared`]).
    client_once: Arc<AmazonS3>,
    /// The same bucket for chunk PUTs, whose bodies are not hashed into the signature
    /// (`UNSIGNED-PAYLOAD`); see [`Backend::put_chunk`] below.
    chunk_client: Arc<AmazonS3>,
    runtime: Option<tokio::runtime::Runtime>,
    prefix: String,
    describe: String,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend").field("location", &self.describe).finish_non_exhaustive()
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        // May be dropped inside an async context, where a blocking shutdown would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn s3_error(what: &str, key: &str, e: object_store::Error) -> StoreError {
    let kind = match &e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => ErrorKind::Conflict,
        _ => ErrorKind::Io,
    };
    StoreError::new(kind, format!("S3 {what} {key}: {}", brief(&e)))
}

/// An object_store error in a few words: the HTTP status and S3 error code when the
/// server answered, else the innermost cause (e.g. "Connection refused"), and how many
/// retries were spent. Its own Display repeats the URL and the cause chain several times.
fn brief(e: &object_store::Error) -> String {
    let text = one_line(e);
    let mut innermost = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(c) = next {
        innermost = c.to_string();
        next = c.source();
    }
    let mut out = match (between(&text, "status code: ", ":"), between(&text, "<Code>", "</Code>")) {
        (Some(status), Some(code)) => format!("{status} {code}"),
        (Some(status), None) => status.to_string(),
        _ => innermost.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    if let Some(n) = between(&text, "after ", " retries") {
        out.push_str(&format!(", after {n} retries"));
    }
    out
}

/// A chunk object's name (64 hex digits) as its digest.
pub(crate) fn parse_hex_digest(name: &str) -> Option<Digest> {
    if name.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Digest::from_slice(&bytes).ok()
}

impl S3Backend {
    /// Builds the client and checks, within [`START_CHECK_TIMEOUT`], that the bucket exists
    /// and the credentials are accepted (a LIST under the prefix). Every failure is one
    /// line naming the endpoint and bucket.
    pub fn connect(settings: &S3Settings) -> Result<Self> {
        let invalid = |m: String| StoreError::new(ErrorKind::InvalidArgument, m);
        let endpoint = settings.endpoint.trim_end_matches('/');
        if endpoint.starts_with("http://") && !settings.allow_http {
            return Err(invalid(format!(
                "[s3] endpoint {endpoint} is plain http; set allow_http = true to send data and signed requests unencrypted"
            )));
        }
        if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
            return Err(invalid(format!("[s3] endpoint {endpoint:?} must start with https:// (or http://)")));
        }
        if settings.bucket.is_empty() {
            return Err(invalid("[s3] bucket is not set".into()));
        }
        if settings.access_key_id.is_empty() || settings.secret_access_key.is_empty() {
            return Err(invalid(
                "[s3] credentials are not set: access_key_id and secret_access_key_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            ));
        }
        let prefix = settings.prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|s| s == "." || s == "..") || prefix.contains("//") {
            return Err(invalid(format!("[s3] prefix {prefix:?} is not a plain key prefix")));
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = build_client(settings, endpoint, 8, false)?;
        let client_once = build_client(settings, endpoint, 0, false)?;
        let chunk_client = build_client(settings, endpoint, 8, true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-backend")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("starting the S3 client's runtime", e))?;
        let describe = if prefix.is_empty() {
            format!("s3://{}", settings.bucket)
        } else {
            format!("s3://{}/{prefix}", settings.bucket)
        };
        let backend = Self {
            client: Arc::new(client),
            client_once: Arc::new(client_once),
            chunk_client: Arc::new(chunk_client),
            runtime: Some(runtime),
            prefix,
            describe,
        };
        backend.check(endpoint, &settings.bucket)?;
        Ok(backend)
    }

    fn check(&self, endpoint: &str, bucket: &str) -> Result<()> {
        let client = self.client.clone();
        let key = self.key("chunks");
        let listed = self.block(async move {
            tokio::time::timeout(START_CHECK_TIMEOUT, client.list_with_delimiter(Some(&key))).await
        })?;
        let at = format!("S3 endpoint {endpoint} bucket {bucket:?}");
        match listed {
            Err(_) => Err(StoreError::new(
                ErrorKind::Io,
                format!("{at}: no answer within {}s (is the endpoint reachable?)", START_CHECK_TIMEOUT.as_secs()),
            )),
            Ok(Err(e)) => {
                let text = one_line(&e);
                let (status, code) = (between(&text, "status code: ", ":"), between(&text, "<Code>", "</Code>"));
                let msg = match (status, code) {
                    (_, Some("NoSuchBucket")) => "the bucket does not exist (404 NoSuchBucket); create it first".into(),
                    (Some(s), Some(c)) if s.starts_with("403") => {
                        format!("credentials refused ({s} {c}); check access_key_id and the secret")
                    }
                    (Some(s), Some(c)) => format!("refused: {s} {c}"),
                    (Some(s), None) => format!("refused: {s}"),
                    _ => text,
                };
                let kind =
                    if matches!(e, object_store::Error::NotFound { .. }) { ErrorKind::NotFound } else { ErrorKind::Io };
                Err(StoreError::new(kind, format!("{at}: {msg}")))
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Reads `<prefix>/store.json`, creating it on first start with a create-only PUT, so
    /// two servers starting together over an empty bucket agree on one identity.
    /// `chunk_size` applies only to a new store.
    pub fn open_or_create_identity(&self, chunk_size: u32) -> Result<StoreIdentity> {
        let key = self.key("store.json");
        let what = format!("s3://…/{key}");
        match self.get(&key) {
            Ok(bytes) => return StoreIdentity::from_json(&bytes, &what),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        crate::identity::validate_chunk_size(chunk_size).map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e))?;
        let id = StoreIdentity::new(chunk_size);
        let json = serde_json::to_vec_pretty(&id).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
        if self.put_create(&key, json)? {
            tracing::info!(store = %self.describe, store_uuid = %id.store_uuid, "created a new store");
            Ok(id)
        } else {
            // Another server created it first: its identity is the store's.
            StoreIdentity::from_json(&self.get(&key)?, &what)
        }
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> &str {
        &self.describe
    }

    fn key(&self, rest: &str) -> ObjPath {
        if self.prefix.is_empty() { ObjPath::from(rest) } else { ObjPath::from(format!("{}/{rest}", self.prefix)) }
    }

    fn chunk_key(&self, d: &Digest) -> ObjPath {
        let hex = d.to_hex();
        self.key(&format!("chunks/{}/{hex}", &hex[..4]))
    }

    fn object_key(&self, kind: ObjectKind, name: &str) -> Result<ObjPath> {
        if name.is_empty() || name.contains('/') || name.contains('\0') || name.starts_with('.') {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!("object name {name:?} is not a plain file name"),
            ));
        }
        Ok(self.key(&format!("{}/{name}", kind.dir())))
    }

    fn owner_key(&self, namespace: &str, d: &Digest) -> Result<ObjPath> {
        crate::group_meta::check_namespace(namespace).map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e))?;
        let hex = d.to_hex();
        Ok(self.key(&format!("owners/{namespace}/{}/{hex}", &hex[..4])))
    }

    /// Runs `fut` on the backend's runtime and waits for it on this thread.
    fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let rt = self.runtime.as_ref().ok_or_else(|| StoreError::new(ErrorKind::Io, "the S3 client is shut down"))?;
        let task = rt.spawn(fut);
        futures::executor::block_on(task).map_err(|e| StoreError::new(ErrorKind::Io, format!("S3 request task: {e}")))
    }

    fn get(&self, key: &ObjPath) -> Result<Vec<u8>> {
        let (client, k) = (self.client.clone(), key.clone());
        self.block(async move {
            let r = client.get(&k).await?;
            r.bytes().await
        })?
        // A body that came in one piece, or was gathered into one, is moved, not copied.
        .map(Vec::from)
        .map_err(|e| s3_error("GET", key.as_ref(), e))
    }

    /// HEAD: the object's LastModified, None when absent.
    fn head(&self, key: &ObjPath) -> Result<Option<SystemTime>> {
        let (client, k) = (self.client.clone(), key.clone());
        match self.block(async move { client.head(&k).await })? {
            Ok(m) => Ok(Some(m.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("HEAD", key.as_ref(), e)),
        }
    }

    /// Create-only PUT (`If-None-Match: *`); false when the key already exists.
    fn put_create(&self, key: &ObjPath, bytes: Vec<u8>) -> Result<bool> {
        self.put_create_with(&self.client, key, bytes)
    }

    /// [`Self::put_create`] through `client`.
    fn put_create_with(&self, client: &Arc<AmazonS3>, key: &ObjPath, bytes: Vec<u8>) -> Result<bool> {
        let (client, k) = (client.clone(), key.clone());
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.block(async move { client.put_opts(&k, PutPayload::from(bytes), opts).await })? {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(s3_error("PUT", key.as_ref(), e)),
        }
    }

    fn delete(&self, key: &ObjPath) -> Result<()> {
        let (client, k) = (self.client.clone(), key.clone());
        match self.block(async move { client.delete(&k).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("DELETE", key.as_ref(), e)),
        }
    }

    /// Every object under `dir` (paginated LIST): (last path segment, size, LastModified).
    fn list(&self, dir: &str) -> Result<Vec<(String, u64, SystemTime)>> {
        Ok(self
            .list_keys(&format!("{dir}/"))?
            .into_iter()
            .map(|l| (l.key.rsplit('/').next().unwrap_or_default().to_string(), l.size, l.modified))
            .collect())
    }

    /// Every object whose key (relative to the prefix) starts with `rel`, which ends in `/`.
    fn list_keys(&self, rel: &str) -> Result<Vec<Listed>> {
        let (client, k) = (self.client.clone(), self.key(rel.trim_end_matches('/')));
        let key = k.clone();
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        self.block(async move {
            client
                .list(Some(&k))
                .map_ok(|m| Listed {
                    key: m.location.as_ref().strip_prefix(strip.as_str()).unwrap_or(m.location.as_ref()).to_string(),
                    size: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
                .try_collect::<Vec<_>>()
                .await
        })?
        .map_err(|e| s3_error("LIST", key.as_ref(), e))
    }
}

/// An S3 client for the settings, retrying 5xx and transport errors `max_retries` times;
/// `unsigned_payload` leaves request bodies out of the signature.
fn build_client(settings: &S3Settings, endpoint: &str, max_retries: usize, unsigned_payload: bool) -> Result<AmazonS3> {
    AmazonS3Builder::new()
        .with_unsigned_payload(unsigned_payload)
        .with_endpoint(endpoint)
        .with_bucket_name(&settings.bucket)
        .with_region(if settings.region.is_empty() { "us-east-1" } else { &settings.region })
        .with_access_key_id(&settings.access_key_id)
        .with_secret_access_key(&settings.secret_access_key)
        .with_virtual_hosted_style_request(false)
        .with_allow_http(settings.allow_http)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries,
            retry_timeout: RETRY_TIMEOUT,
        })
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(settings.allow_http)
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(CONNECT_TIMEOUT),
        )
        .build()
        .map_err(|e| StoreError::new(ErrorKind::InvalidArgument, format!("[s3] configuration: {e}")))
}

/// The text between `start` and the next `end` in `s`.
fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(s[from..from + len].trim())
}

/// An object_store error as one line (its Display may hold a multi-line response body).
fn one_line(e: &object_store::Error) -> String {
    let mut s = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(c) = next {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        next = c.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Backend for S3Backend {
    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        Ok(self.head(&self.chunk_key(digest))?.is_some())
    }

    fn has_chunks(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        let keys: Vec<ObjPath> = digests.iter().map(|d| self.chunk_key(d)).collect();
        let client = self.client.clone();
        self.block(async move {
            futures::stream::iter(keys)
                .map(|k| {
                    let client = client.clone();
                    async move {
                        match client.head(&k).await {
                            Ok(_) => Ok(true),
                            Err(object_store::Error::NotFound { .. }) => Ok(false),
                            Err(e) => Err(s3_error("HEAD", k.as_ref(), e)),
                        }
                    }
                })
                .buffered(LOOKUPS_IN_FLIGHT)
                .try_collect::<Vec<bool>>()
                .await
        })?
    }

    /// A chunk's body is sent as `UNSIGNED-PAYLOAD`: the signature still covers the key,
    /// the headers and the time, but neither side hashes the body with SHA-256 (in a
    /// profile of an S3 full backup that was 15% of the store's CPU and 9% of radosgw's).
    /// The body needs no second checksum: it is content-addressed, the store checked it
    /// against its digest before this call, and every reader checks it again (a restore
    /// decodes it and compares its BLAKE3 digest, verify does the same). In transit, TLS
    /// protects it on `https`; on plain `http` (an explicit `allow_http`) a body signature
    /// would protect little, since S3 signs requests, not answers: whoever can change a
    /// body on the path can as well answer 412 "already there" to the PUT.
    /// Manifests, indexes, sessions and leases are signed with their bodies.
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<bool> {
        self.put_create_with(&self.chunk_client, &self.chunk_key(digest), blob.to_vec())
    }

    fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.get(&self.chunk_key(digest))
    }

    fn touch_chunk(&self, digest: &Digest) -> Result<bool> {
        Ok(self.head(&self.chunk_key(digest))?.is_some())
    }

    fn chunk_touched(&self, digest: &Digest) -> Result<Option<SystemTime>> {
        self.head(&self.chunk_key(digest))
    }

    fn for_each_chunk(&self, f: &mut dyn FnMut(ChunkInfo) -> Result<()>) -> Result<()> {
        for (name, size, touched) in self.list("chunks")? {
            let Some(digest) = parse_hex_digest(&name) else { continue };
            f(ChunkInfo { digest, size, touched })?;
        }
        Ok(())
    }

    fn delete_chunk(&self, digest: &Digest) -> Result<()> {
        self.delete(&self.chunk_key(digest))
    }

    fn quarantine_chunk(&self, digest: &Digest) -> Result<()> {
        let (from, to) = (self.chunk_key(digest), self.key(&format!("bad/{}", digest.to_hex())));
        let (client, f, t) = (self.client.clone(), from.clone(), to.clone());
        match self.block(async move { client.copy(&f, &t).await })? {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(s3_error("COPY to bad/", from.as_ref(), e)),
        }
        self.delete_chunk(digest)
    }

    fn put_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        let key = self.object_key(kind, name)?;
        let (client, k, payload) = (self.client.clone(), key.clone(), PutPayload::from(bytes.to_vec()));
        self.block(async move { client.put(&k, payload).await })?
            .map(|_| ())
            .map_err(|e| s3_error("PUT", key.as_ref(), e))
    }

    fn create_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<bool> {
        self.put_create(&self.object_key(kind, name)?, bytes.to_vec())
    }

    fn get_object(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        self.get(&self.object_key(kind, name)?)
    }

    fn list_objects(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        Ok(self.list(kind.dir())?.into_iter().map(|(name, _, modified)| ObjectInfo { name, modified }).collect())
    }

    fn delete_object(&self, kind: ObjectKind, name: &str) -> Result<()> {
        self.delete(&self.object_key(kind, name)?)
    }

    fn capacity(&self) -> Result<(u64, u64)> {
        Ok((u64::MAX, u64::MAX))
    }

    fn mark_owner(&self, namespace: &str, digest: &Digest) -> Result<bool> {
        self.put_create(&self.owner_key(namespace, digest)?, Vec::new())
    }

    fn is_owner(&self, namespace: &str, digest: &Digest) -> Result<bool> {
        Ok(self.head(&self.owner_key(namespace, digest)?)?.is_some())
    }

    fn probe(&self) -> Result<()> {
        let (client, key) = (self.client_once.clone(), self.key("store.json"));
        let k = key.clone();
        match self.block(async move { tokio::time::timeout(PROBE_TIMEOUT, client.head(&k)).await })? {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(s3_error("HEAD", key.as_ref(), e)),
            Err(_) => Err(StoreError::new(
                ErrorKind::Io,
                format!("S3 HEAD {key}: no answer within {}s", PROBE_TIMEOUT.as_secs()),
            )),
        }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

impl SharedObjects for S3Backend {
    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.key(key);
        let (client, k) = (self.client.clone(), key.clone());
        self.block(async move { client.put(&k, PutPayload::from(bytes)).await })?
            .map(|_| ())
            .map_err(|e| s3_error("PUT", key.as_ref(), e))
    }

    fn put_create(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        S3Backend::put_create(self, &self.key(key), bytes)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        S3Backend::get(self, &self.key(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        self.list_keys(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        S3Backend::delete(self, &self.key(key))
    }

    fn delete_many(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let paths: Vec<ObjPath> = keys.iter().map(|k| self.key(k)).collect();
        let client = self.client.clone();
        // Multi-object DELETE (up to 1000 keys a request); absent keys are fine.
        let results = self.block(async move {
            let stream = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
            client.delete_stream(stream).collect::<Vec<_>>().await
        })?;
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(s3_error("DELETE", "(batch)", e)),
            }
        }
        Ok(())
    }

    fn chunk_modified(&self, digest: &Digest) -> Result<Option<SystemTime>> {
        self.head(&self.chunk_key(digest))
    }

    fn delete_chunk_once(&self, digest: &Digest) -> Result<()> {
        let key = self.chunk_key(digest);
        let (client, k) = (self.client_once.clone(), key.clone());
        match self.block(async move { client.delete(&k).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("DELETE", key.as_ref(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_names_parse_back() {
        let d = Digest::of(b"x");
        assert_eq!(parse_hex_digest(&d.to_hex()), Some(d));
        assert_eq!(parse_hex_digest("zz"), None);
        assert_eq!(parse_hex_digest(&"g".repeat(64)), None);
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        let s = S3Settings {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            access_key_id: "a".into(),
            secret_access_key: "s".into(),
            ..Default::default()
        };
        let e = S3Backend::connect(&s).expect_err("http refused");
        assert!(e.to_string().contains("allow_http"), "{e}");
        assert!(!format!("{s:?}").contains("\"s\""), "the secret is never in Debug output");
    }
}
