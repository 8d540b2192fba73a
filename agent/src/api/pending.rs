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

/// VmBackupService, pending.
#[derive(Debug, Clone, Copy)]
pub struct VmBackupApi;
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

pending!(pb::vm_backup_service_server::VmBackupService, VmBackupApi, {
    create_vm_backup(pb::CreateVmBackupRequest) -> pb::VolumeBackupsReply, "CreateVmBackup";
    delete_vm_backup(pb::DeleteVmBackupRequest) -> pb::DeleteVmBackupReply, "DeleteVmBackup";
    sync_vm_backup(pb::SyncVmBackupRequest) -> pb::SyncVmBackupReply, "SyncVmBackup";
    recover_vm_backup_from_image_store_backup_storage(pb::RecoverVmBackupFromImageStoreBackupStorageRequest) -> pb::VolumeBackupsReply, "RecoverVmBackupFromImageStoreBackupStorage";
    restore_vm_backup(pb::RestoreVmBackupRequest) -> pb::RestoreVmBackupReply, "RestoreVmBackup";
    query_volume_backup(pb::QueryVolumeBackupRequest) -> pb::QueryVolumeBackupReply, "QueryVolumeBackup";
    cancel_job(pb::CancelJobRequest) -> pb::CancelJobReply, "CancelJob";
}
    type WatchJobStream = tokio_stream::Empty<Result<pb::JobProgress, Status>>;
    async fn watch_job(&self, _r: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(unimplemented("WatchJob"))
    }
);

pending!(pb::volume_snapshot_group_service_server::VolumeSnapshotGroupService, SnapshotGroupApi, {
    create_volume_snapshot_group(pb::CreateVolumeSnapshotGroupRequest) -> pb::VolumeSnapshotGroupReply, "CreateVolumeSnapshotGroup";
    delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest) -> pb::DeleteVolumeSnapshotGroupReply, "DeleteVolumeSnapshotGroup";
    update_volume_snapshot_group(pb::UpdateVolumeSnapshotGroupRequest) -> pb::VolumeSnapshotGroupReply, "UpdateVolumeSnapshotGroup";
    query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest) -> pb::QueryVolumeSnapshotGroupReply, "QueryVolumeSnapshotGroup";
});
