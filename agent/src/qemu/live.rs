//! Live backup of a running VM: one QMP `transaction` of `blockdev-snapshot-sync` freezes
//! every disk at the same instant under a new qcow2 overlay (the guest writes go to the
//! overlays from then on, and the VM never pauses); the backup reads the frozen images like
//! offline files; then each overlay is `block-commit`ted back into its image (an active
//! commit: READY, then `block-job-complete`) and deleted, so the chain is as before.
//!
//! If QEMU goes away before the merge, the overlay still holds the guest's latest writes:
//! it is merged offline (`qemu-img commit`) and deleted, so the image the VM is defined on
//! is complete again and nothing is left behind.
//!
//! A node that nothing uses (no device, no export, no parent node: a disk a
//! `qemu-storage-daemon` opened but serves to nobody) cannot take an overlay: QEMU makes
//! the file, finds no parent to put the overlay under, and drops the new node at once. No
//! guest writes to such a disk, so it is read as it is: the unused overlay file is removed
//! right after the snapshot and nothing is merged back for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::qmp::{Qmp, QmpError};
use crate::catalog::vm::VolumeRecord;
use crate::error::{AgentError, ErrorKind, Result};

/// How long a QMP command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long merging one overlay back may take.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

impl From<QmpError> for AgentError {
    fn from(e: QmpError) -> Self {
        let kind = match &e {
            QmpError::Command { .. } => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Unavailable,
        };
        AgentError::new(kind, e.to_string())
    }
}

/// Guest byte ranges `(offset, length)`.
pub type Ranges = Vec<(u64, u64)>;

/// One frozen disk.
#[derive(Debug)]
struct Frozen {
    volume_uuid: String,
    base_node: String,
    overlay_node: String,
    overlay: PathBuf,
    /// Whether the overlay took (the base node had a user); false: nothing to merge.
    attached: bool,
}

/// The overlays of one live backup, until [`LiveSnapshot::release`].
#[derive(Debug)]
pub struct LiveSnapshot {
    qmp: Arc<Qmp>,
    frozen: Vec<Frozen>,
    merge_speed: Option<u64>,
}

/// [`connect_if_running`] for a VM that may have no QMP socket registered.
pub async fn connect_if_running_opt(socket: Option<&str>) -> Result<Option<Arc<Qmp>>> {
    match socket {
        Some(s) if !s.is_empty() => connect_if_running(Path::new(s)).await,
        _ => Ok(None),
    }
}

