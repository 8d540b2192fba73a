//! Garbage collection, by PBS's rule.
//!
//! 1. **Cutoff** = min(GC start, start of the oldest open session) − safety margin
//!    ([`cutoff`]).
//! 2. **Mark**: touch every chunk named by a committed index (its mtime becomes "now",
//!    after the cutoff).
//! 3. **Sweep**: delete every chunk last touched before the cutoff, re-checking its time
//!    under the chunk's shard lock (MissingChunks and uploads touch under the same lock).
//!    Index objects no manifest names, older than the cutoff, go too.
//!
//! Why it is safe while backups run: a chunk a session was told is present, or uploaded,
//! was touched after that session started, so after the cutoff; a group committed after
//! the mark phase only names such chunks (its session was open). The margin absorbs clock
//! granularity and small clock steps.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use vmbackup_proto::Digest;
use vmbackup_proto::index::{self, SparseIndex};

use crate::backend::ObjectKind;
use crate::chunk_store::ChunkStore;
use crate::error::{ErrorKind, Result, StoreError};

/// Default safety margin.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(300);

/// What a GC run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Chunks deleted.
    pub chunks_removed: u64,
    /// Blob bytes deleted.
    pub bytes_removed: u64,
    /// Chunks kept.
    pub chunks_kept: u64,
    /// Blob bytes kept.
    pub bytes_kept: u64,
    /// Unreferenced index objects deleted.
    pub indexes_removed: u64,
    /// Wall time.
    pub seconds: f64,
}

/// The sweep cutoff: chunks last touched before it may go.
pub fn cutoff(gc_start: SystemTime, oldest_session: Option<SystemTime>, margin: Duration) -> SystemTime {
    let base = oldest_session.map_or(gc_start, |s| s.min(gc_start));
    base.checked_sub(margin).unwrap_or(SystemTime::UNIX_EPOCH).max(SystemTime::UNIX_EPOCH)
}

/// What the mark phase found: committed groups, the indexes they name, their chunks.
#[derive(Debug, Default)]
pub(crate) struct Marked {
    /// Manifest object names (`<uuid>.json`) of the groups marked.
    pub groups: HashSet<String>,
    /// Index object names those groups name.
    pub indexes: HashSet<String>,
    /// Chunks those indexes name.
    pub chunks: HashSet<Digest>,
}

impl ChunkStore {
    /// Runs one GC; a second concurrent run is refused (over a shared bucket, on any
    /// server: see [`crate::shared`]).
    pub fn garbage_collect(&self, margin: Duration) -> Result<GcReport> {
        let _running = self
            .gc_running
            .try_lock()
            .map_err(|_| StoreError::new(ErrorKind::Conflict, "garbage collection is already running"))?;
        if let Some(shared) = self.sessions().shared_protocol() {
            return self.shared_garbage_collect(shared, margin);
        }
        let timer = Instant::now();
        let start = SystemTime::now();
        let cut = cutoff(start, self.sessions().oldest_start()?, margin);

        let mut marked = Marked::default();
        self.mark_committed(&mut marked, true)?;

        // Sweep.
        let mut report = GcReport::default();
        self.backend.for_each_chunk(&mut |c| {
            if c.touched >= cut {
                report.chunks_kept += 1;
                report.bytes_kept += c.size;
                return Ok(());
            }
            let _guard = self.shard_lock(&c.digest);
            match self.backend.chunk_touched(&c.digest)? {
                Some(t) if t < cut => {
                    self.backend.delete_chunk(&c.digest)?;
                    report.chunks_removed += 1;
                    report.bytes_removed += c.size;
                }
                Some(_) => {
                    report.chunks_kept += 1;
                    report.bytes_kept += c.size;
                }
                None => {}
            }
            Ok(())
        })?;
        report.indexes_removed = self.remove_unreferenced(&marked, cut)?;
        report.seconds = timer.elapsed().as_secs_f64();
        tracing::info!(?report, "garbage collection finished");
        Ok(report)
    }

    /// Marks every chunk named by a committed group not yet in `marked.groups`; with
    /// `touch`, touches each (the local sweep's rule).
    pub(crate) fn mark_committed(&self, marked: &mut Marked, touch: bool) -> Result<()> {
        for group in self.list_groups()? {
            if !marked.groups.insert(format!("{}.json", group.manifest.group_uuid)) {
                continue;
            }
            for v in &group.manifest.volumes {
                marked.indexes.insert(v.index_name.clone());
                let bytes = match self.backend.get_object(ObjectKind::Index, &v.index_name) {
                    Ok(b) => b,
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        tracing::error!(group = %group.manifest.group_uuid, index = %v.index_name, "index of a committed group is missing");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let ix = SparseIndex::decode(&bytes, index::MAX_CHUNKS).map_err(|e| {
                    StoreError::new(
                        ErrorKind::Corrupt,
                        format!("index {}: {e}; GC stopped before deleting anything", v.index_name),
                    )
                })?;
                for d in ix.referenced() {
                    if marked.chunks.insert(*d) && touch {
                        self.backend.touch_chunk(d)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes index objects no marked group names and group metas without a manifest,
    /// older than the cutoff (a live commit writes both after its session started, so
    /// after the cutoff). Returns how many indexes went.
    pub(crate) fn remove_unreferenced(&self, marked: &Marked, cut: SystemTime) -> Result<u64> {
        let mut removed = 0;
        for o in self.backend.list_objects(ObjectKind::Index)? {
            if !marked.indexes.contains(&o.name) && o.modified < cut {
                self.backend.delete_object(ObjectKind::Index, &o.name)?;
                removed += 1;
            }
        }
        for o in self.backend.list_objects(ObjectKind::GroupMeta)? {
            if !marked.groups.contains(&o.name) && o.modified < cut {
                self.backend.delete_object(ObjectKind::GroupMeta, &o.name)?;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn cutoff_precedes_the_oldest_open_session() {
        let m = Duration::from_secs(10);
        assert_eq!(cutoff(t(1000), None, m), t(990));
        assert_eq!(cutoff(t(1000), Some(t(500)), m), t(490), "an older session moves the cutoff back");
        assert_eq!(cutoff(t(1000), Some(t(2000)), m), t(990), "a session newer than GC does not move it forward");
        assert_eq!(cutoff(t(5), None, m), SystemTime::UNIX_EPOCH);
    }
}
