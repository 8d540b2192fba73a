//! Verification: re-read chunks, check CRC and digest, move bad ones aside (never delete
//! them), and record which groups are damaged (a chunk they name is missing or bad) in the
//! store's group state (`group_state.rs`, `meta/verify-state.json`), which group
//! reads report.

use std::collections::HashSet;
use std::time::Instant;

use vmbackup_proto::Digest;
use vmbackup_proto::index::{self, VolumeIndex};

use crate::backend::ObjectKind;
use crate::chunk_store::ChunkStore;
use crate::error::{ErrorKind, Result, StoreError};

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
                return Err(StoreError::new(ErrorKind::NotFound, format!("group {unknown} not found")));
            }
            sel
        };

        let mut report = VerifyReport::default();
        let mut bad: HashSet<Digest> = HashSet::new();
        let mut good: HashSet<Digest> = HashSet::new();
        if groups.is_empty() {
            // Every stored chunk, referenced or not.
            let mut stored = Vec::new();
            self.backend.for_each_chunk(&mut |c| {
                stored.push(c.digest);
                Ok(())
            })?;
            for d in stored {
                report.chunks_checked += 1;
                match self.check_chunk(&d)? {
                    Check::Good => {
                        good.insert(d);
                    }
                    Check::Bad => {
                        bad.insert(d);
                    }
                    // Deleted since the listing (GC): only a group naming it makes it damage.
                    Check::Missing => {}
                }
            }
        }
        let mut damaged = Vec::new();
        for g in &selected {
            let mut group_bad = false;
            for v in &g.manifest.volumes {
                let ix = match self.backend.get_object(ObjectKind::Index, &v.index_name) {
                    Ok(b) => VolumeIndex::decode(&b, index::MAX_CHUNKS).ok(),
                    Err(e) if e.kind() == ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                };
                let Some(ix) = ix else {
                    group_bad = true;
                    continue;
                };
                for d in ix.referenced() {
                    if good.contains(d) {
                        continue;
                    }
                    if bad.contains(d) {
                        group_bad = true;
                        continue;
                    }
                    // A full scan already read every stored chunk: one it did not see is missing.
                    let check = if groups.is_empty() {
                        Check::Missing
                    } else {
                        report.chunks_checked += 1;
                        self.check_chunk(d)?
                    };
                    if check == Check::Good {
                        good.insert(*d);
                    } else {
                        bad.insert(*d);
                        group_bad = true;
                    }
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
