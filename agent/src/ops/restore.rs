//! RestoreVmBackup as an operation: which volume backups go where (new files, or over the
//! VM's own volumes for a revert), under a job, with the volumes of a revert locked.

use std::path::PathBuf;
use std::sync::Arc;

use super::Ops;
use crate::backup;
use crate::backup::restore::{RestoreOptions, RestoreTarget};
use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::roots::Access;
use crate::tags::SystemTags;
use crate::throttle::{ByteRate, Throttle};
use crate::volume::VolumeFormat;
use crate::volume::writer::Mode;

/// One target as asked: a volume of the group and, for a new file, where and in which format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Volume uuid (of the backed-up volume).
    pub volume: String,
    /// Absolute path of the new file (None for a revert).
    pub path: Option<PathBuf>,
    /// Format of the new file.
    pub format: VolumeFormat,
}

/// A validated RestoreVmBackup.
#[derive(Debug, Clone)]
pub struct Restore {
    /// groupUuid.
    pub group: String,
    /// backupStorageUuid.
    pub storage: String,
    /// resourceUuid: names the job.
    pub resource: Option<String>,
    /// networkReadBandwidth.
    pub network_read_bandwidth: Option<Arc<ByteRate>>,
    /// volumeWriteBandwidth.
    pub volume_write_bandwidth: Option<Arc<ByteRate>>,
    /// The parsed system tags.
    pub tags: SystemTags,
    /// What to restore where (every volume of the group for a revert when empty).
    pub targets: Vec<TargetSpec>,
    /// Over the VM's own volumes.
    pub revert: bool,
    /// A revert the VM runs from at once (see [`super::live_restore`]).
    pub live: bool,
}

impl Ops {
    /// RestoreVmBackup: returns the job uuid and the volume backups restored.
    pub async fn restore_backup(&self, r: Restore) -> Result<(String, Vec<VolumeBackupRecord>)> {
        let caps = self.live.caps();
        let network_limit = Throttle::unlimited().with(r.network_read_bandwidth.clone()).with(caps.network_read);
        let write_limit = Throttle::unlimited().with(r.volume_write_bandwidth.clone()).with(caps.volume_write);
        let parallelism = self.parallelism(&r.tags);
        let source = r.tags.backup_network.as_ref().map(crate::storage::netbind::pick).transpose()?;
        let g = r.group.clone();
        let backups = self.catalog().run(move |c| c.group_volume_backups(&g)).await?;
        if backups.is_empty() {
            return Err(AgentError::not_found("backup group", &r.group).with_field("groupUuid"));
        }
        let chosen = choose(&r.group, &backups, &r.targets, r.revert)?;
        let (targets, lease) = if r.revert {
            let targets = self.revert_targets(chosen).await?;
            let paths = targets.iter().map(|t| (t.backup.volume_uuid.as_str(), t.path.to_str().unwrap_or_default()));
            self.check_install_paths("revert", paths).await?;
            let holder = format!("RestoreVmBackup (revert) of backup group {}", r.group);
            let lease = self.locks.acquire(targets.iter().map(|t| t.backup.volume_uuid.as_str()), &holder)?;
            (targets, Some(lease))
        } else {
            let targets = chosen
                .into_iter()
                .zip(&r.targets)
                .enumerate()
                .map(|(i, (backup, t))| {
                    let path = t.path.clone().ok_or_else(|| {
                        AgentError::invalid("targets", format!("targets[{i}].installPath: a new file needs a path"))
                    })?;
                    Ok(RestoreTarget { backup, path, format: t.format, mode: Mode::Create })
                })
                .collect::<Result<Vec<_>>>()?;
            (self.new_targets_in_roots(targets).await?, None)
        };
        if r.live
            && let Some(lease) = lease
        {
            let speed = write_limit.bytes_per_second();
            return self.live_restore(r, targets, lease, speed).await;
        }
        let records: Vec<VolumeBackupRecord> = targets.iter().map(|t| t.backup.clone()).collect();
        let job = self.jobs.start("RestoreVmBackup", r.resource, Some(r.storage.clone())).await?;
        job.set_group(&r.group);
        let (registry, j, job_uuid) = (self.registry.clone(), job.clone(), job.uuid.clone());
        let opts = RestoreOptions { network_limit, write_limit, parallelism, source };
        let bs = r.storage;
        self.jobs
            .run(job, async move {
                let _lease = lease;
                backup::restore::run(&registry, &j, &bs, targets, opts).await
            })
            .await?;
        Ok((job_uuid, records))
    }

    /// New files go where the roots allow, by their resolved paths (a parent that is a
    /// symlink out of the roots is refused, not followed later).
    async fn new_targets_in_roots(&self, mut targets: Vec<RestoreTarget>) -> Result<Vec<RestoreTarget>> {
        let uses = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("targets[{i}].installPath"), t.path.clone(), Access::Create))
            .collect();
        let resolved = self.check_paths("targets", uses).await?;
        for (t, path) in targets.iter_mut().zip(resolved) {
            t.path = path;
        }
        Ok(targets)
    }

    /// Revert: each chosen volume goes back over its registered install path, in its
    /// registered format, if no running VM holds it.
    async fn revert_targets(&self, chosen: Vec<VolumeBackupRecord>) -> Result<Vec<RestoreTarget>> {
        let mut out = Vec::new();
        for backup in chosen {
            let v = backup.volume_uuid.clone();
            let vm = self.catalog().run(move |c| c.vm_of_volume(&v)).await?.ok_or_else(|| {
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
            out.push(RestoreTarget {
                backup,
                path: volume.install_path.clone().into(),
                format: volume.format,
                mode: Mode::Revert,
            });
        }
        Ok(out)
    }
}

/// The volume backups of `group` the targets name, in their order (every one of the group
/// for a revert that names none).
fn choose(
    group: &str,
    backups: &[VolumeBackupRecord],
    asked: &[TargetSpec],
    revert: bool,
) -> Result<Vec<VolumeBackupRecord>> {
    if asked.is_empty() {
        if revert {
            return Ok(backups.to_vec());
        }
        return Err(AgentError::invalid("targets", "name at least one volume to restore and where"));
    }
    asked
        .iter()
        .enumerate()
        .map(|(i, t)| {
            backups.iter().find(|b| b.volume_uuid == t.volume).cloned().ok_or_else(|| {
                AgentError::invalid(
                    "targets",
                    format!("targets[{i}]: volume {} is not in backup group {group}", t.volume),
                )
            })
        })
        .collect()
}
