//! The gRPC edge of the agent: each request is parsed into validated domain values here,
//! one core operation ([`crate::ops`]) runs, and its result becomes the seeds' inventory.
//! Errors leave as a gRPC status whose details carry ZStack's ErrorCode; timestamps and job
//! progress take their wire shapes here too. The router and the state its services share
//! live here.

pub mod auth;
pub mod backup_storage;
mod files;
mod prune_export;
pub mod snapshot_group;
pub mod vm;
pub mod vm_backup;

use prost::Message;
use tonic::Status;
use vmbackup_proto::Timestamp;
use vmbackup_proto::agent::v1 as pb;

use crate::catalog::query::QueryParams;
use crate::config::AgentConfig;
use crate::error::{AgentError, ErrorKind, ErrorReport};
use crate::jobs::Progress;
use crate::ops::Ops;

/// What every service of the edge shares.
#[derive(Debug, Clone)]
pub struct State {
    /// Effective configuration.
    pub config: std::sync::Arc<AgentConfig>,
    /// Accepted sessions.
    pub sessions: auth::Sessions,
    /// The core.
    pub ops: Ops,
}

/// The gRPC health service's name, as reflection lists it.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The gRPC reflection service's name, as reflection lists it.
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// `type_url` of the ErrorCode carried in status details.
pub const ERROR_CODE_TYPE_URL: &str = "type.googleapis.com/vmbackup.agent.v1.ErrorCode";

/// Converts an agent error into a gRPC status with ZStack's ErrorCode in its details (a
/// `google.rpc.Status` holding the ErrorCode as an `Any`).
pub fn status(e: &AgentError) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorKind::Unimplemented => tonic::Code::Unimplemented,
        ErrorKind::Timeout => tonic::Code::DeadlineExceeded,
        ErrorKind::Cancelled => tonic::Code::Cancelled,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    let error_code = error_code(e);
    let message = match &error_code.cause {
        Some(cause) => format!("{}: {}", e, cause.details),
        None => e.to_string(),
    };
    let rpc_status = tonic_types::pb::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: ERROR_CODE_TYPE_URL.to_string(),
            value: error_code.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, rpc_status.encode_to_vec().into())
}

/// ZStack's ErrorCode for an error; the chain of sources becomes `cause`.
pub fn error_code(e: &AgentError) -> pb::ErrorCode {
    render_error(e.report())
}

/// The wire form of an [`ErrorReport`].
pub fn render_error(r: ErrorReport) -> pb::ErrorCode {
    pb::ErrorCode {
        code: r.code,
        description: r.description,
        details: r.details,
        elaboration: r.elaboration,
        opaque: r.opaque.into_iter().collect(),
        cause: r.cause.map(|c| Box::new(render_error(*c))),
    }
}

/// The wire form of a job's [`Progress`].
pub fn job_progress(p: Progress) -> pb::JobProgress {
    pb::JobProgress {
        job_uuid: p.job_uuid,
        kind: p.kind,
        state: p.state.to_string(),
        bytes_planned: p.bytes_planned,
        bytes_read: p.bytes_read,
        bytes_zero: p.bytes_zero,
        bytes_deduplicated: p.bytes_deduplicated,
        bytes_sent: p.bytes_sent,
        bytes_received: p.bytes_received,
        bytes_written: p.bytes_written,
        rate: p.rate,
        eta_seconds: p.eta_seconds,
        message: p.message,
        error: p.error.map(render_error),
        started: timestamp(p.started),
        finished: p.finished.and_then(timestamp),
    }
}

/// The ErrorCode in a status returned by the agent, if it carries one.
pub fn error_code_of(status: &Status) -> Option<pb::ErrorCode> {
    let rpc = tonic_types::pb::Status::decode(status.details()).ok()?;
    rpc.details
        .iter()
        .find(|a| a.type_url == ERROR_CODE_TYPE_URL)
        .and_then(|a| pb::ErrorCode::decode(a.value.as_slice()).ok())
}