/// The QMP session of a running VM, or None when nothing listens on `socket` (the VM is
/// stopped, and its files are read directly).
pub async fn connect_if_running(socket: &Path) -> Result<Option<Arc<Qmp>>> {
    match Qmp::connect(socket, COMMAND_TIMEOUT).await {
        Ok(q) => Ok(Some(q)),
        Err(QmpError::Io(_, e))
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The node QEMU uses for `path`: the format node (not the protocol node) whose image is
/// that file.
pub(crate) fn node_for(nodes: &[Value], path: &str) -> Option<String> {
    nodes
        .iter()
        .filter(|n| n["image"]["filename"].as_str() == Some(path))
        .filter(|n| !matches!(n["drv"].as_str(), Some("file" | "host_device" | "host_cdrom")))
        .find_map(|n| n["node-name"].as_str().map(str::to_string))
}

impl LiveSnapshot {
    /// Freezes every volume of the VM behind `qmp` in one transaction; `tag` names the
    /// overlays (`<image>.vmbackup-<tag>`) and their nodes.
    pub async fn take(qmp: Arc<Qmp>, volumes: &[VolumeRecord], tag: &str, bitmap: Option<&str>) -> Result<Self> {
        merge_leftovers(&qmp, volumes).await?;
        let nodes = block_nodes(&qmp).await?;
        let mut frozen = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            let base_node = node_for(&nodes, &v.install_path).ok_or_else(|| {
                AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("the running VM has no block node for volume {} ({})", v.uuid, v.install_path),
                )
            })?;
            let meta = std::fs::metadata(&v.install_path)
                .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("{}: {e}", v.install_path)))?;
            if !meta.is_file() {
                return Err(AgentError::new(
                    ErrorKind::Unimplemented,
                    format!("live backup of block-device volume {} is not supported yet", v.uuid),
                ));
            }
            let overlay = PathBuf::from(format!("{}.vmbackup-{tag}", v.install_path));
            if overlay.is_file() {
                return Err(AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "{} already exists (left by an earlier run?); remove it to back up live",
                        overlay.display()
                    ),
                ));
            }
            frozen.push(Frozen {
                volume_uuid: v.uuid.clone(),
                base_node,
                overlay_node: format!("vmbk-{tag}-{i}"),
                overlay,
                attached: true,
            });
        }
        let plan: Vec<(&str, &Path, &str)> =
            frozen.iter().map(|f| (f.base_node.as_str(), f.overlay.as_path(), f.overlay_node.as_str())).collect();
        // Persistent bitmaps live in qcow2 images; a raw image's bitmap lasts while QEMU
        // runs (after a restart it is gone, and the next backup reads that disk in full).
        let qcow2 = |node: &str| {
            nodes.iter().any(|n| n["node-name"].as_str() == Some(node) && n["drv"].as_str() == Some("qcow2"))
        };
        // A bitmap of this name is an interrupted attempt's at the same group: it marks
        // writes since that attempt's snapshot, not this one's, so it goes.
        if let Some(b) = bitmap {
            for f in &frozen {
                let has = nodes.iter().any(|n| {
                    n["node-name"].as_str() == Some(f.base_node.as_str())
                        && n["dirty-bitmaps"]
                            .as_array()
                            .is_some_and(|bs| bs.iter().any(|x| x["name"].as_str() == Some(b)))
                });
                if has {
                    tracing::warn!(bitmap = b, node = %f.base_node, "removing the bitmap an interrupted attempt left");
                    qmp.execute("block-dirty-bitmap-remove", json!({ "node": f.base_node, "name": b })).await?;
                }
            }
        }
        let bitmaps: Vec<(&str, &str, bool)> = match bitmap {
            Some(b) => frozen.iter().map(|f| (f.base_node.as_str(), b, qcow2(&f.base_node))).collect(),
            None => Vec::new(),
        };
        if let Err(e) = snapshot_live_with_bitmaps(&qmp, &plan, &bitmaps).await {
            // QEMU rolled the transaction back; files it made for it are ours to remove.
            for f in &frozen {
                if f.overlay.is_file() {
                    let _ = std::fs::remove_file(&f.overlay);
                }
            }
            return Err(e);
        }
        detach_unused(&qmp, &mut frozen).await;
        tracing::info!(disks = frozen.len(), "live snapshot taken; guest writes go to the overlays");
        Ok(Self { qmp, frozen, merge_speed: None })
    }

    /// Limits the merge back of each overlay to `bytes_per_second` (`block-commit`'s
    /// `speed`): the guest's disk is written at no more than that while it runs.
    pub fn limit_merge(&mut self, bytes_per_second: Option<u64>) {
        self.merge_speed = bytes_per_second;
    }

    /// Merges every overlay back and deletes it; offline with `qemu-img commit` when QEMU
    /// has gone away. Returns the first error, after trying every disk.
    pub async fn release(self) -> Result<()> {
        self.release_keeping(None).await
    }

    /// [`LiveSnapshot::release`], then keeps only the dirty bitmap `keep` among vmbackup's
    /// own (`vmbackup-*`) on each disk: after a committed backup its new bitmap, after a
    /// failed one the previous backup's (`keep` names it, and the new one goes).
    pub async fn release_keeping(self, keep: Option<&str>) -> Result<()> {
        let result = self.merge_all().await;
        if let Some(keep) = keep
            && let Ok(nodes) = block_nodes(&self.qmp).await
        {
            for f in &self.frozen {
                let Some(node) = nodes.iter().find(|n| n["node-name"].as_str() == Some(f.base_node.as_str())) else {
                    continue;
                };
                for b in node["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
                    let Some(name) = b["name"].as_str() else { continue };
                    if name.starts_with("vmbackup-") && name != keep {
                        let args = json!({ "node": f.base_node, "name": name });
                        if let Err(e) = self.qmp.execute("block-dirty-bitmap-remove", args).await {
                            tracing::warn!(bitmap = name, error = %e, "removing an old dirty bitmap failed");
                        }
                    }
                }
            }
        }
        result
    }

    /// For each frozen disk, the guest ranges written between the backup whose bitmap is
    /// `bitmap` and this snapshot, read through a temporary NBD export of the frozen image
    /// (`qemu:dirty-bitmap:` meta context). None for a disk without a usable bitmap of that
    /// name (then it is read in full).
    pub async fn dirty_since(&self, bitmap: &str, socket: &Path) -> Result<Vec<(String, Option<Ranges>)>> {
        let nodes = block_nodes(&self.qmp).await?;
        let usable = |node: &str| {
            nodes.iter().filter(|n| n["node-name"].as_str() == Some(node)).any(|n| {
                n["dirty-bitmaps"].as_array().is_some_and(|bs| {
                    bs.iter().any(|b| b["name"].as_str() == Some(bitmap) && b["inconsistent"].as_bool() != Some(true))
                })
            })
        };
        let mut out: Vec<(String, Option<Ranges>)> =
            self.frozen.iter().map(|f| (f.volume_uuid.clone(), None)).collect();
        if !self.frozen.iter().any(|f| usable(&f.base_node)) {
            return Ok(out);
        }
        let _ = std::fs::remove_file(socket);
        let server = json!({ "addr": { "type": "unix", "data": { "path": socket.display().to_string() } } });
        if let Err(e) = self.qmp.execute("nbd-server-start", server).await {
            tracing::warn!(error = %e, "cannot start QEMU's NBD server to read dirty bitmaps; reading in full");
            return Ok(out);
        }
        for (i, f) in self.frozen.iter().enumerate() {
            if !usable(&f.base_node) {
                continue;
            }
            let (id, name) = (format!("{}-x{i}", f.overlay_node), format!("{}-x{i}", f.overlay_node));
            let export = json!({ "type": "nbd", "id": id, "node-name": f.base_node, "name": name,
                                 "writable": false, "bitmaps": [bitmap] });
            let ranges = async {
                self.qmp.execute("block-export-add", export).await?;
                let context = format!("qemu:dirty-bitmap:{bitmap}");
                let r = async {
                    let mut c = super::nbd::NbdClient::connect(socket, &name, &[context.as_str()]).await?;
                    let r = c.ranges_with(&context, 1).await;
                    c.close().await;
                    r
                }
                .await
                .map_err(|e| AgentError::new(ErrorKind::Unavailable, e.to_string()));
                let _ = self.qmp.execute("block-export-del", json!({ "id": id })).await;
                r
            }
            .await;
            match ranges {
                Ok(r) => out[i].1 = Some(r),
                Err(e) => {
                    tracing::warn!(volume = %f.volume_uuid, error = %e, "dirty bitmap unreadable; reading in full")
                }
            }
        }
        let _ = self.qmp.execute("nbd-server-stop", Value::Null).await;
        let _ = std::fs::remove_file(socket);
        Ok(out)
    }

    async fn merge_all(&self) -> Result<()> {
        let mut first = None;
        for (i, f) in self.frozen.iter().enumerate().filter(|(_, f)| f.attached) {
            let merged = match commit_live(&self.qmp, f, i, self.merge_speed).await {
                Ok(()) => Ok(()),
                Err(_) if !qemu_alive(&self.qmp).await => commit_offline(f).await,
                Err(e) => Err(e),
            };
            match merged {
                Ok(()) => {
                    if let Err(e) = std::fs::remove_file(&f.overlay) {
                        tracing::warn!(overlay = %f.overlay.display(), error = %e, "removing the merged overlay failed");
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %f.volume_uuid, overlay = %f.overlay.display(), error = %e,
                        "merging the overlay back failed; the VM keeps running on it");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Merges back the overlays an earlier agent process left on this VM's disks (it was killed
/// during a live backup, before or while merging back): every `vmbk-*` node whose image is
/// `<volume>.vmbackup-*` over one of `volumes`. A merge job it left half done is finished
/// (READY: completed) or cancelled and run again. Returns how many overlays were merged.
async fn merge_leftovers(qmp: &Qmp, volumes: &[VolumeRecord]) -> Result<usize> {
    let jobs = qmp.execute("query-block-jobs", Value::Null).await?;
    for j in jobs.as_array().cloned().unwrap_or_default() {
        let Some(id) = j["device"].as_str().filter(|id| id.starts_with("vmbk-")) else { continue };
        let mut events = qmp.events();
        let (command, wanted) = if j["ready"].as_bool() == Some(true) {
            ("block-job-complete", "BLOCK_JOB_COMPLETED")
        } else {
            ("block-job-cancel", "BLOCK_JOB_CANCELLED")
        };
        tracing::warn!(job = id, command, "a merge an earlier agent process left");
        qmp.execute(command, json!({ "device": id })).await?;
        qmp.wait_event(&mut events, COMMIT_TIMEOUT, "an earlier merge to end", |e| {
            e.data["device"].as_str() == Some(id) && (e.name == wanted || e.name == "BLOCK_JOB_COMPLETED")
        })
        .await?;
    }
    let nodes = block_nodes(qmp).await?;
    let mut merged = 0;
    for v in volumes {
        let prefix = format!("{}.vmbackup-", v.install_path);
        let leftovers: Vec<(String, String)> = nodes
            .iter()
            .filter_map(|n| {
                let name = n["node-name"].as_str()?;
                let file = n["image"]["filename"].as_str()?;
                (name.starts_with("vmbk-") && file.starts_with(&prefix) && n["drv"].as_str() == Some("qcow2"))
                    .then(|| (name.to_string(), file.to_string()))
            })
            .collect();
        for (node, file) in leftovers {
            let Some(base) = node_for(&nodes, &v.install_path) else { continue };
            tracing::warn!(volume = %v.uuid, overlay = %file, "the VM runs on an overlay an interrupted live backup left: merging it back");
            merge_live(qmp, &node, &base, &format!("{node}-leftover"), None).await?;
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!(overlay = %file, error = %e, "removing the merged leftover overlay failed");
            }
            merged += 1;
        }
    }
    Ok(merged)
}

/// Marks the disks whose overlay node QEMU dropped (their base node has no user) and
/// removes their unused overlay files. If the graph cannot be read, every overlay is
/// assumed attached (and merged as usual).
async fn detach_unused(qmp: &Qmp, frozen: &mut [Frozen]) {
    let nodes = match block_nodes(qmp).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list block nodes after the snapshot; assuming every overlay took");
            return;
        }
    };
    for f in frozen.iter_mut() {
        if nodes.iter().any(|n| n["node-name"].as_str() == Some(f.overlay_node.as_str())) {
            continue;
        }
        f.attached = false;
        tracing::info!(volume = %f.volume_uuid, node = %f.base_node,
            "the disk's node has no user (no device or export): no guest writes it, so it is read as it is");
        if let Err(e) = std::fs::remove_file(&f.overlay)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(overlay = %f.overlay.display(), error = %e, "removing the unused overlay failed");
        }
    }
}

