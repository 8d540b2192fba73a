//! Volume snapshot groups: one external snapshot of every volume of a VM, taken at the same
//! instant. For a running VM (its QMP socket answers) a single QMP transaction of
//! `blockdev-snapshot-sync` does it and the VM never pauses; for a stopped VM each volume
//! gets a new qcow2 overlay on its file. Either way the frozen file is the snapshot and the
//! volume continues on the overlay. Delete merges each overlay back (block-commit, or
//! `qemu-img commit` offline) and reports one result per snapshot. Both hold the VM's
//! volumes in the lock set for the call, so neither overlaps a backup or a revert. Volumes
//! and overlays must lie under the volume roots, checked before either starts.

use std::path::{Path, PathBuf};

use super::Ops;
use crate::catalog::now_millis;
use crate::catalog::snapshot_group::{SnapshotGroupRecord, SnapshotRecord};
use crate::catalog::vm::VmRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::qemu::live;
use crate::qemu::qmp::Qmp;
use crate::roots::Access;

/// A validated CreateVolumeSnapshotGroup.
#[derive(Debug, Clone)]
pub struct CreateSnapshotGroup {
    /// rootVolumeUuid.
    pub root_volume: String,
    /// name.
    pub name: String,
    /// description.
    pub description: Option<String>,
    /// resourceUuid, or a new uuid.
    pub uuid: String,
}

/// What deleting one snapshot came to.
#[derive(Debug)]
pub struct SnapshotOutcome {
    /// The snapshot.
    pub snapshot_uuid: String,
    /// Its volume.
    pub volume_uuid: String,
    /// Merged back and forgotten, or why not.
    pub result: Result<()>,
}

/// `<dir>/<stem>-snap-<group12>-<device>.qcow2`, beside the volume's file.
fn overlay_path(install_path: &str, group: &str, device_id: i32) -> PathBuf {
    let p = Path::new(install_path);
    let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "volume".into());
    p.with_file_name(format!("{stem}-snap-{}-{device_id}.qcow2", &group[..12.min(group.len())]))
}

/// The snapshot records a group of `vm` will hold.
fn plan(vm: &VmRecord, r: &CreateSnapshotGroup, now: i64) -> Vec<SnapshotRecord> {
    vm.volumes
        .iter()
        .map(|v| SnapshotRecord {
            overlay_path: overlay_path(&v.install_path, &r.uuid, v.device_id).display().to_string(),
            uuid: uuid::Uuid::new_v4().simple().to_string(),
            volume_uuid: v.uuid.clone(),
            volume_name: v.name.clone(),
            volume_type: v.kind,
            device_id: v.device_id,
            name: format!("{}-{}", r.name, v.name),
            install_path: v.install_path.clone(),
            install_format: v.format,
            deleted: false,
            create_date: now,
            last_op_date: now,
        })
        .collect()
}

/// A running VM: one QMP transaction, so every disk is frozen at the same instant.
async fn snapshot_running(qmp: &Qmp, snapshots: &[SnapshotRecord]) -> Result<()> {
    let nodes = live::block_nodes(qmp).await?;
    let mut plan = Vec::new();
    for s in snapshots {
        let node = live::node_for(&nodes, &s.install_path).ok_or_else(|| {
            AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("the running VM has no block node for volume {} ({})", s.volume_uuid, s.install_path),
            )
        })?;
        plan.push((node, PathBuf::from(&s.overlay_path), format!("snap-{}", &s.uuid[..12])));
    }
    // Never let QEMU overwrite (and a failure then delete) a file already there.
    if let Some(s) = snapshots.iter().find(|s| Path::new(&s.overlay_path).is_file()) {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("{} already exists; it would become volume {}'s overlay", s.overlay_path, s.volume_uuid),
        ));
    }
    let plan_refs: Vec<(&str, &Path, &str)> =
        plan.iter().map(|(n, p, o)| (n.as_str(), p.as_path(), o.as_str())).collect();
    let taken = live::snapshot_live(qmp, &plan_refs).await;
    if taken.is_err() {
        // The transaction is all or nothing in QEMU, but files it created for the actions
        // it rolled back stay: remove them.
        for s in snapshots.iter().filter(|s| Path::new(&s.overlay_path).is_file()) {
            let _ = std::fs::remove_file(&s.overlay_path);
        }
    }
    taken
}

