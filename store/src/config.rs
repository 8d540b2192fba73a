//! Configuration of vmbackup-store: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! listen = "127.0.0.1:7871"        # gRPC address
//! data_dir = "/var/lib/vmbackup-store"
//! chunk_size = 4194304             # bytes; only used when the store is created
//! [tls]                            # see crate::daemon::tls
//! cert = "/etc/vmbackup/store.crt"
//! key = "/etc/vmbackup/store.key"
//! ```
//!
//! An S3 bucket instead of `data_dir` (which then keeps only the local admin token; the
//! store's identity `store.json` is in the bucket):
//!
//! ```toml
//! backend = "s3"                   # "fs" (default) or "s3"
//! [s3]
//! endpoint = "https://rgw.example:443"
//! bucket = "vmbackup"
//! prefix = "site-a"                # optional key prefix
//! region = "us-east-1"             # the default
//! access_key_id = "AKIA…"          # or AWS_ACCESS_KEY_ID
//! secret_access_key_file = "/etc/vmbackup/s3.secret"   # or AWS_SECRET_ACCESS_KEY
//! allow_http = false               # true to accept an http:// endpoint
//! gc_lease_seconds = 60            # GC lease lifetime (see crate::shared)
//! ```
//!
//! A Ceph pool instead, through librados (loaded at run time):
//!
//! ```toml
//! backend = "rados"
//! [rados]
//! pool = "vmbackup"                # must exist
//! conf = "/etc/ceph/ceph.conf"     # the default
//! client = "client.admin"          # the default; a client with rwx on the pool suffices
//! keyring = "/etc/ceph/ceph.client.admin.keyring"   # else the conf's
//! prefix = "vmbackup."             # RADOS namespace prefix (the default)
//! timeout_seconds = 30             # every monitor and OSD operation
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Settings of one store server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Root of the store's data.
    pub data_dir: PathBuf,
    /// Chunk size of a new store, in bytes.
    pub chunk_size: u32,
    /// TLS of the gRPC server.
    pub tls: crate::daemon::tls::ServerTls,
    /// GC keeps chunks touched within this many seconds before its cutoff.
    pub gc_safety_margin_seconds: u64,
    /// Prometheus `/metrics` address (plain HTTP); absent: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Who may call the store (re-read on SIGHUP).
    pub auth: crate::access::AuthConfig,
    /// How far deduplication reaches: "store" (every namespace) or "namespace".
    pub dedup_scope: crate::chunk_store::DedupScope,
    /// Accept version-2 sealed chunks (from the first agents with client-side encryption).
    /// Their names are not derived from what the store can see, so any writer could plant
    /// an unreadable chunk under a plain chunk's name; off until every writer is trusted that
    /// far. Current sealed chunks (version 3) are always accepted: the store checks that
    /// their names derive from their headers.
    pub accept_sealed_chunks: bool,
    /// Every new group is locked against deletion for this many seconds (0: no default).
    pub default_retention_seconds: u64,
    /// Where chunks, indexes and manifests are kept.
    pub backend: BackendKind,
    /// The bucket, when `backend = "s3"`.
    pub s3: Option<S3Config>,
    /// The pool, when `backend = "rados"`.
    pub rados: Option<RadosConfig>,
}

/// Which backend holds the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A local directory, `data_dir`.
    #[default]
    Fs,
    /// An S3 bucket, `[s3]`.
    S3,
    /// A Ceph RADOS pool, `[rados]`.
    Rados,
}

/// The `[rados]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RadosConfig {
    /// ceph.conf with the monitors.
    #[serde(default = "default_ceph_conf")]
    pub conf: PathBuf,
    /// cephx client name.
    #[serde(default = "default_ceph_client")]
    pub client: String,
    /// Keyring file (else the one ceph.conf names).
    pub keyring: Option<PathBuf>,
    /// Pool name; it must exist.
    pub pool: String,
    /// Prefix of the store's RADOS namespaces, so several stores can share a pool.
    #[serde(default = "default_rados_prefix")]
    pub prefix: String,
    /// Timeout of the connection and of every monitor and OSD operation.
    #[serde(default = "default_rados_timeout")]
    pub timeout_seconds: u64,
    /// Lifetime of the GC lease in the pool (see `[s3] gc_lease_seconds`).
    #[serde(default = "default_lease_seconds")]
    pub gc_lease_seconds: u64,
}

