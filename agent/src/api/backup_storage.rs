//! BackupStorageService: request -> validated values -> [`Registry`] -> inventory.

use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::backup_storage_service_server::BackupStorageService;

use super::{query_params, status, timestamp};
use crate::catalog::backup_storage::BackupStorageRecord;
use crate::error::{AgentError, Result};
use crate::storage::ceph::{CephTarget, DEFAULT_CLIENT, parse_mon_url};
use crate::storage::registry::{NewCeph, NewImageStore, Registry};
use crate::validate;

/// The service.
#[derive(Debug, Clone)]
pub struct BackupStorageApi {
    registry: Registry,
    default_store_port: u16,
}

impl BackupStorageApi {
    /// The service over the edge's state.
    pub fn new(state: &super::State) -> Self {
        Self { registry: state.ops.registry().clone(), default_store_port: state.config.default_store_port }
    }

    fn parse_add(&self, r: &pb::AddImageStoreBackupStorageRequest) -> Result<NewImageStore> {
        let name = validate::name("name", &r.name)?;
        let description = validate::description("description", &r.description)?;
        let uuid = validate::optional_uuid("resourceUuid", &r.resource_uuid)?;
        let (hostname, port, tls) = if !r.url.is_empty() {
            let (h, p, tls) = validate::parse_endpoint("url", &r.url)?;
            if !r.hostname.is_empty() && r.hostname != h {
                return Err(AgentError::invalid(
                    "hostname",
                    format!("{:?} disagrees with url {:?}", r.hostname, r.url),
                ));
            }
            if r.port != 0 && r.port != u32::from(p) {
                return Err(AgentError::invalid("port", format!("{} disagrees with url {:?}", r.port, r.url)));
            }
            (h, p, tls)
        } else {
            let h = validate::hostname("hostname", &r.hostname)?;
            let p = match r.port {
                0 => self.default_store_port,
                p => u16::try_from(p)
                    .map_err(|_| AgentError::invalid("port", format!("{p} is not a TCP port (1-65535)")))?,
            };
            (h, p, false)
        };
        let zones = zones(&r.attached_zone_uuids)?;
        let (max_backups, encryption_key) = storage_tags(&r.system_tags)?;
        let token = crate::storage::credentials::check_token("token", &r.token)?;
        Ok(NewImageStore { uuid, name, description, hostname, port, tls, zones, max_backups, token, encryption_key })
    }
}

fn parse_add_ceph(r: &pb::AddCephBackupStorageRequest) -> Result<NewCeph> {
    let name = validate::name("name", &r.name)?;
    let description = validate::description("description", &r.description)?;
    let uuid = validate::optional_uuid("resourceUuid", &r.resource_uuid)?;
    if r.mon_urls.is_empty() {
        return Err(AgentError::invalid("monUrls", "is required (at least one monitor)"));
    }
    if r.mon_urls.len() > 16 {
        return Err(AgentError::invalid("monUrls", format!("lists {} monitors; at most 16", r.mon_urls.len())));
    }
    let mut mons = Vec::new();
    for raw in &r.mon_urls {
        let m = parse_mon_url("monUrls", raw)?;
        if mons.iter().any(|o: &crate::storage::ceph::MonUrl| o.hostname == m.hostname && o.mon_port == m.mon_port) {
            return Err(AgentError::invalid("monUrls", format!("{}:{} is listed twice", m.hostname, m.mon_port)));
        }
        mons.push(m);
    }
    let pool = ceph_name("poolName", &r.pool_name)?;
    let client = match r.ceph_client.trim() {
        "" => DEFAULT_CLIENT.to_string(),
        c => {
            let c = ceph_name("cephClient", c)?;
            if !c.starts_with("client.") || c.len() == "client.".len() {
                return Err(AgentError::invalid(
                    "cephClient",
                    format!("{c:?} is not a client name such as client.backup"),
                ));
            }
            c
        }
    };
    let keyring = match r.keyring_path.trim() {
        "" => None,
        k if k.starts_with('/') && !k.contains('\0') && k.len() <= 4096 => Some(std::path::PathBuf::from(k)),
        k => {
            return Err(AgentError::invalid(
                "keyringPath",
                format!("{} is not an absolute path", validate::shorten(k)),
            ));
        }
    };
    if r.import_images {
        return Err(AgentError::invalid(
            "importImages",
            "is not supported: backups already in the pool are found by SyncVmBackup",
        ));
    }
    let (max_backups, encryption_key) = storage_tags(&r.system_tags)?;
    Ok(NewCeph {
        uuid,
        name,
        description,
        target: CephTarget { mons, pool, client, keyring },
        zones: zones(&r.attached_zone_uuids)?,
        max_backups,
        encryption_key,
    })
}

/// A pool or client name: what Ceph accepts in both, 1 to 128 characters.
fn ceph_name(field: &'static str, value: &str) -> Result<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    let ok = v.len() <= 128 && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok || v.starts_with('.') {
        return Err(AgentError::invalid(
            field,
            format!("{} may hold only letters, digits, '.', '_' and '-' (at most 128)", validate::shorten(v)),
        ));
    }
    Ok(v.to_string())
}

