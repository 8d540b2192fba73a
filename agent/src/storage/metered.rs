//! Rate limits and byte counters as wrappers of the storage seam: a [`Metered`] reader or
//! writer waits on its [`Throttle`] for every blob it moves and counts the blob's bytes,
//! so no engine calls throttles or counters by hand.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use vmbackup_proto::Digest;

use super::seam::{ChunkReader, ChunkStream, ChunkWriter, PutStats};
use crate::error::Result;
use crate::throttle::Throttle;

/// Called with the size of every blob moved (e.g. a job's `sent` counter).
pub type Count = Arc<dyn Fn(u64) + Send + Sync>;

/// A reader or writer whose blobs pass a throttle and a counter.
pub struct Metered<P> {
    inner: P,
    limit: Throttle,
    count: Count,
}

impl<P> std::fmt::Debug for Metered<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered").field("limited", &self.limit.is_limited()).finish_non_exhaustive()
    }
}

impl<P> Metered<P> {
    /// Wraps `inner` (a `Box<dyn ChunkWriter>` or an `Arc<dyn ChunkReader>`).
    pub fn new(inner: P, limit: Throttle, count: Count) -> Self {
        Self { inner, limit, count }
    }
}

fn len64(b: &Bytes) -> u64 {
    u64::try_from(b.len()).unwrap_or(u64::MAX)
}

#[tonic::async_trait]
impl ChunkWriter for Metered<Box<dyn ChunkWriter>> {
    async fn put(&self, digest: Digest, blob: Bytes) -> Result<()> {
        self.limit.consume(blob.len()).await;
        let n = len64(&blob);
        self.inner.put(digest, blob).await?;
        (self.count)(n);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<PutStats> {
        self.inner.finish().await
    }
}

#[tonic::async_trait]
impl ChunkReader for Metered<Arc<dyn ChunkReader>> {
    async fn get_index(&self, name: &str) -> Result<Vec<u8>> {
        self.inner.get_index(name).await
    }

    async fn get_sparse_index(&self, name: &str) -> Result<vmbackup_proto::index::SparseIndex> {
        self.inner.get_sparse_index(name).await
    }

    async fn download(&self, index: &str, digests: &[Digest]) -> Result<ChunkStream> {
        let stream = self.inner.download(index, digests).await?;
        let (limit, count) = (self.limit.clone(), self.count.clone());
        Ok(stream
            .then(move |item| {
                let (limit, count) = (limit.clone(), count.clone());
                async move {
                    let (digest, blob) = item?;
                    limit.consume(blob.len()).await;
                    count(len64(&blob));
                    Ok((digest, blob))
                }
            })
            .boxed())
    }
}
