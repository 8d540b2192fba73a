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
//!
//! **Version 2, sealed** (an encrypted backup storage's, [`GroupManifest::seal`]): what a
//! person wrote is private: `name`, `description`, `systemTags`, `userTags` and every
//! volume's `name` are empty in clear and kept, as the JSON document
//! `{"name", "description", "systemTags", "userTags", "volumeNames": [...]}`, in two fields
//! that follow `volumes`:
//!
//! ```json
//!  "keyId": "<32 hex>", "sealed": "<hex: nonce ‖ AES-256-GCM ciphertext ‖ tag>"
//! ```
//!
//! The associated data is `vmbackup sealed manifest\0` followed by the compact JSON of the
//! clear manifest without `sealed`, so the key also vouches for everything left readable:
//! the group, VM and volume uuids, sizes, dates and the index digests (and through them
//! every chunk name). Those stay readable because the store needs them: it commits,
//! lists, verifies and garbage-collects groups by them, and never holds the key.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::format_error::FormatError;
use crate::seal::{ChunkKey, KeyId, hex_decode, hex_encode};

/// Format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Format version of a sealed manifest.
pub const SEALED_FORMAT_VERSION: u32 = 2;
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
    /// Sealed manifests: the id of the key that sealed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Sealed manifests: the private fields, sealed, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

