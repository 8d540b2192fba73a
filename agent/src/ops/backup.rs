//! CreateVmBackup, DeleteVmBackup, SyncVmBackup and RecoverVmBackupFromImageStoreBackupStorage
//! as operations: the rules around the engines in [`crate::backup`] (idempotency, joining a
//! running attempt, per-storage caps, volume locks, jobs).

use std::sync::Arc;

use futures::StreamExt;

use super::Ops;
use crate::backup::{self, BackupRequest};
use crate::catalog::backup_storage::BackupStorageRecord;
use crate::catalog::vm::VmRecord;
use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::model::VolumeKind;
use crate::storage::registry::CONNECTED;
use crate::tags::SystemTags;
use crate::throttle::{ByteRate, Throttle};
use crate::validate::DeleteMode;

/// How long an Enforcing delete waits for the jobs it cancelled to end.
const ENFORCING_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A validated CreateVmBackup.
#[derive(Debug, Clone)]
pub struct CreateBackup {
    /// rootVolumeUuid.
    pub root_volume: String,
    /// backupStorageUuid.
    pub storage: String,
    /// name.
    pub name: String,
    /// description.
    pub description: Option<String>,
    /// resourceUuid: the group's uuid, and an idempotency key.
    pub resource: Option<String>,
    /// volumeReadBandwidth.
    pub volume_read_bandwidth: Option<Arc<ByteRate>>,
    /// networkWriteBandwidth.
    pub network_write_bandwidth: Option<Arc<ByteRate>>,
    /// volumeWriteBandwidth: a live backup merges the guest's writes back at this rate.
    pub volume_write_bandwidth: Option<Arc<ByteRate>>,
    /// The parsed system tags.
    pub tags: SystemTags,
    /// System tags as given, recorded in the manifest.
    pub system_tags: Vec<String>,
    /// User tags as given, recorded in the manifest.
    pub user_tags: Vec<String>,
    /// A VM layout to register first (inline in the request).
    pub vm: Option<VmRecord>,
}

impl Ops {
    /// The reader workers of a job: its `parallelismDegree` tag, else the configured default.
    pub(crate) fn parallelism(&self, tags: &SystemTags) -> usize {
        usize::try_from(tags.parallelism.unwrap_or(self.live.default_parallelism())).unwrap_or(1)
    }

