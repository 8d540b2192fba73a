//! Services whose methods are not built yet. Each method answers UNIMPLEMENTED with ZStack
//! code SYS.1014, never a fake success.

use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;

use crate::error::{AgentError, ErrorKind};

fn unimplemented(method: &str) -> Status {
    super::status(&AgentError::new(
        ErrorKind::Unimplemented,
        format!("{method} is not implemented by this agent version"),
    ))
}

/// VolumeSnapshotGroupService, pending.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotGroupApi;

macro_rules! pending {
    ($trait:path, $ty:ty, { $($method:ident($req:ty) -> $reply:ty, $name:literal;)* } $($extra:tt)*) => {
        #[tonic::async_trait]
        impl $trait for $ty {
            $(
                async fn $method(&self, _r: Request<$req>) -> Result<Response<$reply>, Status> {
                    Err(unimplemented($name))
                }
            )*
            $($extra)*
        }
    };
}

pending!(pb::volume_snapshot_group_service_server::VolumeSnapshotGroupService, SnapshotGroupApi, {
    create_volume_snapshot_group(pb::CreateVolumeSnapshotGroupRequest) -> pb::VolumeSnapshotGroupReply, "CreateVolumeSnapshotGroup";
    delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest) -> pb::DeleteVolumeSnapshotGroupReply, "DeleteVolumeSnapshotGroup";
    update_volume_snapshot_group(pb::UpdateVolumeSnapshotGroupRequest) -> pb::VolumeSnapshotGroupReply, "UpdateVolumeSnapshotGroup";
    query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest) -> pb::QueryVolumeSnapshotGroupReply, "QueryVolumeSnapshotGroup";
});