/// The private fields of a sealed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Private {
    name: String,
    description: String,
    system_tags: Vec<String>,
    user_tags: Vec<String>,
    volume_names: Vec<String>,
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
    /// Whether the private fields are sealed (version 2).
    pub fn is_sealed(&self) -> bool {
        self.format_version == SEALED_FORMAT_VERSION
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), FormatError> {
        let sealed = match self.format_version {
            FORMAT_VERSION => false,
            SEALED_FORMAT_VERSION => true,
            v => {
                return Err(err(
                    "formatVersion",
                    format!("{v} is not supported (this build reads {FORMAT_VERSION} and {SEALED_FORMAT_VERSION})"),
                ));
            }
        };
        if sealed {
            let id = self.key_id.as_deref().ok_or_else(|| err("keyId", "a sealed manifest needs its key id"))?;
            id.parse::<KeyId>().map_err(|e| err("keyId", e.message))?;
            let body =
                self.sealed.as_deref().ok_or_else(|| err("sealed", "a sealed manifest needs its sealed fields"))?;
            if body.len() > MAX_MANIFEST_BYTES {
                return Err(err("sealed", "is too long"));
            }
            let private_in_clear = !self.name.is_empty()
                || !self.description.is_empty()
                || !self.system_tags.is_empty()
                || !self.user_tags.is_empty()
                || self.volumes.iter().any(|v| !v.name.is_empty());
            if private_in_clear {
                return Err(err("sealed", "names, description and tags of a sealed manifest must be empty in clear"));
            }
        } else if self.key_id.is_some() || self.sealed.is_some() {
            return Err(err("formatVersion", format!("keyId and sealed need formatVersion {SEALED_FORMAT_VERSION}")));
        }
        check_uuid("groupUuid", &self.group_uuid)?;
        check_uuid("vmUuid", &self.vm_uuid)?;
        check_text("name", &self.name, !sealed)?;
        check_text("description", &self.description, false)?;
        crate::index::check_chunk_size(self.chunk_size).map_err(|e| err("chunkSize", e.message))?;
        if self.volumes.is_empty() || self.volumes.len() > MAX_VOLUMES {
            return Err(err("volumes", format!("{} volumes; a group has 1..={MAX_VOLUMES}", self.volumes.len())));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.volumes {
            check_uuid("volumeBackupUuid", &v.volume_backup_uuid)?;
            check_uuid("volumeUuid", &v.volume_uuid)?;
            check_text("volumes.name", &v.name, !sealed)?;
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

    /// The associated data of a sealed manifest: everything in clear but `sealed`.
    fn sealed_aad(&self) -> Result<Vec<u8>, FormatError> {
        let clear = GroupManifest { sealed: None, ..self.clone() };
        let mut aad = b"vmbackup sealed manifest\0".to_vec();
        aad.extend(serde_json::to_vec(&clear).map_err(|e| err("json", e.to_string()))?);
        Ok(aad)
    }

    /// This (plain, version 1) manifest with its private fields sealed with `key`.
    pub fn seal(&self, key: &ChunkKey) -> Result<GroupManifest, FormatError> {
        self.validate()?;
        if self.is_sealed() {
            return Err(err("formatVersion", "the manifest is sealed already"));
        }
        let private = Private {
            name: self.name.clone(),
            description: self.description.clone(),
            system_tags: self.system_tags.clone(),
            user_tags: self.user_tags.clone(),
            volume_names: self.volumes.iter().map(|v| v.name.clone()).collect(),
        };
        let mut clear = GroupManifest {
            format_version: SEALED_FORMAT_VERSION,
            name: String::new(),
            description: String::new(),
            system_tags: Vec::new(),
            user_tags: Vec::new(),
            volumes: self.volumes.iter().map(|v| VolumeEntry { name: String::new(), ..v.clone() }).collect(),
            key_id: Some(key.id().to_string()),
            sealed: None,
            ..self.clone()
        };
        let plain = serde_json::to_vec(&private).map_err(|e| err("json", e.to_string()))?;
        clear.sealed = Some(hex_encode(&key.seal_bytes(&clear.sealed_aad()?, &plain)?));
        clear.validate()?;
        Ok(clear)
    }

    /// The plain (version 1) manifest of a sealed one, opened with `key`: another key, or
    /// anything altered in clear or sealed, is an error.
    pub fn unseal(&self, key: &ChunkKey) -> Result<GroupManifest, FormatError> {
        self.validate()?;
        if !self.is_sealed() {
            return Err(err("formatVersion", format!("the manifest is not sealed, but key {} was expected", key.id())));
        }
        let id = self.key_id.as_deref().unwrap_or_default();
        if id != key.id().to_string() {
            return Err(err("keyId", format!("sealed with key {id}, not with key {}", key.id())));
        }
        let sealed = hex_decode(self.sealed.as_deref().unwrap_or_default(), "manifest")?;
        let plain = key.open_bytes(&self.sealed_aad()?, &sealed, "manifest")?;
        let private: Private = serde_json::from_slice(&plain).map_err(|e| err("sealed", e.to_string()))?;
        if private.volume_names.len() != self.volumes.len() {
            return Err(err("sealed", "the sealed volume names do not match the volumes"));
        }
        let open = GroupManifest {
            format_version: FORMAT_VERSION,
            name: private.name,
            description: private.description,
            system_tags: private.system_tags,
            user_tags: private.user_tags,
            volumes: self
                .volumes
                .iter()
                .zip(private.volume_names)
                .map(|(v, name)| VolumeEntry { name, ..v.clone() })
                .collect(),
            key_id: None,
            sealed: None,
            ..self.clone()
        };
        open.validate()?;
        Ok(open)
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
            key_id: None,
            sealed: None,
        }
    }

    #[test]
    fn sealed_manifests_hide_what_people_wrote_and_open_only_unchanged() {
        let mut m = sample();
        m.description = "payroll database".into();
        m.user_tags = vec!["finance".into()];
        let key = ChunkKey::new(&[4u8; 32]);
        let sealed = m.seal(&key).expect("seal");
        let bytes = sealed.encode().expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        for secret in ["payroll", "finance", "backup-1", "Root-Volume-Backup-1"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains(&m.volumes[0].index_digest), "the store still reads index digests");
        let decoded = GroupManifest::decode(&bytes).expect("decode");
        assert!(decoded.is_sealed());
        assert_eq!(decoded.unseal(&key).expect("unseal"), m);
        let e = decoded.unseal(&ChunkKey::new(&[5u8; 32])).expect_err("other key");
        assert_eq!(e.field, "keyId");
        // Anything changed in clear breaks the seal.
        let mut moved = decoded.clone();
        moved.volumes[0].index_digest = Digest::of(b"another index").to_hex();
        assert_eq!(moved.unseal(&key).expect_err("altered").field, "sealed");
        let mut renamed = decoded.clone();
        renamed.name = "x".into();
        assert_eq!(renamed.validate().expect_err("private in clear").field, "sealed");
        assert_eq!(m.unseal(&key).expect_err("plain").field, "formatVersion");
        assert_eq!(decoded.seal(&key).expect_err("twice").field, "formatVersion");
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
        m.format_version = 3;
        cases.push((m, "formatVersion"));
        let mut m = sample();
        m.format_version = 2;
        cases.push((m, "keyId"));
        let mut m = sample();
        m.sealed = Some("00".into());
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
