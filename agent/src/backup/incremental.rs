//! Incremental live backups: what changed since the previous backup, from QEMU's persistent
//! dirty bitmaps.
//!
//! Each live backup adds a bitmap named `vmbackup-<group>` to every disk in the same QMP
//! transaction as its snapshot. The next live backup of the VM to the same storage looks
//! for the bitmap of the group it follows; a chunk the bitmap leaves clean takes its digest
//! from that group's index without being read. The lineage must match: the previous
//! index must belong to that very group and have the same size and chunk size, else the
//! volume is read in full and the job says so.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use vmbackup_proto::Digest;
use vmbackup_proto::index::SparseIndex;

use super::BackupRequest;
use crate::catalog::CatalogHandle;
use crate::storage::ChunkReader;
use crate::volume::VolumeFormat;

/// Guest ranges written since the backup `previous_group`, per volume (None: unknown).
#[derive(Debug, Clone, Default)]
pub struct DirtySince {
    /// The group the bitmap follows.
    pub previous_group: String,
    /// Volume uuid → written ranges.
    pub per_volume: HashMap<String, Option<Vec<(u64, u64)>>>,
}

/// For one volume: which chunks changed, and the previous digests of the others.
#[derive(Debug)]
pub(crate) struct Reuse {
    /// Per chunk: written since the previous backup (one byte a chunk, zeroed at
    /// allocation, so only the pages of dirty chunks are touched).
    pub(crate) dirty: Vec<bool>,
    /// `(chunk, digest)` of the previous backup's non-zero chunks, ascending.
    pub(crate) previous: Vec<(u64, Digest)>,
}

/// The name of the dirty bitmap a backup of `group` leaves on each disk.
pub fn bitmap_name(group: &str) -> String {
    format!("vmbackup-{group}")
}

/// The group of the latest backup of this VM on the request's storage, when every volume's
/// latest backup there belongs to it.
pub async fn previous_group(catalog: &CatalogHandle, req: &BackupRequest) -> Option<String> {
    let mut group: Option<String> = None;
    for v in &req.vm.volumes {
        let (vol, bs) = (v.uuid.clone(), req.storage.uuid.clone());
        let prev = catalog.run(move |c| c.latest_volume_backup(&vol, &bs)).await.ok().flatten()?;
        match &group {
            None => group = Some(prev.group_uuid),
            Some(g) if *g == prev.group_uuid => {}
            Some(_) => return None,
        }
    }
    group
}

/// The previous index of each volume on this storage, with its group.
pub(crate) async fn previous_indexes(
    catalog: &CatalogHandle,
    store: &dyn ChunkReader,
    req: &BackupRequest,
) -> HashMap<String, (String, SparseIndex)> {
    let mut out = HashMap::new();
    for v in &req.vm.volumes {
        let (vol, bs) = (v.uuid.clone(), req.storage.uuid.clone());
        let Ok(Some(prev)) = catalog.run(move |c| c.latest_volume_backup(&vol, &bs)).await else { continue };
        let Some(r) = prev.refs.iter().find(|r| r.backup_storage_uuid == req.storage.uuid) else { continue };
        match store.get_sparse_index(&r.install_path).await {
            Ok(ix) => {
                out.insert(v.uuid.clone(), (prev.group_uuid, ix));
            }
            Err(e) => tracing::warn!(volume = %v.uuid, error = %e, "previous index unusable; asking the store instead"),
        }
    }
    out
}

/// Every digest the previous indexes name: known present without asking.
pub(crate) fn known(previous: &HashMap<String, (String, SparseIndex)>) -> Arc<HashSet<Digest>> {
    Arc::new(previous.values().flat_map(|(_, ix)| ix.entries.iter().map(|(_, d)| *d)).collect())
}

