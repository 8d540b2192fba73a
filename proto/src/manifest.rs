//! Group manifest: what makes a backup exist. One JSON document per VM backup group; the
//! group is visible exactly when its manifest is committed. SyncVmBackup rebuilds an agent's
//! catalog from manifests alone, so every inventory field lives here.
//!
//! JSON, camelCase, fields in this fixed order (encoding is deterministic):
//!
//! ```json
//! {"formatVersion": 1, "groupUuid": "…", "vmUuid": "…", "name": "…", "description": "…",
//!  "systemTags": [], "userTags": [], "created": 1764000000000, "chunkSize": 4194304,
//!  "volumes": [{"volumeBackupUuid": "…", "volumeUuid": "…", "name": "…", "type": "Root",
//!               "deviceId": 0, "virtualSize": 1073741824, "format": "qcow2",
//!               "indexName": "<volumeBackupUuid>.vidx", "indexDigest": "<64 hex>",
//!               "storedBytes": 0, "deduplicatedBytes": 0}]}
//! ```
//!
//! `created` is Unix milliseconds. Unknown fields are refused: a newer writer bumps
//! `formatVersion`, and an older reader says so instead of dropping what it cannot keep.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::format_error::FormatError;

/// Format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest accepted, bytes.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Most volumes in one group.
pub const MAX_VOLUMES: usize = 64;
/// Longest name or description.
const MAX_TEXT: usize = 2048;
/// Suffix of index names.
pub const INDEX_SUFFIX: &str = ".vidx";

/// A backup group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Group uuid (32 lowercase hex).
    pub group_uuid: String,
    /// VM uuid.
    pub vm_uuid: String,
    /// Backup name.
    pub name: String,
    /// Description.
    pub description: String,
    /// System tags of the request.
    pub system_tags: Vec<String>,
    /// User tags of the request.
    pub user_tags: Vec<String>,
    /// Unix milliseconds.
    pub created: i64,
    /// Chunk size of every index.
    pub chunk_size: u32,
    /// One entry per volume, root first.
    pub volumes: Vec<VolumeEntry>,
}

/// One volume of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeEntry {
    /// Volume backup uuid.
    pub volume_backup_uuid: String,
    /// Volume uuid.
    pub volume_uuid: String,
    /// Volume backup name.
    pub name: String,
    /// `Root` or `Data`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Device order.
    pub device_id: i32,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Name of the volume index object.
    pub index_name: String,
    /// BLAKE3 of the encoded index, hex.
    pub index_digest: String,
    /// Bytes this backup added to the store (compressed).
    pub stored_bytes: u64,
    /// Logical bytes whose chunks the store already had.
    pub deduplicated_bytes: u64,
}

fn err(field: &'static str, message: impl Into<String>) -> FormatError {
    FormatError::new("manifest", field, None, message)
}

fn check_uuid(field: &'static str, v: &str) -> Result<(), FormatError> {
    if v.len() == 32 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(err(field, format!("{v:?} is not 32 lowercase hex digits")))
    }
}

fn check_text(field: &'static str, v: &str, required: bool) -> Result<(), FormatError> {
    if required && v.trim().is_empty() {
        return Err(err(field, "is empty"));
    }
    if v.len() > MAX_TEXT {
        return Err(err(field, format!("is longer than {MAX_TEXT} bytes")));
    }
    Ok(())
}

/// Whether `name` is a safe object name: `<32 hex><suffix>`.
pub fn is_index_name(name: &str) -> bool {
    name.strip_suffix(INDEX_SUFFIX).is_some_and(|u| check_uuid("indexName", u).is_ok())
}

