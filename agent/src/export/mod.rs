//! Volume backups served as read-only disks (NBD), at once, without a restore: an export
//! fetches the chunks a reader touches ([`disk`]) and speaks NBD on a Unix socket or over
//! TCP with TLS ([`nbd_server`]). `qemu-img`, `qemu-nbd`, `nbdcopy` or a VM (`-blockdev
//! driver=nbd,...`) read it as they read a local disk.
//!
//! Each export is a task of its own with a lifetime; the registry here lists and stops
//! them. Sockets live in the agent's runtime directory (`<data_dir>/run/exports/`, mode
//! 0700, each socket 0600): only root on the host reads an export, as only root reads the
//! host's volumes. A TCP export is served only inside TLS, to clients whose certificate
//! chains to the configured client CA ([`tls`]): NBD has no other authentication. An export
//! holds no store session and writes nothing.

pub mod disk;
pub mod nbd_server;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
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
    /// Where it is served.
    pub endpoint: Endpoint,
    /// Bytes.
    pub size: u64,
    /// Unix milliseconds.
    pub created: i64,
    /// Unix milliseconds; the export stops then.
    pub expires: i64,
}

/// Where an export is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket (mode 0600).
    Unix(PathBuf),
    /// A TCP address, TLS only.
    Tcp(SocketAddr),
}

impl ExportInfo {
    /// `nbd+unix:///<name>?socket=<path>`, or `nbds://<host>:<port>/<name>` over TCP.
    pub fn uri(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(socket) => format!("nbd+unix:///{}?socket={}", self.name, socket.display()),
            Endpoint::Tcp(addr) => format!("nbds://{addr}/{}", self.name),
        }
    }
}

/// A bound listener of an export.
pub enum Listener {
    /// On a Unix socket.
    Unix(UnixListener),
    /// On TCP, TLS only.
    Tcp(TcpListener, TlsAcceptor),
}

impl Listener {
    /// Accepts the next connection and serves it (spawned) until it ends or `stop`.
    async fn accept_and_serve(
        &self,
        name: &str,
        disk: &Arc<BackupDisk>,
        stop: &CancellationToken,
    ) -> std::io::Result<()> {
        let (disk, name, stop) = (disk.clone(), name.to_string(), stop.clone());
        let served = |r: Result<(), nbd_server::ServeError>| {
            if let Err(e) = r {
                tracing::info!(error = %e, "NBD connection ended");
            }
        };
        match self {
            Listener::Unix(l) => {
                let (conn, _) = l.accept().await?;
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        r = nbd_server::serve(conn, &name, disk, None) => served(r),
                    }
                });
            }
            Listener::Tcp(l, acceptor) => {
                let (conn, peer) = l.accept().await?;
                let _ = conn.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    tracing::info!(%peer, "NBD client connected over TCP");
                    tokio::select! {
                        () = stop.cancelled() => {}
                        r = nbd_server::serve(conn, &name, disk, Some(&acceptor)) => served(r),
                    }
                });
            }
        }
        Ok(())
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
    /// a socket file goes with it.
    pub fn start(&self, info: ExportInfo, disk: Arc<BackupDisk>, listener: Listener, lifetime: Duration) {
        let stop = CancellationToken::new();
        self.lock().insert(info.uuid.clone(), Running { info: info.clone(), stop: stop.clone() });
        let registry = self.clone();
        let span = tracing::info_span!("export", id = %info.uuid, name = %info.name);
        let task = async move {
            tracing::info!(uri = %info.uri(), size = info.size, "NBD export serving");
            let deadline = tokio::time::sleep(lifetime);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = &mut deadline => {
                        tracing::info!("export lifetime ended");
                        break;
                    }
                    accepted = listener.accept_and_serve(&info.name, &disk, &stop) => match accepted {
                        Ok(()) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            stop.cancel();
            if let Endpoint::Unix(socket) = &info.endpoint {
                let _ = std::fs::remove_file(socket);
            }
            registry.lock().remove(&info.uuid);
            tracing::info!("NBD export stopped");
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
    }
}
