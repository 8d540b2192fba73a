//! RestoreVmBackup with `live`: the VM runs from its backup at once. Each volume's backup is
//! exported over NBD ([`crate::export`]); the VM's own install path becomes a qcow2 overlay
//! whose backing file is that export, so the control plane can start the VM immediately.
//! The job then waits for the VM's QMP socket to answer and pulls every chunk into the
//! overlays with QEMU's `block-stream` (guest writes stay theirs: only clusters the overlay
//! lacks are copied), retrying after a failure of the storage, until no overlay depends on
//! the backup; then the exports stop.
//!
//! While the copy runs the VM reads through the agent: an agent restart in that time leaves
//! the VM with I/O errors on what was not copied yet (the overlays keep every guest write,
//! and a second live restore is not needed: `qemu-img rebase` onto a new export, or a plain
//! restore, completes it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Ops;
use super::export::{ExportSpec, MAX_LIFETIME};
use super::restore::Restore;
use crate::backup::restore::RestoreTarget;
use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::Counters;
use crate::qemu::{live, stream};
use crate::volume::VolumeFormat;

/// How often the job looks for the VM to have started.
const POLL: Duration = Duration::from_millis(250);
/// How long it waits for the VM before giving up.
const START_WAIT: Duration = Duration::from_secs(3600);
/// Pause before a failed copy is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// One volume on its overlay.
#[derive(Debug, Clone)]
struct Overlay {
    path: PathBuf,
    export: String,
    size: u64,
}

impl Ops {
    /// The live restore of `targets` (a revert's, checked and locked by the caller).
    pub(super) async fn live_restore(
        &self,
        r: Restore,
        targets: Vec<RestoreTarget>,
        lease: super::VolumeLease,
        speed: Option<u64>,
    ) -> Result<(String, Vec<VolumeBackupRecord>)> {
        let first = targets.first().ok_or_else(|| AgentError::invalid("targets", "nothing to restore"))?;
        let v = first.backup.volume_uuid.clone();
        let mut vm = self
            .catalog()
            .run(move |c| c.vm_of_volume(&v))
            .await?
            .ok_or_else(|| AgentError::invalid("live", "the VM is not registered on this host"))?;
        let socket = vm.qmp_socket.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
            AgentError::invalid("live", format!("VM {} has no qmpSocket: a live restore copies through QEMU", vm.uuid))
        })?;
        for t in &targets {
            // An overlay is a file put in the volume's place: a block device stays a plain revert.
            if std::fs::metadata(&t.path).is_ok_and(|m| !m.is_file()) {
                return Err(AgentError::invalid(
                    "live",
                    format!(
                        "volume {} is a block device ({}): restore it without live",
                        t.backup.volume_uuid,
                        t.path.display()
                    ),
                ));
            }
        }
        let mut overlays = Vec::new();
        for t in &targets {
            let spec = ExportSpec {
                group: r.group.clone(),
                volume: t.backup.volume_uuid.clone(),
                storage: r.storage.clone(),
                name: None,
                lifetime: MAX_LIFETIME,
                listen: None,
            };
            let info = match self.export_backup(spec).await {
                Ok(i) => i,
                Err(e) => {
                    overlays.iter().for_each(|o: &Overlay| {
                        self.exports.stop(&o.export);
                    });
                    return Err(e);
                }
            };
            overlays.push(Overlay { path: t.path.clone(), export: info.uuid.clone(), size: info.size });
            if let Err(e) = make_overlay(&t.path, &info.uri(), info.size).await {
                overlays.iter().for_each(|o| {
                    self.exports.stop(&o.export);
                });
                return Err(e);
            }
        }
        // The registered layout follows: those volumes are qcow2 overlays now.
        for vol in vm.volumes.iter_mut() {
            if targets.iter().any(|t| t.backup.volume_uuid == vol.uuid) {
                vol.format = VolumeFormat::Qcow2;
            }
        }
        let vm = self.register_vm(vm).await?;
        let records: Vec<VolumeBackupRecord> = targets.iter().map(|t| t.backup.clone()).collect();
        let job = self.jobs.start("RestoreVmBackup", r.resource, Some(r.storage.clone())).await?;
        job.set_group(&r.group);
        job.set_message("live restore: the VM may start now; waiting for it to copy the rest");
        let planned: u64 = overlays.iter().map(|o| o.size).sum();
        Counters::add(&job.counters.planned, planned);
        let (jobs, j, job_uuid, exports) = (self.jobs.clone(), job.clone(), job.uuid.clone(), self.exports.clone());
        tracing::info!(job = %job_uuid, vm = %vm.uuid, volumes = overlays.len(), "live restore: overlays on the backup are in place");
        tokio::spawn(async move {
            let work = async move {
                let _lease = lease;
                let copied = copy_all(&j, Path::new(&socket), &overlays, speed).await;
                if copied.is_ok() {
                    for o in &overlays {
                        exports.stop(&o.export);
                    }
                }
                copied
            };
            let _ = jobs.run(job, work).await;
        });
        Ok((job_uuid, records))
    }
}

/// Creates `<path>` as a qcow2 overlay of `uri` (the export), atomically over what was there.
async fn make_overlay(path: &Path, uri: &str, size: u64) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.vmbackup-partial", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let size = size.to_string();
    let tmp_s = tmp.display().to_string();
    crate::tool::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", &tmp_s, &size],
        crate::tool::SHORT,
    )
    .await?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let (tmp2, path2) = (tmp.clone(), path.to_path_buf());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::File::open(&tmp2)?.sync_all()?;
        std::fs::rename(&tmp2, &path2)?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?
    .map_err(|e| AgentError::new(ErrorKind::Internal, format!("placing the overlay at {}: {e}", path.display())))
}

/// Waits for the VM, then streams every overlay, retrying after failures, until done or
/// cancelled.
async fn copy_all(job: &crate::jobs::Job, socket: &Path, overlays: &[Overlay], speed: Option<u64>) -> Result<()> {
    let waited = tokio::time::Instant::now();
    let qmp = loop {
        if job.cancel.is_cancelled() {
            return Err(AgentError::new(ErrorKind::Cancelled, "the live restore was cancelled before the VM started"));
        }
        if let Some(q) = live::connect_if_running(socket).await.ok().flatten() {
            break q;
        }
        if waited.elapsed() > START_WAIT {
            return Err(AgentError::new(
                ErrorKind::Timeout,
                format!("the VM did not start within {START_WAIT:?}; the overlays still read from the backup"),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    job.set_message("live restore: copying the backup into the running VM's disks");
    for (i, o) in overlays.iter().enumerate() {
        let path = o.path.display().to_string();
        let job_id = format!("vmbk-restore-{i}");
        loop {
            let nodes = live::block_nodes(&qmp).await?;
            let node = live::node_for(&nodes, &path).ok_or_else(|| {
                AgentError::new(ErrorKind::FailedPrecondition, format!("the running VM has no block node for {path}"))
            })?;
            let copied = tokio::select! {
                () = job.cancel.cancelled() => {
                    stream::cancel(&qmp, &job_id).await;
                    return Err(AgentError::new(ErrorKind::Cancelled, "the live restore was cancelled; the VM still reads from the backup"));
                }
                r = stream::stream(&qmp, &node, &job_id, speed) => r,
            };
            match copied {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(volume = %path, error = %e, "live restore copy failed; retrying");
                    job.set_message(format!("live restore: copy of {path} failed ({e}); retrying"));
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        Counters::add(&job.counters.written, o.size);
    }
    job.set_message("live restore: every disk is independent of the backup");
    Ok(())
}
