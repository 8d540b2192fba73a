//! GC over a shared bucket: the lease (`gc/lease-<epoch>.json`), the fence and doomed
//! lists, and the run itself (steps 1–8 of the [module doc](super)).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use vmbackup_proto::Digest;

use super::{Listed, Shared, encode_digests, from_unix_ms, unix_ms};
use crate::chunk_store::ChunkStore;
use crate::error::{ErrorKind, Result, StoreError};
use crate::gc::{GcReport, Marked, cutoff};

/// A GC lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The holding server.
    pub holder: String,
    /// Expiry, unix milliseconds (holder's clock).
    pub expires_ms: u64,
    /// `running` or `released`.
    pub phase: String,
}

/// `gc/lease-<epoch>.json`.
pub fn lease_key(epoch: u64) -> String {
    format!("gc/lease-{epoch:020}.json")
}

/// `gc/fence-<epoch>`.
pub fn fence_key(epoch: u64) -> String {
    format!("gc/fence-{epoch:020}")
}

/// `gc/doomed-<epoch>`.
pub fn doomed_key(epoch: u64) -> String {
    format!("gc/doomed-{epoch:020}")
}

fn epoch_of(key: &str, kind: &str, suffix: &str) -> Option<u64> {
    let digits = key.strip_prefix("gc/")?.strip_prefix(kind)?.strip_prefix('-')?.strip_suffix(suffix)?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

/// The newest lease in a listing of `gc/`: its epoch and last write.
pub fn newest_lease(listed: &[Listed]) -> Option<(u64, SystemTime)> {
    listed.iter().filter_map(|l| Some((epoch_of(&l.key, "lease", ".json")?, l.modified))).max_by_key(|(e, _)| *e)
}

/// A lease this server holds. While a run uses it, [`HeldLease::renew_until_stopped`]
/// renews it every third of its TTL on a thread of its own, so no step of the run (a long
/// LIST, many journals) can outlast it unnoticed.
#[derive(Debug)]
pub struct HeldLease<'a> {
    shared: &'a Shared,
    /// Its epoch.
    pub epoch: u64,
    /// The expiry last written.
    expires: Mutex<SystemTime>,
    stop: AtomicBool,
}

impl HeldLease<'_> {
    fn write(&self, phase: &str) -> Result<()> {
        let expires = SystemTime::now() + self.shared.lease_ttl;
        let lease = Lease { holder: self.shared.server.clone(), expires_ms: unix_ms(expires), phase: phase.into() };
        let json = serde_json::to_vec(&lease).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
        self.shared.objects.put(&lease_key(self.epoch), json)?;
        *self.expires.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = expires;
        Ok(())
    }

    /// Renews the lease every third of its TTL until [`Self::stop`]; a failed renewal is
    /// logged and retried, and [`Self::keep`] stops the run if the expiry comes near.
    pub fn renew_until_stopped(&self) {
        let step = Duration::from_millis(50);
        let mut since = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(step);
            if since.elapsed() >= self.shared.lease_ttl / 3 {
                match self.write("running") {
                    Ok(()) => since = Instant::now(),
                    Err(e) => tracing::warn!(epoch = self.epoch, error = %e, "could not renew the GC lease"),
                }
            }
        }
    }

    /// Ends [`Self::renew_until_stopped`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Fails once the lease may have expired (another server may then hold the next one):
    /// the run must stop deleting.
    pub fn keep(&self) -> Result<()> {
        let expires = *self.expires.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if SystemTime::now() + Duration::from_secs(1) >= expires {
            return Err(StoreError::new(
                ErrorKind::Conflict,
                format!("GC lease {} expired before it could be renewed; this run stops", self.epoch),
            ));
        }
        Ok(())
    }

    /// Marks the lease released (kept as the newest epoch, so epochs never repeat).
    pub fn release(self) -> Result<()> {
        self.write("released")
    }
}

impl Shared {
    /// Takes the GC lease, or says who holds it.
    pub fn acquire_lease(&self) -> Result<HeldLease<'_>> {
        let listed = self.objects.list("gc/")?;
        let next = match newest_lease(&listed) {
            None => 1,
            Some((n, _)) => {
                let key = lease_key(n);
                match self.objects.get(&key) {
                    Ok(bytes) => {
                        let lease: Lease = serde_json::from_slice(&bytes)
                            .map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("{key}: {e}")))?;
                        let expires = from_unix_ms(lease.expires_ms);
                        if lease.phase != "released" && expires + self.margin() > SystemTime::now() {
                            return Err(StoreError::new(
                                ErrorKind::Conflict,
                                format!(
                                    "garbage collection is already running on store server {} (lease {n})",
                                    lease.holder
                                ),
                            ));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                n + 1
            }
        };
        let lease = Lease {
            holder: self.server.clone(),
            expires_ms: unix_ms(SystemTime::now() + self.lease_ttl),
            phase: "running".into(),
        };
        let json = serde_json::to_vec(&lease).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
        if !self.objects.put_create(&lease_key(next), json)? {
            return Err(StoreError::new(
                ErrorKind::Conflict,
                format!("garbage collection is already running (another server took lease {next})"),
            ));
        }
        tracing::info!(epoch = next, server = %self.server, "GC lease taken");
        Ok(HeldLease {
            shared: self,
            epoch: next,
            expires: Mutex::new(from_unix_ms(lease.expires_ms)),
            stop: AtomicBool::new(false),
        })
    }

