//! The store's metric families. They are served by
//! [`crate::daemon::metrics_http::serve`], the `/metrics` server both daemons share.
//!
//! Values that already live elsewhere (the store's counters, capacity, group count) are
//! read at scrape time by a [`Collector`], so there is one source of truth and nothing to
//! keep in sync; results of GC and verify runs are recorded as they finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::chunk_store::ChunkStore;
use crate::daemon::metrics_http::encode_one;

/// Results of GC and verify runs, recorded as they end.
#[derive(Debug, Default)]
pub struct RunMetrics {
    /// GC runs.
    pub gc_runs: Counter,
    /// Chunks removed by GC.
    pub gc_chunks_removed: Counter,
    /// Bytes removed by GC.
    pub gc_bytes_removed: Counter,
    /// Chunk bytes kept by the last GC (the store's size then).
    pub gc_last_bytes_kept: Gauge,
    /// Verify runs.
    pub verify_runs: Counter,
    /// Chunks checked by verify.
    pub verify_chunks_checked: Counter,
    /// Bad or missing chunks found by verify.
    pub verify_bad_chunks: Counter,
    /// Groups the last verify found damaged.
    pub verify_last_damaged_groups: Gauge,
}

/// Reads the store's live values at scrape time.
#[derive(Debug)]
struct StoreCollector {
    store: Arc<ChunkStore>,
}

fn counter(v: &AtomicU64) -> ConstCounter<u64> {
    ConstCounter::new(v.load(Ordering::Relaxed))
}

impl Collector for StoreCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.store.counters();
        let pairs = [
            ("chunks_uploaded", "Chunks written by uploads", &c.chunks_uploaded),
            ("uploaded_bytes", "Blob bytes written by uploads", &c.bytes_uploaded),
            ("chunks_already_present", "Uploaded chunks the store already had", &c.chunks_already_present),
            (
                "chunks_reported_present",
                "Chunks MissingChunks reported present (deduplicated)",
                &c.chunks_reported_present,
            ),
            ("chunks_downloaded", "Chunks served to readers", &c.chunks_downloaded),
            ("downloaded_bytes", "Blob bytes served to readers", &c.bytes_downloaded),
            ("chunks_rejected", "Uploads refused: bad blob or wrong digest", &c.chunks_rejected),
            (
                "commit_chunk_lookups",
                "Chunks commits looked up in the backend (not those their session confirmed on this server)",
                &c.commit_lookups,
            ),
        ];
        for (name, help, v) in pairs {
            encode_one(&mut e, &format!("vmbackup_store_{name}"), help, &counter(v))?;
        }
        let groups = self.store.list_groups().map(|g| g.len()).unwrap_or(0);
        encode_one(
            &mut e,
            "vmbackup_store_groups",
            "Committed backup groups",
            &ConstGauge::new(i64::try_from(groups).unwrap_or(i64::MAX)),
        )?;
        if let Ok((total, available)) = self.store.capacity() {
            let g = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            encode_one(&mut e, "vmbackup_store_capacity_bytes", "Size of the store's file system", &g(total))?;
            encode_one(
                &mut e,
                "vmbackup_store_available_bytes",
                "Free space of the store's file system",
                &g(available),
            )?;
        }
        Ok(())
    }
}

/// The store's registry: live values plus `runs`.
pub fn store_registry(store: Arc<ChunkStore>, runs: &RunMetrics) -> Registry {
    let mut r = Registry::default();
    r.register("vmbackup_store_gc_runs", "Garbage collections run", runs.gc_runs.clone());
    r.register("vmbackup_store_gc_chunks_removed", "Chunks removed by GC", runs.gc_chunks_removed.clone());
    r.register("vmbackup_store_gc_removed_bytes", "Bytes removed by GC", runs.gc_bytes_removed.clone());
    r.register("vmbackup_store_gc_last_kept_bytes", "Chunk bytes kept by the last GC", runs.gc_last_bytes_kept.clone());
    r.register("vmbackup_store_verify_runs", "Verify runs", runs.verify_runs.clone());
    r.register("vmbackup_store_verify_chunks_checked", "Chunks checked by verify", runs.verify_chunks_checked.clone());
    r.register(
        "vmbackup_store_verify_bad_chunks",
        "Bad or missing chunks found by verify",
        runs.verify_bad_chunks.clone(),
    );
    r.register(
        "vmbackup_store_verify_last_damaged_groups",
        "Groups the last verify found damaged",
        runs.verify_last_damaged_groups.clone(),
    );
    r.register_collector(Box::new(StoreCollector { store }));
    r
}
