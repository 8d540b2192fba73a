//! Pulling a disk's backing data into its top image on a running QEMU (`block-stream`):
//! what a live restore does once the VM runs on an overlay of the backup's NBD export.
//! Guest writes go to the top image throughout and are never overwritten: the stream copies
//! only clusters the top does not have. On completion QEMU drops the backing link.

use std::time::Duration;

use serde_json::json;

use super::qmp::Qmp;
use crate::error::{AgentError, ErrorKind, Result};

/// How long one stream may take before it is given up (a week: the exports' longest life).
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// Streams the backing data of `node` into it; `speed` limits bytes per second. Returns
/// when QEMU reports the job completed, or its error.
pub async fn stream(qmp: &Qmp, node: &str, job_id: &str, speed: Option<u64>) -> Result<()> {
    let mut events = qmp.events();
    let mut args = json!({ "job-id": job_id, "device": node });
    if let Some(s) = speed {
        args["speed"] = json!(s);
    }
    qmp.execute("block-stream", args).await?;
    let ev = qmp
        .wait_event(&mut events, STREAM_TIMEOUT, "the live restore's copy", |e| {
            e.data["device"].as_str() == Some(job_id)
                && matches!(e.name.as_str(), "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
        })
        .await?;
    match (ev.name.as_str(), ev.data.get("error")) {
        ("BLOCK_JOB_COMPLETED", None) => Ok(()),
        (name, error) => Err(AgentError::new(
            ErrorKind::Unavailable,
            format!("copy of {node}: {name} {}", error.map(ToString::to_string).unwrap_or_default()),
        )),
    }
}

/// Cancels block job `job_id` (a cancelled live restore); errors are ignored: the job may
/// have ended on its own.
pub async fn cancel(qmp: &Qmp, job_id: &str) {
    let _ = qmp.execute("block-job-cancel", json!({ "device": job_id })).await;
}
