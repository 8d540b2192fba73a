//! Runs a REST call on the gRPC edge's own services, in process: the request JSON becomes
//! the proto request (the proto's deserializer refuses unknown and mistyped fields), the
//! service parses and runs it exactly as for a gRPC caller, and the reply becomes ZStack
//! JSON. No rule of any API is written twice.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::backup_storage_service_server::BackupStorageService;
use vmbackup_proto::agent::v1::vm_backup_service_server::VmBackupService;
use vmbackup_proto::agent::v1::volume_snapshot_group_service_server::VolumeSnapshotGroupService;

use super::json;
use super::routes::Api;
use crate::api::State;
use crate::api::backup_storage::BackupStorageApi;
use crate::api::snapshot_group::SnapshotGroupApi;
use crate::api::vm_backup::VmBackupApi;
use crate::error::AgentError;

/// A failed call: ZStack's error and the gRPC code it came with.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The gRPC code (the HTTP status follows from it).
    pub code: tonic::Code,
    /// ZStack's ErrorCode.
    pub error: Box<pb::ErrorCode>,
}

impl Failure {
    /// The failure of an agent error.
    pub fn of(e: &AgentError) -> Self {
        Self::from_status(&crate::api::status(e))
    }

    fn from_status(s: &Status) -> Self {
        let error = crate::api::error_code_of(s).unwrap_or_else(|| pb::ErrorCode {
            code: "SYS.1000".into(),
            description: "An internal error happened in the system".into(),
            details: s.message().to_string(),
            ..Default::default()
        });
        Self { code: s.code(), error: Box::new(error) }
    }

    /// `{"error": {...}}`, with `cause` null when there is none (as ZStack writes it).
    pub fn body(&self) -> Value {
        let mut error = json::render(self.error.as_ref());
        if let Value::Object(m) = &mut error {
            m.entry("cause").or_insert(Value::Null);
        }
        serde_json::json!({ "error": error })
    }
}

/// Runs `api` with `request` (its proto request's JSON) and returns the reply's JSON.
pub async fn invoke(state: &State, api: Api, request: Value) -> Result<Value, Failure> {
    let vb = VmBackupApi::new(state);
    let sg = SnapshotGroupApi::new(state);
    let bs = BackupStorageApi::new(state);
    match api {
        Api::CreateVmBackup => call(request, |r| vb.create_vm_backup(r)).await,
        Api::DeleteVmBackup => call(request, |r| vb.delete_vm_backup(r)).await,
        Api::SyncVmBackup => call(request, |r| vb.sync_vm_backup(r)).await,
        Api::RecoverVmBackup => call(request, |r| vb.recover_vm_backup_from_image_store_backup_storage(r)).await,
        Api::RestoreVmBackup => call(request, |r| vb.restore_vm_backup(r)).await,
        Api::QueryVolumeBackup => call(request, |r| vb.query_volume_backup(r)).await,
        Api::PruneVmBackup => call(request, |r| vb.prune_vm_backup(r)).await,
        Api::ExportVmBackup => call(request, |r| vb.export_vm_backup(r)).await,
        Api::QueryVmBackupExport => call(request, |r| vb.query_vm_backup_export(r)).await,
        Api::StopVmBackupExport => call(request, |r| vb.stop_vm_backup_export(r)).await,
        Api::CreateVolumeSnapshotGroup => call(request, |r| sg.create_volume_snapshot_group(r)).await,
        Api::DeleteVolumeSnapshotGroup => call(request, |r| sg.delete_volume_snapshot_group(r)).await,
        Api::UpdateVolumeSnapshotGroup => call(request, |r| sg.update_volume_snapshot_group(r)).await,
        Api::QueryVolumeSnapshotGroup => call(request, |r| sg.query_volume_snapshot_group(r)).await,
        Api::AddImageStoreBackupStorage => call(request, |r| bs.add_image_store_backup_storage(r)).await,
        Api::AddCephBackupStorage => call(request, |r| bs.add_ceph_backup_storage(r)).await,
        Api::DeleteBackupStorage => call(request, |r| bs.delete_backup_storage(r)).await,
        Api::QueryBackupStorage => call(request, |r| bs.query_backup_storage(r)).await,
        Api::ReconnectBackupStorage => call(request, |r| bs.reconnect_backup_storage(r)).await,
        Api::ApiJob => Err(Failure::of(&AgentError::invalid("uuid", "an API job is not a call"))),
    }
}

