//! Configuration of vmbackup-agent: a TOML file, overridden by command-line flags.
//! `systemd/vmbackup-agent.toml` is an example with every key commented.

mod sessions;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
pub use sessions::{ExpiringSession, Instant, Session, SessionEntry, format_rfc3339, parse_rfc3339};

/// Settings of the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// gRPC listen address of the agent API.
    pub listen: SocketAddr,
    /// Local state: catalog, session file, embedded store.
    pub data_dir: PathBuf,
    /// Accepted sessions (`authorization: OAuth <uuid>`): plain uuids, or
    /// `{ id = "<uuid>", expires = <RFC 3339> }`. Empty: the agent creates one in
    /// `<data_dir>/session`, which never expires.
    pub sessions: Vec<SessionEntry>,
    /// Port assumed for an Image Storage added with a hostname and no port.
    pub default_store_port: u16,
    /// Reader workers of a backup without a volumeLiveBackup::parallelismDegree tag.
    pub default_parallelism: u32,
    /// Concurrent backups on one backup storage.
    pub max_backups_per_storage: u32,
    /// Host-wide bandwidth caps shared by every job.
    pub limits: HostLimits,
    /// Where volumes may be read and restores written.
    pub volumes: VolumesConfig,
    /// On SIGTERM, how long running jobs may go on before they are cancelled, seconds.
    pub shutdown_grace_seconds: u64,
    /// How long a running backup waits for an Image Storage that stopped answering (a
    /// restart, a network cut) before it fails, seconds. Meanwhile it retries with backoff
    /// and, once the store is back, resumes in a new session, sending only the chunks the
    /// store lacks. 0: fail at once.
    pub store_outage_seconds: u64,
    /// Where logs go: `auto` (journald under systemd, else text on stderr), `text`, `json`.
    pub log_format: String,
    /// Prometheus `/metrics` address (plain HTTP); absent: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter (`info`, `debug`, `vmbackup_agent=debug,info`, ...); `RUST_LOG` wins at
    /// start-up, a SIGHUP applies this.
    pub log_level: String,
    /// The Image Storage embedded in the agent.
    pub embedded_store: EmbeddedStoreConfig,
    /// TLS of the agent API.
    pub tls: vmbackup_store::daemon::tls::ServerTls,
    /// TLS towards Image Storage servers with `https://` endpoints.
    pub store_tls: vmbackup_store::daemon::tls::ClientTls,
    /// How the agent reaches Ceph backup storages (pools it writes directly).
    pub ceph: CephConfig,
    /// ZStack's REST API (`zstack/v1/...`) beside gRPC.
    pub rest: RestConfig,
    /// Retention policies per backup storage (by name or uuid), for PruneVmBackup calls
    /// that give none.
    pub retention: std::collections::BTreeMap<String, RetentionConfig>,
    /// Encryption keys by name (`[keys.<name>]`), for storages added with
    /// `backup::encryption::key::<name>`.
    pub keys: std::collections::BTreeMap<String, crate::keys::KeyConfig>,
    /// NBD exports served over TCP.
    pub exports: ExportsConfig,
}

/// TLS of NBD exports served over TCP (ExportVmBackup's `listenAddress`). NBD has no other
/// authentication, so a TCP export needs all three: the agent's certificate and key, and
/// the CA every client's certificate must chain to. Without them TCP exports are refused;
/// Unix-socket exports need none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportsConfig {
    /// PEM certificate chain the agent presents.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key: Option<PathBuf>,
    /// PEM CA that clients' certificates must chain to.
    pub tls_client_ca: Option<PathBuf>,
}

/// A backup storage's retention policy (see [`crate::retention`]); 0 turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// The newest N backups of each VM.
    pub keep_last: u32,
    /// One per hour, for the newest N hours that have backups.
    pub keep_hourly: u32,
    /// One per day.
    pub keep_daily: u32,
    /// One per ISO week.
    pub keep_weekly: u32,
    /// One per month.
    pub keep_monthly: u32,
    /// One per year.
    pub keep_yearly: u32,
}

impl RetentionConfig {
    /// As a policy.
    pub fn policy(&self) -> crate::retention::Policy {
        crate::retention::Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        }
    }
}

/// The REST listener: the same sessions and TLS as the gRPC listener, on its own address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestConfig {
    /// Listen address; absent: no REST listener.
    pub listen: Option<SocketAddr>,
    /// How long the result of a finished API job stays at its `api-jobs` location, seconds.
    pub job_ttl_seconds: u64,
}

impl Default for RestConfig {
    fn default() -> Self {
        Self { listen: None, job_ttl_seconds: 3600 }
    }
}

/// Client settings for Ceph backup storages; the monitors, pool, client name and keyring
/// come with each AddCephBackupStorage.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CephConfig {
    /// ceph.conf read before a storage's own settings, when the file exists (its monitors
    /// are replaced by the storage's `monUrls`).
    pub conf: PathBuf,
    /// Timeout of connecting and of every monitor and OSD operation, seconds: a stopped
    /// monitor or OSD fails a job within it instead of hanging it.
    pub timeout_seconds: u64,
    /// Lifetime of a garbage collection lease in the pool, seconds.
    pub gc_lease_seconds: u64,
    /// How often the agent collects the garbage of its Ceph storages' pools, seconds; 0:
    /// never (another host or a `vmbackup-store` on the pool does). One collector runs at a
    /// time per pool, whatever the number of hosts: the others find the lease taken.
    pub gc_interval_seconds: u64,
    /// Chunks last used within this many seconds before the oldest open backup session are
    /// kept by a collection.
    pub gc_safety_margin_seconds: u64,
}

