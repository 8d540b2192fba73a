//! The chunk workers of one backup job: read, hash, ask, compress (and, on an encrypted
//! storage, seal), and put through the storage seam's [`ChunkWriter`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use vmbackup_proto::Digest;
use vmbackup_proto::blob::ChunkName;
use vmbackup_proto::digest::is_all_zero;
use vmbackup_proto::seal::ChunkKey;

use super::VolumeJob;
use super::outage::Settled;
use super::slots::Planned;
use crate::error::{AgentError, ErrorKind, Result};
use crate::jobs::{Counters, Job};
use crate::storage::seam::PutStats;
use crate::storage::{ChunkWriter, Store};
use crate::throttle::Throttle;
use crate::volume::ExtentKind;

/// zstd level of uploaded chunks (level 1: fast, most of the gain on VM images).
pub(crate) const ZSTD_LEVEL: i32 = 1;

pub(super) struct Inputs {
    /// Where chunks go (already metered: network limit and `sent` counter).
    pub writer: Box<dyn ChunkWriter>,
    /// Asks the store what it lacks, in batches.
    pub asker: Asker,
    pub volumes: Vec<Arc<VolumeJob>>,
    pub known: Arc<HashSet<Digest>>,
    pub parallelism: usize,
    pub read_limit: Throttle,
    pub job: Arc<Job>,
    pub chunk_size: u32,
    /// The storage's key: chunks are named by keyed BLAKE3 and sealed; None: plain.
    pub key: Option<Arc<ChunkKey>>,
    /// A later attempt after a store outage: only the chunks the ledgers say are not done.
    pub resume: bool,
}

/// A chunk that holds data somewhere in its range.
#[derive(Debug, Clone, Copy)]
struct Task {
    volume: usize,
    /// The chunk's slot in its volume's [`Slots`](super::slots::Slots).
    slot: usize,
    offset: u64,
    len: u64,
}

/// The chunks a resumed attempt reads: those its ledgers say are not done.
fn plan_resume(volumes: &[Arc<VolumeJob>], chunk_size: u32) -> Result<Vec<Task>> {
    let cs = u64::from(chunk_size);
    let mut tasks = Vec::new();
    for (vi, v) in volumes.iter().enumerate() {
        let slots = v.slots()?;
        for slot in slots.ledger.pending() {
            let ci = slots.chunk(slot);
            let offset = u64::try_from(ci).unwrap_or(u64::MAX) * cs;
            tasks.push(Task { volume: vi, slot, offset, len: v.chunk_len(ci) });
        }
    }
    Ok(tasks)
}

