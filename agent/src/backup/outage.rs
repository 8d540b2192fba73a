//! Surviving an Image Storage outage mid-backup: a store restarted or a network cut must not
//! cost the job its work, nor make it send what the store already holds.
//!
//! - **The ledger.** Every slot of a volume (each chunk that may hold data, see
//!   [`super::slots`]) has a [`Settled`] state: not yet done, done without bytes (zero,
//!   reused, or the store had it), or stored with its blob's length. Workers fill it as
//!   they go; chunks without a slot are zero and done from the start.
//! - **The wait.** An error marked [`AgentError::is_store_outage`] (unreachable, a call
//!   timing out, a stream cut) is waited out with backoff ([`backoff`]) for up to the
//!   agent's `store_outage_seconds`; any other error (a refusal, a full disk, a bad volume)
//!   fails the job at once.
//! - **The resume.** The next attempt opens a new session. Chunks settled with data are asked
//!   again ([`recheck`]): the new session then protects them from GC, and those the store
//!   lacks (uploads the outage cut short) go back to "not yet done" with their byte counts
//!   taken back. Only chunks not done are read and sent; nothing is sent twice.
//! - **The lost answer.** A commit the store made durable but whose answer never arrived is
//!   found by [`committed_before`] (the group is on the store), and its manifest's records
//!   are returned instead of committing again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vmbackup_proto::Digest;
use vmbackup_proto::manifest::GroupManifest;

use super::VolumeJob;
use crate::catalog::volume_backup::VolumeBackupRecord;
use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::{Session, Store};

/// One chunk's state in the ledger (an `AtomicU32`: 0, 1, or 2 + the stored blob's length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Not done: to be read (again).
    No,
    /// Done and nothing stored by this job: zero, not allocated, reused from the previous
    /// backup, or already on the store.
    WithoutBytes,
    /// Stored by this job: the blob's length.
    Stored(u32),
}

impl Settled {
    fn encode(self) -> u32 {
        match self {
            Settled::No => 0,
            Settled::WithoutBytes => 1,
            Settled::Stored(n) => n.saturating_add(2),
        }
    }

    fn decode(v: u32) -> Self {
        match v {
            0 => Settled::No,
            1 => Settled::WithoutBytes,
            n => Settled::Stored(n - 2),
        }
    }
}

/// The ledger of one volume: one state per slot.
#[derive(Debug)]
pub(crate) struct Ledger(Vec<AtomicU32>);

impl Ledger {
    /// A ledger of `slots` slots, none done.
    pub(crate) fn new(slots: usize) -> Self {
        Self((0..slots).map(|_| AtomicU32::new(0)).collect())
    }

    /// Records slot `i`'s state.
    pub(crate) fn set(&self, i: usize, s: Settled) {
        if let Some(slot) = self.0.get(i) {
            slot.store(s.encode(), Ordering::Relaxed);
        }
    }

    /// Slot `i`'s state.
    pub(crate) fn get(&self, i: usize) -> Settled {
        self.0.get(i).map_or(Settled::No, |slot| Settled::decode(slot.load(Ordering::Relaxed)))
    }

    /// Slots not done.
    pub(crate) fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.0.len()).filter(|&i| self.get(i) == Settled::No)
    }
}

/// The pause before attempt `n` (1, 2, 4, … seconds, at most 30).
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// Digests asked per MissingChunks call of a re-check.
const RECHECK_BATCH: usize = 8192;

/// Asks the new `session` about every chunk an earlier attempt settled with data (those the
/// previous backup's index already named were never asked and are not now). Chunks the
/// store lacks are marked not done and their bytes taken back from the volume's counts.
/// Returns how many were lacking.
pub(crate) async fn recheck(
    session: &Session,
    volumes: &[std::sync::Arc<VolumeJob>],
    known: &HashSet<Digest>,
) -> Result<u64> {
    let mut lacking = 0;
    for v in volumes {
        // A volume the earlier attempts never planned has nothing settled.
        let Some(slots) = v.slots.get() else { continue };
        let digests: Vec<(usize, Digest)> = slots
            .with_data()
            .into_iter()
            .filter(|(s, d)| !known.contains(d) && slots.ledger.get(*s) != Settled::No)
            .collect();
        for batch in digests.chunks(RECHECK_BATCH) {
            let question: Vec<Digest> = batch.iter().map(|(_, d)| *d).collect::<HashSet<_>>().into_iter().collect();
            let missing: HashSet<Digest> = session.missing(&question).await?.into_iter().collect();
            for (s, d) in batch {
                if !missing.contains(d) {
                    continue;
                }
                lacking += 1;
                match slots.ledger.get(*s) {
                    Settled::Stored(n) => {
                        v.stored_bytes.fetch_sub(u64::from(n), Ordering::Relaxed);
                    }
                    Settled::WithoutBytes => {
                        let len = v.chunk_len(slots.chunk(*s));
                        v.dedup_bytes.fetch_sub(len, Ordering::Relaxed);
                    }
                    Settled::No => {}
                }
                slots.ledger.set(*s, Settled::No);
            }
        }
    }
    Ok(lacking)
}

/// The records of `group_uuid` when an earlier attempt's commit reached the store (its
/// answer was lost to the outage); None when the store does not have it.
pub(crate) async fn committed_before(
    store: &dyn Store,
    storage_uuid: &str,
    group_uuid: &str,
    key: Option<&vmbackup_proto::seal::ChunkKey>,
) -> Result<Option<Vec<VolumeBackupRecord>>> {
    let g = match store.get_group(group_uuid).await {
        Ok(g) => g,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest = GroupManifest::decode(&g.manifest)
        .and_then(|m| match key {
            Some(k) => m.unseal(k),
            None => Ok(m),
        })
        .map_err(|e| {
            AgentError::new(ErrorKind::FailedPrecondition, format!("manifest of group {group_uuid} on the store: {e}"))
        })?;
    let records = super::records_of(&manifest, storage_uuid, g.damaged)?;
    Ok(Some(records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_keeps_each_state_and_backoff_doubles_to_thirty_seconds() {
        let l = Ledger::new(4);
        l.set(1, Settled::WithoutBytes);
        l.set(2, Settled::Stored(0));
        l.set(3, Settled::Stored(4 << 20));
        assert_eq!(
            (0..4).map(|i| l.get(i)).collect::<Vec<_>>(),
            vec![Settled::No, Settled::WithoutBytes, Settled::Stored(0), Settled::Stored(4 << 20)]
        );
        assert_eq!(l.pending().collect::<Vec<_>>(), vec![0]);
        assert_eq!(l.get(99), Settled::No, "out of range reads as not done");
        let waits: Vec<u64> = (1..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
