//! The store's identity file `store.json`: a uuid made at first start that never changes,
//! the on-disk layout version, and the fixed chunk size.
//!
//! ```json
//! {"format_version": 1, "store_uuid": "…32 hex…", "chunk_size": 4194304}
//! ```

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::durable;

/// Version of the on-disk layout this build reads and writes. Do not change without a
/// migration: stores in the field carry it.
pub const FORMAT_VERSION: u32 = 1;

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Smallest chunk size a store accepts (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size a store accepts (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Contents of `store.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreIdentity {
    /// Layout version, [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The store's uuid (32 lowercase hex digits, ZStack style).
    pub store_uuid: String,
    /// Fixed chunk size in bytes.
    pub chunk_size: u32,
}

/// Checks that a chunk size is a power of two within [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
pub fn validate_chunk_size(size: u32) -> Result<(), String> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!(
            "chunk size {size} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
        ));
    }
    Ok(())
}

impl StoreIdentity {
    /// A new identity: a fresh uuid, this build's layout version, `chunk_size`.
    pub fn new(chunk_size: u32) -> Self {
        StoreIdentity {
            format_version: FORMAT_VERSION,
            store_uuid: uuid::Uuid::new_v4().simple().to_string(),
            chunk_size,
        }
    }

    /// Parses and checks an identity read from `what` (a path or object key, for errors).
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Self, crate::error::StoreError> {
        use crate::error::{ErrorKind, StoreError};
        let id: StoreIdentity =
            serde_json::from_slice(bytes).map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("{what}: {e}")))?;
        if id.format_version != FORMAT_VERSION {
            return Err(StoreError::new(
                ErrorKind::Corrupt,
                format!(
                    "{what}: format_version {} is not supported (this build reads {FORMAT_VERSION})",
                    id.format_version
                ),
            ));
        }
        validate_chunk_size(id.chunk_size).map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("{what}: {e}")))?;
        Ok(id)
    }

    /// Reads `store.json` under `dir`, creating it (and `dir`) on first start.
    ///
    /// `chunk_size` applies only to a new store; an existing store keeps its own.
    pub fn open_or_create(dir: &Path, chunk_size: u32) -> io::Result<Self> {
        match Self::read(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                validate_chunk_size(chunk_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                std::fs::create_dir_all(dir)?;
                let id = StoreIdentity::new(chunk_size);
                let json = serde_json::to_vec_pretty(&id).map_err(io::Error::other)?;
                durable::write_atomic(&dir.join("store.json"), &json)?;
                Ok(id)
            }
            other => other,
        }
    }

    /// Reads and checks `store.json` under `dir` (NotFound when there is none).
    pub fn read(dir: &Path) -> io::Result<Self> {
        let path = dir.join("store.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let id: StoreIdentity = serde_json::from_slice(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
                if id.format_version != FORMAT_VERSION {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: format_version {} is not supported (this build reads {FORMAT_VERSION})",
                            path.display(),
                            id.format_version
                        ),
                    ));
                }
                validate_chunk_size(id.chunk_size)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = StoreIdentity::open_or_create(&dir.path().join("s"), DEFAULT_CHUNK_SIZE).expect("create");
        let b = StoreIdentity::open_or_create(&dir.path().join("s"), MIN_CHUNK_SIZE).expect("reopen");
        assert_eq!(a, b, "a reopened store keeps its uuid and chunk size");
        assert_eq!(a.store_uuid.len(), 32);
    }

    #[test]
    fn chunk_size_out_of_range_is_refused() {
        assert!(validate_chunk_size(3 << 20).is_err());
        assert!(validate_chunk_size(32 << 10).is_err());
        assert!(validate_chunk_size(32 << 20).is_err());
        assert!(validate_chunk_size(64 << 10).is_ok());
    }

    #[test]
    fn corrupt_identity_file_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("store.json"), b"{not json").expect("write");
        let err = StoreIdentity::open_or_create(dir.path(), DEFAULT_CHUNK_SIZE).expect_err("corrupt");
        assert!(err.to_string().contains("store.json"), "{err}");
    }
}
