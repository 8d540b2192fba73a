//! The RADOS backend: a store in a Ceph pool, through librados ([`ffi`]), with no store
//! server needed in the data path (the agent can open it directly) and any number of
//! writers (hosts, store servers) coordinating by the protocol of [`crate::shared`].
//!
//! ```text
//! RADOS namespace      object                      what
//! <prefix>             store.json                  identity (exclusive create, once)
//! <prefix>chunks       <first 4 hex>/<64 hex>      chunk blobs (exclusive create)
//! <prefix>indexes      <name>.vidx                 volume indexes (exclusive create)
//! <prefix>groups       <group-uuid>.json           manifests (exclusive create, last)
//! <prefix>group-meta   <group-uuid>.json           namespace and retention lock
//! <prefix>meta         <name>                      store bookkeeping (verify-state.json)
//! <prefix>owners       <ns>/<4 hex>/<64 hex>       empty: namespace <ns> uploaded that chunk
//! <prefix>bad          <64 hex>                    chunks verify found damaged
//! <prefix>sessions     <id>.json                   shared-bucket session records
//! <prefix>journal      <id>/<server>-<n>           reuse journals
//! <prefix>gc           lease-…, fence-…, doomed-…  the GC lease and lists
//! ```
//!
//! Each top-level "directory" is its own RADOS namespace, so listing one (the GC lease
//! check of every MissingChunks, a session's journal) never walks the chunks. An exclusive
//! create (`LIBRADOS_CREATE_EXCLUSIVE` with `write_full` in one write operation) is atomic:
//! a racing writer cannot tear a chunk, and a second create of a name answers EEXIST
//! ("already present"). RADOS is strongly consistent, as the shared protocol requires.
//! "Last touched" is the object's mtime (`rados_stat`, seconds).
//!
//! librados is synchronous: calls block their thread (the chunk store runs on blocking
//! threads), and batch lookups fan out over [`LOOKUP_THREADS`] threads. Every monitor
//! and OSD operation has a timeout (`rados_osd_op_timeout` …), so a dead cluster is an
//! error within it, never a hung job.

pub mod ffi;
pub mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use vmbackup_proto::Digest;

use super::{Backend, ChunkInfo, ObjectInfo, ObjectKind};
use crate::error::{ErrorKind, Result, StoreError};
use crate::identity::StoreIdentity;
use crate::shared::{Listed, SharedObjects};
use ffi::{Cluster, IoCtx, RadosError};

/// Threads a batch lookup (MissingChunks, commit checks) uses.
pub const LOOKUP_THREADS: usize = 16;

/// Where the pool is and who connects.
#[derive(Debug, Clone)]
pub struct RadosSettings {
    /// ceph.conf (monitors, and the keyring unless given); None: librados's defaults only.
    pub conf: Option<PathBuf>,
    /// Monitors (`mon_host` syntax, e.g. `v1:10.0.0.1:6789,v1:10.0.0.2:6789`); None: the conf's.
    pub mon_host: Option<String>,
    /// Client name, e.g. `client.admin` or `client.vmbackup`.
    pub client: String,
    /// Keyring file (else the conf's).
    pub keyring: Option<PathBuf>,
    /// Pool name; it must exist.
    pub pool: String,
    /// Prefix of the store's RADOS namespaces (several stores may share a pool).
    pub prefix: String,
    /// Timeout of the mount and of every operation.
    pub timeout: Duration,
}

