//! BackupStorageService: request -> validated values -> [`Registry`] -> inventory.

use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::backup_storage_service_server::BackupStorageService;

use super::{query_params, status, timestamp};
use crate::catalog::backup_storage::BackupStorageRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::registry::{NewImageStore, Registry};
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
        let mut zones =
            r.attached_zone_uuids.iter().map(|z| validate::uuid("attachedZoneUuids", z)).collect::<Result<Vec<_>>>()?;
        zones.sort();
        zones.dedup();
        // On a storage record, parallelismDegree caps concurrent backups there (ZStack's
        // meaning); the other tags are about a backup and have no place here.
        let tags = crate::tags::parse(&r.system_tags)?;
        if tags.backup_network.is_some() || tags.fs_info.is_some() {
            return Err(AgentError::invalid(
                "systemTags",
                "only volumeLiveBackup::parallelismDegree applies to a storage",
            ));
        }
        let max_backups = tags.parallelism;
        let token = crate::storage::credentials::check_token("token", &r.token)?;
        Ok(NewImageStore { uuid, name, description, hostname, port, tls, zones, max_backups, token })
    }
}

/// The seeds' BackupStorageInventory for a record.
pub fn inventory(r: BackupStorageRecord) -> pb::BackupStorageInventory {
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
        _request: Request<pb::AddCephBackupStorageRequest>,
    ) -> Result<Response<pb::BackupStorageReply>, Status> {
        Err(status(&AgentError::new(
            ErrorKind::Unimplemented,
            "AddCephBackupStorage is not implemented by this agent version",
        )))
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
