//! What a job reports: its [`JobState`], the byte [`Counters`] its workers bump, and the
//! [`Progress`] snapshot watchers receive and the catalog keeps (as JSON in the `job` table).
//!
//! The stored JSON keeps the shape earlier agents wrote, so a job recorded before an upgrade
//! still replays: camelCase names, 64-bit counts as numbers or as decimal strings, the error
//! as ZStack's ErrorCode object. Start and end times live in the table's own columns.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ErrorReport;
pub use crate::model::JobState;

/// Byte counters of one job, bumped by its workers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Logical bytes the job will cover.
    pub planned: AtomicI64,
    /// Bytes read from volumes.
    pub read: AtomicI64,
    /// Bytes skipped as zero or unallocated.
    pub zero: AtomicI64,
    /// Bytes whose chunks the storage already had.
    pub deduplicated: AtomicI64,
    /// Bytes sent to storage.
    pub sent: AtomicI64,
    /// Bytes received from storage.
    pub received: AtomicI64,
    /// Bytes written to volumes.
    pub written: AtomicI64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicI64, n: u64) {
        counter.fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// A callback adding to the counter `which` picks, for the storage seam's meters.
    pub fn count_into(self: &Arc<Self>, which: fn(&Counters) -> &AtomicI64) -> crate::storage::metered::Count {
        let c = self.clone();
        Arc::new(move |n| Counters::add(which(&c), n))
    }

    /// Logical bytes done: read or skipped (backup) / written or skipped (restore).
    pub(crate) fn done(&self) -> i64 {
        self.read.load(Ordering::Relaxed).max(self.written.load(Ordering::Relaxed)) + self.zero.load(Ordering::Relaxed)
    }

    /// The counters' values now, by kind, as metrics label them.
    pub fn totals(&self) -> [(&'static str, u64); 6] {
        let get = |a: &AtomicI64| u64::try_from(a.load(Ordering::Relaxed)).unwrap_or(0);
        [
            ("read", get(&self.read)),
            ("zero", get(&self.zero)),
            ("deduplicated", get(&self.deduplicated)),
            ("sent", get(&self.sent)),
            ("received", get(&self.received)),
            ("written", get(&self.written)),
        ]
    }
}

/// One snapshot of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Progress {
    /// Job uuid.
    pub job_uuid: String,
    /// `CreateVmBackup`, `RestoreVmBackup`, `RecoverVmBackup`.
    pub kind: String,
    /// State.
    pub state: JobState,
    /// Logical bytes the job covers.
    #[serde(deserialize_with = "int64")]
    pub bytes_planned: i64,
    /// Bytes read from volumes.
    #[serde(deserialize_with = "int64")]
    pub bytes_read: i64,
    /// Bytes skipped as zero or unallocated.
    #[serde(deserialize_with = "int64")]
    pub bytes_zero: i64,
    /// Bytes the storage already had.
    #[serde(deserialize_with = "int64")]
    pub bytes_deduplicated: i64,
    /// Bytes sent to storage.
    #[serde(deserialize_with = "int64")]
    pub bytes_sent: i64,
    /// Bytes received from storage.
    #[serde(deserialize_with = "int64")]
    pub bytes_received: i64,
    /// Bytes written to volumes.
    #[serde(deserialize_with = "int64")]
    pub bytes_written: i64,
    /// Logical bytes per second over the last few seconds.
    pub rate: f64,
    /// Seconds left at that rate.
    pub eta_seconds: Option<f64>,
    /// What the job is doing.
    pub message: String,
    /// Why it failed or was cancelled.
    pub error: Option<ErrorReport>,
    /// Unix milliseconds (kept in the table's column, not in the JSON).
    #[serde(skip)]
    pub started: i64,
    /// Unix milliseconds, once ended (kept in the table's column).
    #[serde(skip)]
    pub finished: Option<i64>,
}

/// A 64-bit count written as a JSON number, or as a decimal string (earlier agents).
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(i64),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::Number(n) => Ok(n),
        Either::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_written_by_earlier_agents_still_reads() {
        let old = r#"{"jobUuid":"j","kind":"CreateVmBackup","state":"Failed","bytesPlanned":"100","bytesRead":"60",
            "rate":0,"message":"m","error":{"code":"SYS.1006","description":"d","details":"x","opaque":{"field":"f"}},
            "started":"2026-01-01T00:00:00Z"}"#;
        let p: Progress = serde_json::from_str(old).expect("old progress");
        assert_eq!((p.state, p.bytes_planned, p.bytes_read), (JobState::Failed, 100, 60));
        let e = p.error.as_ref().expect("error");
        assert_eq!((e.code.as_str(), e.opaque.get("field").map(String::as_str)), ("SYS.1006", Some("f")));
        let again: Progress = serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("round trip");
        assert_eq!(again, p);
    }
}