/// Freezes every `(node, overlay file, overlay node name)` at one instant: a single QMP
/// `transaction` of `blockdev-snapshot-sync` (all or nothing).
pub async fn snapshot_live(qmp: &Qmp, plan: &[(&str, &Path, &str)]) -> Result<()> {
    snapshot_live_with_bitmaps(qmp, plan, &[]).await
}

/// [`snapshot_live`], adding in the same transaction a dirty bitmap (64 KiB granularity,
/// persistent or not) to each `(node, name, persistent)`: it records every write after the
/// snapshot instant, including the overlay's when it is merged back.
pub async fn snapshot_live_with_bitmaps(
    qmp: &Qmp,
    plan: &[(&str, &Path, &str)],
    bitmaps: &[(&str, &str, bool)],
) -> Result<()> {
    let mut actions: Vec<Value> = plan
        .iter()
        .map(|(node, overlay, overlay_node)| {
            json!({ "type": "blockdev-snapshot-sync", "data": {
                "node-name": node,
                "snapshot-file": overlay.display().to_string(),
                "snapshot-node-name": overlay_node,
                "format": "qcow2",
            }})
        })
        .collect();
    for (node, name, persistent) in bitmaps {
        actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": name, "persistent": persistent, "granularity": 65536,
        }}));
    }
    qmp.execute("transaction", json!({ "actions": actions })).await?;
    Ok(())
}