/// A stopped VM: overlays on the files; undone them all if one fails.
async fn snapshot_stopped(snapshots: &[SnapshotRecord]) -> Result<()> {
    let mut made: Vec<&str> = Vec::new();
    for s in snapshots {
        let fmt = s.install_format.as_str();
        let args = ["create", "-q", "-f", "qcow2", "-F", fmt, "-b", &s.install_path, &s.overlay_path];
        if let Err(e) = crate::tool::run("qemu-img", &args, crate::tool::SHORT).await {
            for m in made {
                let _ = std::fs::remove_file(m);
            }
            return Err(e);
        }
        made.push(&s.overlay_path);
    }
    Ok(())
}

/// Merges one snapshot's overlay back into its volume.
async fn merge_back(qmp: Option<&Qmp>, s: &SnapshotRecord) -> Result<()> {
    match qmp {
        Some(qmp) => {
            let nodes = live::block_nodes(qmp).await?;
            let missing = |p: &str| {
                AgentError::new(ErrorKind::FailedPrecondition, format!("the running VM has no block node for {p}"))
            };
            let top = live::node_for(&nodes, &s.overlay_path).ok_or_else(|| missing(&s.overlay_path))?;
            let base = live::node_for(&nodes, &s.install_path).ok_or_else(|| missing(&s.install_path))?;
            live::merge_live(qmp, &top, &base, &format!("merge-{}", &s.uuid[..12]), None).await
        }
        None if Path::new(&s.overlay_path).exists() => live::merge_offline(Path::new(&s.overlay_path)).await,
        None => Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("the overlay {} of snapshot {} is missing", s.overlay_path, s.uuid),
        )),
    }
}

impl Ops {
    /// Each snapshot's volume and its overlay (to be created, or there already) must lie
    /// under the volume roots.
    async fn check_snapshot_paths(
        &self,
        field: &'static str,
        snapshots: &[SnapshotRecord],
        overlay: Access,
    ) -> Result<()> {
        let mut uses = Vec::new();
        for s in snapshots {
            let volume = format!("installPath of volume {}", s.volume_uuid);
            uses.push((volume, PathBuf::from(&s.install_path), Access::Volume));
            uses.push((
                format!("snapshot overlay of volume {}", s.volume_uuid),
                PathBuf::from(&s.overlay_path),
                overlay,
            ));
        }
        self.check_paths(field, uses).await.map(drop)
    }

    /// CreateVolumeSnapshotGroup. A retry with the same uuid, VM and name returns the group.
    pub async fn create_snapshot_group(&self, r: CreateSnapshotGroup) -> Result<SnapshotGroupRecord> {
        let vm = self.vm_of_root(&r.root_volume).await?;
        let g = r.uuid.clone();
        if let Some(existing) = self.catalog().run(move |c| c.get_snapshot_group(&g)).await? {
            return if existing.vm_uuid == vm.uuid && existing.name == r.name {
                Ok(existing)
            } else {
                Err(AgentError::new(ErrorKind::AlreadyExists, format!("snapshot group {} exists", r.uuid))
                    .with_field("resourceUuid"))
            };
        }
        let now = now_millis();
        let snapshots = plan(&vm, &r, now);
        self.check_snapshot_paths("rootVolumeUuid", &snapshots, Access::Create).await?;
        if let Some(s) = snapshots.iter().find(|s| !Path::new(&s.install_path).is_file()) {
            return Err(AgentError::new(
                ErrorKind::Unimplemented,
                format!("volume {} is not a file; snapshots of block devices are not supported yet", s.volume_uuid),
            ));
        }
        let holder = format!("CreateVolumeSnapshotGroup {}", r.uuid);
        let _lease = self.locks.acquire(vm.volumes.iter().map(|v| v.uuid.as_str()), &holder)?;
        match live::connect_if_running_opt(vm.qmp_socket.as_deref()).await? {
            Some(qmp) => snapshot_running(&qmp, &snapshots).await?,
            None => snapshot_stopped(&snapshots).await?,
        }
        let record = SnapshotGroupRecord {
            uuid: r.uuid,
            name: r.name,
            description: r.description,
            vm_uuid: vm.uuid,
            create_date: now,
            last_op_date: now,
            snapshots,
        };
        let g = record.clone();
        self.catalog().run(move |c| c.insert_snapshot_group(&g)).await?;
        tracing::info!(group = %record.uuid, vm = %record.vm_uuid, volumes = record.snapshots.len(), "snapshot group taken");
        Ok(record)
    }

