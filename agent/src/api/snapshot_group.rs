//! VolumeSnapshotGroupService: one external snapshot of every volume of a VM, taken at the
//! same instant. For a running VM (its QMP socket answers) a single QMP transaction of
//! `blockdev-snapshot-sync` does it and the VM never pauses; for a stopped VM each volume
//! gets a new qcow2 overlay on its file. Either way the frozen file is the snapshot and the
//! volume continues on the overlay. Delete merges each overlay back (block-commit, or
//! `qemu-img commit` offline) and answers one result per snapshot.

use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::volume_snapshot_group_service_server::VolumeSnapshotGroupService;

use super::{error_code, query_params, status, timestamp};
use crate::catalog::snapshot_group::{SnapshotGroupRecord, SnapshotRecord};
use crate::catalog::{Catalog, now_millis};
use crate::error::{AgentError, ErrorKind, Result, blocking};
use crate::qemu::live;
use crate::validate;

/// The service.
#[derive(Debug, Clone)]
pub struct SnapshotGroupApi {
    catalog: std::sync::Arc<Catalog>,
}

impl SnapshotGroupApi {
    /// The service over the daemon's state.
    pub fn new(state: &crate::daemon::State) -> Self {
        Self { catalog: state.registry.catalog().clone() }
    }
}

fn inventory(g: SnapshotGroupRecord) -> pb::VolumeSnapshotGroupInventory {
    pb::VolumeSnapshotGroupInventory {
        snapshot_count: i32::try_from(g.snapshots.iter().filter(|s| !s.deleted).count()).unwrap_or(i32::MAX),
        volume_snapshot_refs: g
            .snapshots
            .iter()
            .map(|s| pb::VolumeSnapshotGroupRef {
                volume_snapshot_uuid: s.uuid.clone(),
                volume_snapshot_group_uuid: g.uuid.clone(),
                device_id: s.device_id,
                snapshot_deleted: s.deleted,
                volume_uuid: s.volume_uuid.clone(),
                volume_name: s.volume_name.clone(),
                volume_type: s.volume_type.clone(),
                volume_snapshot_install_path: s.install_path.clone(),
                volume_snapshot_name: s.name.clone(),
                create_date: timestamp(s.create_date),
                last_op_date: timestamp(s.last_op_date),
            })
            .collect(),
        uuid: g.uuid,
        name: g.name,
        description: g.description.unwrap_or_default(),
        vm_instance_uuid: g.vm_uuid,
        create_date: timestamp(g.create_date),
        last_op_date: timestamp(g.last_op_date),
    }
}

/// `<dir>/<stem>-snap-<group12>-<device>.qcow2`, beside the volume's file.
fn overlay_path(install_path: &str, group: &str, device_id: i32) -> PathBuf {
    let p = Path::new(install_path);
    let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "volume".into());
    p.with_file_name(format!("{stem}-snap-{}-{device_id}.qcow2", &group[..12.min(group.len())]))
}

