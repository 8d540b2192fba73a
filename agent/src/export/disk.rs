//! A volume backup as a read-only disk: its index maps an offset to a chunk in O(1), zero
//! chunks read as zeros without a fetch, and every other chunk is downloaded from the
//! backup storage when first read, checked against its digest, and kept in a small LRU
//! cache of decoded chunks. A miss during a sequential scan also fetches the next
//! [`READ_AHEAD`] chunks in the same download. A chunk that fails its check is an error
//! naming it, never data.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::VolumeIndex;

use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::ChunkReader;

/// Chunks fetched ahead of a sequential reader.
pub const READ_AHEAD: usize = 8;
/// Decoded chunks kept per export (at 4 MiB chunks, 128 MiB).
pub const CACHED_CHUNKS: usize = 32;

/// One extent of `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes.
    pub len: u64,
    /// A hole that reads as zeros (no chunk stored).
    pub zero: bool,
}

#[derive(Debug, Default)]
struct Cache {
    chunks: HashMap<usize, Arc<Vec<u8>>>,
    order: VecDeque<usize>,
    last_read: Option<usize>,
}

impl Cache {
    fn get(&mut self, i: usize) -> Option<Arc<Vec<u8>>> {
        let c = self.chunks.get(&i).cloned()?;
        if let Some(at) = self.order.iter().position(|k| *k == i) {
            self.order.remove(at);
        }
        self.order.push_back(i);
        Some(c)
    }

    fn put(&mut self, i: usize, data: Arc<Vec<u8>>) {
        if self.chunks.insert(i, data).is_none() {
            self.order.push_back(i);
        }
        while self.order.len() > CACHED_CHUNKS {
            if let Some(old) = self.order.pop_front() {
                self.chunks.remove(&old);
            }
        }
    }
}

/// A volume backup served as a disk.
#[derive(Debug)]
pub struct BackupDisk {
    index: VolumeIndex,
    index_name: String,
    reader: Arc<dyn ChunkReader>,
    cache: Mutex<Cache>,
    /// Names the volume backup in errors.
    label: String,
    /// The storage's key when its chunks are sealed.
    key: Option<Arc<vmbackup_proto::seal::ChunkKey>>,
}

impl BackupDisk {
    /// The disk of the decoded `index`, stored as `index_name` and read through `reader`;
    /// chunks are opened with `key` when the storage seals them.
    pub fn new(
        index: VolumeIndex,
        index_name: String,
        reader: Arc<dyn ChunkReader>,
        label: String,
        key: Option<Arc<vmbackup_proto::seal::ChunkKey>>,
    ) -> Self {
        Self { index, index_name, reader, cache: Mutex::default(), label, key }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.index.virtual_size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.index.chunk_size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The allocation of `[offset, offset + len)` as extents (merged; at most one when
    /// `one`).
    pub fn extents(&self, offset: u64, len: u64, one: bool) -> Vec<Extent> {
        let cs = u64::from(self.index.chunk_size);
        let end = offset.saturating_add(len).min(self.size());
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let i = usize::try_from(at / cs).unwrap_or(usize::MAX);
            let zero = self.index.digests.get(i).is_none_or(Digest::is_zero_chunk);
            let chunk_end = ((at / cs) + 1).saturating_mul(cs).min(end);
            match out.last_mut() {
                Some(e) if e.zero == zero => e.len += chunk_end - at,
                _ => {
                    if one && !out.is_empty() {
                        break;
                    }
                    out.push(Extent { len: chunk_end - at, zero });
                }
            }
            at = chunk_end;
        }
        out
    }

    /// The bytes of `[offset, offset + len)` (the caller keeps it within the disk).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let cs = u64::from(self.index.chunk_size);
        let mut out = vec![0u8; len];
        let end = offset + len as u64;
        let mut at = offset;
        while at < end {
            let i = usize::try_from(at / cs).unwrap_or(usize::MAX);
            let chunk_start = (at / cs) * cs;
            let take_end = (chunk_start + cs).min(end);
            let dst = usize::try_from(at - offset).unwrap_or(0)..usize::try_from(take_end - offset).unwrap_or(0);
            let d = self.index.digests.get(i).copied().unwrap_or(Digest::ZERO_CHUNK);
            if !d.is_zero_chunk() {
                let data = self.chunk(i).await?;
                let src = usize::try_from(at - chunk_start).unwrap_or(0)
                    ..usize::try_from(take_end - chunk_start).unwrap_or(0);
                let slice = data.get(src.clone()).ok_or_else(|| {
                    AgentError::new(
                        ErrorKind::FailedPrecondition,
                        format!("chunk {d} of {} is shorter than its place in the index", self.label),
                    )
                })?;
                out[dst].copy_from_slice(slice);
            }
            at = take_end;
        }
        Ok(out)
    }

