//! Recover: copy a backup group from one Image Storage to another, sending only the chunks
//! the destination lacks. The indexes and manifest are copied as they are (same uuids), so
//! the group appears on the destination, atomically, only when it is complete there.
//! Chunks and manifests are copied as stored, so between encrypted storages both must use
//! the same key (sealed bytes stay sealed; nothing is decrypted on the way but to check).

use std::sync::Arc;

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::VolumeIndex;
use vmbackup_proto::manifest::GroupManifest;

use futures::StreamExt;

use crate::catalog::now_millis;
use crate::catalog::volume_backup::StorageRef;
use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::{Counters, Job};
use crate::model::BackupStatus;
use crate::storage::metered::Metered;
use crate::storage::registry::Registry;
use crate::storage::{ChunkReader, ChunkWriter, Session};
use crate::throttle::Throttle;

/// Digests per MissingChunks call and per download stream.
const BATCH: usize = 256;

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
    let (src_key, dst_key) = (registry.chunk_key(&src_rec).await?, registry.chunk_key(&dst_rec).await?);
    if src_key.as_ref().map(|k| k.id()) != dst_key.as_ref().map(|k| k.id()) {
        let name = |k: &Option<Arc<vmbackup_proto::seal::ChunkKey>>| match k {
            Some(k) => format!("sealed with key {}", k.id()),
            None => "not encrypted".to_string(),
        };
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "backup storage {src} is {} and {dst} is {}: recover copies backups as stored, so both need the same key",
                name(&src_key),
                name(&dst_key)
            ),
        ));
    }
    let (from, src_status) = registry.open_store(&src_rec, None).await?;
    let (to, dst_status) = registry.open_store(&dst_rec, None).await?;
    if src_status.chunk_size != dst_status.chunk_size {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "the stores use different chunk sizes ({} and {}); recover needs equal ones",
                src_status.chunk_size, dst_status.chunk_size
            ),
        ));
    }
    let info = from.get_group(group_uuid).await?;
    let manifest = GroupManifest::decode(&info.manifest).map_err(|e| {
        AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("manifest of group {group_uuid} on {}: {e}", src_rec.url),
        )
    })?;
    // A recover reads one store and writes another: the limit applies once per chunk.
    let received = job.counters.count_into(|c| &c.received);
    let reader: Arc<dyn ChunkReader> = Arc::new(Metered::new(from.clone() as Arc<dyn ChunkReader>, network, received));
    let copy = ChunkCopy {
        reader,
        job: job.clone(),
        chunk_size: src_status.chunk_size,
        source: src_rec.url.clone(),
        key: src_key,
    };
    let session = Session::open(to, &format!("vmbackup-agent recover {group_uuid}")).await?;
    for v in &manifest.volumes {
        let index_bytes = from.get_index(&v.index_name).await?;
        let ix = VolumeIndex::decode(&index_bytes, vmbackup_proto::index::MAX_CHUNKS)
            .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("index {}: {e}", v.index_name)))?;
        Counters::add(&job.counters.planned, ix.virtual_size);
        let mut unique: Vec<Digest> = ix.referenced().copied().collect();
        unique.sort_unstable();
        unique.dedup();
        for batch in unique.chunks(BATCH) {
            let missing = session.missing(batch).await?;
            Counters::add(
                &job.counters.deduplicated,
                u64::try_from(batch.len() - missing.len()).unwrap_or(0) * u64::from(src_status.chunk_size),
            );
            if !missing.is_empty() {
                copy.chunks(&session, &missing, &v.index_name, &v.volume_uuid).await?;
            }
        }
        session.put_index(&v.index_name, index_bytes).await?;
        Counters::add(&job.counters.read, ix.virtual_size);
    }
    session.commit(info.manifest.clone(), 0).await?;
    if let Err(e) = session.close().await {
        tracing::warn!(error = %e, "closing the destination session after the commit failed; it expires with its TTL");
    }

    let now = now_millis();
    let (g, d) = (group_uuid.to_string(), dst.to_string());
    let names: Vec<(String, String)> =
        manifest.volumes.iter().map(|v| (v.volume_backup_uuid.clone(), v.index_name.clone())).collect();
    registry
        .catalog()
        .run(move |c| -> Result<()> {
            let mut records = c.group_volume_backups(&g)?;
            for r in &mut records {
                if let Some((_, index)) = names.iter().find(|(u, _)| *u == r.uuid)
                    && !r.refs.iter().any(|s| s.backup_storage_uuid == d)
                {
                    r.refs.push(StorageRef {
                        backup_storage_uuid: d.clone(),
                        install_path: index.clone(),
                        status: BackupStatus::Ready,
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

/// Copies chunks from the source store into a destination session.
#[derive(Debug)]
struct ChunkCopy {
    reader: Arc<dyn ChunkReader>,
    job: Arc<Job>,
    chunk_size: u32,
    source: String,
    key: Option<Arc<vmbackup_proto::seal::ChunkKey>>,
}

impl ChunkCopy {
    /// Downloads `missing`, verifies each chunk and uploads it: at most a few chunks are in
    /// memory at once, whatever the batch size.
    async fn chunks(&self, session: &Session, missing: &[Digest], index: &str, volume: &str) -> Result<()> {
        let max = usize::try_from(self.chunk_size).unwrap_or(usize::MAX);
        let mut stream = self.reader.download(index, missing).await?;
        let sent = self.job.counters.count_into(|c| &c.sent);
        let writer = Box::new(Metered::new(session.writer().await?, Throttle::unlimited(), sent));
        let mut copied = 0usize;
        while let Some(item) = stream.next().await {
            let (d, b) = item?;
            let key = self.key.clone();
            let checked = tokio::task::spawn_blocking(move || {
                blob::Decoder::with_key(key).and_then(|mut dec| dec.decode_and_verify(&b, &d, max)).map(|_| b)
            })
            .await?;
            let b = checked.map_err(|e| {
                AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("chunk {d} of volume {volume} is damaged on {}: {e}", self.source),
                )
            })?;
            writer.put(d, b).await?;
            copied += 1;
        }
        writer.finish().await?;
        if copied != missing.len() {
            return Err(AgentError::new(
                ErrorKind::Unavailable,
                format!("{} sent {copied} of {} chunks", self.source, missing.len()),
            ));
        }
        Ok(())
    }
}
