//! Recover: copy a backup group from one Image Storage to another, sending only the chunks
//! the destination lacks. The indexes and manifest are copied as they are (same uuids), so
//! the group appears on the destination, atomically, only when it is complete there.
//! Between storages with the same key (or none), chunks and manifests are copied as stored
//! (sealed bytes stay sealed; nothing is decrypted on the way but to check). Between
//! different keys, or from a plain storage to an encrypted one, every chunk is sealed again
//! with the destination's key ([`super::rekey`]). From an encrypted storage to a plain one is
//! refused: it would store the backup decrypted.

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

use super::rekey::Rekey;

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
    if let (Some(k), None) = (&src_key, &dst_key) {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "backup storage {src} is encrypted (key {}) and {dst} is not: recover would store the backup \
                 decrypted; add {dst} with a key (backup::encryption::key::<name>)",
                k.id()
            ),
        ));
    }
    let rekey = src_key.as_ref().map(|k| k.id()) != dst_key.as_ref().map(|k| k.id());
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
    // A re-keyed manifest is sealed afresh each time, so committing it again would conflict
    // with the copy a finished recover already committed: that copy is the recovered group.
    if rekey {
        match to.get_group(group_uuid).await {
            Ok(_) => {
                tracing::info!(group = %group_uuid, to = %dst, "the group is on the destination already");
                return record(registry, group_uuid, dst, &manifest).await;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let session = Session::open(to, &format!("vmbackup-agent recover {group_uuid}")).await?;
    let manifest_bytes = if rekey {
        let copy = Rekey {
            reader: copy.reader,
            from: copy.key,
            to: dst_key,
            job: job.clone(),
            chunk_size: src_status.chunk_size,
            source: src_rec.url.clone(),
        };
        copy.copy(&session, &manifest).await?
    } else {
        copy.group(&session, &manifest).await?;
        info.manifest.clone()
    };
    session.commit(manifest_bytes, 0).await?;
    if let Err(e) = session.close().await {
        tracing::warn!(error = %e, "closing the destination session after the commit failed; it expires with its TTL");
    }
    record(registry, group_uuid, dst, &manifest).await?;
    tracing::info!(group = %group_uuid, from = %src, to = %dst, rekeyed = rekey, "backup group recovered");
    Ok(())
}

impl ChunkCopy {
    /// Copies every volume's missing chunks and its index as stored.
    async fn group(&self, session: &Session, manifest: &GroupManifest) -> Result<()> {
        for v in &manifest.volumes {
            let index_bytes = self.reader.get_index(&v.index_name).await?;
            let ix = VolumeIndex::decode(&index_bytes, vmbackup_proto::index::MAX_CHUNKS)
                .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("index {}: {e}", v.index_name)))?;
            Counters::add(&self.job.counters.planned, ix.virtual_size);
            let mut unique: Vec<Digest> = ix.referenced().copied().collect();
            unique.sort_unstable();
            unique.dedup();
            for batch in unique.chunks(BATCH) {
                let missing = session.missing(batch).await?;
                Counters::add(
                    &self.job.counters.deduplicated,
                    u64::try_from(batch.len() - missing.len()).unwrap_or(0) * u64::from(self.chunk_size),
                );
                if !missing.is_empty() {
                    self.chunks(session, &missing, &v.index_name, &v.volume_uuid).await?;
                }
            }
            session.put_index(&v.index_name, index_bytes).await?;
            Counters::add(&self.job.counters.read, ix.virtual_size);
        }
        Ok(())
    }
}

/// Records the destination as a place each of the group's volume backups is stored.
async fn record(registry: &Registry, group_uuid: &str, dst: &str, manifest: &GroupManifest) -> Result<()> {
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