fn default_ceph_conf() -> PathBuf {
    PathBuf::from("/etc/ceph/ceph.conf")
}

fn default_ceph_client() -> String {
    "client.admin".into()
}

fn default_rados_prefix() -> String {
    "vmbackup.".into()
}

fn default_rados_timeout() -> u64 {
    30
}

impl RadosConfig {
    /// The backend settings.
    pub fn settings(&self) -> crate::backend::rados::RadosSettings {
        crate::backend::rados::RadosSettings {
            conf: Some(self.conf.clone()),
            mon_host: None,
            client: self.client.clone(),
            keyring: self.keyring.clone(),
            pool: self.pool.clone(),
            prefix: self.prefix.clone(),
            timeout: std::time::Duration::from_secs(self.timeout_seconds.max(1)),
        }
    }
}

/// The `[s3]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `https://host:port` of the S3 server (path-style requests).
    pub endpoint: String,
    /// Bucket name; the bucket must exist.
    pub bucket: String,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: String,
    /// Signing region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Access key id (else `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// File holding the secret access key (else `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key_file: Option<PathBuf>,
    /// Accept a plain `http://` endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// Lifetime of the GC lease in the bucket: how long after a GC holder dies the next
    /// GC may run (it is renewed every third of this while its holder lives).
    #[serde(default = "default_lease_seconds")]
    pub gc_lease_seconds: u64,
}

fn default_lease_seconds() -> u64 {
    crate::shared::DEFAULT_LEASE_TTL.as_secs()
}

fn default_region() -> String {
    "us-east-1".into()
}

impl S3Config {
    /// The backend settings, with credentials from the file or the environment. Errors
    /// name the file or variable, never a secret.
    pub fn settings(&self) -> Result<crate::backend::s3::S3Settings, String> {
        let access_key_id = match &self.access_key_id {
            Some(k) => k.clone(),
            None => std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                "[s3] access_key_id is not set and AWS_ACCESS_KEY_ID is not in the environment".to_string()
            })?,
        };
        let secret_access_key = match &self.secret_access_key_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("[s3] reading secret_access_key_file {}: {e}", p.display()))?
                .trim()
                .to_string(),
            None => std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| {
                "[s3] secret_access_key_file is not set and AWS_SECRET_ACCESS_KEY is not in the environment".to_string()
            })?,
        };
        Ok(crate::backend::s3::S3Settings {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            region: self.region.clone(),
            access_key_id,
            secret_access_key,
            allow_http: self.allow_http,
        })
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7871)),
            data_dir: PathBuf::from("/var/lib/vmbackup-store"),
            chunk_size: crate::identity::DEFAULT_CHUNK_SIZE,
            tls: crate::daemon::tls::ServerTls::default(),
            gc_safety_margin_seconds: crate::gc::DEFAULT_MARGIN.as_secs(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9871))),
            auth: crate::access::AuthConfig::default(),
            dedup_scope: crate::chunk_store::DedupScope::default(),
            accept_sealed_chunks: false,
            default_retention_seconds: 0,
            backend: BackendKind::Fs,
            s3: None,
            rados: None,
        }
    }
}

impl StoreConfig {
    /// Parses a TOML config; unknown keys are an error naming the key.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let c = StoreConfig::from_toml(include_str!("../../systemd/vmbackup-store.toml")).expect("example parses");
        assert!(!c.tls.insecure_plaintext, "the shipped config never serves plaintext off loopback");
        assert!(c.tls.cert.is_some() && c.tls.key.is_some(), "the shipped config serves TLS");
        assert!(!c.auth.principals.is_empty(), "the shipped config names principals");
        assert!(StoreConfig::from_toml("chunk = 1").is_err());
    }

    #[test]
    fn s3_section_parses_with_defaults() {
        let c = StoreConfig::from_toml(
            "backend = \"s3\"\n[s3]\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\nallow_http = true\n",
        )
        .expect("parses");
        assert_eq!(c.backend, BackendKind::S3);
        let s3 = c.s3.expect("section");
        assert_eq!(s3.region, "us-east-1");
        assert!(s3.allow_http && s3.prefix.is_empty());
        assert!(StoreConfig::from_toml("[s3]\nendpoint = \"x\"\nbucket = \"b\"\nsecret = \"s\"\n").is_err());
    }
}
