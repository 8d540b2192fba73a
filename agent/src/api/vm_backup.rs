//! VmBackupService: CreateVmBackup, DeleteVmBackup, SyncVmBackup, QueryVolumeBackup,
//! RestoreVmBackup (to new raw or qcow2 files, or over the VM's own volumes),
//! RecoverVmBackupFromImageStoreBackupStorage, PruneVmBackup, the NBD exports of backups
//! (ExportVmBackup, QueryVmBackupExport, StopVmBackupExport), WatchJob and CancelJob. Each
//! request is parsed here and runs as one operation of [`Ops`].

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_server::VmBackupService;

use super::files;
use super::prune_export::{export_inventory, parse_export, parse_prune, prune_decision};
use super::{job_progress, query_params, status, timestamp};
use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::Result;
use crate::ops::Ops;
use crate::ops::backup::CreateBackup;
use crate::ops::restore::{Restore, TargetSpec};
use crate::throttle::bandwidth;
use crate::volume::VolumeFormat;
use crate::{tags, validate};

/// The service.
#[derive(Debug, Clone)]
pub struct VmBackupApi {
    ops: Ops,
}

impl VmBackupApi {
    /// The service over the edge's state.
    pub fn new(state: &super::State) -> Self {
        Self { ops: state.ops.clone() }
    }
}

fn parse_create(r: pb::CreateVmBackupRequest) -> Result<CreateBackup> {
    let root_volume = validate::uuid("rootVolumeUuid", &r.root_volume_uuid)?;
    let storage = validate::uuid("backupStorageUuid", &r.backup_storage_uuid)?;
    let name = validate::name("name", &r.name)?;
    let description = validate::description("description", &r.description)?;
    let resource = validate::optional_uuid("resourceUuid", &r.resource_uuid)?;
    let volume_read_bandwidth = bandwidth("volumeReadBandwidth", r.volume_read_bandwidth)?;
    let network_write_bandwidth = bandwidth("networkWriteBandwidth", r.network_write_bandwidth)?;
    let volume_write_bandwidth = bandwidth("volumeWriteBandwidth", r.volume_write_bandwidth)?;
    // A backup reads nothing from its storage: networkReadBandwidth is checked, and limits
    // nothing.
    bandwidth("networkReadBandwidth", r.network_read_bandwidth)?;
    let tags = tags::parse(&r.system_tags)?;
    if tags.encryption_key.is_some() {
        return Err(crate::error::AgentError::invalid(
            "systemTags",
            "backup::encryption::key is chosen when a backup storage is added, not per backup",
        ));
    }
    let vm = r.vm.as_ref().map(super::vm::parse_vm).transpose()?;
    Ok(CreateBackup {
        root_volume,
        storage,
        name,
        description,
        resource,
        volume_read_bandwidth,
        network_write_bandwidth,
        volume_write_bandwidth,
        tags,
        system_tags: r.system_tags,
        user_tags: r.user_tags,
        vm,
    })
}

fn parse_restore(r: pb::RestoreVmBackupRequest) -> Result<Restore> {
    let group = validate::uuid("groupUuid", &r.group_uuid)?;
    let storage = validate::uuid("backupStorageUuid", &r.backup_storage_uuid)?;
    let resource = validate::optional_uuid("resourceUuid", &r.resource_uuid)?;
    let network_read_bandwidth = bandwidth("networkReadBandwidth", r.network_read_bandwidth)?;
    let volume_write_bandwidth = bandwidth("volumeWriteBandwidth", r.volume_write_bandwidth)?;
    let tags = tags::parse(&r.system_tags)?;
    let targets =
        r.targets.iter().enumerate().map(|(i, t)| parse_target(i, t, r.revert)).collect::<Result<Vec<_>>>()?;
    if r.live && !r.revert {
        return Err(crate::error::AgentError::invalid(
            "live",
            "a live restore writes over the VM's own volumes: set revert too",
        ));
    }
    Ok(Restore {
        group,
        storage,
        resource,
        network_read_bandwidth,
        volume_write_bandwidth,
        tags,
        targets,
        revert: r.revert,
        live: r.live,
    })
}

/// A revert names volumes only; a new file needs an absolute path and a format.
fn parse_target(i: usize, t: &pb::RestoreTarget, revert: bool) -> Result<TargetSpec> {
    let volume = validate::uuid("targets", &t.volume_uuid)?;
    if revert {
        return Ok(TargetSpec { volume, path: None, format: VolumeFormat::Raw });
    }
    if !t.install_path.starts_with('/') || t.install_path.contains('\0') {
        return Err(crate::error::AgentError::invalid(
            "targets",
            format!("targets[{i}].installPath: {} is not an absolute path", validate::shorten(&t.install_path)),
        ));
    }
    let format = match t.format.as_str() {
        "" | "raw" => VolumeFormat::Raw,
        "qcow2" => VolumeFormat::Qcow2,
        other => {
            return Err(crate::error::AgentError::invalid(
                "targets",
                format!("targets[{i}].format: {} is not raw or qcow2", validate::shorten(other)),
            ));
        }
    };
    Ok(TargetSpec { volume, path: Some(t.install_path.clone().into()), format })
}

