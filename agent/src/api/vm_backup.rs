//! VmBackupService: CreateVmBackup, DeleteVmBackup, SyncVmBackup, QueryVolumeBackup,
//! RestoreVmBackup (to new raw or qcow2 files, or over the VM's own volumes),
//! RecoverVmBackupFromImageStoreBackupStorage, WatchJob and CancelJob.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_server::VmBackupService;

use super::{query_params, status, timestamp};
use crate::backup::{self, BackupRequest};
use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result, blocking};
use crate::jobs::Jobs;
use crate::storage::registry::{CONNECTED, Registry};
use crate::throttle::{Throttle, bandwidth};
use crate::volume::VolumeFormat;
use crate::volume::writer::Mode;
use crate::{tags, validate};

/// The service.
#[derive(Debug, Clone)]
pub struct VmBackupApi {
    registry: Registry,
    jobs: Jobs,
    live: Arc<crate::live::Live>,
    runtime_dir: std::path::PathBuf,
    busy_volumes: Arc<Mutex<HashSet<String>>>,
}

impl VmBackupApi {
    /// The service over the daemon's state.
    pub fn new(state: &crate::daemon::State) -> Self {
        Self {
            registry: state.registry.clone(),
            jobs: state.jobs.clone(),
            live: state.live.clone(),
            runtime_dir: state.config.data_dir.join("run"),
            busy_volumes: Arc::default(),
        }
    }

    async fn create(&self, r: pb::CreateVmBackupRequest) -> Result<Vec<VolumeBackupRecord>> {
        let root = validate::uuid("rootVolumeUuid", &r.root_volume_uuid)?;
        let bs = validate::uuid("backupStorageUuid", &r.backup_storage_uuid)?;
        let name = validate::name("name", &r.name)?;
        let description = validate::description("description", &r.description)?;
        let resource = validate::optional_uuid("resourceUuid", &r.resource_uuid)?;
        let caps = self.live.caps();
        let read_limit = Throttle::unlimited()
            .with(bandwidth("volumeReadBandwidth", r.volume_read_bandwidth)?)
            .with(caps.volume_read);
        let network_limit = Throttle::unlimited()
            .with(bandwidth("networkWriteBandwidth", r.network_write_bandwidth)?)
            .with(caps.network_write);
        bandwidth("volumeWriteBandwidth", r.volume_write_bandwidth)?;
        bandwidth("networkReadBandwidth", r.network_read_bandwidth)?;
        let system_tags = tags::parse(&r.system_tags)?;
        let parallelism =
            usize::try_from(system_tags.parallelism.unwrap_or(self.live.default_parallelism())).unwrap_or(1);
        // Checked before anything starts: no address in the CIDR means nothing is sent.
        let source = system_tags.backup_network.as_ref().map(crate::storage::netbind::pick).transpose()?;

        let catalog = self.registry.catalog().clone();
        if let Some(spec) = &r.vm {
            let vm = super::vm::parse_vm(spec)?;
            if !vm.volumes.iter().any(|v| v.uuid == root && v.kind == "Root") {
                return Err(AgentError::invalid("vm", format!("the inline VM's Root volume is not {root}")));
            }
            super::vm::register(&catalog, vm).await?;
        }

        // A retried create returns the group it made.
        let group_uuid = resource.clone().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let (c, g) = (catalog.clone(), group_uuid.clone());
        let existing = blocking(move || Ok(c.group_volume_backups(&g)?)).await?;
        if !existing.is_empty() {
            return Ok(existing);
        }
        if self.jobs.running(&group_uuid).is_some() {
            // A retry while the first attempt runs joins it.
            let mut progress = Box::pin(self.jobs.watch(&group_uuid).await?);
            let mut last = None;
            while let Some(p) = progress.next().await {
                last = Some(p);
            }
            let (c, g) = (catalog.clone(), group_uuid.clone());
            let records = blocking(move || Ok(c.group_volume_backups(&g)?)).await?;
            if !records.is_empty() {
                return Ok(records);
            }
            let why = last.and_then(|p| p.error.map(|e| e.details)).unwrap_or_else(|| "it did not commit".into());
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("the joined backup {group_uuid} failed: {why}"),
            ));
        }

        let (c, v) = (catalog.clone(), root.clone());
        let vm = blocking(move || Ok(c.vm_of_volume(&v)?))
            .await?
            .ok_or_else(|| AgentError::not_found("volume", &root).with_field("rootVolumeUuid"))?;
        if !vm.volumes.iter().any(|v| v.uuid == root && v.kind == "Root") {
            return Err(AgentError::invalid(
                "rootVolumeUuid",
                format!("volume {root} is not the Root volume of VM {}", vm.uuid),
            ));
        }
        let storage = self.registry.require(&bs).await.map_err(|e| e.with_field("backupStorageUuid"))?;
        if storage.status != CONNECTED {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("backup storage {bs} is {}; reconnect it first", storage.status),
            )
            .with_field("backupStorageUuid"));
        }
        let (c, b) = (catalog.clone(), bs.clone());
        let max_per_storage = storage
            .max_backups
            .map_or(self.live.max_backups_per_storage(), |m| m.min(self.live.max_backups_per_storage()));
        if blocking(move || Ok(c.running_jobs_on(&b)?)).await? >= i64::from(max_per_storage) {
            return Err(AgentError::new(
                ErrorKind::ResourceExhausted,
                format!("{max_per_storage} backups already run on backup storage {bs}"),
            ));
        }

        // One backup of a volume at a time.
        let volumes: Vec<String> = vm.volumes.iter().map(|v| v.uuid.clone()).collect();
        {
            let mut busy = self.busy_volumes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(v) = volumes.iter().find(|v| busy.contains(*v)) {
                return Err(AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("a backup of volume {v} is already running"),
                ));
            }
            busy.extend(volumes.iter().cloned());
        }
        let release = VolumesGuard { set: self.busy_volumes.clone(), volumes };

        let job = self.jobs.start("CreateVmBackup", Some(group_uuid.clone()), Some(bs.clone())).await?;
        let req = BackupRequest {
            group_uuid,
            vm,
            storage,
            name,
            description,
            parallelism,
            read_limit,
            network_limit,
            source,
            runtime_dir: self.runtime_dir.clone(),
            fs_info: system_tags.fs_info.clone(),
            dirty: None,
            system_tags: r.system_tags.clone(),
            user_tags: r.user_tags.clone(),
        };
        // The job runs to its end even if the caller goes away; the caller waits for it.
        let (registry, jobs, j) = (self.registry.clone(), self.jobs.clone(), job.clone());
        let span = job.span();
        let handle = tokio::spawn(
            async move {
                let _release = release;
                let result = backup::run(&registry, &j, req).await;
                let outcome = result.as_ref().map(|_| ()).map_err(|e| AgentError::new(e.kind(), e.to_string()));
                jobs.finish(&j, &outcome).await;
                result
            }
            .instrument(span),
        );
        handle.await?
    }
}

