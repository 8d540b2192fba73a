//! The `fsInfo::type::T::url::U::options::O` system tag: the Image Storage's data
//! directory is reachable as a filesystem (an NFS export of it, say). The agent mounts it
//! for the job (`mount -t T -o O U <data>/run/mnt-<job>`), writes chunks straight into it
//! with the store's own directory backend (tmp/ + fsync + rename, as the store itself
//! does), and still asks the store over gRPC what is missing, to keep its session open
//! (so GC spares the new chunks) and to commit, which checks every chunk on its disk. The
//! filesystem is unmounted when the job ends, whatever the outcome.

use std::path::{Path, PathBuf};

use vmbackup_proto::Digest;
use vmbackup_store::backend::Backend;
use vmbackup_store::backend::fs::FsBackend;

use crate::error::{AgentError, ErrorKind, Result};
use crate::tags::FsInfo;

/// A store directory mounted for one job.
#[derive(Debug)]
pub struct MountedStore {
    mountpoint: PathBuf,
    backend: FsBackend,
    mounted: bool,
}

async fn run(program: &str, args: &[&str]) -> std::result::Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
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

async fn unmount(mountpoint: &Path) {
    let mp = mountpoint.display().to_string();
    if let Err(e) = run("umount", &[mp.as_str()]).await {
        tracing::warn!(error = %e, "unmounting the store directory failed; detaching it lazily");
        let _ = run("umount", &["-l", mp.as_str()]).await;
    }
    let _ = std::fs::remove_dir(mountpoint);
}