/// A store in a RADOS pool.
pub struct RadosBackend {
    cluster: Arc<Cluster>,
    pool: String,
    prefix: String,
    contexts: Mutex<HashMap<String, Arc<IoCtx>>>,
    /// Whether an OSD map refresh is under way (at most one at a time).
    refreshing: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for RadosBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadosBackend").field("pool", &self.pool).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// `ETIMEDOUT`: an operation outlived the timeout (an OSD or monitor down or moved).
const ETIMEDOUT: i32 = 110;

fn rados_error(e: RadosError) -> StoreError {
    let kind = match e.errno {
        2 => ErrorKind::NotFound,
        17 => ErrorKind::Conflict,
        28 | 122 => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    };
    StoreError::new(kind, e.to_string())
}

impl RadosBackend {
    /// Connects and checks the pool exists. Every failure is one line naming the conf,
    /// client or pool.
    pub fn connect(settings: &RadosSettings) -> Result<Self> {
        let invalid = |m: String| StoreError::new(ErrorKind::InvalidArgument, m);
        if settings.pool.is_empty() {
            return Err(invalid("[rados] pool is not set".into()));
        }
        if settings.prefix.contains(['/', '\0']) {
            return Err(invalid(format!("[rados] prefix {:?} may not contain '/'", settings.prefix)));
        }
        let cluster = Cluster::connect(
            settings.conf.as_deref(),
            settings.mon_host.as_deref(),
            &settings.client,
            settings.keyring.as_deref(),
            settings.timeout,
        )
        .map_err(|e| {
            let mut via = Vec::new();
            if let Some(m) = &settings.mon_host {
                via.push(format!("monitors {m}"));
            }
            if let Some(c) = &settings.conf {
                via.push(c.display().to_string());
            }
            if let Some(k) = &settings.keyring {
                via.push(format!("keyring {}", k.display()));
            }
            StoreError::new(
                ErrorKind::Io,
                format!("connecting to Ceph as {} ({}): {e}", settings.client, via.join(", ")),
            )
        })?;
        if !cluster.has_pool(&settings.pool).map_err(rados_error)? {
            return Err(StoreError::new(
                ErrorKind::NotFound,
                format!("Ceph pool {:?} does not exist; create it first (ceph osd pool create)", settings.pool),
            ));
        }
        Ok(Self {
            cluster,
            pool: settings.pool.clone(),
            prefix: settings.prefix.clone(),
            contexts: Mutex::default(),
            refreshing: Arc::default(),
        })
    }

    /// A failed operation as a store error. After a timeout it also starts fetching the
    /// newest OSD map in the background (one fetch at a time), so later operations go where
    /// the OSDs are now (an OSD that died and came back elsewhere may not have been announced
    /// to this client yet). The fetch has no timeout in librados and waits as long as the
    /// monitors are down, so no caller ever waits for it.
    fn fail(&self, e: RadosError) -> StoreError {
        use std::sync::atomic::Ordering;
        if e.errno == ETIMEDOUT && !self.refreshing.swap(true, Ordering::AcqRel) {
            let (cluster, flag) = (Arc::clone(&self.cluster), Arc::clone(&self.refreshing));
            let what = e.to_string();
            let spawned = std::thread::Builder::new().name("rados-osdmap".into()).spawn(move || {
                match cluster.refresh_osdmap() {
                    Ok(()) => tracing::info!(error = %what, "a RADOS operation timed out; fetched the newest OSD map"),
                    Err(r) => tracing::warn!(error = %what, refresh = %r, "a RADOS operation timed out; fetching the OSD map failed"),
                }
                flag.store(false, Ordering::Release);
            });
            if spawned.is_err() {
                self.refreshing.store(false, Ordering::Release);
            }
        }
        rados_error(e)
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> Result<String> {
        self.cluster.fsid().map_err(rados_error)
    }

    /// Reads `store.json`, creating it on first use with an exclusive create, so two
    /// writers starting together agree on one identity.
    pub fn open_or_create_identity(&self, chunk_size: u32) -> Result<StoreIdentity> {
        let what = format!("rados://{}/{}store.json", self.pool, self.prefix);
        if let Some(bytes) = self.ctx("")?.read("store.json").map_err(rados_error)? {
            return StoreIdentity::from_json(&bytes, &what);
        }
        crate::identity::validate_chunk_size(chunk_size).map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e))?;
        let id = StoreIdentity::new(chunk_size);
        let json = serde_json::to_vec_pretty(&id).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
        if self.ctx("")?.create_exclusive("store.json", &json).map_err(rados_error)? {
            tracing::info!(store = %self.describe(), store_uuid = %id.store_uuid, "created a new store");
            return Ok(id);
        }
        let bytes = self.ctx("")?.read("store.json").map_err(rados_error)?.unwrap_or_default();
        StoreIdentity::from_json(&bytes, &what)
    }