/// Which chunks to read: those overlapping data extents, each given a slot. An
/// incremental's unchanged chunks take the previous backup's digest (a slot, done) or stay
/// zero; every other chunk is zero and gets no slot.
fn plan(volumes: &[Arc<VolumeJob>], chunk_size: u32, counters: &Counters) -> Result<Vec<Task>> {
    let cs = u64::from(chunk_size);
    let mut tasks = Vec::new();
    let mut all = Vec::with_capacity(volumes.len());
    for (vi, v) in volumes.iter().enumerate() {
        let size = v.source.virtual_size();
        Counters::add(&counters.planned, size);
        // One byte a chunk, zeroed at allocation: only the pages of data chunks are touched.
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
        let mut planned = Planned::default();
        let mut previous = v.reuse.as_ref().map(|r| r.previous.iter().peekable());
        for (ci, want) in wanted.iter().enumerate() {
            let offset = u64::try_from(ci).unwrap_or(u64::MAX) * cs;
            let len = cs.min(size - offset);
            // Unchanged since the previous backup (its dirty bitmap says so): that backup's
            // digest stands, nothing is read.
            if let (Some(r), Some(prev)) = (&v.reuse, previous.as_mut())
                && !r.dirty.get(ci).copied().unwrap_or(true)
            {
                let chunk = u64::try_from(ci).unwrap_or(u64::MAX);
                while prev.next_if(|(c, _)| *c < chunk).is_some() {}
                match prev.next_if(|(c, _)| *c == chunk) {
                    Some((_, d)) => {
                        planned.push(ci, *d, Settled::WithoutBytes);
                        Counters::add(&counters.deduplicated, len);
                        v.dedup_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    None => Counters::add(&counters.zero, len),
                }
                continue;
            }
            if *want {
                let slot = planned.push(ci, Digest::ZERO_CHUNK, Settled::No);
                tasks.push(Task { volume: vi, slot, offset, len });
            } else {
                Counters::add(&counters.zero, len);
            }
        }
        all.push(planned);
    }
    // Set only once every volume is planned: an attempt whose plan failed leaves none.
    for (v, planned) in volumes.iter().zip(all) {
        v.slots
            .set(planned.done())
            .map_err(|_| AgentError::new(ErrorKind::Internal, "the volume's chunks were planned twice"))?;
    }
    Ok(tasks)
}

pub(super) async fn run(inputs: Inputs) -> Result<PutStats> {
    let Inputs { writer, asker, volumes, known, parallelism, read_limit, job, chunk_size, key, resume } = inputs;
    let planning = volumes.clone();
    let counters = job.counters.clone();
    let tasks = Arc::new(
        tokio::task::spawn_blocking(move || {
            // An attempt resumes what an earlier one planned; an earlier attempt that failed
            // before its plan (a store outage at the session's start) left nothing to resume.
            if resume && planning.iter().all(|v| v.slots.get().is_some()) {
                plan_resume(&planning, chunk_size)
            } else {
                plan(&planning, chunk_size, &counters)
            }
        })
        .await??,
    );
    job.set_message(format!("{} chunks to read with {parallelism} workers", tasks.len()));

    let writer: Arc<Box<dyn ChunkWriter>> = Arc::new(writer);
    let asker = Arc::new(asker);
    let next = Arc::new(AtomicUsize::new(0));
    let claimed: Arc<Mutex<HashSet<Digest>>> = Arc::default();
    // Stops this attempt's workers on the first error without cancelling the job, which
    // may wait for its store and resume.
    let stop = job.cancel.child_token();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallelism.max(1) {
        let w = Worker {
            tasks: tasks.clone(),
            next: next.clone(),
            volumes: volumes.clone(),
            known: known.clone(),
            claimed: claimed.clone(),
            asker: asker.clone(),
            writer: writer.clone(),
            read_limit: read_limit.clone(),
            job: job.clone(),
            key: key.clone(),
            stop: stop.clone(),
        };
        workers.spawn(w.run());
    }
    let mut first_error = None;
    while let Some(r) = workers.join_next().await {
        let r = r.map_err(AgentError::from).and_then(|r| r);
        if let Err(e) = r
            && first_error.is_none()
        {
            stop.cancel();
            first_error = Some(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let writer = Arc::into_inner(writer)
        .ok_or_else(|| AgentError::new(ErrorKind::Internal, "the chunk writer is still shared after the workers"))?;
    let stats = writer.finish().await?;
    tracing::debug!(job = %job.uuid, stored = stats.stored, present = stats.already_present, "chunks written");
    Ok(stats)
}

/// Asks the store which chunks it lacks on behalf of every worker: questions that arrive
/// while calls are out go together in the next one, so a job makes about one MissingChunks
/// call per round of its workers instead of one per chunk. Up to [`ASKS_IN_FLIGHT`] calls
/// are out at once, so over an object store (a call is several round trips) a worker
/// waits about one call, not the calls queued before its question.
pub(super) struct Asker {
    tx: mpsc::Sender<(Digest, oneshot::Sender<Result<bool>>)>,
}

/// Questions answered by one MissingChunks call at most.
const ASK_BATCH: usize = 256;
/// MissingChunks calls out at once per job.
const ASKS_IN_FLIGHT: usize = 4;

impl Asker {
    /// An asker for `session` on `store`; it stops when the last handle is dropped.
    pub(super) fn spawn(store: Arc<dyn Store>, session: String) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Digest, oneshot::Sender<Result<bool>>)>(ASK_BATCH);
        let slots = Arc::new(tokio::sync::Semaphore::new(ASKS_IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let mut batch = vec![first];
                while batch.len() < ASK_BATCH {
                    match rx.try_recv() {
                        Ok(q) => batch.push(q),
                        Err(_) => break,
                    }
                }
                let (store, session) = (store.clone(), session.clone());
                tokio::spawn(async move {
                    let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
                    match store.missing(&session, &digests).await {
                        Ok(missing) => {
                            let missing: HashSet<Digest> = missing.into_iter().collect();
                            for (d, reply) in batch {
                                let _ = reply.send(Ok(missing.contains(&d)));
                            }
                        }
                        Err(e) => {
                            for (_, reply) in batch {
                                let _ = reply.send(Err(e.detached()));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    /// Whether the store lacks `digest`.
    async fn is_missing(&self, digest: Digest) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        let gone = || AgentError::new(ErrorKind::Internal, "the MissingChunks batcher stopped");
        self.tx.send((digest, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

struct Worker {
    tasks: Arc<Vec<Task>>,
    next: Arc<AtomicUsize>,
    volumes: Vec<Arc<VolumeJob>>,
    known: Arc<HashSet<Digest>>,
    claimed: Arc<Mutex<HashSet<Digest>>>,
    asker: Arc<Asker>,
    writer: Arc<Box<dyn ChunkWriter>>,
    read_limit: Throttle,
    job: Arc<Job>,
    key: Option<Arc<ChunkKey>>,
    stop: tokio_util::sync::CancellationToken,
}
impl Worker {
    async fn run(self) -> Result<()> {
        let counters = self.job.counters.clone();
        // One chunk buffer per worker, reused: a fresh 4 MiB allocation per chunk costs the
        // kernel a fault-and-zero of every page and an unmap (seen in the profile).
        let mut spare: Vec<u8> = Vec::new();
        // Blob buffers, reused once the writer is done with them (see `Blobs`).
        let mut blobs = Blobs::default();
        // One zstd context per worker, kept from chunk to chunk.
        let mut encoder =
            Some(vmbackup_proto::blob::Encoder::with_key(ZSTD_LEVEL, self.key.clone()).map_err(|e| {
                AgentError::new(ErrorKind::Internal, format!("setting up zstd level {ZSTD_LEVEL}: {e}"))
            })?);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&t) = self.tasks.get(i) else { return Ok(()) };
            if self.stop.is_cancelled() {
                return Err(AgentError::new(ErrorKind::Cancelled, "the backup was cancelled"));
            }
            let len = usize::try_from(t.len).unwrap_or(usize::MAX);
            self.read_limit.consume(len).await;
            let source = self.volumes[t.volume].source.clone();
            let key = self.key.clone();
            let mut buf = std::mem::take(&mut spare);
            let (name, plain) = tokio::task::spawn_blocking(move || -> Result<(Option<ChunkName>, Vec<u8>)> {
                // read_at fills the whole buffer, so a reused one needs no zeroing.
                buf.resize(len, 0);
                source.read_at(t.offset, &mut buf)?;
                let name = (!is_all_zero(&buf)).then(|| vmbackup_proto::blob::name_of(key.as_deref(), &buf));
                Ok((name, buf))
            })
            .await??;
            // Each chunk counts once: as zero (read or not) or as data read.
            let vj = &self.volumes[t.volume];
            let slots = vj.slots()?;
            let Some(name) = name else {
                spare = plain;
                slots.ledger.set(t.slot, Settled::WithoutBytes);
                Counters::add(&counters.zero, t.len);
                continue;
            };
            Counters::add(&counters.read, t.len);
            let digest = name.digest;
            slots.set_digest(t.slot, digest);
            let mine = !self.known.contains(&digest)
                && self.claimed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(digest);
            if !mine || !self.asker.is_missing(digest).await? {
                spare = plain;
                Counters::add(&counters.deduplicated, t.len);
                vj.dedup_bytes.fetch_add(t.len, Ordering::Relaxed);
                slots.ledger.set(t.slot, Settled::WithoutBytes);
                continue;
            }
            let mut enc = encoder.take().ok_or_else(|| AgentError::new(ErrorKind::Internal, "chunk encoder lost"))?;
            let mut blob = blobs.take();
            let (encoded, plain, enc, blob) = tokio::task::spawn_blocking(move || {
                let encoded = enc.encode_named_into(&plain, &name, &mut blob);
                (encoded, plain, enc, blob)
            })
            .await?;
            spare = plain;
            encoder = Some(enc);
            encoded.map_err(|e| AgentError::new(ErrorKind::Internal, format!("encoding chunk {digest}: {e}")))?;
            let blob = Bytes::from(blob);
            let blob_len = u64::try_from(blob.len()).unwrap_or(u64::MAX);
            self.writer.put(digest, blob.clone()).await?;
            blobs.keep(blob);
            vj.stored_bytes.fetch_add(blob_len, Ordering::Relaxed);
            slots.ledger.set(t.slot, Settled::Stored(u32::try_from(blob_len).unwrap_or(u32::MAX)));
        }
    }
}

/// A worker's blob buffer for reuse. A chunk-sized allocation is fresh memory each time
/// (the allocator returns large blocks to the kernel), and faulting in and zeroing its
/// pages cost more than writing the blob into it. The blob last handed to the writer comes
/// back here; once the writer has let go of it (at once for a store in this process; once
/// the upload stream has framed it for a store across the network) its buffer is used for
/// the next blob. Memory stays as it was: the worker holds at most that one blob besides
/// the one it encodes.
#[derive(Default)]
struct Blobs {
    last: Option<Bytes>,
}

impl Blobs {
    /// An empty buffer: the last blob's, if the writer let go of it, or a new one.
    fn take(&mut self) -> Vec<u8> {
        match self.last.take().map(Bytes::try_into_mut) {
            Some(Ok(mut m)) => {
                m.clear();
                Vec::from(m)
            }
            _ => Vec::new(),
        }
    }

    /// Keeps the blob just given to the writer.
    fn keep(&mut self, b: Bytes) {
        self.last = Some(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_the_writer_let_go_of_lends_its_buffer_to_the_next() {
        let mut blobs = Blobs::default();
        let mut first = blobs.take();
        first.extend_from_slice(&[1u8; 1 << 20]);
        let (ptr, cap) = (first.as_ptr(), first.capacity());
        let sent = Bytes::from(first);
        blobs.keep(sent.clone());
        // Still held by the writer: the next blob gets a new buffer.
        assert_eq!(blobs.take().capacity(), 0);
        blobs.keep(sent.clone());
        drop(sent);
        // Let go of: the same allocation comes back, empty.
        let again = blobs.take();
        assert_eq!((again.as_ptr(), again.capacity(), again.len()), (ptr, cap, 0));
        assert_eq!(blobs.take().capacity(), 0, "lent once");
    }
}
