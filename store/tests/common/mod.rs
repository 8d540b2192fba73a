//! Shared by the chunk store's tests: the manifest of a one-volume group.

#![allow(dead_code)] // each test file uses a different part

use vmbackup_proto::manifest::{FORMAT_VERSION, GroupManifest, VolumeEntry};

/// A new uuid, ZStack style.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The manifest of a new group naming one raw volume backup `vb` whose index `index_name`
/// (of `digest`, covering `virtual_size` bytes in `chunk_size` chunks) is stored.
pub fn one_volume_manifest(
    vb: String,
    index_name: String,
    digest: &vmbackup_proto::Digest,
    virtual_size: u64,
    chunk_size: u32,
) -> GroupManifest {
    GroupManifest {
        format_version: FORMAT_VERSION,
        group_uuid: uuid(),
        vm_uuid: uuid(),
        name: "b".into(),
        description: String::new(),
        system_tags: vec![],
        user_tags: vec![],
        created: 1,
        chunk_size,
        volumes: vec![VolumeEntry {
            volume_backup_uuid: vb,
            volume_uuid: uuid(),
            name: "root".into(),
            kind: "Root".into(),
            device_id: 0,
            virtual_size,
            format: "raw".into(),
            index_name,
            index_digest: digest.to_hex(),
            stored_bytes: 0,
            deduplicated_bytes: 0,
        }],
        key_id: None,
        sealed: None,
    }
}
