//! The chunk workers of one backup job and its single upload stream.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vmbackup_proto::Digest;
use vmbackup_proto::digest::is_all_zero;

use super::VolumeJob;
use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::{Counters, Job};
use crate::storage::ImageStoreClient;
use crate::throttle::Throttle;
use crate::volume::ExtentKind;

/// zstd level of uploaded chunks (level 1: fast, most of the gain on VM images).
const ZSTD_LEVEL: i32 = 1;

pub(super) struct Inputs {
    pub client: ImageStoreClient,
    pub session_id: String,
    pub volumes: Vec<Arc<VolumeJob>>,
    pub known: Arc<HashSet<Digest>>,
    pub parallelism: usize,
    pub read_limit: Throttle,
    pub network_limit: Throttle,
    pub job: Arc<Job>,
    pub chunk_size: u32,
    /// Chunks go into this mounted store directory instead of the upload stream (fsInfo).
    pub mounted: Option<Arc<super::fsinfo::MountedStore>>,
}

/// A chunk that holds data somewhere in its range.
#[derive(Debug, Clone, Copy)]
struct Task {
    volume: usize,
    chunk: usize,
    offset: u64,
    len: u64,
}

/// Which chunks to read: those overlapping data extents. The others are zero in the index.
fn plan(volumes: &[Arc<VolumeJob>], chunk_size: u32, counters: &Counters) -> Result<Vec<Task>> {
    let cs = u64::from(chunk_size);
    let mut tasks = Vec::new();
    for (vi, v) in volumes.iter().enumerate() {
        let size = v.source.virtual_size();
        Counters::add(&counters.planned, size);
        let mut wanted = vec![false; usize::try_from(size.div_ceil(cs)).unwrap_or(0)];
        for e in v.source.extents(0, size)? {
            if e.kind == ExtentKind::Data && e.len > 0 {
                let first = usize::try_from(e.offset / cs).unwrap_or(usize::MAX);
                let last = usize::try_from((e.offset + e.len - 1) / cs).unwrap_or(usize::MAX);
                for w in wanted.iter_mut().take(last + 1).skip(first) {
                    *w = true;
                }
            }
        }
        let mut index = v.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (ci, want) in wanted.iter().enumerate() {
            let offset = u64::try_from(ci).unwrap_or(u64::MAX) * cs;
            let len = cs.min(size - offset);
            // Unchanged since the previous backup (its dirty bitmap says so): that backup's
            // digest stands, nothing is read.
            if let Some(r) = &v.reuse
                && !r.dirty.get(ci).copied().unwrap_or(true)
                && let Some(d) = r.previous.get(ci)
            {
                index.digests[ci] = *d;
                if d.is_zero_chunk() {
                    Counters::add(&counters.zero, len);
                } else {
                    Counters::add(&counters.deduplicated, len);
                    v.dedup_bytes.fetch_add(len, Ordering::Relaxed);
                }
                continue;
            }
            if *want {
                tasks.push(Task { volume: vi, chunk: ci, offset, len });
            } else {
                Counters::add(&counters.zero, len);
            }
        }
    }
    Ok(tasks)
}

pub(super) async fn run(inputs: Inputs) -> Result<()> {
    let Inputs { client, session_id, volumes, known, parallelism, read_limit, network_limit, job, chunk_size, mounted } =
        inputs;
    let planning = volumes.clone();
    let counters = job.counters.clone();
    let tasks = Arc::new(tokio::task::spawn_blocking(move || plan(&planning, chunk_size, &counters)).await??);
    job.set_message(format!("{} chunks to read with {parallelism} workers", tasks.len()));

    let (tx, rx) = mpsc::channel::<(Digest, bytes::Bytes)>(parallelism.max(1));
    let mut upload_client = client.clone();
    let sid = session_id.clone();
    let uploader = tokio::spawn(async move {
        match mounted {
            None => upload_client
                .upload(&sid, ReceiverStream::new(rx))
                .await
                .map(|r| (r.chunks_stored, r.chunks_already_present)),
            Some(store) => {
                let (mut stored, mut present, mut rx) = (0u64, 0u64, rx);
                while let Some((digest, blob)) = rx.recv().await {
                    let s = store.clone();
                    if tokio::task::spawn_blocking(move || s.put(&digest, &blob)).await?? {
                        stored += 1;
                    } else {
                        present += 1;
                    }
                }
                Ok((stored, present))
            }
        }
    });

    let next = Arc::new(AtomicUsize::new(0));
    let claimed: Arc<Mutex<HashSet<Digest>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallelism.max(1) {
        let w = Worker {
            tasks: tasks.clone(),
            next: next.clone(),
            volumes: volumes.clone(),
            known: known.clone(),
            claimed: claimed.clone(),
            client: client.clone(),
            session_id: session_id.clone(),
            read_limit: read_limit.clone(),
            network_limit: network_limit.clone(),
            job: job.clone(),
            tx: tx.clone(),
        };
        workers.spawn(w.run());
    }
    drop(tx);
    let mut first_error = None;
    while let Some(r) = workers.join_next().await {
        let r = r.map_err(AgentError::from).and_then(|r| r);
        if let Err(e) = r
            && first_error.is_none()
        {
            job.cancel.cancel();
            first_error = Some(e);
        }
    }
    if let Some(e) = first_error {
        uploader.abort();
        return Err(e);
    }
    let (stored, present) = uploader.await.map_err(AgentError::from)??;
    tracing::debug!(job = %job.uuid, stored, present, "upload stream finished");
    Ok(())
}

