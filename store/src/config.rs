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
    /// Every new group is locked against deletion for this many seconds (0: no default).
    pub default_retention_seconds: u64,
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
            default_retention_seconds: 0,
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
}