impl VmBackupApi {
    async fn restore(&self, r: pb::RestoreVmBackupRequest) -> Result<(String, Vec<VolumeBackupRecord>)> {
        let group = validate::uuid("groupUuid", &r.group_uuid)?;
        let bs = validate::uuid("backupStorageUuid", &r.backup_storage_uuid)?;
        let resource = validate::optional_uuid("resourceUuid", &r.resource_uuid)?;
        let caps = self.live.caps();
        let network_limit = Throttle::unlimited()
            .with(bandwidth("networkReadBandwidth", r.network_read_bandwidth)?)
            .with(caps.network_read);
        let write_limit = Throttle::unlimited()
            .with(bandwidth("volumeWriteBandwidth", r.volume_write_bandwidth)?)
            .with(caps.volume_write);
        let system_tags = tags::parse(&r.system_tags)?;
        let parallelism =
            usize::try_from(system_tags.parallelism.unwrap_or(self.live.default_parallelism())).unwrap_or(1);
        let source = system_tags.backup_network.as_ref().map(crate::storage::netbind::pick).transpose()?;
        let (c, g) = (self.registry.catalog().clone(), group.clone());
        let backups = blocking(move || Ok(c.group_volume_backups(&g)?)).await?;
        if backups.is_empty() {
            return Err(AgentError::not_found("backup group", &group).with_field("groupUuid"));
        }
        let targets = if r.revert {
            self.revert_targets(&group, &backups, &r.targets).await?
        } else {
            restore_targets(&group, &backups, &r.targets)?
        };
        let records: Vec<VolumeBackupRecord> = targets.iter().map(|t| t.backup.clone()).collect();
        let job = self.jobs.start("RestoreVmBackup", resource, Some(bs.clone())).await?;
        let (registry, jobs, j) = (self.registry.clone(), self.jobs.clone(), job.clone());
        let span = job.span();
        let handle = tokio::spawn(
            async move {
                let opts = backup::restore::RestoreOptions { network_limit, write_limit, parallelism, source };
                let result = backup::restore::run(&registry, &j, &bs, targets, opts).await;
                let outcome = result.as_ref().map(|_| ()).map_err(|e| AgentError::new(e.kind(), e.to_string()));
                jobs.finish(&j, &outcome).await;
                result
            }
            .instrument(span),
        );
        handle.await??;
        Ok((job.uuid.clone(), records))
    }
}

