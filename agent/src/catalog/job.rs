//! Job records: one row per long-running operation (backup, restore, recover), written when
//! it starts and when it ends, so that its outcome survives the agent. A job still `Running`
//! when the agent starts was interrupted by a crash or kill and is marked `Failed`.

use rusqlite::{OptionalExtension, params};

use super::{Catalog, CatalogError};
use crate::model::JobState;

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Job uuid.
    pub uuid: String,
    /// `CreateVmBackup`, `RestoreVmBackup`, …
    pub kind: String,
    /// The request's resourceUuid (idempotency key), if any.
    pub resource_uuid: Option<String>,
    /// What the job works on (e.g. the backup storage uuid), for Permissive deletes.
    pub target_uuid: Option<String>,
    /// State.
    pub state: JobState,
    /// Last progress, JSON of the JobProgress message.
    pub progress: String,
    /// Unix milliseconds.
    pub started: i64,
    /// Unix milliseconds.
    pub finished: Option<i64>,
}

const COLUMNS: &str = "uuid, kind, resource_uuid, target_uuid, state, progress, started, finished";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        uuid: r.get(0)?,
        kind: r.get(1)?,
        resource_uuid: r.get(2)?,
        target_uuid: r.get(3)?,
        state: r.get(4)?,
        progress: r.get(5)?,
        started: r.get(6)?,
        finished: r.get(7)?,
    })
}

impl Catalog {
    /// Records a job (insert or update).
    pub fn put_job(&self, j: &JobRecord) -> Result<(), CatalogError> {
        self.conn().execute(
            &format!(
                "INSERT INTO job ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(uuid) DO UPDATE SET state = excluded.state, progress = excluded.progress, finished = excluded.finished"
            ),
            params![j.uuid, j.kind, j.resource_uuid, j.target_uuid, j.state, j.progress, j.started, j.finished],
        )?;
        Ok(())
    }

    /// The job with this uuid.
    pub fn get_job(&self, uuid: &str) -> Result<Option<JobRecord>, CatalogError> {
        Ok(self.conn().query_row(&format!("SELECT {COLUMNS} FROM job WHERE uuid = ?1"), [uuid], from_row).optional()?)
    }

    /// The newest job of `kind` started for this resourceUuid.
    pub fn job_by_resource(&self, kind: &str, resource_uuid: &str) -> Result<Option<JobRecord>, CatalogError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM job WHERE kind = ?1 AND resource_uuid = ?2 ORDER BY started DESC LIMIT 1"
                ),
                [kind, resource_uuid],
                from_row,
            )
            .optional()?)
    }

    /// Marks every job left `Running` by a previous agent process as `Failed` with `reason`.
    /// Returns how many.
    pub fn fail_interrupted_jobs(&self, reason: &str, now: i64) -> Result<usize, CatalogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM job WHERE state = 'Running'"))?;
        let jobs = stmt.query_map([], from_row)?.collect::<Result<Vec<_>, _>>()?;
        for j in &jobs {
            let mut progress: serde_json::Value = serde_json::from_str(&j.progress).unwrap_or(serde_json::json!({}));
            progress["state"] = "Failed".into();
            progress["message"] = reason.into();
            progress["error"] = serde_json::json!({"code": "SYS.1006", "description": "The operation was interrupted", "details": reason});
            conn.execute(
                "UPDATE job SET state = 'Failed', progress = ?2, finished = ?3 WHERE uuid = ?1",
                params![j.uuid, progress.to_string(), now],
            )?;
        }
        Ok(jobs.len())
    }

    /// Whether a running job works on `target_uuid`.
    pub fn running_jobs_on(&self, target_uuid: &str) -> Result<i64, CatalogError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM job WHERE state = 'Running' AND target_uuid = ?1",
            [target_uuid],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_jobs_become_failed_with_the_reason() {
        let c = Catalog::open_in_memory().expect("catalog");
        let j = JobRecord {
            uuid: "j".into(),
            kind: "CreateVmBackup".into(),
            resource_uuid: Some("r".into()),
            target_uuid: Some("bs".into()),
            state: JobState::Running,
            progress: "{\"jobUuid\":\"j\",\"state\":\"Running\"}".into(),
            started: 5,
            finished: None,
        };
        c.put_job(&j).expect("put");
        assert_eq!(c.running_jobs_on("bs").expect("running"), 1);
        assert_eq!(c.fail_interrupted_jobs("agent restarted", 9).expect("fail"), 1);
        let got = c.get_job("j").expect("get").expect("exists");
        assert_eq!((got.state, got.finished), (JobState::Failed, Some(9)));
        assert!(got.progress.contains("agent restarted"));
        assert_eq!(c.job_by_resource("CreateVmBackup", "r").expect("by resource").map(|j| j.uuid), Some("j".into()));
        assert_eq!(c.running_jobs_on("bs").expect("running"), 0);
    }
}