    /// Removes leases, fences and doomed lists of epochs before `epoch`.
    fn remove_old_epochs(&self, epoch: u64) -> Result<()> {
        for l in self.objects.list("gc/")? {
            let old = ["lease", "fence", "doomed"]
                .iter()
                .filter_map(|k| epoch_of(&l.key, k, if *k == "lease" { ".json" } else { "" }))
                .any(|e| e < epoch);
            if old {
                self.objects.delete(&l.key)?;
            }
        }
        Ok(())
    }
}

impl ChunkStore {
    /// One GC run over a shared bucket (steps 1–8 of the module doc).
    pub(crate) fn shared_garbage_collect(&self, shared: &Shared, margin: Duration) -> Result<GcReport> {
        let lease = shared.acquire_lease()?;
        let run = std::thread::scope(|scope| {
            scope.spawn(|| lease.renew_until_stopped());
            let run = self.shared_gc_run(shared, &lease, margin);
            lease.stop();
            run
        });
        match run {
            Ok(report) => {
                lease.release()?;
                Ok(report)
            }
            Err(e) => {
                // Leave the fence for the lease's lifetime only: release now if we still can.
                if lease.keep().is_ok() {
                    let _ = shared.objects.delete(&doomed_key(lease.epoch));
                    let _ = shared.objects.delete(&fence_key(lease.epoch));
                    let _ = lease.release();
                }
                Err(e)
            }
        }
    }

    fn shared_gc_run(&self, shared: &Shared, lease: &HeldLease<'_>, margin: Duration) -> Result<GcReport> {
        let timer = Instant::now();
        let epoch = lease.epoch;
        let cut = cutoff(SystemTime::now(), shared.oldest_live_start()?, margin);

        let mut marked = Marked::default();
        self.mark_committed(&mut marked, false)?;
        let mut report = GcReport::default();
        let mut candidates: HashMap<Digest, (SystemTime, u64)> = HashMap::new();
        self.backend.for_each_chunk(&mut |c| {
            if c.touched < cut && !marked.chunks.contains(&c.digest) {
                candidates.insert(c.digest, (c.touched, c.size));
            } else {
                report.chunks_kept += 1;
                report.bytes_kept += c.size;
            }
            Ok(())
        })?;
        lease.keep()?;

        if !candidates.is_empty() {
            shared.objects.put_create(&fence_key(epoch), encode_digests(candidates.keys()))?;
            let journaled = shared.journaled()?;
            self.mark_committed(&mut marked, false)?;
            let mut keep = |d: &Digest, report: &mut GcReport| {
                if let Some((_, size)) = candidates.remove(d) {
                    report.chunks_kept += 1;
                    report.bytes_kept += size;
                }
            };
            for d in journaled.iter().chain(marked.chunks.iter()) {
                keep(d, &mut report);
            }
            shared.objects.put_create(&doomed_key(epoch), encode_digests(candidates.keys()))?;
            for (d, (listed, size)) in &candidates {
                lease.keep()?;
                let same = |t: SystemTime| unix_ms(t) / 1000 == unix_ms(*listed) / 1000;
                match shared.objects.chunk_modified(d)? {
                    Some(t) if same(t) => match shared.objects.delete_chunk_once(d) {
                        Ok(()) => {
                            report.chunks_removed += 1;
                            report.bytes_removed += size;
                        }
                        Err(e) => {
                            tracing::warn!(chunk = %d, error = %e, "GC could not delete a chunk; the next run will");
                            report.chunks_kept += 1;
                            report.bytes_kept += size;
                        }
                    },
                    Some(_) => {
                        report.chunks_kept += 1;
                        report.bytes_kept += size;
                    }
                    None => {}
                }
            }
            shared.objects.delete(&doomed_key(epoch))?;
            shared.objects.delete(&fence_key(epoch))?;
        }
        report.indexes_removed = self.remove_unreferenced(&marked, cut)?;
        let dead = shared.remove_dead_sessions()?;
        shared.remove_old_epochs(epoch)?;
        report.seconds = timer.elapsed().as_secs_f64();
        tracing::info!(?report, epoch, dead_sessions = dead, "shared garbage collection finished");
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_sort_and_parse() {
        assert_eq!(lease_key(7), "gc/lease-00000000000000000007.json");
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let listed = [lease_key(9), fence_key(12), lease_key(10), "gc/lease-x.json".into()]
            .into_iter()
            .enumerate()
            .map(|(i, key)| Listed { key, size: 0, modified: at(i as u64) })
            .collect::<Vec<_>>();
        assert_eq!(newest_lease(&listed), Some((10, at(2))));
        assert_eq!(epoch_of(&fence_key(3), "fence", ""), Some(3));
        assert_eq!(epoch_of(&doomed_key(3), "fence", ""), None);
    }
}