    /// DeleteVolumeSnapshotGroup: merges every remaining snapshot back; the group is
    /// forgotten once all are.
    pub async fn delete_snapshot_group(&self, uuid: &str) -> Result<Vec<SnapshotOutcome>> {
        let u = uuid.to_string();
        // A group that no longer exists is deleted already (ZStack's
        // successIfResourceNotExisting): a retried delete succeeds with nothing to report.
        let Some(group) = self.catalog().run(move |c| c.get_snapshot_group(&u)).await? else {
            tracing::info!(group = %uuid, "snapshot group does not exist; nothing to delete");
            return Ok(Vec::new());
        };
        let v = group.vm_uuid.clone();
        let vm = self.catalog().run(move |c| c.get_vm(&v)).await?;
        let live: Vec<SnapshotRecord> = group.snapshots.iter().filter(|s| !s.deleted).cloned().collect();
        self.check_snapshot_paths("uuid", &live, Access::Volume).await?;
        let holder = format!("DeleteVolumeSnapshotGroup {uuid}");
        let _lease = self.locks.acquire(group.snapshots.iter().map(|s| s.volume_uuid.as_str()), &holder)?;
        let qmp = live::connect_if_running_opt(vm.as_ref().and_then(|v| v.qmp_socket.as_deref())).await?;
        let mut outcomes = Vec::new();
        for s in group.snapshots.iter().filter(|s| !s.deleted) {
            let result = match merge_back(qmp.as_deref(), s).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(&s.overlay_path);
                    let snap = s.clone();
                    self.catalog().run(move |c| c.snapshot_merged(&snap, now_millis())).await.map_err(AgentError::from)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                tracing::error!(snapshot = %s.uuid, error = %e, "merging a snapshot back failed");
            }
            outcomes.push(SnapshotOutcome {
                snapshot_uuid: s.uuid.clone(),
                volume_uuid: s.volume_uuid.clone(),
                result,
            });
        }
        if outcomes.iter().all(|o| o.result.is_ok()) {
            let u = uuid.to_string();
            self.catalog().run(move |c| c.remove_snapshot_group(&u)).await?;
        }
        Ok(outcomes)
    }

    /// UpdateVolumeSnapshotGroup: a new name and/or description (an empty one clears it).
    pub async fn update_snapshot_group(
        &self,
        uuid: &str,
        name: Option<String>,
        description: Option<String>,
    ) -> Result<SnapshotGroupRecord> {
        let u = uuid.to_string();
        let found = self
            .catalog()
            .run(move |c| c.update_snapshot_group(&u, name.as_deref(), description.as_deref(), now_millis()))
            .await?;
        if !found {
            return Err(AgentError::not_found("snapshot group", uuid).with_field("uuid"));
        }
        let u = uuid.to_string();
        self.catalog()
            .run(move |c| c.get_snapshot_group(&u))
            .await?
            .ok_or_else(|| AgentError::new(ErrorKind::Internal, "snapshot group vanished"))
    }
}
