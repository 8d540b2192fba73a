//! Recover between storages with different keys: a plain backup copied to an encrypted
//! storage, or one encrypted storage's backup copied to another's key. Sealed bytes cannot
//! be copied as they are (the destination's chunks are named and sealed with its own key),
//! so every distinct chunk of the group is downloaded, opened and checked with the source's
//! key, named and sealed again with the destination's, and uploaded when the destination
//! lacks it; the indexes are rewritten with the new names and the manifest is sealed with
//! the destination's key. Uuids and index names stay the same, so the group is the same
//! backup on both storages, and it appears on the destination only at its commit.
//!
//! Memory is bounded by [`WINDOW`] chunks at a time, whatever the volume's size.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use vmbackup_proto::Digest;
use vmbackup_proto::blob::{self, ChunkName};
use vmbackup_proto::index::VolumeIndex;
use vmbackup_proto::manifest::GroupManifest;
use vmbackup_proto::seal::ChunkKey;

use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::{Counters, Job};
use crate::storage::metered::Metered;
use crate::storage::{ChunkReader, ChunkWriter, Session};
use crate::throttle::Throttle;

/// Chunks opened, named and (when missing) sealed together: one MissingChunks call each.
const WINDOW: usize = 16;

/// What a re-keying copy reads from and writes to.
#[derive(Debug)]
pub struct Rekey {
    /// The source store, metered.
    pub reader: Arc<dyn ChunkReader>,
    /// The source's key (None: plain).
    pub from: Option<Arc<ChunkKey>>,
    /// The destination's key (None: plain).
    pub to: Option<Arc<ChunkKey>>,
    /// The job, for its counters and cancel.
    pub job: Arc<Job>,
    /// Both stores' chunk size.
    pub chunk_size: u32,
    /// The source's URL, for errors.
    pub source: String,
}

/// One chunk opened from the source: its source name, its destination name, its plaintext.
type Opened = (Digest, ChunkName, Vec<u8>);

impl Rekey {
    /// Copies the group of `manifest` (as stored on the source) into `session` and returns
    /// the manifest to commit there.
    pub async fn copy(&self, session: &Session, manifest: &GroupManifest) -> Result<Vec<u8>> {
        let mut open = match (&self.from, manifest.is_sealed()) {
            (Some(k), true) => manifest.unseal(k).map_err(|e| {
                AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("manifest of group {} on {}: {e}", manifest.group_uuid, self.source),
                )
            })?,
            _ => manifest.clone(),
        };
        // Source name -> destination name, across the group's volumes.
        let mut renamed: HashMap<Digest, Digest> = HashMap::new();
        let sent = self.job.counters.count_into(|c| &c.sent);
        let writer: Box<dyn ChunkWriter> = Box::new(Metered::new(session.writer().await?, Throttle::unlimited(), sent));
        for v in &mut open.volumes {
            let index_bytes = self.reader.get_index(&v.index_name).await?;
            let mut ix = VolumeIndex::decode(&index_bytes, vmbackup_proto::index::MAX_CHUNKS)
                .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("index {}: {e}", v.index_name)))?;
            Counters::add(&self.job.counters.planned, ix.virtual_size);
            let mut todo: Vec<Digest> = ix.referenced().filter(|d| !renamed.contains_key(d)).copied().collect();
            todo.sort_unstable();
            todo.dedup();
            for window in todo.chunks(WINDOW) {
                if self.job.cancel.is_cancelled() {
                    return Err(AgentError::new(ErrorKind::Cancelled, "the recover was cancelled"));
                }
                let opened = self.open_window(window, &v.index_name, &v.volume_uuid).await?;
                for (old, new, _) in &opened {
                    renamed.insert(*old, new.digest);
                }
                self.store_window(session, writer.as_ref(), opened).await?;
            }
            for d in ix.digests.iter_mut().filter(|d| !d.is_zero_chunk()) {
                *d = *renamed.get(d).ok_or_else(|| {
                    AgentError::new(ErrorKind::Internal, format!("chunk {d} of index {} was not copied", v.index_name))
                })?;
            }
            let digest = session.put_index(&v.index_name, ix.encode()).await?;
            v.index_digest = digest.to_hex();
            Counters::add(&self.job.counters.read, ix.virtual_size);
        }
        writer.finish().await?;
        let out = match &self.to {
            Some(k) => open.seal(k),
            None => Ok(open),
        }
        .and_then(|m| m.encode())
        .map_err(|e| AgentError::new(ErrorKind::Internal, format!("sealing the manifest: {e}")))?;
        Ok(out)
    }

    /// Downloads `digests`, opens and checks each with the source's key and names it with
    /// the destination's.
    async fn open_window(&self, digests: &[Digest], index: &str, volume: &str) -> Result<Vec<Opened>> {
        let max = usize::try_from(self.chunk_size).unwrap_or(usize::MAX);
        let mut stream = self.reader.download(index, digests).await?;
        let mut blobs = Vec::with_capacity(digests.len());
        while let Some(item) = stream.next().await {
            blobs.push(item?);
        }
        if blobs.len() != digests.len() {
            return Err(AgentError::new(
                ErrorKind::Unavailable,
                format!("{} sent {} of {} chunks", self.source, blobs.len(), digests.len()),
            ));
        }
        let (from, to) = (self.from.clone(), self.to.clone());
        let opened = tokio::task::spawn_blocking(move || -> std::result::Result<Vec<Opened>, (Digest, String)> {
            let mut dec = blob::Decoder::with_key(from).map_err(|e| (Digest::ZERO_CHUNK, e.to_string()))?;
            blobs
                .into_iter()
                .map(|(d, b)| {
                    let plain = dec.decode_and_verify(&b, &d, max).map_err(|e| (d, e.to_string()))?;
                    Ok((d, blob::name_of(to.as_deref(), &plain), plain))
                })
                .collect()
        })
        .await?;
        opened.map_err(|(d, e)| {
            AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("chunk {d} of volume {volume} is damaged on {}: {e}", self.source),
            )
        })
    }

    /// Seals and uploads the chunks of `opened` the destination lacks.
    async fn store_window(&self, session: &Session, writer: &dyn ChunkWriter, opened: Vec<Opened>) -> Result<()> {
        let names: Vec<Digest> = opened.iter().map(|(_, n, _)| n.digest).collect();
        let missing = session.missing(&names).await?;
        let size = u64::from(self.chunk_size);
        Counters::add(&self.job.counters.deduplicated, u64::try_from(names.len() - missing.len()).unwrap_or(0) * size);
        let to = self.to.clone();
        let sealed = tokio::task::spawn_blocking(move || -> std::result::Result<Vec<(Digest, Vec<u8>)>, String> {
            let mut enc =
                blob::Encoder::with_key(crate::backup::ZSTD_LEVEL, to).map_err(|e| format!("zstd encoder: {e}"))?;
            opened
                .into_iter()
                .filter(|(_, n, _)| missing.contains(&n.digest))
                .map(|(_, n, plain)| {
                    enc.encode_named(&plain, &n).map(|b| (n.digest, b)).map_err(|e| format!("chunk {}: {e}", n.digest))
                })
                .collect()
        })
        .await?
        .map_err(|e| AgentError::new(ErrorKind::Internal, format!("sealing for the destination: {e}")))?;
        for (d, b) in sealed {
            writer.put(d, b.into()).await?;
        }
        Ok(())
    }
}
