//! RegisterVm and UnregisterVm: the VM layouts the agent backs up.

use super::Ops;
use crate::catalog::vm::{RegisterConflict, VmRecord};
use crate::error::{AgentError, ErrorKind, Result};

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
}