/// Unix milliseconds -> protobuf Timestamp.
pub fn timestamp(millis: i64) -> Option<Timestamp> {
    let nanos = i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0);
    Some(Timestamp { seconds: millis.div_euclid(1000), nanos })
}

/// Query requests share ZStack's query shape; this lifts it out of each message.
macro_rules! query_params {
    ($req:expr) => {
        $crate::catalog::query::QueryParams {
            conditions: $req.conditions.clone(),
            limit: $req.limit,
            start: $req.start,
            count: $req.count,
            sort_by: $req.sort_by.clone(),
            sort_direction: $req.sort_direction.clone(),
            reply_with_count: $req.reply_with_count,
        }
    };
}
pub(crate) use query_params;

/// Keeps the compiler honest that the macro's output type is what the catalog takes.
#[allow(dead_code)]
fn _query_params_type(r: &pb::QueryBackupStorageRequest) -> QueryParams {
    query_params!(r)
}

/// Builds the router of every agent service: health and reflection open, the rest behind
/// the session check.
pub fn router(
    state: &State,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::server::Router, tonic::transport::Error> {
    use tonic::service::interceptor::InterceptedService;
    use vmbackup_proto::agent::v1::backup_storage_service_server::BackupStorageServiceServer;
    use vmbackup_proto::agent::v1::vm_backup_service_server::VmBackupServiceServer;
    use vmbackup_proto::agent::v1::vm_service_server::VmServiceServer;
    use vmbackup_proto::agent::v1::volume_snapshot_group_service_server::VolumeSnapshotGroupServiceServer;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Serving status of the whole server ("") is what probes ask for.
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    });
    // Reflection lists what this server serves, not every service of the shared descriptors
    // (the store's API is compiled into the same set).
    use tonic::server::NamedService;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmbackup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(<BackupStorageServiceServer<backup_storage::BackupStorageApi> as NamedService>::NAME)
        .with_service_name(<VmBackupServiceServer<vm_backup::VmBackupApi> as NamedService>::NAME)
        .with_service_name(<VmServiceServer<vm::VmApi> as NamedService>::NAME)
        .with_service_name(<VolumeSnapshotGroupServiceServer<snapshot_group::SnapshotGroupApi> as NamedService>::NAME)
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE)
        .build_v1()
        .inspect_err(|e| tracing::error!(error = %e, "gRPC reflection is unavailable"))
        .ok();
    let sessions = state.sessions.clone();
    let auth = move |r| sessions.check(r);
    // Every log line of a call carries its method and a request id (the caller's
    // x-request-id, or a fresh one).
    let mut builder = tonic::transport::Server::builder().trace_fn(|r| {
        let id = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::validate::shorten(v).to_string())
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string());
        tracing::info_span!("rpc", method = %r.uri().path(), request = %id)
    });
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(InterceptedService::new(
            BackupStorageServiceServer::new(backup_storage::BackupStorageApi::new(state)),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            VmBackupServiceServer::new(vm_backup::VmBackupApi::new(state)),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(VmServiceServer::new(vm::VmApi::new(state)), auth.clone()))
        .add_service(InterceptedService::new(
            VolumeSnapshotGroupServiceServer::new(snapshot_group::SnapshotGroupApi::new(state)),
            auth,
        )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_the_zstack_error_code_and_field() {
        let e = AgentError::invalid("name", "is required");
        let s = status(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let ec = error_code_of(&s).expect("error code in details");
        assert_eq!(ec.code, "SYS.1007");
        assert_eq!(ec.details, "name: is required");
        assert_eq!(ec.opaque.get("field").map(String::as_str), Some("name"));
    }

    #[test]
    fn timestamps_handle_negative_and_fractional_millis() {
        assert_eq!(timestamp(1500), Some(Timestamp { seconds: 1, nanos: 500_000_000 }));
        assert_eq!(timestamp(-1), Some(Timestamp { seconds: -1, nanos: 999_000_000 }));
    }
}
