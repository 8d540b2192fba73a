//! Managing backup storages: add, reconnect, delete. The API edge parses requests into the
//! values here; these functions talk to the store and keep the catalog.
//!
//! Rules:
//! - Add connects first and records nothing if the store cannot be reached.
//! - One store (by its persistent uuid) is registered at most once: two records for one
//!   store would make deletes and GC of one silently affect the other.
//! - `resourceUuid` is an idempotency key: repeating an add with the same uuid and the same
//!   parameters returns the existing record; the same uuid with other parameters is refused.
//! - Delete never touches the data on the store.

mod ceph;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use ceph::NewCeph;

use crate::catalog::backup_storage::BackupStorageRecord;
use crate::catalog::{CatalogHandle, now_millis};
use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::credentials::{Credentials, Secret};
use crate::storage::local::LocalStore;
use crate::storage::{ImageStoreClient, Store, StoreStatus};
use crate::validate::{DeleteMode, endpoint_url};

/// Type name of an Image Storage record.
pub const IMAGE_STORE_TYPE: &str = "ImageStoreBackupStorage";
/// Status of a storage that answered its last probe.
pub const CONNECTED: &str = "Connected";
/// Status of a storage that did not.
pub const DISCONNECTED: &str = "Disconnected";

/// A validated AddImageStoreBackupStorage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImageStore {
    /// Requested uuid (resourceUuid), or a new one.
    pub uuid: Option<String>,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Store host.
    pub hostname: String,
    /// Store port.
    pub port: u16,
    /// Whether the store serves TLS (`https://`).
    pub tls: bool,
    /// Attached zones, sorted and deduplicated.
    pub zones: Vec<String>,
    /// Its cap on concurrent backups (parallelismDegree system tag).
    pub max_backups: Option<u32>,
    /// The API token to present to the store.
    pub token: Option<Secret>,
    /// The configured key to seal everything written there with (the
    /// `backup::encryption::key::` tag).
    pub encryption_key: Option<String>,
}

/// Backup storage management over the catalog.
#[derive(Debug, Clone)]
pub struct Registry {
    catalog: CatalogHandle,
    tls: vmbackup_store::daemon::tls::ClientTls,
    credentials: Credentials,
    /// The agent's embedded store, reached in-process once it is running.
    local: Arc<std::sync::OnceLock<LocalStore>>,
    /// How Ceph backup storages are reached.
    ceph_config: crate::config::CephConfig,
    /// Ceph backup storages connected so far, by backup storage uuid (a cluster handle is
    /// costly to set up, and its sessions live in its chunk store).
    ceph: Arc<Mutex<HashMap<String, ceph::CephOpen>>>,
    /// Encryption keys of encrypted storages.
    keys: crate::keys::Keys,
}

impl Registry {
    /// A registry over `catalog`, with the storages' tokens in `credentials`.
    pub fn new(
        catalog: CatalogHandle,
        tls: vmbackup_store::daemon::tls::ClientTls,
        credentials: Credentials,
        ceph_config: crate::config::CephConfig,
        keys: crate::keys::Keys,
    ) -> Self {
        Self { catalog, tls, credentials, local: Arc::default(), ceph_config, ceph: Arc::default(), keys }
    }

    /// The configured encryption keys.
    pub fn keys(&self) -> &crate::keys::Keys {
        &self.keys
    }