    /// The I/O context of a top-level directory (`""`: the store's root).
    fn ctx(&self, dir: &str) -> Result<Arc<IoCtx>> {
        let mut map = self.contexts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(dir) {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(self.cluster.ioctx(&self.pool, &format!("{}{dir}", self.prefix)).map_err(rados_error)?);
        map.insert(dir.to_string(), Arc::clone(&c));
        Ok(c)
    }

    /// A key of the shared layout (`gc/lease-…`) as (directory, object name).
    fn split(key: &str) -> Result<(&str, &str)> {
        match key.split_once('/') {
            Some((dir, oid)) if !dir.is_empty() && !oid.is_empty() => Ok((dir, oid)),
            _ => Ok(("", key)),
        }
    }

    fn chunk_oid(d: &Digest) -> String {
        let hex = d.to_hex();
        format!("{}/{hex}", &hex[..4])
    }

    fn check_name(name: &str) -> Result<()> {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!("object name {name:?} is not a plain file name"),
            ));
        }
        Ok(())
    }

    fn owner_oid(namespace: &str, d: &Digest) -> Result<String> {
        crate::group_meta::check_namespace(namespace).map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e))?;
        Ok(format!("{namespace}/{}", Self::chunk_oid(d)))
    }
}

impl Backend for RadosBackend {
    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        Ok(self.ctx("chunks")?.stat(&Self::chunk_oid(digest)).map_err(|e| self.fail(e))?.is_some())
    }

    fn has_chunks(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        let ctx = self.ctx("chunks")?;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let found: Vec<std::sync::atomic::AtomicU8> = digests.iter().map(|_| Default::default()).collect();
        let threads = LOOKUP_THREADS.min(digests.len()).max(1);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(d) = digests.get(i) else { return Ok(()) };
                            let here = ctx.stat(&Self::chunk_oid(d)).map_err(|e| self.fail(e))?.is_some();
                            found[i].store(u8::from(here), std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| Err(StoreError::new(ErrorKind::Io, "a lookup thread panicked")))
            })
        })?;
        Ok(found.into_iter().map(|f| f.into_inner() == 1).collect())
    }

    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<bool> {
        self.ctx("chunks")?.create_exclusive(&Self::chunk_oid(digest), blob).map_err(|e| self.fail(e))
    }

    fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.ctx("chunks")?
            .read(&Self::chunk_oid(digest))
            .map_err(|e| self.fail(e))?
            .ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("chunk {digest} is not in the pool")))
    }

    fn touch_chunk(&self, digest: &Digest) -> Result<bool> {
        self.has_chunk(digest)
    }

    fn chunk_touched(&self, digest: &Digest) -> Result<Option<SystemTime>> {
        Ok(self.ctx("chunks")?.stat(&Self::chunk_oid(digest)).map_err(|e| self.fail(e))?.map(|(_, t)| t))
    }

    fn for_each_chunk(&self, f: &mut dyn FnMut(ChunkInfo) -> Result<()>) -> Result<()> {
        let ctx = self.ctx("chunks")?;
        for oid in ctx.list().map_err(|e| self.fail(e))? {
            let Some(digest) = oid.rsplit('/').next().and_then(crate::backend::s3::parse_hex_digest) else { continue };
            // Gone since the listing: skipped, as a LIST would not have shown it.
            let Some((size, touched)) = ctx.stat(&oid).map_err(|e| self.fail(e))? else { continue };
            f(ChunkInfo { digest, size, touched })?;
        }
        Ok(())
    }

    fn delete_chunk(&self, digest: &Digest) -> Result<()> {
        self.ctx("chunks")?.remove(&Self::chunk_oid(digest)).map_err(|e| self.fail(e))
    }

    fn quarantine_chunk(&self, digest: &Digest) -> Result<()> {
        let Some(bytes) = self.ctx("chunks")?.read(&Self::chunk_oid(digest)).map_err(|e| self.fail(e))? else {
            return Ok(());
        };
        self.ctx("bad")?.write_full(&digest.to_hex(), &bytes).map_err(|e| self.fail(e))?;
        self.delete_chunk(digest)
    }

    fn put_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        Self::check_name(name)?;
        self.ctx(kind.dir())?.write_full(name, bytes).map_err(|e| self.fail(e))
    }

    fn create_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<bool> {
        Self::check_name(name)?;
        self.ctx(kind.dir())?.create_exclusive(name, bytes).map_err(|e| self.fail(e))
    }

    fn get_object(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        Self::check_name(name)?;
        let dir = kind.dir();
        self.ctx(dir)?
            .read(name)
            .map_err(|e| self.fail(e))?
            .ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("{dir}/{name} is not in the pool")))
    }

    fn list_objects(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let ctx = self.ctx(kind.dir())?;
        let mut out = Vec::new();
        for name in ctx.list().map_err(|e| self.fail(e))? {
            if let Some((_, modified)) = ctx.stat(&name).map_err(|e| self.fail(e))? {
                out.push(ObjectInfo { name, modified });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete_object(&self, kind: ObjectKind, name: &str) -> Result<()> {
        Self::check_name(name)?;
        self.ctx(kind.dir())?.remove(name).map_err(|e| self.fail(e))
    }

    fn capacity(&self) -> Result<(u64, u64)> {
        self.cluster.capacity().map_err(|e| self.fail(e))
    }

    fn mark_owner(&self, namespace: &str, digest: &Digest) -> Result<bool> {
        self.ctx("owners")?.create_exclusive(&Self::owner_oid(namespace, digest)?, &[]).map_err(|e| self.fail(e))
    }

    fn is_owner(&self, namespace: &str, digest: &Digest) -> Result<bool> {
        Ok(self.ctx("owners")?.stat(&Self::owner_oid(namespace, digest)?).map_err(|e| self.fail(e))?.is_some())
    }

    fn probe(&self) -> Result<()> {
        self.ctx("")?.stat("store.json").map_err(|e| self.fail(e)).map(|_| ())
    }

    fn describe(&self) -> String {
        format!("rados://{}/{}", self.pool, self.prefix)
    }
}

impl SharedObjects for RadosBackend {
    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let (dir, oid) = Self::split(key)?;
        self.ctx(dir)?.write_full(oid, &bytes).map_err(|e| self.fail(e))
    }

    fn put_create(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        let (dir, oid) = Self::split(key)?;
        self.ctx(dir)?.create_exclusive(oid, &bytes).map_err(|e| self.fail(e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let (dir, oid) = Self::split(key)?;
        self.ctx(dir)?
            .read(oid)
            .map_err(|e| self.fail(e))?
            .ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("{key} is not in the pool")))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let (dir, rest) = prefix.split_once('/').unwrap_or((prefix, ""));
        let ctx = self.ctx(dir)?;
        let mut out = Vec::new();
        for oid in ctx.list().map_err(|e| self.fail(e))? {
            if !oid.starts_with(rest) {
                continue;
            }
            if let Some((size, modified)) = ctx.stat(&oid).map_err(|e| self.fail(e))? {
                out.push(Listed { key: format!("{dir}/{oid}"), size, modified });
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let (dir, oid) = Self::split(key)?;
        self.ctx(dir)?.remove(oid).map_err(|e| self.fail(e))
    }

    fn chunk_modified(&self, digest: &Digest) -> Result<Option<SystemTime>> {
        self.chunk_touched(digest)
    }

    fn delete_chunk_once(&self, digest: &Digest) -> Result<()> {
        // librados sends an operation once; a resend after an OSD map change is its own
        // and applies in order, so a later create of the name cannot be removed by it.
        self.delete_chunk(digest)
    }
}
