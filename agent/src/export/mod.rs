//! Volume backups served as read-only disks (NBD), at once, without a restore: an export
//! fetches the chunks a reader touches ([`disk`]) and speaks NBD on a Unix socket
//! ([`nbd_server`]). `qemu-img`, `qemu-nbd`, `nbdcopy` or a VM (`-blockdev
//! driver=nbd,...`) read it as they read a local disk.
//!
//! Each export is a task of its own with a lifetime; the registry here lists and stops
//! them. Sockets live in the agent's runtime directory (`<data_dir>/run/exports/`, mode
//! 0700, each socket 0600): only root on the host reads an export, as only root reads the
//! host's volumes. An export holds no store session and writes nothing.

pub mod disk;
pub mod nbd_server;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use disk::BackupDisk;

/// A running export as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export uuid.
    pub uuid: String,
    /// The backup group.
    pub group_uuid: String,
    /// The volume whose backup it serves.
    pub volume_uuid: String,
    /// The backup storage it reads.
    pub storage_uuid: String,
    /// NBD export name.
    pub name: String,
    /// The Unix socket.
    pub socket: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Unix milliseconds.
    pub created: i64,
    /// Unix milliseconds; the export stops then.
    pub expires: i64,
}

impl ExportInfo {
    /// `nbd+unix:///<name>?socket=<path>`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.name, self.socket.display())
    }
}

#[derive(Debug)]
struct Running {
    info: ExportInfo,
    stop: CancellationToken,
}

/// The running exports.
#[derive(Debug, Clone, Default)]
pub struct Exports(Arc<Mutex<HashMap<String, Running>>>);

impl Exports {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every running export.
    pub fn list(&self) -> Vec<ExportInfo> {
        let mut v: Vec<ExportInfo> = self.lock().values().map(|r| r.info.clone()).collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.uuid.cmp(&b.uuid)));
        v
    }

    /// Stops export `uuid`; false when there is none.
    pub fn stop(&self, uuid: &str) -> bool {
        match self.lock().remove(uuid) {
            Some(r) => {
                r.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops every export (shutdown).
    pub fn stop_all(&self) {
        for (_, r) in self.lock().drain() {
            r.stop.cancel();
        }
    }

    /// Serves `disk` on `listener` as `info` describes, until stopped or `lifetime` ends;
    /// the socket file goes with it.
    pub fn start(&self, info: ExportInfo, disk: Arc<BackupDisk>, listener: UnixListener, lifetime: Duration) {
        let stop = CancellationToken::new();
        self.lock().insert(info.uuid.clone(), Running { info: info.clone(), stop: stop.clone() });
        let registry = self.clone();
        let span = tracing::info_span!("export", id = %info.uuid, name = %info.name);
        let task = async move {
            tracing::info!(socket = %info.socket.display(), size = info.size, "NBD export serving");
            let deadline = tokio::time::sleep(lifetime);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = &mut deadline => {
                        tracing::info!("export lifetime ended");
                        break;
                    }
                    accepted = listener.accept() => match accepted {
                        Ok((conn, _)) => {
                            let (disk, name, stop) = (disk.clone(), info.name.clone(), stop.clone());
                            tokio::spawn(async move {
                                tokio::select! {
                                    () = stop.cancelled() => {}
                                    r = nbd_server::serve(conn, &name, disk) => if let Err(e) = r {
                                        tracing::info!(error = %e, "NBD connection ended");
                                    }
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            stop.cancel();
            let _ = std::fs::remove_file(&info.socket);
            registry.lock().remove(&info.uuid);
            tracing::info!("NBD export stopped");
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
    }
}
