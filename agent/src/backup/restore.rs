//! Restoring volume backups to raw files: chunks are downloaded (network-read limit),
//! decoded and checked against their digest, and written at their offsets (volume-write
//! limit); zero chunks are skipped so they stay holes. A chunk that fails its check stops
//! the restore with an error naming the chunk and the volume, and nothing is left behind.

use std::sync::Arc;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::VolumeIndex;

use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::{Counters, Job};
use crate::storage::registry::Registry;
use crate::throttle::Throttle;
use crate::volume::writer::RawWriter;

/// Chunks asked for per download stream.
const DOWNLOAD_BATCH: usize = 64;

/// One volume backup to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// The volume backup.
    pub backup: VolumeBackupRecord,
    /// The raw file to create.
    pub path: std::path::PathBuf,
}

/// Restores every target from `storage_uuid`.
pub async fn run(
    registry: &Registry,
    job: &Arc<Job>,
    storage_uuid: &str,
    targets: Vec<RestoreTarget>,
    network_limit: Throttle,
    write_limit: Throttle,
) -> Result<()> {
    let storage = registry.require(storage_uuid).await?;
    let mut client = registry.connect(&storage.url).await?;
    let chunk_max = usize::try_from(client.status().await?.chunk_size).unwrap_or(usize::MAX);
    for t in targets {
        let r = t.backup.refs.iter().find(|r| r.backup_storage_uuid == storage_uuid).ok_or_else(|| {
            AgentError::invalid(
                "backupStorageUuid",
                format!("volume backup {} is not on backup storage {storage_uuid}", t.backup.uuid),
            )
        })?;
        let ix = VolumeIndex::decode(
            &client.get_index(&r.install_path).await?,
            vmbackup_store::chunk_store::MAX_INDEX_CHUNKS,
        )
        .map_err(|e| {
            AgentError::new(ErrorKind::FailedPrecondition, format!("index of volume backup {}: {e}", t.backup.uuid))
        })?;
        Counters::add(&job.counters.planned, ix.virtual_size);
        let (path, size) = (t.path.clone(), ix.virtual_size);
        let writer = Arc::new(tokio::task::spawn_blocking(move || RawWriter::create(&path, size)).await??);
        let wanted: Vec<(usize, Digest)> =
            ix.digests.iter().copied().enumerate().filter(|(_, d)| !d.is_zero_chunk()).collect();
        let zero = ix.virtual_size - wanted.iter().map(|(i, _)| ix.chunk_range(*i).1).sum::<u64>();
        Counters::add(&job.counters.zero, zero);
        for batch in wanted.chunks(DOWNLOAD_BATCH) {
            let digests: Vec<Digest> = batch.iter().map(|(_, d)| *d).collect();
            let mut stream = client.download(&digests).await?;
            for &(i, d) in batch {
                if job.cancel.is_cancelled() {
                    return Err(AgentError::new(ErrorKind::Cancelled, "the restore was cancelled"));
                }
                let chunk =
                    stream.message().await.map_err(|s| client.call_error("DownloadChunks", s))?.ok_or_else(|| {
                        AgentError::new(
                            ErrorKind::Unavailable,
                            format!("the store ended the download before chunk {d}"),
                        )
                    })?;
                network_limit.consume(chunk.blob.len()).await;
                Counters::add(&job.counters.received, u64::try_from(chunk.blob.len()).unwrap_or(0));
                let (offset, len) = ix.chunk_range(i);
                let (w, limit, volume) = (writer.clone(), write_limit.clone(), t.backup.volume_uuid.clone());
                limit.consume(usize::try_from(len).unwrap_or(usize::MAX)).await;
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let plain = blob::decode_and_verify(&chunk.blob, &d, chunk_max).map_err(|e| {
                        AgentError::new(
                            ErrorKind::FailedPrecondition,
                            format!("chunk {d} of volume {volume} is damaged on the store: {e}"),
                        )
                    })?;
                    if u64::try_from(plain.len()).ok() != Some(len) {
                        return Err(AgentError::new(
                            ErrorKind::FailedPrecondition,
                            format!("chunk {d} of volume {volume} has {} bytes, {len} expected", plain.len()),
                        ));
                    }
                    Ok(w.write_at(offset, &plain)?)
                })
                .await??;
                Counters::add(&job.counters.written, len);
            }
        }
        let writer =
            Arc::try_unwrap(writer).map_err(|_| AgentError::new(ErrorKind::Internal, "restore writer still shared"))?;
        tokio::task::spawn_blocking(move || writer.finish()).await??;
        tracing::info!(volume_backup = %t.backup.uuid, path = %t.path.display(), "volume restored");
    }
    Ok(())
}