impl VmBackupApi {
    /// Revert: every named volume (or every volume of the group) goes back over its
    /// registered install path, in its registered format, if no running VM holds it.
    async fn revert_targets(
        &self,
        group: &str,
        backups: &[VolumeBackupRecord],
        asked: &[pb::RestoreTarget],
    ) -> Result<Vec<backup::restore::RestoreTarget>> {
        let mut chosen = Vec::new();
        if asked.is_empty() {
            chosen.extend(backups.iter().cloned());
        }
        for (i, t) in asked.iter().enumerate() {
            let volume = validate::uuid("targets", &t.volume_uuid)?;
            let backup = backups.iter().find(|b| b.volume_uuid == volume).ok_or_else(|| {
                AgentError::invalid("targets", format!("targets[{i}]: volume {volume} is not in backup group {group}"))
            })?;
            chosen.push(backup.clone());
        }
        let mut out = Vec::new();
        for backup in chosen {
            let (c, v) = (self.registry.catalog().clone(), backup.volume_uuid.clone());
            let vm = blocking(move || Ok(c.vm_of_volume(&v)?)).await?.ok_or_else(|| {
                AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("volume {} is not registered on this host: nothing to revert", backup.volume_uuid),
                )
                .with_field("revert")
            })?;
            // The same test a live backup makes: a QMP socket that answers is a running VM.
            if let Some(socket) = &vm.qmp_socket
                && crate::qemu::live::connect_if_running(std::path::Path::new(socket)).await?.is_some()
            {
                return Err(AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("VM {} is running (its QMP socket answers): stop it before reverting", vm.uuid),
                )
                .with_field("revert"));
            }
            let Some(volume) = vm.volumes.iter().find(|v| v.uuid == backup.volume_uuid) else { continue };
            let format = VolumeFormat::parse(&volume.format).unwrap_or(VolumeFormat::Raw);
            out.push(backup::restore::RestoreTarget {
                backup: backup.clone(),
                path: volume.install_path.clone().into(),
                format,
                mode: Mode::Revert,
            });
        }
        Ok(out)
    }
}

/// New files: each target names a volume of the group, an absolute path and a format.
fn restore_targets(
    group: &str,
    backups: &[VolumeBackupRecord],
    asked: &[pb::RestoreTarget],
) -> Result<Vec<backup::restore::RestoreTarget>> {
    if asked.is_empty() {
        return Err(AgentError::invalid("targets", "name at least one volume to restore and where"));
    }
    let mut targets = Vec::new();
    for (i, t) in asked.iter().enumerate() {
        let volume = validate::uuid("targets", &t.volume_uuid)?;
        let backup = backups.iter().find(|b| b.volume_uuid == volume).ok_or_else(|| {
            AgentError::invalid("targets", format!("targets[{i}]: volume {volume} is not in backup group {group}"))
        })?;
        if !t.install_path.starts_with('/') || t.install_path.contains('\0') {
            return Err(AgentError::invalid(
                "targets",
                format!("targets[{i}].installPath: {} is not an absolute path", validate::shorten(&t.install_path)),
            ));
        }
        let format = match t.format.as_str() {
            "" | "raw" => VolumeFormat::Raw,
            "qcow2" => VolumeFormat::Qcow2,
            other => {
                return Err(AgentError::invalid(
                    "targets",
                    format!("targets[{i}].format: {} is not raw or qcow2", validate::shorten(other)),
                ));
            }
        };
        targets.push(backup::restore::RestoreTarget {
            backup: backup.clone(),
            path: t.install_path.clone().into(),
            format,
            mode: Mode::Create,
        });
    }
    Ok(targets)
}

impl VmBackupApi {
    async fn recover(
        &self,
        r: pb::RecoverVmBackupFromImageStoreBackupStorageRequest,
    ) -> Result<Vec<VolumeBackupRecord>> {
        let group = validate::uuid("groupUuid", &r.group_uuid)?;
        let src = validate::uuid("srcBackupStorageUuid", &r.src_backup_storage_uuid)?;
        let dst = validate::uuid("dstBackupStorageUuid", &r.dst_backup_storage_uuid)?;
        if src == dst {
            return Err(AgentError::invalid(
                "dstBackupStorageUuid",
                "source and destination are the same backup storage",
            ));
        }
        let (c, g) = (self.registry.catalog().clone(), group.clone());
        let records = blocking(move || Ok(c.group_volume_backups(&g)?)).await?;
        if records.is_empty() {
            return Err(AgentError::not_found("backup group", &group).with_field("groupUuid"));
        }
        if !records.iter().all(|r| r.refs.iter().any(|s| s.backup_storage_uuid == src)) {
            return Err(AgentError::invalid(
                "srcBackupStorageUuid",
                format!("backup group {group} is not on backup storage {src}"),
            ));
        }
        // A recover reads from one store and writes to another: both host caps apply.
        let caps = self.live.caps();
        let network = Throttle::unlimited().with(caps.network_read).with(caps.network_write);
        let job_uuid = crate::jobs::recover_job_uuid(&group, &dst);
        if self.jobs.running(&job_uuid).is_some() {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("backup group {group} is already being recovered to {dst} (job {job_uuid})"),
            ));
        }
        let job = self.jobs.start("RecoverVmBackup", Some(job_uuid), Some(dst.clone())).await?;
        let (registry, jobs, j) = (self.registry.clone(), self.jobs.clone(), job.clone());
        let span = job.span();
        let handle = tokio::spawn(
            async move {
                let result = backup::recover::run(&registry, &j, &group, &src, &dst, network).await;
                let outcome = result.as_ref().map(|_| ()).map_err(|e| AgentError::new(e.kind(), e.to_string()));
                jobs.finish(&j, &outcome).await;
                result.map(|()| group)
            }
            .instrument(span),
        );
        let group = handle.await??;
        let c = self.registry.catalog().clone();
        blocking(move || Ok(c.group_volume_backups(&group)?)).await
    }
}