    /// The key everything on `record`'s storage is sealed with; None for a storage without
    /// encryption. The configured key must still be the one the storage was added with.
    pub async fn chunk_key(&self, record: &BackupStorageRecord) -> Result<Option<Arc<vmbackup_proto::seal::ChunkKey>>> {
        if record.encryption_key.is_empty() {
            return Ok(None);
        }
        let key = self.unlock(&record.encryption_key).await.map_err(|e| {
            AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("backup storage {} ({:?}) is encrypted: {}", record.uuid, record.name, e.message()),
            )
        })?;
        if key.id().to_string() != record.encryption_key_id {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "backup storage {} ({:?}) is encrypted with key {}, but configured key {:?} is key {}",
                    record.uuid,
                    record.name,
                    record.encryption_key_id,
                    record.encryption_key,
                    key.id()
                ),
            ));
        }
        Ok(Some(key))
    }

    /// Key `name`, unlocked off the async runtime (the first use reads two files and runs
    /// Argon2id: a quarter of a second of CPU).
    async fn unlock(&self, name: &str) -> Result<Arc<vmbackup_proto::seal::ChunkKey>> {
        let (keys, name) = (self.keys.clone(), name.to_string());
        tokio::task::spawn_blocking(move || keys.get(&name)).await?
    }

    /// Binds a storage being added to key `name` (unlocking it now, so a wrong passphrase
    /// fails the add rather than the first backup).
    pub(super) async fn bind_key(&self, record: &mut BackupStorageRecord, name: Option<&str>) -> Result<()> {
        if let Some(name) = name {
            let key = self.unlock(name).await?;
            record.encryption_key = name.to_string();
            record.encryption_key_id = key.id().to_string();
        }
        Ok(())
    }

    /// Serves the embedded store's records in-process from now on.
    pub fn set_local(&self, store: LocalStore) {
        if self.local.set(store).is_err() {
            tracing::warn!("an embedded store is already in use; keeping it");
        }
    }

    /// Connects to the store behind a backup storage record (or endpoint).
    pub async fn connect(&self, url: &str, token: Option<&Secret>) -> Result<ImageStoreClient> {
        ImageStoreClient::connect(url, &self.tls, token).await
    }

    /// A client of backup storage `record`'s store, with its token, whose connections
    /// leave from `source` (the backup network), or from wherever the kernel routes.
    pub async fn connect_to(
        &self,
        record: &BackupStorageRecord,
        source: Option<&super::netbind::SourceAddr>,
    ) -> Result<ImageStoreClient> {
        let token = self.credentials.token(&record.uuid)?;
        ImageStoreClient::connect_from(&record.url, &self.tls, source, token.as_ref()).await
    }

    /// The store behind a backup storage record, after checking that it is the store the
    /// record was added for: the embedded store in-process, any other over gRPC, from
    /// `source` when given (the backup network).
    pub async fn open_store(
        &self,
        record: &BackupStorageRecord,
        source: Option<&super::netbind::SourceAddr>,
    ) -> Result<(Arc<dyn Store>, StoreStatus)> {
        if record.kind == crate::storage::ceph::CEPH_TYPE {
            let store = self.ceph_store(record).await?;
            let status = store.status().await?;
            return Ok((Arc::new(store), status));
        }
        if let Some(local) = self.local.get()
            && local.store_uuid() == record.store_uuid
        {
            let status = local.status().await?;
            return Ok((Arc::new(local.clone()), status));
        }
        let client = self.connect_to(record, source).await?;
        let status = client.status().await?;
        if status.store_uuid != record.store_uuid {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "a different Image Storage answers at {}: store {} instead of {}",
                    record.url, status.store_uuid, record.store_uuid
                ),
            ));
        }
        Ok((Arc::new(client), status))
    }

    /// The catalog.
    pub fn catalog(&self) -> &CatalogHandle {
        &self.catalog
    }

    async fn get(&self, uuid: &str) -> Result<Option<BackupStorageRecord>> {
        let uuid = uuid.to_string();
        Ok(self.catalog.run(move |c| c.get_backup_storage(&uuid)).await?)
    }

    /// A backup storage that must exist.
    pub async fn require(&self, uuid: &str) -> Result<BackupStorageRecord> {
        self.get(uuid).await?.ok_or_else(|| AgentError::not_found("backup storage", uuid).with_field("uuid"))
    }

    /// AddImageStoreBackupStorage.
    pub async fn add_image_store(&self, req: NewImageStore) -> Result<BackupStorageRecord> {
        let url = endpoint_url(&req.hostname, req.port, req.tls);
        if let Some(uuid) = &req.uuid
            && let Some(existing) = self.get(uuid).await?
        {
            let same = existing.name == req.name
                && existing.description == req.description
                && existing.hostname == req.hostname
                && existing.port == req.port
                && existing.url == url
                && existing.attached_zone_uuids == req.zones
                && existing.max_backups == req.max_backups
                && existing.encryption_key == req.encryption_key.clone().unwrap_or_default();
            if same {
                return Ok(existing);
            }
            return Err(AgentError::new(
                ErrorKind::AlreadyExists,
                format!("resourceUuid {uuid} is already backup storage {:?} with other parameters", existing.name),
            )
            .with_field("resourceUuid"));
        }

        let client = self.connect(&url, req.token.as_ref()).await?;
        let status = client.status().await?;
        self.record_new(req, url, status).await
    }

    /// Records a store that answered with `status` as a new backup storage.
    async fn record_new(&self, req: NewImageStore, url: String, status: StoreStatus) -> Result<BackupStorageRecord> {
        let now = now_millis();
        let mut record = BackupStorageRecord {
            uuid: req.uuid.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            name: req.name,
            description: req.description,
            kind: IMAGE_STORE_TYPE.to_string(),
            url,
            hostname: req.hostname,
            port: req.port,
            state: "Enabled".to_string(),
            status: CONNECTED.to_string(),
            total_capacity: status.total_capacity,
            available_capacity: status.available_capacity,
            store_uuid: status.store_uuid,
            create_date: now,
            last_op_date: now,
            attached_zone_uuids: req.zones,
            max_backups: req.max_backups,
            ..Default::default()
        };
        self.bind_key(&mut record, req.encryption_key.as_deref()).await?;
        self.insert_new(record, req.token.as_ref()).await
    }

    /// Records a new backup storage, unless its store is registered already.
    async fn insert_new(&self, record: BackupStorageRecord, token: Option<&Secret>) -> Result<BackupStorageRecord> {
        let store_uuid = record.store_uuid.clone();
        if let Some(existing) = self.catalog.run(move |c| c.find_backup_storage_by_store(&store_uuid)).await? {
            let at = if record.kind == IMAGE_STORE_TYPE {
                format!("the Image Storage at {}", record.url)
            } else {
                format!("Ceph pool {:?}", record.pool_name)
            };
            return Err(AgentError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{at} (store {}) is already registered as backup storage {} ({:?})",
                    record.store_uuid, existing.uuid, existing.name
                ),
            ));
        }
        if let Some(token) = token {
            self.credentials.save(&record.uuid, token)?;
        }
        let r = record.clone();
        self.catalog
            .run(move |catalog| {
                catalog.insert_backup_storage(&r).map_err(|e| match e {
                    crate::catalog::CatalogError::Sql(rusqlite::Error::SqliteFailure(f, _))
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        AgentError::new(
                            ErrorKind::AlreadyExists,
                            format!("backup storage {} was added concurrently", r.uuid),
                        )
                        .with_field("resourceUuid")
                    }
                    other => other.into(),
                })
            })
            .await?;
        tracing::info!(uuid = %record.uuid, name = %record.name, kind = %record.kind, url = %record.url, store_uuid = %record.store_uuid, "backup storage added");
        Ok(record)
    }

    /// ReconnectBackupStorage: probes the store, records Connected or Disconnected and the
    /// capacities, and fails when the store cannot be reached (the record then says
    /// Disconnected).
    pub async fn reconnect(&self, uuid: &str) -> Result<BackupStorageRecord> {
        let record = self.require(uuid).await?;
        if record.kind == crate::storage::ceph::CEPH_TYPE {
            return self.reconnect_ceph(record).await;
        }
        let probe = async {
            if let Some(local) = self.local.get()
                && local.store_uuid() == record.store_uuid
            {
                return local.status().await;
            }
            self.connect_to(&record, None).await?.status().await
        }
        .await;
        let outcome = match probe {
            Ok(status) if status.store_uuid != record.store_uuid => Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "a different Image Storage answers at {}: store {} instead of {}",
                    record.url, status.store_uuid, record.store_uuid
                ),
            )),
            Ok(status) => Ok(status),
            Err(e) => Err(e),
        };
        let now = now_millis();
        let u = record.uuid.clone();
        match outcome {
            Ok(status) => {
                let cap = (status.total_capacity, status.available_capacity);
                self.catalog.run(move |c| c.update_backup_storage_status(&u, CONNECTED, Some(cap), now)).await?;
                self.require(uuid).await
            }
            Err(e) => {
                self.catalog.run(move |c| c.update_backup_storage_status(&u, DISCONNECTED, None, now)).await?;
                tracing::warn!(uuid = %record.uuid, url = %record.url, error = %e, "backup storage disconnected");
                Err(e)
            }
        }
    }

    /// DeleteBackupStorage: removes the record; the data on the store stays.
    pub async fn delete(&self, uuid: &str, mode: DeleteMode) -> Result<()> {
        let record = self.require(uuid).await?;
        let u = record.uuid.clone();
        self.catalog.run(move |catalog| -> Result<()> {
            if mode == DeleteMode::Permissive {
                let running = catalog.running_jobs_on(&u)?;
                if running > 0 {
                    return Err(AgentError::new(
                        ErrorKind::FailedPrecondition,
                        format!("backup storage {u} is used by {running} running jobs; wait for them or use deleteMode Enforcing"),
                    )
                    .with_code("SYS.1004", "Failed to delete the resource"));
                }
                let refs = catalog.backup_storage_references(&u)?;
                if refs > 0 {
                    return Err(AgentError::new(
                        ErrorKind::FailedPrecondition,
                        format!("backup storage {u} holds {refs} volume backups; delete them first or use deleteMode Enforcing"),
                    )
                    .with_code("SYS.1004", "Failed to delete the resource"));
                }
            }
            catalog.delete_backup_storage(&u)?;
            Ok(())
        })
        .await?;
        self.credentials.remove(&record.uuid)?;
        self.forget_ceph(&record.uuid);
        tracing::info!(uuid = %record.uuid, name = %record.name, ?mode, "backup storage record deleted (data on the store kept)");
        Ok(())
    }

    /// Makes sure the agent's embedded store is registered (as `name`) at `url`: adds it on
    /// first start, follows a changed listen address afterwards.
    pub async fn ensure_embedded(&self, name: &str, hostname: &str, port: u16) -> Result<BackupStorageRecord> {
        let url = endpoint_url(hostname, port, false);
        let local = self.local.get().ok_or_else(|| {
            AgentError::new(ErrorKind::Internal, "the embedded store is registered before it is running")
        })?;
        let status = local.status().await?;
        let store_uuid = status.store_uuid.clone();
        match self.catalog.run(move |c| c.find_backup_storage_by_store(&store_uuid)).await? {
            Some(existing) => {
                let (u, url2, host) = (existing.uuid.clone(), url.clone(), hostname.to_string());
                let cap = (status.total_capacity, status.available_capacity);
                self.catalog
                    .run(move |catalog| -> Result<()> {
                        let now = now_millis();
                        catalog.update_backup_storage_endpoint(&u, &url2, &host, port, now)?;
                        catalog.update_backup_storage_status(&u, CONNECTED, Some(cap), now)?;
                        Ok(())
                    })
                    .await?;
                self.require(&existing.uuid).await
            }
            None => {
                let req = NewImageStore {
                    uuid: None,
                    name: name.to_string(),
                    description: Some("Image Storage embedded in this agent (local directory)".to_string()),
                    hostname: hostname.to_string(),
                    port,
                    tls: false,
                    zones: Vec::new(),
                    max_backups: None,
                    token: None,
                    encryption_key: None,
                };
                self.record_new(req, url, status).await
            }
        }
    }
}
