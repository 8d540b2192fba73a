//! VolumeSnapshotGroupService: requests parsed here, run by [`crate::ops::snapshot_group`]
//! (one external snapshot of every volume of a VM, taken at the same instant), rendered as
//! the seeds' VolumeSnapshotGroupInventory.

use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::volume_snapshot_group_service_server::VolumeSnapshotGroupService;

use super::{error_code, query_params, status, timestamp};
use crate::catalog::snapshot_group::SnapshotGroupRecord;
use crate::error::{AgentError, Result};
use crate::ops::Ops;
use crate::ops::snapshot_group::CreateSnapshotGroup;
use crate::validate;

/// The service.
#[derive(Debug, Clone)]
pub struct SnapshotGroupApi {
    ops: Ops,
}

impl SnapshotGroupApi {
    /// The service over the edge's state.
    pub fn new(state: &super::State) -> Self {
        Self { ops: state.ops.clone() }
    }
}

fn parse_create(r: &pb::CreateVolumeSnapshotGroupRequest) -> Result<CreateSnapshotGroup> {
    let root_volume = validate::uuid("rootVolumeUuid", &r.root_volume_uuid)?;
    let name = validate::name("name", &r.name)?;
    let description = validate::description("description", &r.description)?;
    let uuid = validate::optional_uuid("resourceUuid", &r.resource_uuid)?
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    for (i, t) in r.tag_uuids.iter().enumerate() {
        validate::uuid("tagUuids", t)
            .map_err(|_| AgentError::invalid("tagUuids", format!("tagUuids[{i}] is not a uuid")))?;
    }
    Ok(CreateSnapshotGroup { root_volume, name, description, uuid })
}

fn parse_delete(r: &pb::DeleteVolumeSnapshotGroupRequest) -> Result<String> {
    let uuid = validate::uuid("uuid", &r.uuid)?;
    match r.delete_mode.as_str() {
        "" | "Permissive" | "Enforcing" => Ok(uuid),
        other => Err(AgentError::invalid(
            "deleteMode",
            format!("{} is not Permissive or Enforcing", validate::shorten(other)),
        )),
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
                volume_type: s.volume_type.to_string(),
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

#[tonic::async_trait]
impl VolumeSnapshotGroupService for SnapshotGroupApi {
    async fn create_volume_snapshot_group(
        &self,
        r: Request<pb::CreateVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::VolumeSnapshotGroupReply>, Status> {
        let req = parse_create(r.get_ref()).map_err(|e| status(&e))?;
        let g = self.ops.create_snapshot_group(req).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VolumeSnapshotGroupReply { inventory: Some(inventory(g)) }))
    }

    async fn delete_volume_snapshot_group(
        &self,
        r: Request<pb::DeleteVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::DeleteVolumeSnapshotGroupReply>, Status> {
        let uuid = parse_delete(r.get_ref()).map_err(|e| status(&e))?;
        let outcomes = self.ops.delete_snapshot_group(&uuid).await.map_err(|e| status(&e))?;
        let results = outcomes
            .into_iter()
            .map(|o| pb::OperationResult {
                snapshot_uuid: o.snapshot_uuid,
                volume_uuid: o.volume_uuid,
                success: o.result.is_ok(),
                error: o.result.err().map(|e| error_code(&e)),
            })
            .collect();
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
            self.ops.update_snapshot_group(&uuid, name, description).await
        };
        let g = run.await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VolumeSnapshotGroupReply { inventory: Some(inventory(g)) }))
    }

    async fn query_volume_snapshot_group(
        &self,
        r: Request<pb::QueryVolumeSnapshotGroupRequest>,
    ) -> Result<Response<pb::QueryVolumeSnapshotGroupReply>, Status> {
        let q = query_params!(r.get_ref());
        let res = self.ops.catalog().run(move |c| c.query_snapshot_groups(&q)).await.map_err(|e| status(&e.into()))?;
        Ok(Response::new(pb::QueryVolumeSnapshotGroupReply {
            inventories: res.rows.into_iter().map(inventory).collect(),
            total: res.total,
        }))
    }
}