    /// Decoded chunk `i`, from the cache or the storage (with read-ahead when the reader
    /// goes sequentially).
    async fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        let sequential = {
            let mut c = self.lock();
            if let Some(hit) = c.get(i) {
                c.last_read = Some(i);
                return Ok(hit);
            }
            let seq = c.last_read.is_some_and(|l| l + 1 == i || l == i);
            c.last_read = Some(i);
            seq
        };
        // The chunk, and when sequential the next non-zero, uncached ones.
        let mut wanted: Vec<(usize, Digest)> = vec![(i, self.index.digests[i])];
        if sequential {
            let c = self.lock();
            for j in i + 1..self.index.digests.len() {
                if wanted.len() > READ_AHEAD {
                    break;
                }
                let d = self.index.digests[j];
                if !d.is_zero_chunk() && !c.chunks.contains_key(&j) {
                    wanted.push((j, d));
                }
            }
        }
        let mut digests: Vec<Digest> = Vec::new();
        for (_, d) in &wanted {
            if !digests.contains(d) {
                digests.push(*d);
            }
        }
        let mut stream = self.reader.download(&self.index_name, &digests).await?;
        let mut decoded: HashMap<Digest, Arc<Vec<u8>>> = HashMap::new();
        let max = usize::try_from(self.index.chunk_size).unwrap_or(usize::MAX);
        for d in &digests {
            let (got, blob) = stream.next().await.ok_or_else(|| {
                AgentError::new(ErrorKind::Unavailable, format!("the store ended the download before chunk {d}"))
            })??;
            if got != *d {
                return Err(AgentError::new(
                    ErrorKind::Unavailable,
                    format!("the store sent chunk {got} where chunk {d} was asked for"),
                ));
            }
            let (d2, label, key) = (*d, self.label.clone(), self.key.clone());
            let plain = tokio::task::spawn_blocking(move || {
                blob::Decoder::with_key(key).and_then(|mut dec| dec.decode_and_verify(&blob, &d2, max))
            })
            .await
            .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?
            .map_err(|e| {
                AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("chunk {d2} of {label} is damaged on the store: {e}"),
                )
            })?;
            decoded.insert(*d, Arc::new(plain));
        }
        let mut c = self.lock();
        for (j, d) in &wanted {
            if let Some(data) = decoded.get(d) {
                c.put(*j, data.clone());
            }
        }
        decoded.get(&self.index.digests[i]).cloned().ok_or_else(|| AgentError::new(ErrorKind::Internal, "chunk lost"))
    }
}

/// A [`BackupDisk`] read from a blocking thread (file-level restore's filesystem readers
/// are synchronous): each read runs on the runtime through `handle` and waits for it.
pub struct Blocking {
    /// The disk.
    pub disk: Arc<BackupDisk>,
    /// The runtime its reads run on.
    pub handle: tokio::runtime::Handle,
}

impl crate::guestfs::Disk for Blocking {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let data = self.handle.block_on(self.disk.read(offset, buf.len())).map_err(std::io::Error::other)?;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_most_recent_chunks() {
        let mut c = Cache::default();
        for i in 0..CACHED_CHUNKS + 2 {
            c.put(i, Arc::new(vec![]));
        }
        assert!(c.get(0).is_none() && c.get(1).is_none());
        assert!(c.get(2).is_some());
        c.put(100, Arc::new(vec![]));
        assert!(c.get(2).is_some(), "a chunk just read is not the one evicted");
        assert!(c.get(3).is_none());
    }
}