fn zones(raw: &[String]) -> Result<Vec<String>> {
    let mut zones = raw.iter().map(|z| validate::uuid("attachedZoneUuids", z)).collect::<Result<Vec<_>>>()?;
    zones.sort();
    zones.dedup();
    Ok(zones)
}

/// On a storage record, parallelismDegree caps concurrent backups there (ZStack's meaning)
/// and backup::encryption::key names the key everything written there is sealed with; the
/// other tags are about a backup and have no place here.
fn storage_tags(system_tags: &[String]) -> Result<(Option<u32>, Option<String>)> {
    let tags = crate::tags::parse(system_tags)?;
    if tags.backup_network.is_some() || tags.fs_info.is_some() || tags.retention_lock.is_some() {
        return Err(AgentError::invalid(
            "systemTags",
            "only volumeLiveBackup::parallelismDegree and backup::encryption::key apply to a storage",
        ));
    }
    Ok((tags.parallelism, tags.encryption_key))
}

/// The seeds' BackupStorageInventory for a record.
pub fn inventory(r: BackupStorageRecord) -> pb::BackupStorageInventory {
    let storage_uuid = r.uuid.clone();
    pb::BackupStorageInventory {
        uuid: r.uuid,
        name: r.name,
        url: r.url,
        description: r.description.unwrap_or_default(),
        total_capacity: r.total_capacity,
        available_capacity: r.available_capacity,
        r#type: r.kind,
        state: r.state,
        status: r.status,
        create_date: timestamp(r.create_date),
        last_op_date: timestamp(r.last_op_date),
        attached_zone_uuids: r.attached_zone_uuids,
        hostname: r.hostname,
        port: u32::from(r.port),
        store_uuid: r.store_uuid,
        fsid: r.fsid,
        mons: r
            .mons
            .into_iter()
            .map(|m| pb::CephBackupStorageMonInventory {
                backup_storage_uuid: storage_uuid.clone(),
                create_date: timestamp(m.create_date),
                hostname: m.hostname,
                last_op_date: timestamp(m.last_op_date),
                mon_addr: m.mon_addr,
                mon_port: u32::from(m.mon_port),
                mon_uuid: m.mon_uuid,
                // Never kept, never returned.
                ssh_password: String::new(),
                ssh_port: u32::from(m.ssh_port),
                ssh_username: m.ssh_username,
                status: m.status,
            })
            .collect(),
        pool_name: r.pool_name,
        pool_available_capacity: r.pool_available_capacity,
        pool_used_capacity: r.pool_used_capacity,
        pool_replicated_size: r.pool_replicated_size,
        encryption_key_id: r.encryption_key_id,
        ..Default::default()
    }
}

fn reply(r: Result<BackupStorageRecord>) -> Result<Response<pb::BackupStorageReply>, Status> {
    r.map(|rec| Response::new(pb::BackupStorageReply { inventory: Some(inventory(rec)) })).map_err(|e| status(&e))
}

#[tonic::async_trait]
impl BackupStorageService for BackupStorageApi {
    async fn add_image_store_backup_storage(
        &self,
        request: Request<pb::AddImageStoreBackupStorageRequest>,
    ) -> Result<Response<pb::BackupStorageReply>, Status> {
        let req = self.parse_add(request.get_ref()).map_err(|e| status(&e))?;
        reply(self.registry.add_image_store(req).await)
    }

    async fn add_ceph_backup_storage(
        &self,
        request: Request<pb::AddCephBackupStorageRequest>,
    ) -> Result<Response<pb::BackupStorageReply>, Status> {
        let req = parse_add_ceph(request.get_ref()).map_err(|e| status(&e))?;
        reply(self.registry.add_ceph(req).await)
    }

    async fn delete_backup_storage(
        &self,
        request: Request<pb::DeleteBackupStorageRequest>,
    ) -> Result<Response<pb::DeleteBackupStorageReply>, Status> {
        let r = request.get_ref();
        let parsed =
            validate::uuid("uuid", &r.uuid).and_then(|u| Ok((u, validate::delete_mode("deleteMode", &r.delete_mode)?)));
        let (uuid, mode) = parsed.map_err(|e| status(&e))?;
        self.registry.delete(&uuid, mode).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteBackupStorageReply {}))
    }

    async fn query_backup_storage(
        &self,
        request: Request<pb::QueryBackupStorageRequest>,
    ) -> Result<Response<pb::QueryBackupStorageReply>, Status> {
        let q = query_params!(request.get_ref());
        let result =
            self.registry.catalog().run(move |c| c.query_backup_storages(&q)).await.map_err(|e| status(&e.into()))?;
        Ok(Response::new(pb::QueryBackupStorageReply {
            inventories: result.rows.into_iter().map(inventory).collect(),
            total: result.total,
        }))
    }

    async fn reconnect_backup_storage(
        &self,
        request: Request<pb::ReconnectBackupStorageRequest>,
    ) -> Result<Response<pb::BackupStorageReply>, Status> {
        let uuid = validate::uuid("uuid", &request.get_ref().uuid).map_err(|e| status(&e))?;
        reply(self.registry.reconnect(&uuid).await)
    }
}
