//! Settings that change on a running agent (SIGHUP): job defaults, the host-wide
//! bandwidth caps and the volume roots. Jobs read them when they start (and every operation
//! checks its paths against the roots of that moment); a running job keeps the caps it started
//! with, and a cap whose value did not change keeps its limiter, so jobs old and new still
//! share it.

use std::sync::{Arc, RwLock};

use crate::config::{AgentConfig, HostLimits};
use crate::roots::VolumeRoots;
use crate::throttle::ByteRate;

/// Host-wide caps, each shared by every job it applies to.
#[derive(Debug, Clone, Default)]
pub struct HostCaps {
    /// Reading volumes (backups).
    pub volume_read: Option<Arc<ByteRate>>,
    /// Writing volumes (restores).
    pub volume_write: Option<Arc<ByteRate>>,
    /// Receiving from stores (restores, recovers).
    pub network_read: Option<Arc<ByteRate>>,
    /// Sending to stores (backups, recovers).
    pub network_write: Option<Arc<ByteRate>>,
}

#[derive(Debug, Clone)]
struct Values {
    default_parallelism: u32,
    max_backups_per_storage: u32,
    caps: HostCaps,
    roots: Arc<VolumeRoots>,
    qmp_dirs: Arc<Vec<std::path::PathBuf>>,
    volume_path_patterns: Arc<Vec<String>>,
    retention: Arc<std::collections::BTreeMap<String, crate::config::RetentionConfig>>,
    exports: Arc<crate::config::ExportsConfig>,
    store_outage: std::time::Duration,
}

/// The live settings.
#[derive(Debug)]
pub struct Live(RwLock<Values>);

fn cap(old: &Option<Arc<ByteRate>>, bytes_per_second: u64) -> Option<Arc<ByteRate>> {
    match old {
        _ if bytes_per_second == 0 => None,
        Some(l) if l.bytes_per_second() == bytes_per_second => Some(l.clone()),
        _ => Some(Arc::new(ByteRate::new(bytes_per_second))),
    }
}

fn caps(old: &HostCaps, l: &HostLimits) -> HostCaps {
    HostCaps {
        volume_read: cap(&old.volume_read, l.volume_read_bandwidth),
        volume_write: cap(&old.volume_write, l.volume_write_bandwidth),
        network_read: cap(&old.network_read, l.network_read_bandwidth),
        network_write: cap(&old.network_write, l.network_write_bandwidth),
    }
}

/// The configuration's roots; a configuration that was not checked (built in code) with bad
/// roots gets none, so nothing is allowed rather than everything.
fn roots(config: &AgentConfig) -> VolumeRoots {
    config.volume_roots().unwrap_or_else(|e| {
        tracing::error!(error = %e, "volume roots refused; no volume path is accepted");
        VolumeRoots::default()
    })
}

impl Live {
    /// The settings of `config`.
    pub fn new(config: &AgentConfig) -> Self {
        Self(RwLock::new(Values {
            default_parallelism: config.default_parallelism.max(1),
            max_backups_per_storage: config.max_backups_per_storage.max(1),
            caps: caps(&HostCaps::default(), &config.limits),
            roots: Arc::new(roots(config)),
            qmp_dirs: Arc::new(config.volumes.qmp_dirs.clone()),
            volume_path_patterns: Arc::new(config.volumes.volume_path_patterns.clone()),
            retention: Arc::new(config.retention.clone()),
            exports: Arc::new(config.exports.clone()),
            store_outage: std::time::Duration::from_secs(config.store_outage_seconds),
        }))
    }

    fn read(&self) -> Values {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes the reloadable settings of `config`.
    pub fn apply(&self, config: &AgentConfig) {
        let mut v = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        v.default_parallelism = config.default_parallelism.max(1);
        v.max_backups_per_storage = config.max_backups_per_storage.max(1);
        v.caps = caps(&v.caps, &config.limits);
        v.roots = Arc::new(roots(config));
        v.qmp_dirs = Arc::new(config.volumes.qmp_dirs.clone());
        v.volume_path_patterns = Arc::new(config.volumes.volume_path_patterns.clone());
        v.retention = Arc::new(config.retention.clone());
        v.exports = Arc::new(config.exports.clone());
        v.store_outage = std::time::Duration::from_secs(config.store_outage_seconds);
    }

    /// How long a backup waits for an unreachable Image Storage (`store_outage_seconds`).
    pub fn store_outage(&self) -> std::time::Duration {
        self.read().store_outage
    }

    /// TLS settings of TCP exports.
    pub fn exports(&self) -> Arc<crate::config::ExportsConfig> {
        self.read().exports
    }

    /// The configured retention policy of the backup storage named `name` or `uuid`.
    pub fn retention_of(&self, uuid: &str, name: &str) -> Option<crate::retention::Policy> {
        let r = self.read().retention;
        r.get(uuid).or_else(|| r.get(name)).map(crate::config::RetentionConfig::policy)
    }

    /// Patterns naming the volume uuid in a found VM's disk paths.
    pub fn volume_path_patterns(&self) -> Arc<Vec<String>> {
        self.read().volume_path_patterns
    }

    /// Where running VMs' QMP sockets are looked for.
    pub fn qmp_dirs(&self) -> Arc<Vec<std::path::PathBuf>> {
        self.read().qmp_dirs
    }

    /// Reader workers of a job without a parallelism tag.
    pub fn default_parallelism(&self) -> u32 {
        self.read().default_parallelism
    }

    /// Concurrent backups on one backup storage.
    pub fn max_backups_per_storage(&self) -> u32 {
        self.read().max_backups_per_storage
    }

    /// The volume roots now.
    pub fn roots(&self) -> Arc<VolumeRoots> {
        self.read().roots
    }

    /// The host-wide caps now.
    pub fn caps(&self) -> HostCaps {
        self.read().caps
    }
}