/// The seeds' VolumeBackupInventory of a record.
pub fn inventory(r: VolumeBackupRecord) -> pb::VolumeBackupInventory {
    let uuid = r.uuid.clone();
    pb::VolumeBackupInventory {
        uuid: r.uuid,
        volume_uuid: r.volume_uuid,
        name: r.name,
        description: r.description.unwrap_or_default(),
        r#type: r.kind.to_string(),
        state: r.state,
        status: r.status.to_string(),
        size: r.size,
        metadata: r.metadata,
        group_uuid: r.group_uuid,
        create_date: timestamp(r.create_date),
        last_op_date: timestamp(r.last_op_date),
        backup_storage_refs: r
            .refs
            .into_iter()
            .map(|s| pb::VolumeBackupBackupStorageRef {
                volume_backup_uuid: uuid.clone(),
                backup_storage_uuid: s.backup_storage_uuid,
                install_path: s.install_path,
                status: s.status.to_string(),
                create_date: timestamp(s.create_date),
                last_op_date: timestamp(s.last_op_date),
            })
            .collect(),
        system_tags: r.system_tags,
        user_tags: r.user_tags,
    }
}

fn inventories(records: Vec<VolumeBackupRecord>) -> pb::VolumeBackupsReply {
    pb::VolumeBackupsReply { inventories: records.into_iter().map(inventory).collect() }
}

#[tonic::async_trait]
impl VmBackupService for VmBackupApi {
    async fn create_vm_backup(
        &self,
        r: Request<pb::CreateVmBackupRequest>,
    ) -> Result<Response<pb::VolumeBackupsReply>, Status> {
        let req = parse_create(r.into_inner()).map_err(|e| status(&e))?;
        let records = self.ops.create_backup(req).await.map_err(|e| status(&e))?;
        Ok(Response::new(inventories(records)))
    }

