//! The agent's Prometheus metrics: bytes moved by finished jobs (read, zero-skipped,
//! deduplicated, sent, received, written) by method, jobs by method and outcome, job
//! durations, running jobs and time spent waiting on rate limits. Served at `/metrics` by
//! [`vmbackup_store::daemon::metrics_http::serve`].
//!
//! Byte counters grow when a job ends, by that job's own final counters, so a scrape after
//! a job equals the job's report (WatchJob) exactly.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vmbackup_store::daemon::metrics_http::encode_one;

/// How many jobs run now (asked at every scrape).
pub type RunningJobs = std::sync::Arc<dyn Fn() -> usize + Send + Sync>;

type Labels = Vec<(String, String)>;

fn histogram() -> Histogram {
    // 1 s .. about 9 hours.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// Metrics recorded as jobs end.
#[derive(Debug)]
pub struct AgentMetrics {
    bytes: Family<Labels, Counter>,
    jobs: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            bytes: Family::default(),
            jobs: Family::default(),
            durations: Family::new_with_constructor(histogram as fn() -> Histogram),
        }
    }
}

impl AgentMetrics {
    /// Records a job of `method` that ended in `state` after `seconds`, having moved
    /// `bytes` (by kind: read, zero, deduplicated, sent, received, written).
    pub fn record(&self, method: &str, state: &str, seconds: f64, bytes: &[(&str, u64)]) {
        for &(kind, v) in bytes {
            let labels = vec![("method".to_string(), method.to_string()), ("kind".to_string(), kind.to_string())];
            self.bytes.get_or_create(&labels).inc_by(v);
        }
        let outcome = vec![("method".to_string(), method.to_string()), ("outcome".to_string(), state.to_string())];
        self.jobs.get_or_create(&outcome).inc();
        self.durations.get_or_create(&vec![("method".to_string(), method.to_string())]).observe(seconds);
    }
}

struct Live {
    running: RunningJobs,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let running = i64::try_from((self.running)()).unwrap_or(i64::MAX);
        encode_one(&mut e, "vmbackup_agent_jobs_running", "Jobs running now", &ConstGauge::new(running))?;
        let waited = ConstCounter::new(crate::throttle::total_waited_seconds());
        encode_one(
            &mut e,
            "vmbackup_agent_rate_limit_wait_seconds",
            "Time jobs spent waiting on bandwidth limits, summed over every flow",
            &waited,
        )
    }
}

/// The agent's registry.
pub fn registry(metrics: &AgentMetrics, running: RunningJobs) -> Registry {
    let mut r = Registry::default();
    r.register("vmbackup_agent_job_bytes", "Bytes moved by finished jobs, by method and kind", metrics.bytes.clone());
    r.register("vmbackup_agent_jobs", "Finished jobs by method and outcome", metrics.jobs.clone());
    r.register("vmbackup_agent_job_duration_seconds", "Duration of finished jobs", metrics.durations.clone());
    r.register_collector(Box::new(Live { running }));
    r
}
