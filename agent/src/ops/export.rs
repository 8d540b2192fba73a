//! ExportVmBackup: one volume backup of a group served as a read-only NBD disk
//! ([`crate::export`]) from the moment the call returns.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use vmbackup_proto::index::VolumeIndex;

use super::Ops;
use crate::catalog::now_millis;
use crate::error::{AgentError, ErrorKind, Result};
use crate::export::disk::BackupDisk;
use crate::export::{Endpoint, ExportInfo, Listener};
use crate::storage::ChunkReader;

/// Default lifetime of an export.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest lifetime: a week.
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// A validated ExportVmBackup.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The backup group.
    pub group: String,
    /// The volume whose backup to serve.
    pub volume: String,
    /// The backup storage to read.
    pub storage: String,
    /// NBD export name (default: the volume uuid).
    pub name: Option<String>,
    /// How long it serves.
    pub lifetime: Duration,
    /// A TCP address to serve on (TLS only); None: a Unix socket.
    pub listen: Option<std::net::SocketAddr>,
}

impl Ops {
    /// The backup of `volume` in `group` on `storage` (None: the first storage holding
    /// it) as a disk, with the storage read.
    pub(super) async fn backup_disk(
        &self,
        group: &str,
        volume: &str,
        storage: Option<&str>,
    ) -> Result<(BackupDisk, String)> {
        let g = group.to_string();
        let records = self.catalog().run(move |c| c.group_volume_backups(&g)).await?;
        if records.is_empty() {
            return Err(AgentError::not_found("backup group", group).with_field("groupUuid"));
        }
        let backup = records.iter().find(|b| b.volume_uuid == volume).ok_or_else(|| {
            AgentError::invalid("volumeUuid", format!("backup group {group} has no backup of volume {volume}"))
        })?;
        let r = match storage {
            Some(s) => backup.refs.iter().find(|r| r.backup_storage_uuid == s).ok_or_else(|| {
                AgentError::invalid(
                    "backupStorageUuid",
                    format!("volume backup {} is not on backup storage {s}", backup.uuid),
                )
            })?,
            None => backup.refs.first().ok_or_else(|| {
                AgentError::new(ErrorKind::NotFound, format!("volume backup {} is on no backup storage", backup.uuid))
            })?,
        };
        let storage =
            self.registry.require(&r.backup_storage_uuid).await.map_err(|e| e.with_field("backupStorageUuid"))?;
        let key = self.registry.chunk_key(&storage).await?;
        let (store, _) = self.registry.open_store(&storage, None).await?;
        let reader: Arc<dyn ChunkReader> = store;
        let ix = VolumeIndex::decode(&reader.get_index(&r.install_path).await?, vmbackup_proto::index::MAX_CHUNKS)
            .map_err(|e| {
                AgentError::new(ErrorKind::FailedPrecondition, format!("index of volume backup {}: {e}", backup.uuid))
            })?;
        let label = format!("volume backup {}", backup.uuid);
        Ok((BackupDisk::new(ix, r.install_path.clone(), reader, label, key), storage.uuid))
    }

    /// Starts serving the backup of `volume` in `group` from `storage`.
    pub async fn export_backup(&self, spec: ExportSpec) -> Result<ExportInfo> {
        let (disk, _) = self.backup_disk(&spec.group, &spec.volume, Some(&spec.storage)).await?;
        let uuid = uuid::Uuid::new_v4().simple().to_string();
        let (endpoint, listener) = match spec.listen {
            Some(addr) => self.tcp_listener(addr).await?,
            None => self.unix_listener(&uuid)?,
        };
        let now = now_millis();
        let info = ExportInfo {
            uuid,
            group_uuid: spec.group.clone(),
            volume_uuid: spec.volume.clone(),
            storage_uuid: spec.storage.clone(),
            name: spec.name.clone().unwrap_or_else(|| spec.volume.clone()),
            endpoint,
            size: disk.size(),
            created: now,
            expires: now.saturating_add(i64::try_from(spec.lifetime.as_millis()).unwrap_or(i64::MAX)),
        };
        self.exports.start(info.clone(), Arc::new(disk), listener, spec.lifetime);
        Ok(info)
    }

    /// A TCP listener on `addr` with the configured TLS; refused without it.
    async fn tcp_listener(&self, addr: std::net::SocketAddr) -> Result<(Endpoint, Listener)> {
        let config = self.live.exports();
        let (Some(cert), Some(key), Some(ca)) = (&config.tls_cert, &config.tls_key, &config.tls_client_ca) else {
            return Err(AgentError::invalid(
                "listenAddress",
                "exports over TCP need TLS with client certificates: set [exports] tls_cert, tls_key and \
                 tls_client_ca in the agent's configuration (NBD has no other authentication)",
            ));
        };
        let acceptor = crate::export::tls::acceptor(cert, key, ca)
            .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("export TLS: {e}")))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::invalid("listenAddress", format!("binding {addr}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| AgentError::new(ErrorKind::Internal, format!("address of the listener on {addr}: {e}")))?;
        Ok((Endpoint::Tcp(bound), Listener::Tcp(listener, acceptor)))
    }

    /// A Unix socket (0600) in the runtime directory (0700).
    fn unix_listener(&self, uuid: &str) -> Result<(Endpoint, Listener)> {
        let dir = self.runtime_dir.join("exports");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| AgentError::new(ErrorKind::Internal, format!("creating {}: {e}", dir.display())))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        let socket = dir.join(format!("{uuid}.sock"));
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| AgentError::new(ErrorKind::Internal, format!("binding {}: {e}", socket.display())))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| AgentError::new(ErrorKind::Internal, format!("chmod {}: {e}", socket.display())))?;
        Ok((Endpoint::Unix(socket), Listener::Unix(listener)))
    }
}