impl Default for CephConfig {
    fn default() -> Self {
        Self {
            conf: PathBuf::from("/etc/ceph/ceph.conf"),
            timeout_seconds: 30,
            gc_lease_seconds: 60,
            gc_interval_seconds: 86_400,
            gc_safety_margin_seconds: 300,
        }
    }
}

/// Host-wide caps, bytes per second; 0 is no cap. Each is shared by all jobs at once, on top
/// of each job's own bandwidth parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostLimits {
    /// Reading volumes (backups).
    pub volume_read_bandwidth: u64,
    /// Writing volumes (restores).
    pub volume_write_bandwidth: u64,
    /// Receiving from Image Storage (restores, recovers).
    pub network_read_bandwidth: u64,
    /// Sending to Image Storage (backups, recovers).
    pub network_write_bandwidth: u64,
}

/// Where the agent may read volumes (backups, registered install paths, snapshot overlays)
/// and write restores; see [`crate::roots`]. Everything else is refused with the field named.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// Directories beneath which files (and block devices) are volumes; the last component
    /// may end in `*` (`/zstack_ps*`).
    pub roots: Vec<PathBuf>,
    /// Directories beneath which only existing block devices are volumes.
    pub device_roots: Vec<PathBuf>,
    /// Directories (and their subdirectories) holding running VMs' QMP sockets: a
    /// CreateVmBackup of a root volume no registered VM has finds its VM there.
    pub qmp_dirs: Vec<PathBuf>,
    /// Where a found VM's disks name their volume uuids, tried before ZStack's convention:
    /// absolute paths where `*` is any run within one component and `{uuid}` the uuid.
    pub volume_path_patterns: Vec<String>,
}

impl Default for VolumesConfig {
    /// libvirt's image pool, ZStack's local primary storages (`/zstack_ps`, `/zstack_ps2`,
    /// ...), and block devices under `/dev` (SharedBlock LVs, multipath, iSCSI LUNs).
    fn default() -> Self {
        Self {
            roots: vec![PathBuf::from("/var/lib/libvirt/images"), PathBuf::from("/zstack_ps*")],
            device_roots: vec![PathBuf::from("/dev")],
            qmp_dirs: vec![PathBuf::from("/var/lib/libvirt/qemu"), PathBuf::from("/run/vmbackup/qmp")],
            volume_path_patterns: Vec::new(),
        }
    }
}

/// The embedded Image Storage: a local directory served on loopback and registered as a
/// backup storage, so a fresh agent can back up with no other set-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedStoreConfig {
    /// Whether to run it.
    pub enabled: bool,
    /// Its gRPC address (keep it on loopback unless other hosts should use it).
    pub listen: SocketAddr,
    /// Its data directory; default `<data_dir>/store`.
    pub data_dir: Option<PathBuf>,
    /// Name of its backup storage record.
    pub name: String,
    /// Chunk size of a new store, bytes.
    pub chunk_size: u32,
    /// Who may call it over gRPC (the agent itself uses it in-process). Default: its
    /// own admin token, `<store data_dir>/admin.token`, for vmbackupctl on this host.
    pub auth: vmbackup_store::access::AuthConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7870)),
            data_dir: PathBuf::from("/var/lib/vmbackup"),
            sessions: Vec::new(),
            default_store_port: 7871,
            default_parallelism: 4,
            max_backups_per_storage: 10,
            limits: HostLimits::default(),
            volumes: VolumesConfig::default(),
            shutdown_grace_seconds: 60,
            store_outage_seconds: 300,
            log_level: "info".to_string(),
            log_format: "auto".to_string(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9870))),
            embedded_store: EmbeddedStoreConfig::default(),
            tls: Default::default(),
            store_tls: Default::default(),
            ceph: CephConfig::default(),
            rest: RestConfig::default(),
            retention: Default::default(),
            keys: Default::default(),
            exports: Default::default(),
        }
    }
}

impl Default for EmbeddedStoreConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7871)),
            data_dir: None,
            name: "local".to_string(),
            chunk_size: vmbackup_store::identity::DEFAULT_CHUNK_SIZE,
            auth: vmbackup_store::access::AuthConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Parses a TOML config; unknown keys are an error naming the key, and so are a bad
    /// session expiry or volume root.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        use serde::de::Error;
        let config: Self = toml::from_str(text)?;
        config.session_list().map_err(toml::de::Error::custom)?;
        config.volume_roots().map_err(toml::de::Error::custom)?;
        Ok(config)
    }

    /// The configured sessions with their expiries parsed.
    pub fn session_list(&self) -> Result<Vec<Session>, String> {
        self.sessions.iter().map(SessionEntry::parse).collect()
    }

    /// The configured volume roots, checked.
    pub fn volume_roots(&self) -> Result<crate::roots::VolumeRoots, String> {
        crate::roots::VolumeRoots::new(&self.volumes.roots, &self.volumes.device_roots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_fail() {
        let example = include_str!("../../systemd/vmbackup-agent.toml");
        let c = AgentConfig::from_toml(example).expect("example config parses");
        assert!(c.embedded_store.enabled);
        let e = AgentConfig::from_toml("listn = \"127.0.0.1:1\"").expect_err("typo");
        assert!(e.to_string().contains("listn"), "{e}");
    }
}
