//! Configuration of vmbackup-store: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! listen = "127.0.0.1:7871"        # gRPC address
//! data_dir = "/var/lib/vmbackup-store"
//! chunk_size = 4194304             # bytes; only used when the store is created
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
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7871)),
            data_dir: PathBuf::from("/var/lib/vmbackup-store"),
            chunk_size: crate::identity::DEFAULT_CHUNK_SIZE,
        }
    }
}

impl StoreConfig {
    /// Parses a TOML config; unknown keys are an error naming the key.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}
