//! Running jobs: cancellation, progress, and the progress stream watchers follow.
//!
//! A job is recorded in the catalog when it starts (`Running`) and when it ends, so
//! watching a finished job, or a job a crashed agent left behind, still answers.
//! While it runs, workers bump the atomic [`Counters`]; a ticker publishes a [`Progress`]
//! snapshot (with rate and ETA) twice a second to every watcher. Cancellation is a
//! [`CancellationToken`] per job. A job started for a request with a resourceUuid has that
//! uuid, so a watcher finds it by the id the caller already knows.
//!
//! Jobs know no wire type: the API edges render [`Progress`] in their own shapes, and the
//! metrics observe finished jobs through [`AgentMetrics`].

mod progress;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use progress::{Counters, JobState, Progress};

use crate::catalog::job::JobRecord;
use crate::catalog::{CatalogHandle, now_millis};
use crate::error::{AgentError, ErrorKind, Result};
use crate::metrics::AgentMetrics;

/// How often watchers get a snapshot.
pub const TICK: Duration = Duration::from_millis(500);

/// A running job.
#[derive(Debug)]
pub struct Job {
    /// Job uuid.
    pub uuid: String,
    /// Kind, e.g. `CreateVmBackup`.
    pub kind: String,
    /// Cancelled by CancelJob or shutdown.
    pub cancel: CancellationToken,
    /// Progress counters.
    pub counters: Arc<Counters>,
    record: Mutex<JobRecord>,
    message: Mutex<String>,
    group: Mutex<Option<String>>,
    tx: watch::Sender<Progress>,
}

impl Job {
    /// A span for everything the job logs: its uuid and kind on every line.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("job", id = %self.uuid, kind = %self.kind)
    }

    /// Names the backup group the job reads or writes (a restore, a recover), so a delete
    /// of the group finds it.
    pub fn set_group(&self, group: &str) {
        *self.group.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(group.to_string());
    }

    fn uses_group(&self, group: &str) -> bool {
        self.uuid == group
            || self.group.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_deref() == Some(group)
    }

    /// Sets the progress message.
    pub fn set_message(&self, m: impl Into<String>) {
        *self.message.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = m.into();
    }

    fn snapshot(&self, state: JobState, rate: f64, error: Option<AgentError>, finished: Option<i64>) -> Progress {
        use std::sync::atomic::Ordering;
        let c = &self.counters;
        let planned = c.planned.load(Ordering::Relaxed);
        let done = c.done();
        let eta = (rate > 0.0 && planned > done).then(|| (planned - done) as f64 / rate);
        let started = self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner).started;
        Progress {
            job_uuid: self.uuid.clone(),
            kind: self.kind.clone(),
            state,
            bytes_planned: planned,
            bytes_read: c.read.load(Ordering::Relaxed),
            bytes_zero: c.zero.load(Ordering::Relaxed),
            bytes_deduplicated: c.deduplicated.load(Ordering::Relaxed),
            bytes_sent: c.sent.load(Ordering::Relaxed),
            bytes_received: c.received.load(Ordering::Relaxed),
            bytes_written: c.written.load(Ordering::Relaxed),
            rate,
            eta_seconds: eta,
            message: self.message.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            error: error.map(|e| e.report()),
            started,
            finished,
        }
    }
}

/// The job uuid of a recover of `group` to `dst`: RecoverVmBackupFromImageStoreBackupStorage
/// carries no resourceUuid, so the job is named by what it does, and a client can watch it
/// (`vmbackupctl backup recover` does) without being told.
pub fn recover_job_uuid(group: &str, dst: &str) -> String {
    let d = vmbackup_proto::Digest::of(format!("vmbackup recover\0{group}\0{dst}").as_bytes());
    d.to_hex()[..32].to_string()
}

/// The registry of jobs.
#[derive(Debug, Clone)]
pub struct Jobs {
    catalog: CatalogHandle,
    running: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<AgentMetrics>,
}

/// Final state of a job from its outcome.
fn final_state<T>(outcome: &Result<T>) -> JobState {
    match outcome {
        Ok(_) => JobState::Succeeded,
        Err(e) if e.kind() == ErrorKind::Cancelled => JobState::Cancelled,
        Err(_) => JobState::Failed,
    }
}

impl Jobs {
    /// A registry over `catalog`; jobs a previous process left running are marked Failed.
    pub async fn open(catalog: CatalogHandle) -> Result<Self> {
        let n =
            catalog.run(move |c| c.fail_interrupted_jobs("the agent stopped while the job ran", now_millis())).await?;
        if n > 0 {
            tracing::warn!(jobs = n, "jobs interrupted by an agent restart marked Failed");
        }
        Ok(Self { catalog, running: Arc::default(), draining: Arc::default(), metrics: Arc::default() })
    }

