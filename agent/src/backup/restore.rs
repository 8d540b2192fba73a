//! Restoring volume backups to raw or qcow2 files, or over a VM's own volumes (revert).
//!
//! Per volume the distinct non-zero chunks are split into batches, and up to `parallelism`
//! batches are downloaded at once, each on its own stream (network-read limit), so chunks
//! arrive out of order. A chunk the volume holds several times is downloaded once and
//! written at each of its offsets. Each chunk is decoded into a reused, page-aligned buffer
//! and checked against its digest on a blocking thread, then written (volume-write limit;
//! the writers send aligned data straight to the disk); zero chunks are never downloaded
//! and stay holes. A chunk that fails its check stops the restore with an error
//! naming the chunk and the volume; the writer then removes what it created, so a failed
//! restore never leaves a half-written volume that looks complete.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

use futures::{StreamExt, TryStreamExt};
use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::SparseIndex;
use vmbackup_proto::seal::ChunkKey;

use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::{Counters, Job};
use crate::storage::ChunkReader;
use crate::storage::metered::Metered;
use crate::storage::registry::Registry;
use crate::throttle::Throttle;
use crate::volume::VolumeFormat;
use crate::volume::writer::{self, Mode, VolumeWriter};

/// Chunks asked for per download stream.
const DOWNLOAD_BATCH: usize = 16;

/// Decode buffers of one restore, each one chunk long, with a zstd context each.
/// Anonymous maps are page-aligned, which direct I/O needs; they are reused, so a restore
/// holds at most one per chunk being decoded and never faults in fresh memory per chunk.
#[derive(Debug)]
struct Buffers {
    size: usize,
    free: Mutex<Vec<(MmapMut, blob::Decoder)>>,
    /// The storage's key (chunks are sealed), or None.
    key: Option<Arc<ChunkKey>>,
}

impl Buffers {
    fn take(&self) -> Result<(MmapMut, blob::Decoder)> {
        let reused = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        match reused {
            Some(b) => Ok(b),
            None => {
                let map = MmapMut::map_anon(self.size).map_err(|e| {
                    AgentError::new(ErrorKind::Internal, format!("allocating a {}-byte chunk buffer: {e}", self.size))
                })?;
                let decoder = blob::Decoder::with_key(self.key.clone())
                    .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?;
                Ok((map, decoder))
            }
        }
    }

    fn give(&self, b: (MmapMut, blob::Decoder)) {
        self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(b);
    }
}

/// A chunk to download and the chunk indexes of the volume that hold it.
type Wanted = (Digest, Vec<usize>);

/// One volume backup to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// The volume backup.
    pub backup: VolumeBackupRecord,
    /// The file (or device) to write.
    pub path: std::path::PathBuf,
    /// Format to write.
    pub format: VolumeFormat,
    /// New file, or over the existing volume.
    pub mode: Mode,
}

/// Limits and concurrency of one restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// networkReadBandwidth.
    pub network_limit: Throttle,
    /// volumeWriteBandwidth.
    pub write_limit: Throttle,
    /// Download streams in flight per volume.
    pub parallelism: usize,
    /// Connections to the store leave from here (`backup::network::cidr`).
    pub source: Option<crate::storage::netbind::SourceAddr>,
}

