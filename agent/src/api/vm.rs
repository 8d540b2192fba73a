//! VmService: the VM/volume layout the agent backs up.

use tonic::{Request, Response, Status};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_service_server::VmService;

use super::{query_params, status, timestamp};
use crate::catalog::now_millis;
use crate::catalog::vm::{VmRecord, VolumeRecord};
use crate::error::{AgentError, Result};
use crate::model::VolumeKind;
use crate::ops::Ops;
use crate::validate;
use crate::volume::VolumeFormat;

/// Most volumes one VM may have.
pub const MAX_VOLUMES: usize = 64;
/// Longest unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest install path.
const MAX_PATH: usize = 4096;

/// Validates a VM layout (RegisterVm, or the inline layout of CreateVmBackup).
pub fn parse_vm(r: &pb::RegisterVmRequest) -> Result<VmRecord> {
    let uuid = validate::uuid("uuid", &r.uuid)?;
    let name = if r.name.trim().is_empty() { uuid.clone() } else { validate::name("name", &r.name)? };
    let qmp_socket = match r.qmp_socket.as_str() {
        "" => None,
        s if !s.starts_with('/') => {
            return Err(AgentError::invalid("qmpSocket", format!("{} is not an absolute path", validate::shorten(s))));
        }
        s if s.len() > MAX_SOCKET_PATH => {
            return Err(AgentError::invalid(
                "qmpSocket",
                format!("is longer than {MAX_SOCKET_PATH} bytes, the limit of a unix socket path"),
            ));
        }
        s if s.contains('\0') => return Err(AgentError::invalid("qmpSocket", "contains a NUL byte")),
        s => Some(s.to_string()),
    };
    if r.volumes.is_empty() {
        return Err(AgentError::invalid("volumes", "a VM needs at least its root volume"));
    }
    if r.volumes.len() > MAX_VOLUMES {
        return Err(AgentError::invalid(
            "volumes",
            format!("{} volumes; at most {MAX_VOLUMES} are accepted", r.volumes.len()),
        ));
    }
    let mut volumes = Vec::with_capacity(r.volumes.len());
    for (i, v) in r.volumes.iter().enumerate() {
        let at = |what: &str| format!("volumes[{i}].{what}");
        let bad = |what: &str, msg: String| AgentError::invalid("volumes", format!("{}: {msg}", at(what)));
        let vol_uuid = validate::uuid("volumes", &v.uuid).map_err(|e| bad("uuid", e.message().to_string()))?;
        let path = v.install_path.as_str();
        if !path.starts_with('/') || path.len() > MAX_PATH || path.contains('\0') {
            return Err(bad("installPath", format!("{} is not an absolute path", validate::shorten(path))));
        }
        let format = VolumeFormat::parse(&v.format.to_ascii_lowercase()).ok_or_else(|| {
            bad("format", format!("{} is not raw or qcow2", validate::shorten(&v.format.to_ascii_lowercase())))
        })?;
        let kind = VolumeKind::parse(&v.r#type)
            .ok_or_else(|| bad("type", format!("{} is not Root or Data", validate::shorten(&v.r#type))))?;
        if v.device_id < 0 {
            return Err(bad("deviceId", format!("{} is negative", v.device_id)));
        }
        let vol_name = if v.name.trim().is_empty() {
            format!("{kind}-volume-{}", v.device_id)
        } else {
            validate::name("volumes", &v.name).map_err(|e| bad("name", e.message().to_string()))?
        };
        volumes.push(VolumeRecord {
            uuid: vol_uuid,
            name: vol_name,
            install_path: path.to_string(),
            format,
            kind,
            device_id: v.device_id,
        });
    }
    let roots = volumes.iter().filter(|v| v.kind == VolumeKind::Root).count();
    if roots != 1 {
        return Err(AgentError::invalid("volumes", format!("a VM has exactly one Root volume, not {roots}")));
    }
    volumes.sort_by_key(|v| (v.kind != VolumeKind::Root, v.device_id));
    for pair in volumes.windows(2) {
        if pair[0].device_id == pair[1].device_id {
            return Err(AgentError::invalid("volumes", format!("deviceId {} is used twice", pair[0].device_id)));
        }
    }
    let mut uuids: Vec<_> = volumes.iter().map(|v| v.uuid.as_str()).collect();
    uuids.sort_unstable();
    if let Some(w) = uuids.windows(2).find(|w| w[0] == w[1]) {
        return Err(AgentError::invalid("volumes", format!("volume uuid {} is listed twice", w[0])));
    }
    let now = now_millis();
    Ok(VmRecord { uuid, name, qmp_socket, volumes, create_date: now, last_op_date: now })
}

/// The VmInventory of a record.
pub fn inventory(vm: VmRecord) -> pb::VmInventory {
    let vm_uuid = vm.uuid.clone();
    pb::VmInventory {
        uuid: vm.uuid,
        name: vm.name,
        qmp_socket: vm.qmp_socket.unwrap_or_default(),
        volumes: vm
            .volumes
            .into_iter()
            .map(|v| pb::VolumeInventory {
                uuid: v.uuid,
                name: v.name,
                install_path: v.install_path,
                format: v.format.to_string(),
                r#type: v.kind.to_string(),
                device_id: v.device_id,
                vm_instance_uuid: vm_uuid.clone(),
            })
            .collect(),
        create_date: timestamp(vm.create_date),
        last_op_date: timestamp(vm.last_op_date),
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct VmApi {
    ops: Ops,
}

impl VmApi {
    /// The service over the edge's state.
    pub fn new(state: &super::State) -> Self {
        Self { ops: state.ops.clone() }
    }
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn register_vm(&self, request: Request<pb::RegisterVmRequest>) -> Result<Response<pb::VmReply>, Status> {
        let vm = parse_vm(request.get_ref()).map_err(|e| status(&e))?;
        let vm = self.ops.register_vm(vm).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::VmReply { inventory: Some(inventory(vm)) }))
    }

    async fn unregister_vm(
        &self,
        request: Request<pb::UnregisterVmRequest>,
    ) -> Result<Response<pb::UnregisterVmReply>, Status> {
        let uuid = validate::uuid("uuid", &request.get_ref().uuid).map_err(|e| status(&e))?;
        self.ops.unregister_vm(&uuid).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::UnregisterVmReply {}))
    }

    async fn query_vm(&self, request: Request<pb::QueryVmRequest>) -> Result<Response<pb::QueryVmReply>, Status> {
        let q = query_params!(request.get_ref());
        let r = self.ops.catalog().run(move |c| c.query_vms(&q)).await.map_err(|e| status(&e.into()))?;
        Ok(Response::new(pb::QueryVmReply { inventories: r.rows.into_iter().map(inventory).collect(), total: r.total }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn volume(uuid: &str, kind: &str, device_id: i32) -> pb::VolumeSpec {
        pb::VolumeSpec {
            uuid: uuid.into(),
            name: String::new(),
            install_path: format!("/images/{uuid}.qcow2"),
            format: "qcow2".into(),
            r#type: kind.into(),
            device_id,
        }
    }

    fn request(volumes: Vec<pb::VolumeSpec>) -> pb::RegisterVmRequest {
        pb::RegisterVmRequest { uuid: "9ff17180fded31c2b9e4e5751ebcb2ba".into(), volumes, ..Default::default() }
    }

    const R: &str = "edc07fe8d8a335ec8aa00f23b88fc1c6";
    const D: &str = "2ae6b881bb1239cd907d48993e86a2e8";

    #[test]
    fn valid_layout_is_normalised_root_first() {
        let vm = parse_vm(&request(vec![volume(D, "Data", 1), volume(R, "Root", 0)])).expect("valid");
        assert_eq!(vm.volumes[0].uuid, R);
        assert_eq!(vm.volumes[1].name, "Data-volume-1");
        assert_eq!(vm.name, vm.uuid);
    }

    #[test]
    fn each_bad_layout_names_what_is_wrong() {
        let cases: Vec<(pb::RegisterVmRequest, &str)> = vec![
            (request(vec![]), "at least its root volume"),
            (request(vec![volume(D, "Data", 1)]), "exactly one Root"),
            (request(vec![volume(R, "Root", 0), volume(D, "Root", 1)]), "exactly one Root"),
            (request(vec![volume(R, "Root", 0), volume(D, "Data", 0)]), "deviceId 0 is used twice"),
            (request(vec![volume(R, "Root", 0), volume(R, "Data", 1)]), "listed twice"),
            (request(vec![pb::VolumeSpec { format: "vmdk".into(), ..volume(R, "Root", 0) }]), "volumes[0].format"),
            (
                request(vec![pb::VolumeSpec { install_path: "rel/x".into(), ..volume(R, "Root", 0) }]),
                "volumes[0].installPath",
            ),
            (request(vec![pb::VolumeSpec { uuid: "x".into(), ..volume(R, "Root", 0) }]), "volumes[0].uuid"),
            (request(vec![pb::VolumeSpec { device_id: -1, ..volume(R, "Root", 0) }]), "negative"),
            (
                pb::RegisterVmRequest { qmp_socket: "qmp.sock".into(), ..request(vec![volume(R, "Root", 0)]) },
                "qmpSocket",
            ),
            (pb::RegisterVmRequest { uuid: String::new(), ..request(vec![volume(R, "Root", 0)]) }, "uuid: is required"),
        ];
        for (req, needle) in cases {
            let e = parse_vm(&req).expect_err(needle);
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains(needle), "{e} does not mention {needle:?}");
        }
    }
}