/// Checks that `request` deserializes as `api`'s proto request, before any job is made.
pub fn check(api: Api, request: &Value) -> Result<(), Failure> {
    fn parse<T: DeserializeOwned>(v: &Value) -> Result<(), Failure> {
        decode::<T>(v.clone()).map(|_| ())
    }
    match api {
        Api::CreateVmBackup => parse::<pb::CreateVmBackupRequest>(request),
        Api::DeleteVmBackup => parse::<pb::DeleteVmBackupRequest>(request),
        Api::SyncVmBackup => parse::<pb::SyncVmBackupRequest>(request),
        Api::RecoverVmBackup => parse::<pb::RecoverVmBackupFromImageStoreBackupStorageRequest>(request),
        Api::RestoreVmBackup => parse::<pb::RestoreVmBackupRequest>(request),
        Api::QueryVolumeBackup => parse::<pb::QueryVolumeBackupRequest>(request),
        Api::PruneVmBackup => parse::<pb::PruneVmBackupRequest>(request),
        Api::ExportVmBackup => parse::<pb::ExportVmBackupRequest>(request),
        Api::QueryVmBackupExport => parse::<pb::QueryVmBackupExportRequest>(request),
        Api::StopVmBackupExport => parse::<pb::StopVmBackupExportRequest>(request),
        Api::CreateVolumeSnapshotGroup => parse::<pb::CreateVolumeSnapshotGroupRequest>(request),
        Api::DeleteVolumeSnapshotGroup => parse::<pb::DeleteVolumeSnapshotGroupRequest>(request),
        Api::UpdateVolumeSnapshotGroup => parse::<pb::UpdateVolumeSnapshotGroupRequest>(request),
        Api::QueryVolumeSnapshotGroup => parse::<pb::QueryVolumeSnapshotGroupRequest>(request),
        Api::AddImageStoreBackupStorage => parse::<pb::AddImageStoreBackupStorageRequest>(request),
        Api::AddCephBackupStorage => parse::<pb::AddCephBackupStorageRequest>(request),
        Api::DeleteBackupStorage => parse::<pb::DeleteBackupStorageRequest>(request),
        Api::QueryBackupStorage => parse::<pb::QueryBackupStorageRequest>(request),
        Api::ReconnectBackupStorage => parse::<pb::ReconnectBackupStorageRequest>(request),
        Api::ApiJob => Ok(()),
    }
}

fn decode<T: DeserializeOwned>(v: Value) -> Result<T, Failure> {
    let e = match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    // An unknown field is named by the message already ("unknown field `x`, ..."); a
    // mistyped one is found by decoding each field alone (every proto3 field may be absent).
    let culprit = match &v {
        Value::Object(m) => m.iter().find_map(|(k, val)| {
            let alone = Value::Object(std::iter::once((k.clone(), val.clone())).collect());
            serde_json::from_value::<T>(alone).err().map(|e| format!("{k}: {e}"))
        }),
        _ => None,
    };
    Err(Failure::of(&AgentError::invalid("params", culprit.unwrap_or_else(|| e.to_string()))))
}

async fn call<Req, Rep, Fut>(request: Value, f: impl FnOnce(Request<Req>) -> Fut) -> Result<Value, Failure>
where
    Req: DeserializeOwned,
    Rep: serde::Serialize + prost::Name,
    Fut: Future<Output = Result<Response<Rep>, Status>>,
{
    let req = decode::<Req>(request)?;
    let reply = f(Request::new(req)).await.map_err(|s| Failure::from_status(&s))?;
    Ok(json::render(reply.get_ref()))
}