/// What an incremental may skip on `volume`, or why it reads in full.
pub(crate) fn reuse_for(
    volume: &str,
    size: u64,
    chunk_size: u32,
    dirty: Option<&DirtySince>,
    previous: &HashMap<String, (String, SparseIndex)>,
) -> Result<Option<Reuse>, String> {
    let Some(dirty) = dirty else { return Ok(None) };
    let Some(Some(ranges)) = dirty.per_volume.get(volume) else {
        return Err(format!("no dirty bitmap of backup {} on volume {volume}", dirty.previous_group));
    };
    let Some((group, ix)) = previous.get(volume) else {
        return Err(format!("no previous index of volume {volume} on this storage"));
    };
    if *group != dirty.previous_group || ix.virtual_size != size || ix.chunk_size != chunk_size {
        return Err(format!("the previous backup of volume {volume} does not match its dirty bitmap"));
    }
    let cs = u64::from(chunk_size);
    let mut flags = vec![false; usize::try_from(ix.chunk_count()).unwrap_or(0)];
    for &(offset, len) in ranges {
        if len == 0 || offset >= size {
            continue;
        }
        let first = usize::try_from(offset / cs).unwrap_or(usize::MAX);
        let last = usize::try_from((offset + len - 1).min(size - 1) / cs).unwrap_or(usize::MAX);
        for f in flags.iter_mut().take(last + 1).skip(first) {
            *f = true;
        }
    }
    Ok(Some(Reuse { dirty: flags, previous: ix.entries.clone() }))
}

/// Offline qcow2 volumes carry the same bitmaps in their files: the previous backup's
/// marks what changed since (None for a volume without a usable one).
pub fn offline_dirty(req: &BackupRequest, previous_group: &str) -> DirtySince {
    let name = bitmap_name(previous_group);
    let per_volume = req
        .vm
        .volumes
        .iter()
        .map(|v| {
            let ranges = (v.format == VolumeFormat::Qcow2)
                .then(|| {
                    crate::volume::qcow2::Qcow2Volume::open(
                        std::path::Path::new(&v.install_path),
                        &crate::volume::Limits::default(),
                    )
                    .and_then(|q| q.bitmap_dirty_ranges(&name))
                })
                .and_then(|r| {
                    r.map_err(|e| tracing::info!(volume = %v.uuid, reason = %e, "no usable dirty bitmap")).ok()
                });
            (v.uuid.clone(), ranges)
        })
        .collect();
    DirtySince { previous_group: previous_group.to_string(), per_volume }
}

async fn qemu_img_bitmap(args: &[&str]) -> crate::error::Result<()> {
    let mut all = vec!["bitmap"];
    all.extend_from_slice(args);
    crate::tool::run("qemu-img", &all, crate::tool::SHORT).await.map(|_| ())
}

/// Before an offline backup reads a qcow2 volume, a bitmap for this backup starts
/// recording in its file: whatever is written from then on (if the VM starts meanwhile,
/// say) is marked for the next backup. A volume that cannot take one is read in full next
/// time.
pub async fn offline_start(req: &BackupRequest) {
    let name = bitmap_name(&req.group_uuid);
    for v in req.vm.volumes.iter().filter(|v| v.format == VolumeFormat::Qcow2) {
        if let Err(e) = qemu_img_bitmap(&["--add", "-g", "65536", &v.install_path, &name]).await {
            tracing::warn!(volume = %v.uuid, error = %e, "cannot add a dirty bitmap; the next backup reads it in full");
        }
    }
}

/// After an offline backup: keep only the bitmap the next backup follows (this one's if it
/// committed, else the previous one's).
pub async fn offline_finish(req: &BackupRequest, keep: &str) {
    for v in req.vm.volumes.iter().filter(|v| v.format == VolumeFormat::Qcow2) {
        let path = std::path::PathBuf::from(&v.install_path);
        // Reading the bitmap directory is file I/O: off the async runtime.
        let listed = tokio::task::spawn_blocking(move || {
            crate::volume::qcow2::Qcow2Volume::open(&path, &crate::volume::Limits::default()).and_then(|q| q.bitmaps())
        })
        .await;
        let Ok(Ok(bitmaps)) = listed else { continue };
        for b in bitmaps.iter().filter(|b| b.name.starts_with("vmbackup-") && b.name != keep) {
            if let Err(e) = qemu_img_bitmap(&["--remove", &v.install_path, &b.name]).await {
                tracing::warn!(volume = %v.uuid, bitmap = %b.name, error = %e, "removing an old dirty bitmap failed");
            }
        }
    }
}