    async fn delete_vm_backup(
        &self,
        r: Request<pb::DeleteVmBackupRequest>,
    ) -> Result<Response<pb::DeleteVmBackupReply>, Status> {
        let r = r.into_inner();
        let parsed = (|| -> Result<_> {
            let group = validate::uuid("groupUuid", &r.group_uuid)?;
            let storages = r
                .backup_storage_uuids
                .iter()
                .map(|s| validate::uuid("backupStorageUuids", s))
                .collect::<Result<Vec<_>>>()?;
            Ok((group, storages, validate::delete_mode("deleteMode", &r.delete_mode)?))
        })();
        let (group, storages, mode) = parsed.map_err(|e| status(&e))?;
        self.ops.delete_backup(&group, &storages, mode).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteVmBackupReply {}))
    }

    async fn sync_vm_backup(
        &self,
        r: Request<pb::SyncVmBackupRequest>,
    ) -> Result<Response<pb::SyncVmBackupReply>, Status> {
        let uuid = validate::uuid("imageStoreUuid", &r.get_ref().image_store_uuid).map_err(|e| status(&e))?;
        self.ops.sync_backups(&uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::SyncVmBackupReply {}))
    }

    async fn recover_vm_backup_from_image_store_backup_storage(
        &self,
        r: Request<pb::RecoverVmBackupFromImageStoreBackupStorageRequest>,
    ) -> Result<Response<pb::VolumeBackupsReply>, Status> {
        let r = r.into_inner();
        let parsed = (|| -> Result<_> {
            Ok((
                validate::uuid("groupUuid", &r.group_uuid)?,
                validate::uuid("srcBackupStorageUuid", &r.src_backup_storage_uuid)?,
                validate::uuid("dstBackupStorageUuid", &r.dst_backup_storage_uuid)?,
            ))
        })();
        let (group, src, dst) = parsed.map_err(|e| status(&e))?;
        let records = self.ops.recover_backup(&group, &src, &dst).await.map_err(|e| status(&e))?;
        Ok(Response::new(inventories(records)))
    }

    async fn restore_vm_backup(
        &self,
        r: Request<pb::RestoreVmBackupRequest>,
    ) -> Result<Response<pb::RestoreVmBackupReply>, Status> {
        let req = parse_restore(r.into_inner()).map_err(|e| status(&e))?;
        let (job_uuid, records) = self.ops.restore_backup(req).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::RestoreVmBackupReply { job_uuid, inventories: inventories(records).inventories }))
    }

    async fn query_volume_backup(
        &self,
        r: Request<pb::QueryVolumeBackupRequest>,
    ) -> Result<Response<pb::QueryVolumeBackupReply>, Status> {
        let q = query_params!(r.get_ref());
        let res = self.ops.catalog().run(move |c| c.query_volume_backups(&q)).await.map_err(|e| status(&e.into()))?;
        Ok(Response::new(pb::QueryVolumeBackupReply {
            inventories: res.rows.into_iter().map(inventory).collect(),
            total: res.total,
        }))
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobProgress, Status>> + Send>>;

    async fn watch_job(&self, r: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let uuid = validate::uuid("jobUuid", &r.get_ref().job_uuid).map_err(|e| status(&e))?;
        let s = self.ops.jobs().watch(&uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(Box::pin(s.map(|p| Ok(job_progress(p))))))
    }

    async fn prune_vm_backup(
        &self,
        r: Request<pb::PruneVmBackupRequest>,
    ) -> Result<Response<pb::PruneVmBackupReply>, Status> {
        let req = parse_prune(r.into_inner()).map_err(|e| status(&e))?;
        let outcomes = self.ops.prune_backups(req).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::PruneVmBackupReply { decisions: outcomes.into_iter().map(prune_decision).collect() }))
    }

    async fn export_vm_backup(
        &self,
        r: Request<pb::ExportVmBackupRequest>,
    ) -> Result<Response<pb::VmBackupExportInventory>, Status> {
        let spec = parse_export(r.into_inner()).map_err(|e| status(&e))?;
        let info = self.ops.export_backup(spec).await.map_err(|e| status(&e))?;
        Ok(Response::new(export_inventory(info)))
    }

    async fn query_vm_backup_export(
        &self,
        _r: Request<pb::QueryVmBackupExportRequest>,
    ) -> Result<Response<pb::QueryVmBackupExportReply>, Status> {
        let inventories = self.ops.exports().list().into_iter().map(export_inventory).collect();
        Ok(Response::new(pb::QueryVmBackupExportReply { inventories }))
    }

    type ListVmBackupFilesStream = Pin<Box<dyn Stream<Item = Result<pb::VmBackupFileInventory, Status>> + Send>>;

    async fn list_vm_backup_files(
        &self,
        r: Request<pb::ListVmBackupFilesRequest>,
    ) -> Result<Response<Self::ListVmBackupFilesStream>, Status> {
        let r = r.into_inner();
        let parsed = files::parse_source(r.source)
            .and_then(|src| Ok((src, files::parse_path(&r.path)?, files::parse_limit(r.limit)?)));
        let (src, path, limit) = parsed.map_err(|e| status(&e))?;
        let rx = self.ops.list_files(src, path, r.recursive, limit).await.map_err(|e| status(&e))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| match item {
            Ok((entry, partition)) => Ok(files::file_inventory(entry, partition)),
            Err(e) => Err(status(&e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ReadVmBackupFileStream = Pin<Box<dyn Stream<Item = Result<pb::VmBackupFileData, Status>> + Send>>;

    async fn read_vm_backup_file(
        &self,
        r: Request<pb::ReadVmBackupFileRequest>,
    ) -> Result<Response<Self::ReadVmBackupFileStream>, Status> {
        let r = r.into_inner();
        let parsed = files::parse_source(r.source).and_then(|src| Ok((src, files::parse_path(&r.path)?)));
        let (src, path) = parsed.map_err(|e| status(&e))?;
        let rx = self.ops.read_file(src, path).await.map_err(|e| status(&e))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| match item {
            Ok(data) => Ok(pb::VmBackupFileData { data }),
            Err(e) => Err(status(&e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stop_vm_backup_export(
        &self,
        r: Request<pb::StopVmBackupExportRequest>,
    ) -> Result<Response<pb::StopVmBackupExportReply>, Status> {
        let uuid = validate::uuid("uuid", &r.get_ref().uuid).map_err(|e| status(&e))?;
        if !self.ops.exports().stop(&uuid) {
            return Err(status(&crate::error::AgentError::not_found("export", &uuid).with_field("uuid")));
        }
        Ok(Response::new(pb::StopVmBackupExportReply {}))
    }

    async fn cancel_job(&self, r: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobReply>, Status> {
        let uuid = validate::uuid("jobUuid", &r.get_ref().job_uuid).map_err(|e| status(&e))?;
        self.ops.jobs().cancel(&uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::CancelJobReply {}))
    }
}