    /// Registers and records a new running job.
    pub async fn start(
        &self,
        kind: &str,
        resource_uuid: Option<String>,
        target_uuid: Option<String>,
    ) -> Result<Arc<Job>> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::new(
                ErrorKind::Unavailable,
                "the agent is shutting down; retry once it is back (the same resourceUuid resumes)",
            ));
        }
        let uuid = resource_uuid.clone().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let started = now_millis();
        let record = JobRecord {
            uuid: uuid.clone(),
            kind: kind.to_string(),
            resource_uuid,
            target_uuid,
            state: JobState::Running,
            progress: "{}".to_string(),
            started,
            finished: None,
        };
        let (tx, _rx) = watch::channel(Progress::default());
        let job = Arc::new(Job {
            uuid: uuid.clone(),
            kind: kind.to_string(),
            cancel: CancellationToken::new(),
            counters: Arc::default(),
            record: Mutex::new(record.clone()),
            message: Mutex::new(String::new()),
            group: Mutex::new(None),
            tx,
        });
        let first = job.snapshot(JobState::Running, 0.0, None, None);
        let record = JobRecord { progress: progress_json(&first), ..record };
        job.tx.send_replace(first);
        // Running before it is recorded: a WatchJob in between must find it live, never a
        // recorded "Running" it would replay as if that were the end.
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uuid.clone(), job.clone());
        if let Err(e) = self.catalog.run(move |c| c.put_job(&record)).await {
            self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&uuid);
            return Err(e.into());
        }
        tokio::spawn(ticker(job.clone()));
        Ok(job)
    }

    /// Runs `work` as `job` on its own task, to its end even if the caller goes away, and
    /// records its outcome; returns what it returned.
    pub async fn run<T, F>(&self, job: Arc<Job>, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (jobs, span) = (self.clone(), job.span());
        tokio::spawn(
            async move {
                let result = work.await;
                jobs.finish(&job, result.as_ref().map(|_| ()).map_err(AgentError::detached)).await;
                result
            }
            .instrument(span),
        )
        .await?
    }

    /// Ends a job with `outcome`: records the final progress, tells watchers, forgets it.
    pub async fn finish(&self, job: &Arc<Job>, outcome: Result<()>) {
        // Stop the ticker first so no Running snapshot can follow the terminal one.
        job.cancel.cancel();
        let state = final_state(&outcome);
        let now = now_millis();
        let last = job.snapshot(state, 0.0, outcome.err(), Some(now));
        let record = {
            let mut r = job.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            r.state = state;
            r.progress = progress_json(&last);
            r.finished = Some(now);
            r.clone()
        };
        let seconds = (now - record.started).max(0) as f64 / 1000.0;
        self.metrics.record(&job.kind, state.as_str(), seconds, &job.counters.totals());
        if let Err(e) = self.catalog.run(move |c| c.put_job(&record)).await {
            tracing::error!(job = %job.uuid, error = %e, "recording the end of a job failed");
        }
        job.tx.send_replace(last);
        let idle = {
            let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            running.remove(&job.uuid);
            running.is_empty()
        };
        if idle {
            // Nothing else is working: the agent goes back to its baseline memory instead of
            // keeping the peak of this job's buffers (see `daemon::malloc`); the caller does
            // not wait for it.
            drop(tokio::task::spawn_blocking(vmbackup_store::daemon::malloc::release_free_memory));
        }
    }

    /// Shutdown: refuses new jobs, gives running ones `grace` to end, then cancels them and
    /// waits (briefly) for them to record their end.
    pub async fn drain(&self, grace: std::time::Duration) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let running = self.all_running().len();
        if running > 0 {
            tracing::info!(jobs = running, grace_seconds = grace.as_secs(), "waiting for running jobs before stopping");
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !self.all_running().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let left = self.all_running();
        if left.is_empty() {
            return;
        }
        tracing::warn!(jobs = left.len(), "grace time over: cancelling running jobs");
        for j in &left {
            j.cancel.cancel();
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.all_running().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Metrics of finished jobs.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// The running job with this uuid.
    pub fn running(&self, uuid: &str) -> Option<Arc<Job>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(uuid).cloned()
    }

    /// The running jobs that use backup group `group`: its backup, and restores and
    /// recovers of it.
    pub fn using_group(&self, group: &str) -> Vec<Arc<Job>> {
        self.all_running().into_iter().filter(|j| j.uses_group(group)).collect()
    }

    /// Every running job (for shutdown and status lines).
    pub fn all_running(&self) -> Vec<Arc<Job>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect()
    }

    /// CancelJob: asks a running job to stop.
    pub async fn cancel(&self, uuid: &str) -> Result<()> {
        if let Some(job) = self.running(uuid) {
            job.cancel.cancel();
            return Ok(());
        }
        let u = uuid.to_string();
        match self.catalog.run(move |c| c.get_job(&u)).await? {
            Some(j) => {
                Err(AgentError::new(ErrorKind::FailedPrecondition, format!("job {uuid} already ended ({})", j.state))
                    .with_field("jobUuid"))
            }
            None => Err(AgentError::not_found("job", uuid).with_field("jobUuid")),
        }
    }

    /// WatchJob: progress snapshots until the job ends (the last one is terminal). A job that
    /// already ended yields its final snapshot once.
    pub async fn watch(&self, uuid: &str) -> Result<impl Stream<Item = Progress> + Send + 'static> {
        enum Source {
            Live(watch::Receiver<Progress>),
            Done(Option<Box<Progress>>),
        }
        let source = match self.running(uuid) {
            Some(job) => Source::Live(job.tx.subscribe()),
            None => {
                let u = uuid.to_string();
                let record = self
                    .catalog
                    .run(move |c| c.get_job(&u))
                    .await?
                    .ok_or_else(|| AgentError::not_found("job", uuid).with_field("jobUuid"))?;
                let mut progress = serde_json::from_str::<Progress>(&record.progress).map_err(|e| {
                    AgentError::new(ErrorKind::Internal, format!("stored progress of job {uuid} is unreadable"))
                        .with_source(e)
                })?;
                (progress.state, progress.started, progress.finished) = (record.state, record.started, record.finished);
                Source::Done(Some(Box::new(progress)))
            }
        };
        Ok(futures::stream::unfold((source, false), |(source, ended)| async move {
            if ended {
                return None;
            }
            match source {
                Source::Done(mut p) => p.take().map(|p| (*p, (Source::Done(None), true))),
                Source::Live(mut rx) => {
                    let p = rx.borrow_and_update().clone();
                    if p.state.is_terminal() {
                        return Some((p, (Source::Live(rx), true)));
                    }
                    // Wait for the next snapshot; a closed channel means the job is gone.
                    let next_ok = rx.changed().await.is_ok();
                    let p = rx.borrow_and_update().clone();
                    let terminal = p.state.is_terminal() || !next_ok;
                    Some((p, (Source::Live(rx), terminal)))
                }
            }
        }))
    }
}

