//! Recover: copy a backup group from one Image Storage to another, sending only the chunks
//! the destination lacks. The indexes and manifest are copied as they are (same uuids), so
//! the group appears on the destination, atomically, only when it is complete there.

use std::sync::Arc;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::VolumeIndex;
use vmbackup_proto::manifest::GroupManifest;

use crate::catalog::now_millis;
use crate::catalog::volume_backup::StorageRef;
use crate::error::{AgentError, ErrorKind, Result, blocking};
use crate::jobs::{Counters, Job};
use crate::storage::registry::Registry;
use crate::throttle::Throttle;

/// Digests per MissingChunks call and per download stream.
const BATCH: usize = 256;
/// Verified chunks waiting for the destination's upload stream.
const UPLOAD_AHEAD: usize = 4;

/// Copies `group_uuid` from `src` to `dst` and records the new storage refs.
pub async fn run(
    registry: &Registry,
    job: &Arc<Job>,
    group_uuid: &str,
    src: &str,
    dst: &str,
    network: Throttle,
) -> Result<()> {
    let (src_rec, dst_rec) = (registry.require(src).await?, registry.require(dst).await?);
    let mut from = registry.connect(&src_rec.url).await?;
    let mut to = registry.connect(&dst_rec.url).await?;
    let (src_status, dst_status) = (from.status().await?, to.status().await?);
    if src_status.chunk_size != dst_status.chunk_size {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "the stores use different chunk sizes ({} and {}); recover needs equal ones",
                src_status.chunk_size, dst_status.chunk_size
            ),
        ));
    }
    let max = usize::try_from(src_status.chunk_size).unwrap_or(usize::MAX);
    let info = from.get_group(group_uuid).await?;
    let manifest = GroupManifest::decode(&info.manifest).map_err(|e| {
        AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("manifest of group {group_uuid} on {}: {e}", src_rec.url),
        )
    })?;
    let session = to.open_session(&format!("vmbackup-agent recover {group_uuid}")).await?;
    for v in &manifest.volumes {
        let index_bytes = from.get_index(&v.index_name).await?;
        let ix = VolumeIndex::decode(&index_bytes, vmbackup_proto::index::MAX_CHUNKS)
            .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("index {}: {e}", v.index_name)))?;
        Counters::add(&job.counters.planned, ix.virtual_size);
        let mut unique: Vec<Digest> = ix.referenced().copied().collect();
        unique.sort_unstable();
        unique.dedup();
        for batch in unique.chunks(BATCH) {
            let missing = to.missing(&session, batch).await?;
            Counters::add(
                &job.counters.deduplicated,
                u64::try_from(batch.len() - missing.len()).unwrap_or(0) * u64::from(src_status.chunk_size),
            );
            if missing.is_empty() {
                continue;
            }
            // Downloaded, verified and uploaded as a stream: at most a few chunks are in
            // memory at once, whatever the batch size.
            let mut stream = from.download(&missing).await?;
            let (tx, rx) = tokio::sync::mpsc::channel::<(Digest, bytes::Bytes)>(UPLOAD_AHEAD);
            let (mut up, sid) = (to.clone(), session.id.clone());
            let uploader =
                tokio::spawn(async move { up.upload(&sid, tokio_stream::wrappers::ReceiverStream::new(rx)).await });
            let mut sent = 0usize;
            while let Some(c) = stream.message().await.map_err(|s| from.call_error("DownloadChunks", s))? {
                let d = Digest::from_slice(&c.digest)
                    .map_err(|e| AgentError::new(ErrorKind::Unavailable, e.to_string()))?;
                network.consume(c.blob.len()).await;
                Counters::add(&job.counters.received, u64::try_from(c.blob.len()).unwrap_or(0));
                let b = c.blob;
                let checked =
                    tokio::task::spawn_blocking(move || blob::decode_and_verify(&b, &d, max).map(|_| b)).await?;
                let b = checked.map_err(|e| {
                    AgentError::new(
                        ErrorKind::FailedPrecondition,
                        format!("chunk {d} of volume {} is damaged on {}: {e}", v.volume_uuid, src_rec.url),
                    )
                })?;
                Counters::add(&job.counters.sent, u64::try_from(b.len()).unwrap_or(0));
                if tx.send((d, b)).await.is_err() {
                    break; // the upload ended early; its error is reported below
                }
                sent += 1;
            }
            drop(tx);
            uploader.await??;
            if sent != missing.len() {
                return Err(AgentError::new(
                    ErrorKind::Unavailable,
                    format!("{} sent {sent} of {} chunks", src_rec.url, missing.len()),
                ));
            }
        }
        to.put_index(&session, &v.index_name, index_bytes).await?;
        Counters::add(&job.counters.read, ix.virtual_size);
    }
    to.commit(&session, info.manifest.clone()).await?;
    let _ = to.close_session(session).await;

    let now = now_millis();
    let (c, g, d) = (registry.catalog().clone(), group_uuid.to_string(), dst.to_string());
    let names: Vec<(String, String)> =
        manifest.volumes.iter().map(|v| (v.volume_backup_uuid.clone(), v.index_name.clone())).collect();
    blocking(move || {
        let mut records = c.group_volume_backups(&g)?;
        for r in &mut records {
            if let Some((_, index)) = names.iter().find(|(u, _)| *u == r.uuid)
                && !r.refs.iter().any(|s| s.backup_storage_uuid == d)
            {
                r.refs.push(StorageRef {
                    backup_storage_uuid: d.clone(),
                    install_path: index.clone(),
                    status: "Ready".into(),
                    create_date: now,
                    last_op_date: now,
                });
            }
        }
        Ok(c.insert_volume_backups(&records)?)
    })
    .await?;
    tracing::info!(group = %group_uuid, from = %src, to = %dst, "backup group recovered");
    Ok(())
}