async fn run_qemu_img(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| AgentError::new(ErrorKind::Unavailable, format!("running qemu-img: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(AgentError::new(
        ErrorKind::FailedPrecondition,
        format!("qemu-img {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim()),
    ))
}

impl SnapshotGroupApi {
    async fn create(&self, r: pb::CreateVolumeSnapshotGroupRequest) -> Result<SnapshotGroupRecord> {
        let root = validate::uuid("rootVolumeUuid", &r.root_volume_uuid)?;
        let name = validate::name("name", &r.name)?;
        let description = validate::description("description", &r.description)?;
        let group_uuid = validate::optional_uuid("resourceUuid", &r.resource_uuid)?
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        for (i, t) in r.tag_uuids.iter().enumerate() {
            validate::uuid("tagUuids", t)
                .map_err(|_| AgentError::invalid("tagUuids", format!("tagUuids[{i}] is not a uuid")))?;
        }
        let (c, v) = (self.catalog.clone(), root.clone());
        let vm = blocking(move || Ok(c.vm_of_volume(&v)?))
            .await?
            .ok_or_else(|| AgentError::not_found("volume", &root).with_field("rootVolumeUuid"))?;
        if !vm.volumes.iter().any(|v| v.uuid == root && v.kind == "Root") {
            return Err(AgentError::invalid(
                "rootVolumeUuid",
                format!("{root} is not the root volume of VM {}", vm.uuid),
            ));
        }
        let (c, g) = (self.catalog.clone(), group_uuid.clone());
        if let Some(existing) = blocking(move || Ok(c.get_snapshot_group(&g)?)).await? {
            return if existing.vm_uuid == vm.uuid && existing.name == name {
                Ok(existing)
            } else {
                Err(AgentError::new(ErrorKind::AlreadyExists, format!("snapshot group {group_uuid} exists"))
                    .with_field("resourceUuid"))
            };
        }
        let now = now_millis();
        let snapshots: Vec<SnapshotRecord> = vm
            .volumes
            .iter()
            .map(|v| {
                let uuid = uuid::Uuid::new_v4().simple().to_string();
                SnapshotRecord {
                    overlay_path: overlay_path(&v.install_path, &group_uuid, v.device_id).display().to_string(),
                    uuid,
                    volume_uuid: v.uuid.clone(),
                    volume_name: v.name.clone(),
                    volume_type: v.kind.clone(),
                    device_id: v.device_id,
                    name: format!("{name}-{}", v.name),
                    install_path: v.install_path.clone(),
                    install_format: v.format.clone(),
                    deleted: false,
                    create_date: now,
                    last_op_date: now,
                }
            })
            .collect();
        for s in &snapshots {
            if !Path::new(&s.install_path).is_file() {
                return Err(AgentError::new(
                    ErrorKind::Unimplemented,
                    format!("volume {} is not a file; snapshots of block devices are not supported yet", s.volume_uuid),
                ));
            }
        }
        let qmp = match vm.qmp_socket.as_deref() {
            Some(sock) => live::connect_if_running(Path::new(sock)).await?,
            None => None,
        };
        match qmp {
            Some(qmp) => {
                let nodes = live::block_nodes(&qmp).await?;
                let mut plan = Vec::new();
                for s in &snapshots {
                    let node = live::node_for(&nodes, &s.install_path).ok_or_else(|| {
                        AgentError::new(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "the running VM has no block node for volume {} ({})",
                                s.volume_uuid, s.install_path
                            ),
                        )
                    })?;
                    plan.push((node, PathBuf::from(&s.overlay_path), format!("snap-{}", &s.uuid[..12])));
                }
                let plan_refs: Vec<(&str, &Path, &str)> =
                    plan.iter().map(|(n, p, o)| (n.as_str(), p.as_path(), o.as_str())).collect();
                // Never let QEMU overwrite (and a failure then delete) a file already there.
                for s in &snapshots {
                    if Path::new(&s.overlay_path).is_file() {
                        return Err(AgentError::new(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "{} already exists; it would become volume {}'s overlay",
                                s.overlay_path, s.volume_uuid
                            ),
                        ));
                    }
                }
                if let Err(e) = live::snapshot_live(&qmp, &plan_refs).await {
                    // The transaction is all or nothing in QEMU, but files it created for
                    // the actions it rolled back stay: remove them.
                    for s in &snapshots {
                        if Path::new(&s.overlay_path).is_file() {
                            let _ = std::fs::remove_file(&s.overlay_path);
                        }
                    }
                    return Err(e);
                }
            }
            None => {
                // A stopped VM: overlays on the files; undo them all if one fails.
                let mut made: Vec<&str> = Vec::new();
                for s in &snapshots {
                    let fmt = if s.install_format == "raw" { "raw" } else { "qcow2" };
                    let r = run_qemu_img(&[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        fmt,
                        "-b",
                        &s.install_path,
                        &s.overlay_path,
                    ])
                    .await;
                    if let Err(e) = r {
                        for m in made {
                            let _ = std::fs::remove_file(m);
                        }
                        return Err(e);
                    }
                    made.push(&s.overlay_path);
                }
            }
        }
        let record = SnapshotGroupRecord {
            uuid: group_uuid,
            name,
            description,
            vm_uuid: vm.uuid,
            create_date: now,
            last_op_date: now,
            snapshots,
        };
        let (c, g) = (self.catalog.clone(), record.clone());
        blocking(move || Ok(c.insert_snapshot_group(&g)?)).await?;
        tracing::info!(group = %record.uuid, vm = %record.vm_uuid, volumes = record.snapshots.len(), "snapshot group taken");
        Ok(record)
    }

    async fn delete(&self, r: pb::DeleteVolumeSnapshotGroupRequest) -> Result<Vec<pb::OperationResult>> {
        let uuid = validate::uuid("uuid", &r.uuid)?;
        match r.delete_mode.as_str() {
            "" | "Permissive" | "Enforcing" => {}
            other => {
                return Err(AgentError::invalid(
                    "deleteMode",
                    format!("{} is not Permissive or Enforcing", validate::shorten(other)),
                ));
            }
        }
        let (c, u) = (self.catalog.clone(), uuid.clone());
        let group = blocking(move || Ok(c.get_snapshot_group(&u)?))
            .await?
            .ok_or_else(|| AgentError::not_found("snapshot group", &uuid).with_field("uuid"))?;
        let (c, v) = (self.catalog.clone(), group.vm_uuid.clone());
        let vm = blocking(move || Ok(c.get_vm(&v)?)).await?;
        let qmp = match vm.as_ref().and_then(|v| v.qmp_socket.clone()) {
            Some(sock) => live::connect_if_running(Path::new(&sock)).await?,
            None => None,
        };
        let mut results = Vec::new();
        for s in group.snapshots.iter().filter(|s| !s.deleted) {
            let merged = match &qmp {
                Some(qmp) => {
                    async {
                        let nodes = live::block_nodes(qmp).await?;
                        let missing = |p: &str| {
                            AgentError::new(
                                ErrorKind::FailedPrecondition,
                                format!("the running VM has no block node for {p}"),
                            )
                        };
                        let top = live::node_for(&nodes, &s.overlay_path).ok_or_else(|| missing(&s.overlay_path))?;
                        let base = live::node_for(&nodes, &s.install_path).ok_or_else(|| missing(&s.install_path))?;
                        live::merge_live(qmp, &top, &base, &format!("merge-{}", &s.uuid[..12])).await
                    }
                    .await
                }
                None => {
                    if Path::new(&s.overlay_path).exists() {
                        live::merge_offline(Path::new(&s.overlay_path)).await
                    } else {
                        Err(AgentError::new(
                            ErrorKind::FailedPrecondition,
                            format!("the overlay {} of snapshot {} is missing", s.overlay_path, s.uuid),
                        ))
                    }
                }
            };
            let result = match merged {
                Ok(()) => {
                    let _ = std::fs::remove_file(&s.overlay_path);
                    let (c, snap) = (self.catalog.clone(), s.clone());
                    blocking(move || Ok(c.snapshot_merged(&snap, now_millis())?)).await
                }
                Err(e) => Err(e),
            };
            results.push(match result {
                Ok(()) => pb::OperationResult {
                    snapshot_uuid: s.uuid.clone(),
                    volume_uuid: s.volume_uuid.clone(),
                    success: true,
                    error: None,
                },
                Err(e) => {
                    tracing::error!(snapshot = %s.uuid, error = %e, "merging a snapshot back failed");
                    pb::OperationResult {
                        snapshot_uuid: s.uuid.clone(),
                        volume_uuid: s.volume_uuid.clone(),
                        success: false,
                        error: Some(error_code(&e)),
                    }
                }
            });
        }
        if results.iter().all(|r| r.success) {
            let (c, u) = (self.catalog.clone(), uuid.clone());
            blocking(move || Ok(c.remove_snapshot_group(&u)?)).await?;
        }
        Ok(results)
    }
}

