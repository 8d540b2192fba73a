//! ZStack's asynchronous API protocol: every call that changes something answers `202`
//! with a `location` to poll (`GET zstack/v1/api-jobs/{uuid}`), which answers 202 while
//! the call runs, then 200 with its reply or 503 with `{"error": ...}`, and 404 once the
//! job is unknown or its result expired.
//!
//! `X-Job-UUID` names the job: a second call with the same uuid and the same request is
//! the same job (it is not run again); with another request it is refused. `X-Web-Hook`
//! makes the agent POST the result there when the call ends, with `X-Job-UUID` and
//! `X-Job-Success` headers, retrying with backoff.
//!
//! API jobs live in memory: a restarted agent answers 404 for the jobs of the previous
//! process (their work itself is in the catalog: backups, jobs and their errors). Finished
//! results are kept for `ttl`, and at most [`MAX_JOBS`] jobs are held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// At most this many API jobs are remembered; the oldest finished ones go first.
pub const MAX_JOBS: usize = 10_000;
/// Webhook deliveries tried per result.
pub const WEBHOOK_ATTEMPTS: u32 = 4;

/// How a job stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Still running.
    Running,
    /// Ended: whether it succeeded, and the body to answer with.
    Done {
        /// Success.
        success: bool,
        /// The reply, or `{"error": ...}`.
        body: Value,
    },
}

#[derive(Debug)]
struct Entry {
    fingerprint: vmbackup_proto::Digest,
    outcome: Outcome,
    ended: Option<Instant>,
    created: Instant,
}

/// The API jobs of one agent.
#[derive(Debug, Clone)]
pub struct ApiJobs {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    ttl: Duration,
}

/// What [`ApiJobs::begin`] decided.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// A new job: run the call.
    New,
    /// The same request under the same uuid: answer with the existing job.
    Replay,
    /// The uuid is taken by another request.
    Conflict,
}

impl ApiJobs {
    /// Jobs whose results are kept `ttl` after they end.
    pub fn new(ttl: Duration) -> Self {
        Self { inner: Arc::default(), ttl }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records job `uuid` for the request `fingerprint` (method, path and body).
    pub fn begin(&self, uuid: &str, fingerprint: &[u8]) -> Begin {
        let fingerprint = vmbackup_proto::Digest::of(fingerprint);
        let mut jobs = self.lock();
        self.expire(&mut jobs);
        if let Some(e) = jobs.get(uuid) {
            return if e.fingerprint == fingerprint { Begin::Replay } else { Begin::Conflict };
        }
        if jobs.len() >= MAX_JOBS {
            let oldest = jobs.iter().filter(|(_, e)| e.ended.is_some()).min_by_key(|(_, e)| e.created);
            if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                jobs.remove(&k);
            }
        }
        let now = Instant::now();
        jobs.insert(uuid.to_string(), Entry { fingerprint, outcome: Outcome::Running, ended: None, created: now });
        Begin::New
    }

    /// Records the end of job `uuid`.
    pub fn finish(&self, uuid: &str, success: bool, body: Value) {
        if let Some(e) = self.lock().get_mut(uuid) {
            e.outcome = Outcome::Done { success, body };
            e.ended = Some(Instant::now());
        }
    }

    /// How job `uuid` stands, or None when it is unknown or expired.
    pub fn get(&self, uuid: &str) -> Option<Outcome> {
        let mut jobs = self.lock();
        self.expire(&mut jobs);
        jobs.get(uuid).map(|e| e.outcome.clone())
    }

    fn expire(&self, jobs: &mut HashMap<String, Entry>) {
        let ttl = self.ttl;
        jobs.retain(|_, e| e.ended.is_none_or(|t| t.elapsed() < ttl));
    }
}

/// POSTs a job's result to `url`, with `X-Job-UUID` and `X-Job-Success`, until a 2xx
/// answer or [`WEBHOOK_ATTEMPTS`] tries (1 s, 2 s, 4 s apart).
pub async fn deliver(url: String, job: String, success: bool, body: Value) {
    // reqwest is built without a default TLS provider (the workspace picks ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(job = %job, error = %e, "no HTTP client for the webhook");
            return;
        }
    };
    let text = body.to_string();
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let sent = client
            .post(&url)
            .header("Content-Type", "application/json;charset=UTF-8")
            .header("X-Job-UUID", &job)
            .header("X-Job-Success", if success { "true" } else { "false" })
            .body(text.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(job = %job, attempt, status = %r.status(), "webhook refused the result"),
            Err(e) => tracing::warn!(job = %job, attempt, error = %e, "webhook unreachable"),
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    tracing::error!(job = %job, "webhook not delivered; the result stays at its api-jobs location");
}

/// A webhook URL as given in `X-Web-Hook`: `http://host[:port]/path`.
pub fn check_webhook(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{} is not an http:// URL", crate::validate::shorten(url)))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || url.len() > 2048 || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("{} is not a valid URL", crate::validate::shorten(url)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_is_one_job_for_one_request() {
        let jobs = ApiJobs::new(Duration::from_secs(60));
        assert_eq!(jobs.begin("a", b"POST /x {}"), Begin::New);
        assert_eq!(jobs.begin("a", b"POST /x {}"), Begin::Replay);
        assert_eq!(jobs.begin("a", b"POST /y {}"), Begin::Conflict);
        assert_eq!(jobs.get("a"), Some(Outcome::Running));
        jobs.finish("a", true, serde_json::json!({}));
        assert_eq!(jobs.get("a"), Some(Outcome::Done { success: true, body: serde_json::json!({}) }));
        assert_eq!(jobs.get("b"), None);
    }

    #[test]
    fn results_expire() {
        let jobs = ApiJobs::new(Duration::ZERO);
        jobs.begin("a", b"x");
        assert_eq!(jobs.get("a"), Some(Outcome::Running));
        jobs.finish("a", false, Value::Null);
        assert_eq!(jobs.get("a"), None);
    }

    #[test]
    fn webhooks_must_be_http_urls() {
        assert!(check_webhook("http://127.0.0.1:9/hook").is_ok());
        assert!(check_webhook("ftp://x").is_err());
        assert!(check_webhook("http:///x").is_err());
        assert!(check_webhook("http://a b/").is_err());
    }
}