struct Worker {
    tasks: Arc<Vec<Task>>,
    next: Arc<AtomicUsize>,
    volumes: Vec<Arc<VolumeJob>>,
    known: Arc<HashSet<Digest>>,
    claimed: Arc<Mutex<HashSet<Digest>>>,
    client: ImageStoreClient,
    session_id: String,
    read_limit: Throttle,
    network_limit: Throttle,
    job: Arc<Job>,
    tx: mpsc::Sender<(Digest, bytes::Bytes)>,
}

impl Worker {
    async fn run(mut self) -> Result<()> {
        let counters = self.job.counters.clone();
        // One chunk buffer per worker, reused: a fresh 4 MiB allocation per chunk costs the
        // kernel a fault-and-zero of every page and an unmap (seen in the profile).
        let mut spare: Vec<u8> = Vec::new();
        // One zstd context per worker, kept from chunk to chunk.
        let mut encoder =
            Some(vmbackup_proto::blob::Encoder::new(ZSTD_LEVEL).map_err(|e| {
                AgentError::new(ErrorKind::Internal, format!("setting up zstd level {ZSTD_LEVEL}: {e}"))
            })?);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&t) = self.tasks.get(i) else { return Ok(()) };
            if self.job.cancel.is_cancelled() {
                return Err(AgentError::new(ErrorKind::Cancelled, "the backup was cancelled"));
            }
            let len = usize::try_from(t.len).unwrap_or(usize::MAX);
            self.read_limit.consume(len).await;
            let source = self.volumes[t.volume].source.clone();
            let mut buf = std::mem::take(&mut spare);
            let (digest, plain) = tokio::task::spawn_blocking(move || -> Result<(Option<Digest>, Vec<u8>)> {
                // read_at fills the whole buffer, so a reused one needs no zeroing.
                buf.resize(len, 0);
                source.read_at(t.offset, &mut buf)?;
                let digest = (!is_all_zero(&buf)).then(|| Digest::of(&buf));
                Ok((digest, buf))
            })
            .await??;
            // Each chunk counts once: as zero (read or not) or as data read.
            let vj = &self.volumes[t.volume];
            let Some(digest) = digest else {
                spare = plain;
                Counters::add(&counters.zero, t.len);
                continue;
            };
            Counters::add(&counters.read, t.len);
            vj.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner).digests[t.chunk] = digest;
            let mine = !self.known.contains(&digest)
                && self.claimed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(digest);
            if !mine || self.client.missing_one(&self.session_id, digest).await?.is_none() {
                spare = plain;
                Counters::add(&counters.deduplicated, t.len);
                vj.dedup_bytes.fetch_add(t.len, Ordering::Relaxed);
                continue;
            }
            let mut enc = encoder.take().ok_or_else(|| AgentError::new(ErrorKind::Internal, "chunk encoder lost"))?;
            let (blob, plain, enc) = tokio::task::spawn_blocking(move || (enc.encode(&plain), plain, enc)).await?;
            spare = plain;
            encoder = Some(enc);
            let blob =
                blob.map_err(|e| AgentError::new(ErrorKind::Internal, format!("encoding chunk {digest}: {e}")))?;
            let blob_len = u64::try_from(blob.len()).unwrap_or(u64::MAX);
            self.network_limit.consume(blob.len()).await;
            if self.tx.send((digest, blob.into())).await.is_err() {
                return Err(AgentError::new(
                    ErrorKind::Unavailable,
                    "the upload stream to the Image Storage ended early",
                ));
            }
            Counters::add(&counters.sent, blob_len);
            vj.stored_bytes.fetch_add(blob_len, Ordering::Relaxed);
        }
    }
}