fn progress_json(p: &Progress) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "{}".to_string())
}

/// Publishes a snapshot every [`TICK`] with the rate over the last few ticks.
async fn ticker(job: Arc<Job>) {
    let mut history: std::collections::VecDeque<(Instant, i64)> = std::collections::VecDeque::new();
    let mut interval = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = job.cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = Instant::now();
        history.push_back((now, job.counters.done()));
        while history.len() > 10 {
            history.pop_front();
        }
        let rate = match (history.front(), history.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => (b1 - b0) as f64 / (*t1 - *t0).as_secs_f64(),
            _ => 0.0,
        };
        let snapshot = job.snapshot(JobState::Running, rate, None, None);
        // A terminal snapshot is final: never replace it with a Running one.
        job.tx.send_if_modified(|current| {
            if !current.state.is_terminal() {
                *current = snapshot;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn watch_follows_a_job_to_its_end_and_replays_it_afterwards() {
        let jobs = Jobs::open(CatalogHandle::new(crate::catalog::Catalog::open_in_memory().expect("catalog")))
            .await
            .expect("jobs");
        let job = jobs.start("CreateVmBackup", None, Some("bs".into())).await.expect("start");
        Counters::add(&job.counters.planned, 100);
        let stream = jobs.watch(&job.uuid).await.expect("watch");
        let watcher = tokio::spawn(stream.collect::<Vec<_>>());
        Counters::add(&job.counters.read, 60);
        tokio::time::sleep(TICK * 2).await;
        jobs.finish(&job, Ok(())).await;
        let seen = watcher.await.expect("watcher");
        let last = seen.last().expect("at least one snapshot");
        assert_eq!((last.state, last.bytes_read, last.bytes_planned), (JobState::Succeeded, 60, 100));
        assert!(seen[..seen.len() - 1].iter().all(|p| p.state == JobState::Running));

        let replay: Vec<_> = jobs.watch(&job.uuid).await.expect("watch ended").collect().await;
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].state, JobState::Succeeded);
        assert_eq!(jobs.cancel(&job.uuid).await.expect_err("ended").kind(), ErrorKind::FailedPrecondition);
        assert_eq!(jobs.cancel("nope").await.expect_err("unknown").kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn cancel_and_failure_are_recorded() {
        let jobs = Jobs::open(CatalogHandle::new(crate::catalog::Catalog::open_in_memory().expect("catalog")))
            .await
            .expect("jobs");
        let job = jobs.start("CreateVmBackup", None, None).await.expect("start");
        jobs.cancel(&job.uuid).await.expect("cancel");
        assert!(job.cancel.is_cancelled());
        jobs.finish(&job, Err(AgentError::new(ErrorKind::Cancelled, "cancelled by CancelJob"))).await;
        let p: Vec<_> = jobs.watch(&job.uuid).await.expect("watch").collect().await;
        assert_eq!(p[0].state, JobState::Cancelled);
        assert_eq!(p[0].error.as_ref().map(|e| e.details.as_str()), Some("cancelled by CancelJob"));
    }
}
