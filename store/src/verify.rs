//! Verification: re-read chunks, check CRC and digest, move bad ones aside (never delete
//! them), and record which groups are damaged (a chunk they name is missing or bad) in the
//! store's group state (`group_state.rs`, `meta/verify-state.json`), which group
//! reads report.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use vmbackup_proto::Digest;
use vmbackup_proto::index::{self, SparseIndex};

use crate::backend::ObjectKind;
use crate::chunk_store::ChunkStore;
use crate::error::{ErrorKind, Result, StoreError};

/// Chunks read and checked at once by a verify.
pub const VERIFY_WORKERS: usize = 8;

/// What a verify found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    /// Chunks read and checked.
    pub chunks_checked: u64,
    /// Chunks missing or failing CRC or digest (the bad ones are quarantined).
    pub bad_chunks: Vec<Digest>,
    /// Groups naming a bad or missing chunk.
    pub damaged_groups: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

/// Outcome of checking one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Good,
    Missing,
    Bad,
}

impl ChunkStore {
    fn check_chunk(&self, d: &Digest) -> Result<Check> {
        let blob_bytes = match self.backend.get_chunk(d) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Check::Missing),
            Err(e) => return Err(e),
        };
        match self.check_blob(&blob_bytes, d) {
            Ok(_) => Ok(Check::Good),
            Err(e) => {
                tracing::error!(chunk = %d, error = %e, "bad chunk moved aside");
                self.backend.quarantine_chunk(d)?;
                Ok(Check::Bad)
            }
        }
    }

    /// Checks `ds` on up to [`VERIFY_WORKERS`] threads (an object store's latency is then
    /// paid once per batch of reads, not per chunk), at most one blob held per thread.
    fn check_chunks(&self, ds: &[Digest]) -> Result<Vec<Check>> {
        let workers = VERIFY_WORKERS.min(ds.len()).max(1);
        let next = AtomicUsize::new(0);
        let mut out = vec![Check::Missing; ds.len()];
        let done: Vec<Result<Vec<(usize, Check)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(d) = ds.get(i) else { return Ok(mine) };
                            mine.push((i, self.check_chunk(d)?));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::new(ErrorKind::Io, "a verify thread panicked"))))
                .collect()
        });
        for r in done {
            for (i, c) in r? {
                out[i] = c;
            }
        }
        Ok(out)
    }

    /// Verifies the chunks of `groups` (all chunks of the store when empty) and records
    /// which groups are damaged.
    pub fn verify(&self, groups: &[String]) -> Result<VerifyReport> {
        let timer = Instant::now();
        let all = self.list_groups()?;
        let selected: Vec<_> = if groups.is_empty() {
            all.iter().collect()
        } else {
            let want: HashSet<String> = groups.iter().map(|g| g.to_ascii_lowercase()).collect();
            let sel: Vec<_> = all.iter().filter(|g| want.contains(&g.manifest.group_uuid)).collect();
            if let Some(unknown) = want.iter().find(|w| !sel.iter().any(|g| &g.manifest.group_uuid == *w)) {
                return Err(StoreError::new(
                    ErrorKind::NotFound,
                    format!("group {} not found (groupUuids)", crate::error::shorten(unknown)),
                ));
            }
            sel
        };

        let mut report = VerifyReport::default();
        let mut bad: HashSet<Digest> = HashSet::new();
        let mut good: HashSet<Digest> = HashSet::new();
        // The selected groups' indexes, read once (None: missing or undecodable).
        let mut indexes: HashMap<&str, Option<SparseIndex>> = HashMap::new();
        for v in selected.iter().flat_map(|g| &g.manifest.volumes) {
            if indexes.contains_key(v.index_name.as_str()) {
                continue;
            }
            let ix = match self.backend.get_object(ObjectKind::Index, &v.index_name) {
                Ok(b) => SparseIndex::decode(&b, index::MAX_CHUNKS).ok(),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            indexes.insert(&v.index_name, ix);
        }
        // What to read: every stored chunk, or every chunk the selected groups name.
        let todo: Vec<Digest> = if groups.is_empty() {
            let mut stored = Vec::new();
            self.backend.for_each_chunk(&mut |c| {
                stored.push(c.digest);
                Ok(())
            })?;
            stored
        } else {
            let mut seen = HashSet::new();
            indexes.values().flatten().flat_map(|ix| ix.referenced()).filter(|d| seen.insert(**d)).copied().collect()
        };
        for (d, check) in todo.iter().zip(self.check_chunks(&todo)?) {
            report.chunks_checked += 1;
            match check {
                Check::Good => {
                    good.insert(*d);
                }
                Check::Bad => {
                    bad.insert(*d);
                }
                // Gone since the listing (GC): bad only if a group names it (below).
                Check::Missing => {}
            }
        }
        // A group is damaged when an index is unreadable or a chunk it names is not good
        // (bad, or missing: reported among the bad chunks).
        let mut damaged = Vec::new();
        for g in &selected {
            let mut group_bad = false;
            for v in &g.manifest.volumes {
                let Some(ix) = &indexes[v.index_name.as_str()] else {
                    group_bad = true;
                    continue;
                };
                for d in ix.referenced().filter(|d| !good.contains(*d)) {
                    bad.insert(*d);
                    group_bad = true;
                }
            }
            if group_bad {
                damaged.push(g.manifest.group_uuid.clone());
            }
        }

        self.group_state.record_verify(selected.iter().map(|g| g.manifest.group_uuid.as_str()), &damaged)?;

        report.bad_chunks = bad.into_iter().collect();
        report.bad_chunks.sort();
        report.damaged_groups = damaged;
        report.seconds = timer.elapsed().as_secs_f64();
        tracing::info!(
            checked = report.chunks_checked,
            bad = report.bad_chunks.len(),
            damaged = report.damaged_groups.len(),
            "verify finished"
        );
        Ok(report)
    }
}