impl GroupManifest {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.format_version != FORMAT_VERSION {
            return Err(err(
                "formatVersion",
                format!("{} is not supported (this build reads {FORMAT_VERSION})", self.format_version),
            ));
        }
        check_uuid("groupUuid", &self.group_uuid)?;
        check_uuid("vmUuid", &self.vm_uuid)?;
        check_text("name", &self.name, true)?;
        check_text("description", &self.description, false)?;
        crate::index::check_chunk_size(self.chunk_size).map_err(|e| err("chunkSize", e.message))?;
        if self.volumes.is_empty() || self.volumes.len() > MAX_VOLUMES {
            return Err(err("volumes", format!("{} volumes; a group has 1..={MAX_VOLUMES}", self.volumes.len())));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.volumes {
            check_uuid("volumeBackupUuid", &v.volume_backup_uuid)?;
            check_uuid("volumeUuid", &v.volume_uuid)?;
            check_text("volumes.name", &v.name, true)?;
            if !matches!(v.kind.as_str(), "Root" | "Data") {
                return Err(err("volumes.type", format!("{:?} is not Root or Data", v.kind)));
            }
            if !matches!(v.format.as_str(), "raw" | "qcow2") {
                return Err(err("volumes.format", format!("{:?} is not raw or qcow2", v.format)));
            }
            if !is_index_name(&v.index_name) {
                return Err(err("volumes.indexName", format!("{:?} is not <32 hex>{INDEX_SUFFIX}", v.index_name)));
            }
            v.index_digest.parse::<Digest>().map_err(|e| err("volumes.indexDigest", e.to_string()))?;
            if !seen.insert(&v.volume_backup_uuid) {
                return Err(err("volumes", format!("volume backup {} is listed twice", v.volume_backup_uuid)));
            }
        }
        Ok(())
    }

    /// Encodes (deterministically) after validating.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        serde_json::to_vec_pretty(self).map_err(|e| err("json", e.to_string()))
    }

    /// Decodes and validates.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(err("length", format!("{} bytes exceeds the limit of {MAX_MANIFEST_BYTES}", bytes.len())));
        }
        let m: GroupManifest = serde_json::from_slice(bytes).map_err(|e| err("json", e.to_string()))?;
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> GroupManifest {
        GroupManifest {
            format_version: 1,
            group_uuid: "2f7c0a5bb86430e8a5ac48312172d70d".into(),
            vm_uuid: "9ff17180fded31c2b9e4e5751ebcb2ba".into(),
            name: "backup-1".into(),
            description: String::new(),
            system_tags: vec![],
            user_tags: vec![],
            created: 1_764_000_000_000,
            chunk_size: 4 << 20,
            volumes: vec![VolumeEntry {
                volume_backup_uuid: "785edb93bb1b3a31857dac1e69cc8392".into(),
                volume_uuid: "2ae6b881bb1239cd907d48993e86a2e8".into(),
                name: "Root-Volume-Backup-1".into(),
                kind: "Root".into(),
                device_id: 0,
                virtual_size: 1 << 30,
                format: "qcow2".into(),
                index_name: "785edb93bb1b3a31857dac1e69cc8392.vidx".into(),
                index_digest: Digest::of(b"index").to_hex(),
                stored_bytes: 10,
                deduplicated_bytes: 20,
            }],
        }
    }

    #[test]
    fn round_trip_is_deterministic() {
        let m = sample();
        let a = m.encode().expect("encode");
        assert_eq!(a, m.encode().expect("again"));
        assert_eq!(GroupManifest::decode(&a).expect("decode"), m);
        let text = String::from_utf8(a).expect("utf8");
        assert!(
            text.starts_with("{\n  \"formatVersion\": 1,\n  \"groupUuid\": \"2f7c0a5bb86430e8a5ac48312172d70d\""),
            "{text}"
        );
    }

    #[test]
    fn invalid_manifests_name_the_field() {
        let mut cases: Vec<(GroupManifest, &str)> = Vec::new();
        let mut m = sample();
        m.format_version = 2;
        cases.push((m, "formatVersion"));
        let mut m = sample();
        m.group_uuid = "../../etc".into();
        cases.push((m, "groupUuid"));
        let mut m = sample();
        m.volumes[0].index_name = "../x.vidx".into();
        cases.push((m, "volumes.indexName"));
        let mut m = sample();
        m.volumes[0].index_digest = "zz".into();
        cases.push((m, "volumes.indexDigest"));
        let mut m = sample();
        m.volumes.push(m.volumes[0].clone());
        cases.push((m, "volumes"));
        let mut m = sample();
        m.name = " ".into();
        cases.push((m, "name"));
        for (m, field) in cases {
            assert_eq!(m.validate().expect_err(field).field, field);
        }
        assert_eq!(GroupManifest::decode(b"{\"formatVersion\":1,\"extra\":1}").expect_err("unknown").field, "json");
        assert_eq!(GroupManifest::decode(&vec![b' '; MAX_MANIFEST_BYTES + 1]).expect_err("big").field, "length");
    }
}
