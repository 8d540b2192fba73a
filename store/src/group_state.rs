//! State the store keeps about committed groups beside their manifests: which groups the
//! last verify of each found damaged (a chunk or index they name is missing or bad).
//!
//! On disk it is `meta/verify-state.json`, `{"damagedGroups": ["<group uuid>", ...]}`. The
//! name and shape are a format (stores written by earlier builds carry them): do not change
//! them. A missing file means no group is marked.
//!
//! The chunk store owns one [`GroupState`]. It reads the file once, on first use, and keeps
//! the marks in memory behind a mutex: group reads (get, list) answer from that copy
//! instead of reading the file each time. Every change is load-modify-persist under the
//! mutex, written with the backend's durable put (temp + fsync + rename + directory fsync),
//! and applied to the copy only once the write succeeded. So two verifies finishing at once
//! cannot lose each other's marks, and after a failed write memory still matches the disk.
//!
//! The copy assumes one process serves a store directory (the daemon); nothing else writes
//! the file. Deleting a group leaves its mark in place (the uuid is not reused); a verify
//! covering the group again clears it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ObjectKind};
use crate::error::{ErrorKind, Result, StoreError};

/// The file name under `meta/`. Do not change: existing stores carry it.
const FILE: &str = "verify-state.json";

/// The JSON document. Do not rename fields: existing stores carry them.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    damaged_groups: BTreeSet<String>,
}

/// The damaged-group marks of one store: loaded once, cached, updated under a lock.
#[derive(Debug)]
pub(crate) struct GroupState {
    backend: Arc<dyn Backend>,
    /// `None` until first read from the backend (and again if that read failed).
    damaged: Mutex<Option<BTreeSet<String>>>,
}

impl GroupState {
    /// Marks kept in `backend`, read on first use.
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend, damaged: Mutex::new(None) }
    }

    /// Whether `group` is marked damaged.
    pub(crate) fn is_damaged(&self, group: &str) -> Result<bool> {
        let mut guard = self.lock();
        Ok(self.loaded(&mut guard)?.contains(group))
    }

    /// The groups marked damaged.
    pub(crate) fn damaged(&self) -> Result<BTreeSet<String>> {
        let mut guard = self.lock();
        Ok(self.loaded(&mut guard)?.clone())
    }

    /// Records a verify of `verified`: their marks are replaced by `damaged` (a subset of
    /// them); every other group's mark is kept. Persisted before this returns.
    pub(crate) fn record_verify<'a>(
        &self,
        verified: impl IntoIterator<Item = &'a str>,
        damaged: &[String],
    ) -> Result<()> {
        let mut guard = self.lock();
        let mut next = self.loaded(&mut guard)?.clone();
        for g in verified {
            next.remove(g);
        }
        next.extend(damaged.iter().cloned());
        let doc = Document { damaged_groups: next };
        let json = serde_json::to_vec_pretty(&doc).map_err(|e| {
            StoreError::new(ErrorKind::Io, format!("encoding damaged-group marks for meta/{FILE}")).with_source(e)
        })?;
        self.backend.put_object(ObjectKind::Meta, FILE, &json)?;
        *guard = Some(doc.damaged_groups);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Option<BTreeSet<String>>> {
        // A panic under the lock cannot leave a half-applied change: the copy is replaced
        // only after a successful write.
        self.damaged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached marks, read from the backend first if this is the first use.
    fn loaded<'g>(&self, guard: &'g mut Option<BTreeSet<String>>) -> Result<&'g BTreeSet<String>> {
        if guard.is_none() {
            *guard = Some(self.read()?);
        }
        // Just filled if it was empty.
        Ok(guard.get_or_insert_with(BTreeSet::new))
    }

    fn read(&self) -> Result<BTreeSet<String>> {
        let bytes = match self.backend.get_object(ObjectKind::Meta, FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(e),
        };
        let doc: Document = serde_json::from_slice(&bytes).map_err(|e| {
            StoreError::new(ErrorKind::Corrupt, format!("meta/{FILE} is not a damaged-group list")).with_source(e)
        })?;
        Ok(doc.damaged_groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fs::FsBackend;

    fn state() -> (tempfile::TempDir, Arc<dyn Backend>, GroupState) {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend: Arc<dyn Backend> = Arc::new(FsBackend::open(dir.path()).expect("backend"));
        let state = GroupState::new(backend.clone());
        (dir, backend, state)
    }

    #[test]
    fn record_verify_keeps_marks_of_groups_it_did_not_verify() {
        let (dir, backend, s) = state();
        s.record_verify(["a", "b"], &["a".into(), "b".into()]).expect("first verify");
        s.record_verify(["b", "c"], &["c".into()]).expect("second verify");
        let want: BTreeSet<String> = ["a", "c"].map(String::from).into();
        assert_eq!(s.damaged().expect("marks"), want);
        assert!(s.is_damaged("a").expect("a") && !s.is_damaged("b").expect("b"));
        assert_eq!(GroupState::new(backend).damaged().expect("reread"), want, "persisted");
        let text = std::fs::read_to_string(dir.path().join("meta").join(FILE)).expect("file");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json, serde_json::json!({"damagedGroups": ["a", "c"]}), "on-disk shape");
    }

    #[test]
    fn missing_file_means_no_marks_and_reads_are_cached() {
        let (dir, _backend, s) = state();
        assert!(s.damaged().expect("marks").is_empty());
        // Read once: a file appearing behind the store's back is not seen.
        std::fs::write(dir.path().join("meta").join(FILE), br#"{"damagedGroups":["x"]}"#).expect("write");
        assert!(!s.is_damaged("x").expect("cached"));
    }

    #[test]
    fn unreadable_file_is_corrupt_naming_it_and_is_retried() {
        let (dir, _backend, s) = state();
        let path = dir.path().join("meta").join(FILE);
        std::fs::write(&path, b"{not json").expect("write");
        let e = s.damaged().expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains(FILE), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "the JSON error is the source");
        let e = s.record_verify(["a"], &[]).expect_err("not overwritten while unreadable");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        std::fs::write(&path, br#"{"damagedGroups":["x"]}"#).expect("repair");
        assert!(s.is_damaged("x").expect("read again after the failure"));
    }
}