/// Restores every target from `storage_uuid`.
pub async fn run(
    registry: &Registry,
    job: &Arc<Job>,
    storage_uuid: &str,
    targets: Vec<RestoreTarget>,
    opts: RestoreOptions,
) -> Result<()> {
    let storage = registry.require(storage_uuid).await?;
    let key = registry.chunk_key(&storage).await?;
    let (store, status) = registry.open_store(&storage, opts.source.as_ref()).await?;
    let received = job.counters.count_into(|c| &c.received);
    let reader: Arc<dyn ChunkReader> =
        Arc::new(Metered::new(store as Arc<dyn ChunkReader>, opts.network_limit.clone(), received));
    let chunk_max = usize::try_from(status.chunk_size).unwrap_or(usize::MAX);
    let buffers = Arc::new(Buffers { size: chunk_max, free: Mutex::default(), key });
    for t in targets {
        let r = t.backup.refs.iter().find(|r| r.backup_storage_uuid == storage_uuid).ok_or_else(|| {
            AgentError::invalid(
                "backupStorageUuid",
                format!("volume backup {} is not on backup storage {storage_uuid}", t.backup.uuid),
            )
        })?;
        // Read as it streams in, holding only the chunks with data.
        let ix = reader.get_sparse_index(&r.install_path).await.map_err(|e| match e.kind() {
            ErrorKind::Internal => {
                AgentError::new(ErrorKind::FailedPrecondition, format!("index of volume backup {}: {e}", t.backup.uuid))
            }
            _ => e,
        })?;
        let first = probe(&*reader, &r.install_path, &ix, &buffers, &t.backup.volume_uuid).await?;
        Counters::add(&job.counters.planned, ix.virtual_size);
        let (path, size, format, mode) = (t.path.clone(), ix.virtual_size, t.format, t.mode);
        let writer: Arc<Box<dyn VolumeWriter>> =
            Arc::new(tokio::task::spawn_blocking(move || writer::create(&path, format, size, mode)).await??);
        let ix = Arc::new(ix);
        let (w, plan_ix, counters) = (writer.clone(), ix.clone(), job.counters.clone());
        let mut wanted = tokio::task::spawn_blocking(move || plan(&plan_ix, &**w, &counters)).await??;
        let volume = Arc::new(VolumeRestore {
            reader: reader.clone(),
            job: job.clone(),
            ix,
            index_name: r.install_path.clone(),
            writer,
            volume: t.backup.volume_uuid.clone(),
            write_limit: opts.write_limit.clone(),
            buffers: buffers.clone(),
        });
        // The probed chunk is written from what the probe fetched.
        if let Some((d, blob)) = first
            && let Some(at) = wanted.iter().position(|(w, _)| *w == d)
        {
            let (_, indexes) = wanted.remove(at);
            write_chunk(&volume, d, blob, indexes).await?;
        }
        futures::stream::iter(wanted.chunks(DOWNLOAD_BATCH).map(<[_]>::to_vec))
            .map(|batch| restore_batch(volume.clone(), batch))
            .buffer_unordered(opts.parallelism.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let writer = Arc::into_inner(volume)
            .and_then(|v| Arc::into_inner(v.writer))
            .ok_or_else(|| AgentError::new(ErrorKind::Internal, "restore writer still shared"))?;
        tokio::task::spawn_blocking(move || writer.finish()).await??;
        tracing::info!(volume_backup = %t.backup.uuid, path = %t.path.display(), "volume restored");
    }
    Ok(())
}

/// Downloads and checks the volume's first stored chunk before anything is written: a key
/// that is not the one the backup was sealed with (or a plain backup where a key is
/// expected) then fails the restore with nothing created or overwritten. Returns the
/// chunk, which the restore then writes without downloading it again.
async fn probe(
    reader: &dyn ChunkReader,
    index_name: &str,
    ix: &SparseIndex,
    buffers: &Arc<Buffers>,
    volume: &str,
) -> Result<Option<(Digest, bytes::Bytes)>> {
    let Some(&(_, d)) = ix.entries.first() else { return Ok(None) };
    let mut stream = reader.download(index_name, &[d]).await?;
    let (got, blob) = stream.next().await.ok_or_else(|| {
        AgentError::new(ErrorKind::Unavailable, format!("the store ended the download before chunk {d}"))
    })??;
    drop(stream);
    if got != d {
        return Err(AgentError::new(
            ErrorKind::Unavailable,
            format!("the store sent chunk {got} where {d} was asked for"),
        ));
    }
    let (b, volume, checked_blob) = (buffers.clone(), volume.to_string(), blob.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let (mut buf, mut decoder) = b.take()?;
        let checked = decoder.decode_and_verify_into(&checked_blob, &d, &mut buf).map(|_| ());
        b.give((buf, decoder));
        checked.map_err(|e| {
            AgentError::new(ErrorKind::FailedPrecondition, format!("chunk {d} of volume {volume} cannot be read: {e}"))
        })
    })
    .await??;
    Ok(Some((d, blob)))
}

