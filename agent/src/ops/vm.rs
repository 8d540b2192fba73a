//! RegisterVm and UnregisterVm: the VM layouts the agent backs up; and the layout of a
//! running VM found by its volume, for callers that never register one.

use super::Ops;
use crate::catalog::now_millis;
use crate::catalog::vm::{RegisterConflict, VmRecord, VolumeRecord};
use crate::error::{AgentError, ErrorKind, Result};
use crate::model::VolumeKind;
use crate::qemu::discover;

impl Ops {
    /// Records a validated layout (replacing an earlier one of the same VM); a volume that
    /// belongs to another VM, or an install path outside the volume roots, is refused.
    pub async fn register_vm(&self, vm: VmRecord) -> Result<VmRecord> {
        self.check_install_paths("volumes", vm.volumes.iter().map(|v| (v.uuid.as_str(), v.install_path.as_str())))
            .await?;
        self.catalog()
            .run(move |catalog| -> Result<VmRecord> {
                match catalog.register_vm(&vm)? {
                    Ok(()) => {}
                    Err(RegisterConflict::VolumeOfAnotherVm { volume, vm: owner }) => {
                        return Err(AgentError::new(
                            ErrorKind::AlreadyExists,
                            format!("volume {volume} belongs to VM {owner}"),
                        )
                        .with_field("volumes"));
                    }
                }
                catalog.get_vm(&vm.uuid)?.ok_or_else(|| AgentError::new(ErrorKind::Internal, "registered VM vanished"))
            })
            .await
    }

    /// Forgets a VM layout.
    pub async fn unregister_vm(&self, uuid: &str) -> Result<()> {
        let u = uuid.to_string();
        if self.catalog().run(move |c| c.unregister_vm(&u)).await? {
            Ok(())
        } else {
            Err(AgentError::not_found("VM", uuid).with_field("uuid"))
        }
    }

    /// Finds the running VM whose disks include `root` (see [`discover`]) and registers
    /// it: `root` is its Root volume (device 0), every other disk a Data volume in QEMU's
    /// device order, and its QMP socket is recorded so the backup is live.
    pub async fn discover_vm(&self, root: &str) -> Result<VmRecord> {
        let dirs = self.live.qmp_dirs();
        let patterns = self.live.volume_path_patterns();
        let found = discover::find(&dirs, &patterns, root).await.ok_or_else(|| {
            let where_ = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
            AgentError::new(
                ErrorKind::NotFound,
                format!(
                    "volume {root} is not the Root volume of a registered VM, and no running VM whose QMP socket is under [{where_}] has it as a disk"
                ),
            )
            .with_field("rootVolumeUuid")
        })?;
        let mut volumes = Vec::with_capacity(found.disks.len());
        let mut next_data = 1;
        for d in &found.disks {
            let (kind, device_id) = if d.volume_uuid == root {
                (VolumeKind::Root, 0)
            } else {
                next_data += 1;
                (VolumeKind::Data, next_data - 1)
            };
            volumes.push(VolumeRecord {
                uuid: d.volume_uuid.clone(),
                name: format!("{kind}-volume-{device_id}"),
                install_path: d.path.clone(),
                format: d.format,
                kind,
                device_id,
            });
        }
        volumes.sort_by_key(|v| v.device_id);
        // Without a `-uuid`, the VM is named after its root volume.
        let uuid = found.uuid.clone().unwrap_or_else(|| root.to_string());
        let now = now_millis();
        let vm = VmRecord {
            name: found.name.clone().unwrap_or_else(|| format!("vm-{uuid}")),
            uuid,
            qmp_socket: Some(found.socket.display().to_string()),
            volumes,
            create_date: now,
            last_op_date: now,
        };
        tracing::info!(vm = %vm.uuid, socket = %found.socket.display(), disks = vm.volumes.len(), "registered a running VM found by its root volume");
        self.register_vm(vm).await
    }
}