/// The node names of a running VM's block graph.
pub async fn block_nodes(qmp: &Qmp) -> Result<Vec<Value>> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true })).await?;
    Ok(nodes.as_array().cloned().unwrap_or_default())
}

async fn qemu_alive(qmp: &Qmp) -> bool {
    qmp.execute("query-version", Value::Null).await.is_ok()
}

async fn commit_live(qmp: &Qmp, f: &Frozen, i: usize, speed: Option<u64>) -> Result<()> {
    merge_live(qmp, &f.overlay_node, &f.base_node, &format!("{}-commit{i}", f.overlay_node), speed).await
}

/// Merges the active overlay `top` into `base` on a running QEMU (an active
/// `block-commit`: READY, then `block-job-complete`); `job_id` names the block job, and
/// `speed` (bytes per second) limits how fast it writes `base`.
pub async fn merge_live(qmp: &Qmp, top: &str, base: &str, job_id: &str, speed: Option<u64>) -> Result<()> {
    let mut events = qmp.events();
    let mut args = json!({ "job-id": job_id, "device": top, "top-node": top, "base-node": base });
    if let Some(speed) = speed {
        args["speed"] = json!(speed);
    }
    qmp.execute("block-commit", args).await?;
    let is_job = |e: &super::qmp::Event| e.data["device"].as_str() == Some(job_id);
    let ev = qmp
        .wait_event(&mut events, COMMIT_TIMEOUT, "the overlay merge", |e| {
            is_job(e) && matches!(e.name.as_str(), "BLOCK_JOB_READY" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR")
        })
        .await?;
    if ev.name != "BLOCK_JOB_READY" {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("merge of {job_id}: {} {}", ev.name, ev.data),
        ));
    }
    qmp.execute("block-job-complete", json!({ "device": job_id })).await?;
    let ev = qmp
        .wait_event(&mut events, COMMIT_TIMEOUT, "the overlay merge", |e| {
            is_job(e) && matches!(e.name.as_str(), "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR")
        })
        .await?;
    if ev.name != "BLOCK_JOB_COMPLETED" || ev.data.get("error").is_some() {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("merge of {job_id}: {} {}", ev.name, ev.data),
        ));
    }
    Ok(())
}

async fn commit_offline(f: &Frozen) -> Result<()> {
    tracing::warn!(overlay = %f.overlay.display(), "QEMU went away: merging the overlay offline");
    merge_offline(&f.overlay).await
}

/// Merges the qcow2 `overlay` into its backing file with `qemu-img commit` (no QEMU runs
/// on it).
pub async fn merge_offline(overlay: &Path) -> Result<()> {
    let path = overlay.display().to_string();
    crate::tool::run("qemu-img", &["commit", "-q", "-f", "qcow2", &path], crate::tool::LONG).await?;
    Ok(())
}