/// What the download streams of one volume share.
#[derive(Debug)]
struct VolumeRestore {
    reader: Arc<dyn ChunkReader>,
    job: Arc<Job>,
    ix: Arc<SparseIndex>,
    /// Name of the index on the store (downloads name it).
    index_name: String,
    writer: Arc<Box<dyn VolumeWriter>>,
    volume: String,
    write_limit: Throttle,
    buffers: Arc<Buffers>,
}

/// Zeroes what the index says is zero (a no-op on new targets) and groups the other
/// chunks by digest, in volume order: each distinct chunk is downloaded once. Runs off the
/// async runtime: an index may name millions of chunks.
fn plan(ix: &SparseIndex, writer: &dyn VolumeWriter, counters: &Counters) -> Result<Vec<Wanted>> {
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut seen: HashMap<Digest, usize> = HashMap::new();
    let zero = |from: u64, to: u64| -> Result<()> {
        for i in from..to {
            let (offset, len) = ix.chunk_range(i);
            writer.zero(offset, len)?;
            Counters::add(&counters.zero, len);
        }
        Ok(())
    };
    let mut next = 0u64;
    for &(chunk, d) in &ix.entries {
        zero(next, chunk)?;
        next = chunk + 1;
        let i = usize::try_from(chunk).map_err(|_| AgentError::new(ErrorKind::Internal, "chunk number too large"))?;
        if let Some(&at) = seen.get(&d) {
            wanted[at].1.push(i);
        } else {
            seen.insert(d, wanted.len());
            wanted.push((d, vec![i]));
        }
    }
    zero(next, ix.chunk_count())?;
    Ok(wanted)
}

/// Downloads one batch on its own stream and writes each chunk wherever the volume holds it.
async fn restore_batch(v: Arc<VolumeRestore>, batch: Vec<Wanted>) -> Result<()> {
    let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
    let mut stream = v.reader.download(&v.index_name, &digests).await?;
    for (d, at) in batch {
        if v.job.cancel.is_cancelled() {
            return Err(AgentError::new(ErrorKind::Cancelled, "the restore was cancelled"));
        }
        let (got, blob) = stream.next().await.ok_or_else(|| {
            AgentError::new(ErrorKind::Unavailable, format!("the store ended the download before chunk {d}"))
        })??;
        if got != d {
            return Err(AgentError::new(
                ErrorKind::Unavailable,
                format!("the store sent chunk {got} where chunk {d} of volume {} was asked for", v.volume),
            ));
        }
        write_chunk(&v, d, blob, at).await?;
    }
    Ok(())
}

/// Writes downloaded chunk `d` at every chunk index in `at` (volume-write limit).
async fn write_chunk(v: &Arc<VolumeRestore>, d: Digest, blob: bytes::Bytes, at: Vec<usize>) -> Result<()> {
    let bytes: u64 = at.iter().map(|&i| v.ix.chunk_range(u64::try_from(i).unwrap_or(u64::MAX)).1).sum();
    v.write_limit.consume(usize::try_from(bytes).unwrap_or(usize::MAX)).await;
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let (mut buf, mut decoder) = v2.buffers.take()?;
        let written = decode_and_write(&v2, &mut decoder, &blob, &d, &mut buf, &at);
        v2.buffers.give((buf, decoder));
        written
    })
    .await??;
    Counters::add(&v.job.counters.written, bytes);
    Ok(())
}

/// Decodes chunk `d` into `buf`, checks it, and writes it at every chunk index in `at`.
fn decode_and_write(
    v: &VolumeRestore,
    decoder: &mut blob::Decoder,
    blob: &[u8],
    d: &Digest,
    buf: &mut [u8],
    at: &[usize],
) -> Result<()> {
    let volume = &v.volume;
    let n = decoder.decode_and_verify_into(blob, d, buf).map_err(|e| {
        AgentError::new(
            ErrorKind::FailedPrecondition,
            format!("chunk {d} of volume {volume} is damaged on the store: {e}"),
        )
    })?;
    for &i in at {
        let (offset, len) = v.ix.chunk_range(u64::try_from(i).unwrap_or(u64::MAX));
        if u64::try_from(n).ok() != Some(len) {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("chunk {d} of volume {volume} has {n} bytes, {len} expected at chunk {i}"),
            ));
        }
        v.writer.write_at(offset, &buf[..n])?;
    }
    Ok(())
}