#[tonic::async_trait]
impl VolumeSnapshotGroupService for SnapshotGroupApi {
    async fn create_volume_snapshot_group(
        &self,
        r: Request<pb::CreateVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::VolumeSnapshotGroupReply>, Status> {
        let g = self.create(r.into_inner()).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VolumeSnapshotGroupReply { inventory: Some(inventory(g)) }))
    }

    async fn delete_volume_snapshot_group(
        &self,
        r: Request<pb::DeleteVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::DeleteVolumeSnapshotGroupReply>, Status> {
        let results = self.delete(r.into_inner()).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteVolumeSnapshotGroupReply { results }))
    }

    async fn update_volume_snapshot_group(
        &self,
        r: Request<pb::UpdateVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::VolumeSnapshotGroupReply>, Status> {
        let r = r.into_inner();
        let run = async {
            let uuid = validate::uuid("uuid", &r.uuid)?;
            let name = r.name.as_deref().map(|n| validate::name("name", n)).transpose()?;
            let description = match r.description.as_deref() {
                Some(d) => validate::description("description", d)?.or(Some(String::new())),
                None => None,
            };
            let (c, u) = (self.catalog.clone(), uuid.clone());
            let found = blocking(move || {
                Ok(c.update_snapshot_group(&u, name.as_deref(), description.as_deref(), now_millis())?)
            })
            .await?;
            if !found {
                return Err(AgentError::not_found("snapshot group", &uuid).with_field("uuid"));
            }
            let c = self.catalog.clone();
            blocking(move || Ok(c.get_snapshot_group(&uuid)?))
                .await?
                .ok_or_else(|| AgentError::new(ErrorKind::Internal, "snapshot group vanished"))
        };
        let g = run.await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VolumeSnapshotGroupReply { inventory: Some(inventory(g)) }))
    }

    async fn query_volume_snapshot_group(
        &self,
        r: Request<pb::QueryVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::QueryVolumeSnapshotGroupReply>, Status> {
        let q = query_params!(r.get_ref());
        let c = self.catalog.clone();
        let res = blocking(move || Ok(c.query_snapshot_groups(&q)?)).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::QueryVolumeSnapshotGroupReply {
            inventories: res.rows.into_iter().map(inventory).collect(),
            total: res.total,
        }))
    }
}