struct VolumesGuard {
    set: Arc<Mutex<HashSet<String>>>,
    volumes: Vec<String>,
}

impl Drop for VolumesGuard {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for v in &self.volumes {
            set.remove(v);
        }
    }
}

/// The seeds' VolumeBackupInventory of a record.
pub fn inventory(r: VolumeBackupRecord) -> pb::VolumeBackupInventory {
    let uuid = r.uuid.clone();
    pb::VolumeBackupInventory {
        uuid: r.uuid,
        volume_uuid: r.volume_uuid,
        name: r.name,
        description: r.description.unwrap_or_default(),
        r#type: r.kind,
        state: r.state,
        status: r.status,
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
                status: s.status,
                create_date: timestamp(s.create_date),
                last_op_date: timestamp(s.last_op_date),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl VmBackupService for VmBackupApi {
    async fn create_vm_backup(
        &self,
        r: Request<pb::CreateVmBackupRequest>,
    ) -> Result<Response<pb::VolumeBackupsReply>, Status> {
        let records = self.create(r.into_inner()).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VolumeBackupsReply { inventories: records.into_iter().map(inventory).collect() }))
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
        if let Some(job) = self.jobs.running(&group) {
            if mode == validate::DeleteMode::Permissive {
                return Err(status(&AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("job {} is using backup group {group}; wait for it or use deleteMode Enforcing", job.uuid),
                )));
            }
            job.cancel.cancel();
        }
        backup::lifecycle::delete_group(&self.registry, &group, &storages).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteVmBackupReply {}))
    }

    async fn sync_vm_backup(
        &self,
        r: Request<pb::SyncVmBackupRequest>,
    ) -> Result<Response<pb::SyncVmBackupReply>, Status> {
        let uuid = validate::uuid("imageStoreUuid", &r.get_ref().image_store_uuid).map_err(|e| status(&e))?;
        backup::lifecycle::sync_storage(&self.registry, &uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::SyncVmBackupReply {}))
    }

    async fn recover_vm_backup_from_image_store_backup_storage(
        &self,
        r: Request<pb::RecoverVmBackupFromImageStoreBackupStorageRequest>,
    ) -> Result<Response<pb::VolumeBackupsReply>, Status> {
        let records = self.recover(r.into_inner()).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VolumeBackupsReply { inventories: records.into_iter().map(inventory).collect() }))
    }

    async fn restore_vm_backup(
        &self,
        r: Request<pb::RestoreVmBackupRequest>,
    ) -> Result<Response<pb::RestoreVmBackupReply>, Status> {
        let (job_uuid, records) = self.restore(r.into_inner()).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::RestoreVmBackupReply {
            job_uuid,
            inventories: records.into_iter().map(inventory).collect(),
        }))
    }

    async fn query_volume_backup(
        &self,
        r: Request<pb::QueryVolumeBackupRequest>,
    ) -> Result<Response<pb::QueryVolumeBackupReply>, Status> {
        let q = query_params!(r.get_ref());
        let catalog = self.registry.catalog().clone();
        let res = blocking(move || Ok(catalog.query_volume_backups(&q)?)).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::QueryVolumeBackupReply {
            inventories: res.rows.into_iter().map(inventory).collect(),
            total: res.total,
        }))
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobProgress, Status>> + Send>>;

    async fn watch_job(&self, r: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let uuid = validate::uuid("jobUuid", &r.get_ref().job_uuid).map_err(|e| status(&e))?;
        let s = self.jobs.watch(&uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(Box::pin(s.map(Ok))))
    }

    async fn cancel_job(&self, r: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobReply>, Status> {
        let uuid = validate::uuid("jobUuid", &r.get_ref().job_uuid).map_err(|e| status(&e))?;
        self.jobs.cancel(&uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::CancelJobReply {}))
    }
}
