//! File-level restore at the gRPC edge: ListVmBackupFiles and ReadVmBackupFile requests
//! parsed into [`FileSource`]s and paths, and entries rendered as inventories.

use vmbackup_proto::agent::v1 as pb;

use crate::error::{AgentError, Result};
use crate::guestfs::Entry;
use crate::ops::files::{DEFAULT_LIST_LIMIT, FileSource};
use crate::validate;

/// Longest path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Most entries one listing may ask for.
const MAX_LIST_LIMIT: u32 = 1_000_000;

pub(super) fn parse_source(s: Option<pb::VmBackupFileSource>) -> Result<FileSource> {
    let s = s.ok_or_else(|| AgentError::invalid("source", "is required (groupUuid, volumeUuid)"))?;
    Ok(FileSource {
        group: validate::uuid("source.groupUuid", &s.group_uuid)?,
        volume: validate::uuid("source.volumeUuid", &s.volume_uuid)?,
        storage: validate::optional_uuid("source.backupStorageUuid", &s.backup_storage_uuid)?,
        partition: s.partition,
        logical_volume: match s.logical_volume.as_str() {
            "" => None,
            lv if lv.len() <= 255
                && lv.split('/').count() == 2
                && lv.split('/').all(|p| {
                    !p.is_empty()
                        && !p.starts_with('-')
                        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
                }) =>
            {
                Some(lv.to_string())
            }
            lv => {
                return Err(AgentError::invalid(
                    "source.logicalVolume",
                    format!("{} is not vg/lv (each 1 to 127 of [A-Za-z0-9+_.-])", validate::shorten(lv)),
                ));
            }
        },
    })
}

pub(super) fn parse_path(path: &str) -> Result<String> {
    if path.is_empty() {
        return Ok("/".into());
    }
    if path.len() > MAX_PATH {
        return Err(AgentError::invalid("path", format!("is {} bytes long; at most {MAX_PATH}", path.len())));
    }
    if !path.starts_with('/') || path.contains('\0') {
        return Err(AgentError::invalid(
            "path",
            format!("{} is not an absolute path without NUL bytes", validate::shorten(path)),
        ));
    }
    Ok(path.to_string())
}

pub(super) fn parse_limit(limit: u32) -> Result<u64> {
    match limit {
        0 => Ok(DEFAULT_LIST_LIMIT),
        n if n > MAX_LIST_LIMIT => Err(AgentError::invalid("limit", format!("{n} is more than {MAX_LIST_LIMIT}"))),
        n => Ok(u64::from(n)),
    }
}

pub(super) fn file_inventory(e: Entry, partition: u32) -> pb::VmBackupFileInventory {
    pb::VmBackupFileInventory {
        path: e.path,
        r#type: e.kind.to_string(),
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        modified: Some(vmbackup_proto::Timestamp {
            seconds: e.mtime,
            nanos: i32::try_from(e.mtime_nanos).unwrap_or(0),
        }),
        link_target: e.link_target.unwrap_or_default(),
        partition,
    }
}