    /// CreateVmBackup: backs up every volume of the root volume's VM into one group. A retry
    /// with the same resourceUuid returns the committed group, or joins the attempt that is
    /// still running.
    pub async fn create_backup(&self, r: CreateBackup) -> Result<Vec<VolumeBackupRecord>> {
        let caps = self.live.caps();
        let read_limit = Throttle::unlimited().with(r.volume_read_bandwidth.clone()).with(caps.volume_read);
        let network_limit = Throttle::unlimited().with(r.network_write_bandwidth.clone()).with(caps.network_write);
        let parallelism = self.parallelism(&r.tags);
        // Checked before anything starts: no address in the CIDR means nothing is sent.
        let source = r.tags.backup_network.as_ref().map(crate::storage::netbind::pick).transpose()?;
        if let Some(vm) = r.vm.clone() {
            if !vm.volumes.iter().any(|v| v.uuid == r.root_volume && v.kind == VolumeKind::Root) {
                return Err(AgentError::invalid("vm", format!("the inline VM's Root volume is not {}", r.root_volume)));
            }
            self.register_vm(vm).await?;
        }

        let group_uuid = r.resource.clone().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        if let Some(done) = self.committed_or_joined(&group_uuid).await? {
            same_request(&r, &done)?;
            return Ok(done);
        }
        let vm = match self.vm_of_root(&r.root_volume).await {
            Err(e) if e.kind() == ErrorKind::NotFound && r.vm.is_none() => {
                self.discover_vm(&r.root_volume).await?;
                self.vm_of_root(&r.root_volume).await?
            }
            found => found?,
        };
        // Recorded paths are judged by today's roots: a narrowed configuration stops them.
        let paths = vm.volumes.iter().map(|v| (v.uuid.as_str(), v.install_path.as_str()));
        self.check_install_paths("rootVolumeUuid", paths).await?;
        let storage = self.backup_target(&r.storage).await?;
        if r.tags.fs_info.is_some() && storage.kind == crate::storage::ceph::CEPH_TYPE {
            return Err(AgentError::invalid(
                "systemTags",
                "fsInfo mounts an Image Storage's directory; a Ceph backup storage is written through librados already",
            ));
        }

        // One operation on a volume at a time.
        let job_name = format!("CreateVmBackup job {group_uuid}");
        let lease = self.locks.acquire(vm.volumes.iter().map(|v| v.uuid.as_str()), &job_name)?;
        let job = self.jobs.start("CreateVmBackup", Some(group_uuid.clone()), Some(storage.uuid.clone())).await?;
        let req = BackupRequest {
            group_uuid,
            vm,
            storage,
            name: r.name,
            description: r.description,
            parallelism,
            merge_speed: [r.volume_write_bandwidth.as_ref(), caps.volume_write.as_ref()]
                .into_iter()
                .flatten()
                .map(|l| l.bytes_per_second())
                .min(),
            read_limit,
            network_limit,
            source,
            runtime_dir: self.runtime_dir.clone(),
            fs_info: r.tags.fs_info.clone(),
            dirty: None,
            system_tags: r.system_tags,
            user_tags: r.user_tags,
            retain_until: r.tags.retention_lock.map_or(0, |s| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                now.saturating_add(s)
            }),
            roots: self.live.roots(),
            store_outage: self.live.store_outage(),
        };
        let (registry, j) = (self.registry.clone(), job.clone());
        self.jobs
            .run(job, async move {
                let _lease = lease;
                backup::run(&registry, &j, req).await
            })
            .await
    }

    /// The records of a committed group, or, when an attempt at it is running, what that
    /// attempt ends with (a retry joins it).
    async fn committed_or_joined(&self, group_uuid: &str) -> Result<Option<Vec<VolumeBackupRecord>>> {
        let g = group_uuid.to_string();
        let existing = self.catalog().run(move |c| c.group_volume_backups(&g)).await?;
        if !existing.is_empty() {
            return Ok(Some(existing));
        }
        if self.jobs.running(group_uuid).is_none() {
            return Ok(None);
        }
        let mut progress = Box::pin(self.jobs.watch(group_uuid).await?);
        let mut last = None;
        while let Some(p) = progress.next().await {
            last = Some(p);
        }
        let g = group_uuid.to_string();
        let records = self.catalog().run(move |c| c.group_volume_backups(&g)).await?;
        if !records.is_empty() {
            return Ok(Some(records));
        }
        let why = last.and_then(|p| p.error.map(|e| e.details)).unwrap_or_else(|| "it did not commit".into());
        Err(AgentError::new(ErrorKind::FailedPrecondition, format!("the joined backup {group_uuid} failed: {why}")))
    }

    /// The registered VM whose Root volume is `root`.
    pub(crate) async fn vm_of_root(&self, root: &str) -> Result<VmRecord> {
        let v = root.to_string();
        let vm = self
            .catalog()
            .run(move |c| c.vm_of_volume(&v))
            .await?
            .ok_or_else(|| AgentError::not_found("volume", root).with_field("rootVolumeUuid"))?;
        if !vm.volumes.iter().any(|v| v.uuid == root && v.kind == VolumeKind::Root) {
            return Err(AgentError::invalid(
                "rootVolumeUuid",
                format!("volume {root} is not the Root volume of VM {}", vm.uuid),
            ));
        }
        Ok(vm)
    }

    /// A connected storage with room for one more backup under its cap.
    async fn backup_target(&self, bs: &str) -> Result<BackupStorageRecord> {
        let storage = self.registry.require(bs).await.map_err(|e| e.with_field("backupStorageUuid"))?;
        if storage.status != CONNECTED {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("backup storage {bs} is {}; reconnect it first", storage.status),
            )
            .with_field("backupStorageUuid"));
        }
        let max = self.live.max_backups_per_storage();
        let max = storage.max_backups.map_or(max, |m| m.min(max));
        let b = bs.to_string();
        if self.catalog().run(move |c| c.running_jobs_on(&b)).await? >= i64::from(max) {
            return Err(AgentError::new(
                ErrorKind::ResourceExhausted,
                format!("{max} backups already run on backup storage {bs}"),
            ));
        }
        Ok(storage)
    }

    /// DeleteVmBackup: removes a group from `storages` (every storage holding it when empty).
    /// Permissive refuses while a job works on the group; Enforcing cancels it first.
    pub async fn delete_backup(&self, group: &str, storages: &[String], mode: DeleteMode) -> Result<()> {
        let users = self.jobs.using_group(group);
        if let Some(job) = users.first()
            && mode == DeleteMode::Permissive
        {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "{} job {} is using backup group {group}; wait for it or use deleteMode Enforcing",
                    job.kind, job.uuid
                ),
            ));
        }
        // Enforcing: every job on the group is cancelled and has ended before anything goes.
        for job in &users {
            job.cancel.cancel();
        }
        for job in &users {
            if let Ok(progress) = self.jobs.watch(&job.uuid).await {
                let ended = tokio::time::timeout(ENFORCING_WAIT, progress.for_each(|_| async {})).await;
                if ended.is_err() {
                    return Err(AgentError::new(
                        ErrorKind::Timeout,
                        format!("{} job {} did not stop within {ENFORCING_WAIT:?} of its cancel", job.kind, job.uuid),
                    ));
                }
            }
        }
        if !users.is_empty() {
            let g = group.to_string();
            if self.catalog().run(move |c| c.group_volume_backups(&g)).await?.is_empty() {
                // The cancelled backup never committed: nothing of the group is left.
                tracing::info!(group = %group, "backup cancelled before it committed; nothing to delete");
                return Ok(());
            }
        }
        backup::lifecycle::delete_group(&self.registry, group, storages, self.live.store_outage()).await
    }

    /// SyncVmBackup: rebuilds the catalog of one storage from its manifests.
    pub async fn sync_backups(&self, storage: &str) -> Result<(usize, usize)> {
        backup::lifecycle::sync_storage(&self.registry, storage).await
    }

    /// RecoverVmBackupFromImageStoreBackupStorage: copies a group from `src` to `dst`,
    /// sending only the chunks `dst` lacks; returns the group's records with the new refs.
    pub async fn recover_backup(&self, group: &str, src: &str, dst: &str) -> Result<Vec<VolumeBackupRecord>> {
        if src == dst {
            return Err(AgentError::invalid(
                "dstBackupStorageUuid",
                "source and destination are the same backup storage",
            ));
        }
        let g = group.to_string();
        let records = self.catalog().run(move |c| c.group_volume_backups(&g)).await?;
        if records.is_empty() {
            return Err(AgentError::not_found("backup group", group).with_field("groupUuid"));
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
        let job_uuid = crate::jobs::recover_job_uuid(group, dst);
        if self.jobs.running(&job_uuid).is_some() {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("backup group {group} is already being recovered to {dst} (job {job_uuid})"),
            ));
        }
        let job = self.jobs.start("RecoverVmBackup", Some(job_uuid), Some(dst.to_string())).await?;
        job.set_group(group);
        let (registry, j) = (self.registry.clone(), job.clone());
        let (g, s, d) = (group.to_string(), src.to_string(), dst.to_string());
        self.jobs.run(job, async move { backup::recover::run(&registry, &j, &g, &s, &d, network).await }).await?;
        let g = group.to_string();
        Ok(self.catalog().run(move |c| c.group_volume_backups(&g)).await?)
    }
}

/// A retried create names the group it made: the same root volume, name and backup
/// storage. Anything else under that resourceUuid is another request, refused rather than
/// answered with a group it did not ask for.
fn same_request(r: &CreateBackup, records: &[VolumeBackupRecord]) -> Result<()> {
    let group = r.resource.as_deref().unwrap_or_default();
    let differs = |what: &str, had: &str| {
        AgentError::new(
            ErrorKind::AlreadyExists,
            format!("resourceUuid {group} is backup group of another request ({what} {had}); use a new resourceUuid"),
        )
        .with_field("resourceUuid")
    };
    let Some(root) = records.iter().find(|b| b.kind == VolumeKind::Root) else {
        return Ok(());
    };
    if root.volume_uuid != r.root_volume {
        return Err(differs("rootVolumeUuid", &root.volume_uuid));
    }
    if !root.name.starts_with(&format!("{}-", r.name)) {
        return Err(differs("name of", &root.name));
    }
    if !root.refs.iter().any(|s| s.backup_storage_uuid == r.storage) {
        return Err(differs("not on backupStorageUuid", &r.storage));
    }
    Ok(())
}
