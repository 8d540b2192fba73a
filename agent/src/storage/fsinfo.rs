//! The `fsInfo::type::T::url::U::options::O` system tag: the Image Storage's data
//! directory is reachable as a filesystem (an NFS export of it, say). The agent mounts it
//! for the job (`mount -t T -o O U <data>/run/mnt-<job>`), writes chunks straight into it
//! with the store's own directory backend (tmp/ + fsync + rename, as the store itself
//! does), and still asks the store over gRPC what is missing, to keep its session open
//! (so GC spares the new chunks) and to commit, which checks every chunk on its disk. The
//! filesystem is unmounted when the job ends, whatever the outcome. To the backup pipeline
//! the mounted directory is one more [`ChunkWriter`] behind the storage seam.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use vmbackup_proto::Digest;
use vmbackup_store::backend::Backend;
use vmbackup_store::backend::fs::FsBackend;

use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::ChunkWriter;
use crate::storage::seam::PutStats;
use crate::tags::FsInfo;

/// A store directory mounted for one job.
#[derive(Debug)]
pub struct MountedStore {
    mountpoint: PathBuf,
    backend: FsBackend,
    mounted: bool,
}

async fn run(program: &str, args: &[&str]) -> std::result::Result<(), String> {
    crate::tool::run(program, args, crate::tool::SHORT).await.map(|_| ()).map_err(|e| e.to_string())
}

impl MountedStore {
    /// Mounts `info` under `runtime_dir` and checks it is the store `store_uuid`.
    pub async fn mount(info: &FsInfo, runtime_dir: &Path, tag: &str, store_uuid: &str) -> Result<Self> {
        let mountpoint = runtime_dir.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&mountpoint).map_err(|e| {
            AgentError::new(ErrorKind::Internal, format!("creating mount point {}: {e}", mountpoint.display()))
        })?;
        let mp = mountpoint.display().to_string();
        let mut args = vec!["-t", info.fs_type.as_str()];
        if !info.options.is_empty() {
            args.extend(["-o", info.options.as_str()]);
        }
        args.extend([info.url.as_str(), mp.as_str()]);
        if let Err(e) = run("mount", &args).await {
            let _ = std::fs::remove_dir(&mountpoint);
            return Err(AgentError::new(ErrorKind::FailedPrecondition, format!("fsInfo: {e}")).with_field("systemTags"));
        }
        let attached = (|| {
            let id = vmbackup_store::identity::StoreIdentity::read(&mountpoint)
                .map_err(|e| format!("{} does not hold a vmbackup store: {e}", info.url))?;
            if id.store_uuid != store_uuid {
                return Err(format!(
                    "{} holds store {}, not this backup storage's {store_uuid}",
                    info.url, id.store_uuid
                ));
            }
            FsBackend::attach(&mountpoint).map_err(|e| e.to_string())
        })();
        match attached {
            Ok(backend) => {
                tracing::info!(url = %info.url, mountpoint = %mp, "store directory mounted for the backup");
                Ok(Self { mountpoint, backend, mounted: true })
            }
            Err(e) => {
                unmount(&mountpoint).await;
                Err(AgentError::new(ErrorKind::FailedPrecondition, format!("fsInfo: {e}")).with_field("systemTags"))
            }
        }
    }

    /// Stores one chunk blob durably (already encoded and checked by the caller).
    pub fn put(&self, digest: &Digest, blob: &[u8]) -> Result<bool> {
        self.backend.put_chunk(digest, blob).map_err(|e| {
            AgentError::new(ErrorKind::Unavailable, format!("writing chunk {digest} to the mounted store: {e}"))
        })
    }

    /// Unmounts and removes the mount point.
    pub async fn unmount(&mut self) {
        if self.mounted {
            unmount(&self.mountpoint).await;
            self.mounted = false;
        }
    }
}

/// Chunks of one session written into the mounted directory, each durable when `put`
/// returns (several at once: every worker writes its own).
#[derive(Debug)]
pub struct MountedWriter {
    store: Arc<MountedStore>,
    stored: AtomicU64,
    present: AtomicU64,
}

impl MountedWriter {
    /// A writer into `store`.
    pub fn new(store: Arc<MountedStore>) -> Self {
        Self { store, stored: AtomicU64::new(0), present: AtomicU64::new(0) }
    }
}

#[tonic::async_trait]
impl ChunkWriter for MountedWriter {
    async fn put(&self, digest: Digest, blob: Bytes) -> Result<()> {
        let store = self.store.clone();
        let fresh = tokio::task::spawn_blocking(move || store.put(&digest, &blob)).await??;
        let counter = if fresh { &self.stored } else { &self.present };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<PutStats> {
        Ok(PutStats {
            stored: self.stored.load(Ordering::Relaxed),
            already_present: self.present.load(Ordering::Relaxed),
        })
    }
}

async fn unmount(mountpoint: &Path) {
    let mp = mountpoint.display().to_string();
    if let Err(e) = run("umount", &[mp.as_str()]).await {
        tracing::warn!(error = %e, "unmounting the store directory failed; detaching it lazily");
        let _ = run("umount", &["-l", mp.as_str()]).await;
    }
    let _ = std::fs::remove_dir(mountpoint);
}
