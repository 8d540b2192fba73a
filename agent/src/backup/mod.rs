//! Backing up a VM: every volume into one group on one Image Storage.
//!
//! Per volume an allocation map says which fixed-size chunks hold data; only those are
//! read. `parallelism` workers take chunks in turn: read (volume-read limit) -> all zero?
//! -> BLAKE3 -> known from the previous backup of the volume or this job, or asked with
//! MissingChunks -> zstd -> upload (network-write limit). Hashing and compression run on
//! blocking threads; memory is bounded by the workers plus an upload queue of the same
//! depth, whatever the volume size. Indexes go up once every chunk has; the group becomes
//! visible with one atomic commit, so a failed or cancelled backup leaves none.

pub mod fsinfo;
pub mod incremental;
pub mod lifecycle;
mod pipeline;
pub mod recover;
pub mod restore;

use std::sync::Arc;

use vmbackup_proto::index::{VolumeFormat as IndexFormat, VolumeIndex};
use vmbackup_proto::manifest::{FORMAT_VERSION, GroupManifest, VolumeEntry};

use crate::catalog::backup_storage::BackupStorageRecord;
use crate::catalog::now_millis;
use crate::catalog::vm::VmRecord;
use crate::catalog::volume_backup::{StorageRef, VolumeBackupRecord};
use crate::error::{AgentError, ErrorKind, Result, blocking};
use crate::jobs::Job;
use crate::storage::registry::Registry;
use crate::throttle::Throttle;
use crate::volume::{self, VolumeFormat, VolumeSource};

/// A validated CreateVmBackup.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// Uuid of the group to create (the resourceUuid when given).
    pub group_uuid: String,
    /// The VM and its volumes.
    pub vm: VmRecord,
    /// Where to.
    pub storage: BackupStorageRecord,
    /// Backup name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Reader workers.
    pub parallelism: usize,
    /// volumeReadBandwidth (+ host cap).
    pub read_limit: Throttle,
    /// networkWriteBandwidth (+ host cap).
    pub network_limit: Throttle,
    /// Connections to the store leave from here (`backup::network::cidr`).
    pub source: Option<crate::storage::netbind::SourceAddr>,
    /// Where the agent may create sockets for QEMU (its data directory's `run/`).
    pub runtime_dir: std::path::PathBuf,
    /// Write chunks through this mounted store directory (`fsInfo`).
    pub fs_info: Option<crate::tags::FsInfo>,
    /// Ranges written since the previous backup (live incrementals); filled by [`run`].
    pub dirty: Option<incremental::DirtySince>,
    /// System tags, recorded in the manifest.
    pub system_tags: Vec<String>,
    /// User tags, recorded in the manifest.
    pub user_tags: Vec<String>,
}

/// One volume being backed up.
#[derive(Debug)]
pub(crate) struct VolumeJob {
    pub(crate) source: Arc<dyn VolumeSource>,
    pub(crate) index: std::sync::Mutex<VolumeIndex>,
    pub(crate) stored_bytes: std::sync::atomic::AtomicU64,
    pub(crate) dedup_bytes: std::sync::atomic::AtomicU64,
    /// Chunks an incremental may take from the previous index without reading.
    pub(crate) reuse: Option<incremental::Reuse>,
}

fn index_format(f: VolumeFormat) -> IndexFormat {
    match f {
        VolumeFormat::Raw => IndexFormat::Raw,
        VolumeFormat::Qcow2 => IndexFormat::Qcow2,
    }
}

/// Runs a backup to completion (or failure, or cancellation) and records it. A VM whose
/// QMP socket answers is backed up live: its disks are frozen behind overlays for the
/// duration (see [`crate::qemu::live`]) and merged back afterwards, whatever the outcome.
pub async fn run(registry: &Registry, job: &Arc<Job>, req: BackupRequest) -> Result<Vec<VolumeBackupRecord>> {
    let qmp = match &req.vm.qmp_socket {
        Some(socket) if !socket.is_empty() => {
            crate::qemu::live::connect_if_running(std::path::Path::new(socket)).await?
        }
        _ => None,
    };
    let Some(qmp) = qmp else { return run_offline(registry, job, req).await };
    let tag = req.group_uuid.chars().take(12).collect::<String>();
    let previous = incremental::previous_group(registry.catalog(), &req).await;
    let new_bitmap = incremental::bitmap_name(&req.group_uuid);
    let snapshot = crate::qemu::live::LiveSnapshot::take(qmp, &req.vm.volumes, &tag, Some(&new_bitmap)).await?;
    job.set_message("live backup: disks frozen by a QEMU snapshot");
    let mut req = req;
    if let Some(prev) = &previous {
        let _ = std::fs::create_dir_all(&req.runtime_dir);
        let socket = req.runtime_dir.join(format!("nbd-{tag}.sock"));
        match snapshot.dirty_since(&incremental::bitmap_name(prev), &socket).await {
            Ok(per_volume) => {
                req.dirty = Some(incremental::DirtySince {
                    previous_group: prev.clone(),
                    per_volume: per_volume.into_iter().collect(),
                });
            }
            Err(e) => tracing::warn!(error = %e, "reading dirty bitmaps failed; reading in full"),
        }
    }
    let result = run_files(registry, job, req).await;
    // Keep the bitmap the next backup will follow: this one's if it committed, else the
    // previous one's.
    let keep = match (&result, &previous) {
        (Ok(_), _) => new_bitmap,
        (Err(_), Some(p)) => incremental::bitmap_name(p),
        (Err(_), None) => String::new(),
    };
    if let Err(e) = snapshot.release_keeping(Some(&keep)).await {
        // The backup itself is complete and consistent; the VM's chain needs attention.
        job.set_message(format!("backed up, but merging the snapshot back failed: {e}"));
        return Err(result.err().unwrap_or(e));
    }
    result
}

/// A stopped VM: its qcow2 files' own persistent bitmaps drive the incremental.
async fn run_offline(registry: &Registry, job: &Arc<Job>, req: BackupRequest) -> Result<Vec<VolumeBackupRecord>> {
    let previous = incremental::previous_group(registry.catalog(), &req).await;
    let mut req = req;
    if let Some(prev) = &previous {
        let r = req.clone();
        let p = prev.clone();
        req.dirty = tokio::task::spawn_blocking(move || incremental::offline_dirty(&r, &p)).await.ok();
    }
    incremental::offline_start(&req).await;
    let finish = req.clone();
    let result = run_files(registry, job, req).await;
    let keep = match (&result, &previous) {
        (Ok(_), _) => incremental::bitmap_name(&finish.group_uuid),
        (Err(_), Some(p)) => incremental::bitmap_name(p),
        (Err(_), None) => String::new(),
    };
    incremental::offline_finish(&finish, &keep).await;
    result
}

/// Backs up the VM's volume files as they are on disk.
async fn run_files(registry: &Registry, job: &Arc<Job>, req: BackupRequest) -> Result<Vec<VolumeBackupRecord>> {
    let catalog = registry.catalog().clone();
    if let Some(src) = &req.source {
        tracing::info!(job = %job.uuid, source = %src, "backup network: connecting to the store from this address");
        job.set_message(format!("backup network: {src}"));
    }
    let mut client = registry.connect_from(&req.storage.url, req.source.as_ref()).await?;
    let status = client.status().await?;
    if status.store_uuid != req.storage.store_uuid {
        return Err(AgentError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "a different Image Storage answers at {}: store {} instead of {}",
                req.storage.url, status.store_uuid, req.storage.store_uuid
            ),
        ));
    }
    let chunk_size = status.chunk_size;

    let previous = incremental::previous_indexes(&catalog, &mut client, &req).await;
    let known = incremental::known(&previous);

    // Open every volume first: a missing or unreadable one fails the job before anything is sent.
    let vm = req.vm.clone();
    let (dirty, job2) = (req.dirty.clone(), job.clone());
    let volumes: Vec<Arc<VolumeJob>> = blocking(move || {
        vm.volumes
            .iter()
            .map(|v| {
                let format = VolumeFormat::parse(&v.format);
                let source: Arc<dyn VolumeSource> = Arc::from(
                    volume::open(std::path::Path::new(&v.install_path), format, &volume::Limits::default())
                        .map_err(|e| AgentError::from(e).with_field("volumes"))?,
                );
                let index = VolumeIndex::new(
                    uuid_bytes(&v.uuid),
                    source.virtual_size(),
                    chunk_size,
                    index_format(source.format()),
                )
                .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("volume {}: {e}", v.uuid)))?;
                let reuse =
                    incremental::reuse_for(&v.uuid, source.virtual_size(), chunk_size, dirty.as_ref(), &previous)
                        .unwrap_or_else(|why| {
                            tracing::warn!(volume = %v.uuid, reason = %why, "reading the volume in full");
                            job2.set_message(format!("full read: {why}"));
                            None
                        });
                Ok(Arc::new(VolumeJob {
                    source,
                    index: std::sync::Mutex::new(index),
                    stored_bytes: Default::default(),
                    dedup_bytes: Default::default(),
                    reuse,
                }))
            })
            .collect()
    })
    .await?;

    let session = client.open_session(&format!("vmbackup-agent group {}", req.group_uuid)).await?;
    // fsInfo: mounted after the session opens, so GC already spares what is written.
    let mut mounted = match &req.fs_info {
        Some(info) => {
            let tag: String = req.group_uuid.chars().take(12).collect();
            let m = fsinfo::MountedStore::mount(info, &req.runtime_dir, &tag, &req.storage.store_uuid).await;
            match m {
                Ok(m) => {
                    job.set_message(format!("writing chunks through {} ({})", info.url, info.fs_type));
                    Some(Arc::new(m))
                }
                Err(e) => {
                    let _ = client.close_session(session).await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let outcome = pipeline::run(pipeline::Inputs {
        client: client.clone(),
        session_id: session.id.clone(),
        volumes: volumes.clone(),
        known,
        parallelism: req.parallelism,
        read_limit: req.read_limit.clone(),
        network_limit: req.network_limit.clone(),
        job: job.clone(),
        chunk_size,
        mounted: mounted.clone(),
    })
    .await;
    if let Some(m) = mounted.take() {
        // Every chunk is durable in the store directory; the commit below checks them there.
        match Arc::try_unwrap(m) {
            Ok(mut m) => m.unmount().await,
            Err(_) => tracing::warn!("the mounted store is still in use; it stays mounted"),
        }
    }
    if let Err(e) = outcome {
        let _ = client.close_session(session).await;
        return Err(e);
    }

    // Indexes, then the manifest: the group appears atomically.
    let now = now_millis();
    let mut entries = Vec::new();
    let mut records = Vec::new();
    for (v, vj) in req.vm.volumes.iter().zip(&volumes) {
        let vb_uuid = uuid::Uuid::new_v4().simple().to_string();
        let index_name = format!("{vb_uuid}.vidx");
        let encoded = vj.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner).encode();
        let digest = client.put_index(&session, &index_name, encoded).await?;
        let stored = vj.stored_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let dedup = vj.dedup_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let size = vj.source.virtual_size();
        let name = format!("{}-{}", req.name, v.name);
        entries.push(VolumeEntry {
            volume_backup_uuid: vb_uuid.clone(),
            volume_uuid: v.uuid.clone(),
            name: name.clone(),
            kind: v.kind.clone(),
            device_id: v.device_id,
            virtual_size: size,
            format: vj.source.format().as_str().to_string(),
            index_name: index_name.clone(),
            index_digest: digest.to_hex(),
            stored_bytes: stored,
            deduplicated_bytes: dedup,
        });
        let metadata = serde_json::json!({
            "format": vj.source.format().as_str(),
            "virtualSize": size,
            "chunkSize": chunk_size,
            "storedBytes": stored,
            "deduplicatedBytes": dedup,
        });
        records.push(VolumeBackupRecord {
            uuid: vb_uuid,
            group_uuid: req.group_uuid.clone(),
            volume_uuid: v.uuid.clone(),
            name,
            description: req.description.clone(),
            kind: v.kind.clone(),
            state: "Enabled".into(),
            status: "Ready".into(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            metadata: metadata.to_string(),
            create_date: now,
            last_op_date: now,
            refs: vec![StorageRef {
                backup_storage_uuid: req.storage.uuid.clone(),
                install_path: index_name,
                status: "Ready".into(),
                create_date: now,
                last_op_date: now,
            }],
        });
    }
    let manifest = GroupManifest {
        format_version: FORMAT_VERSION,
        group_uuid: req.group_uuid.clone(),
        vm_uuid: req.vm.uuid.clone(),
        name: req.name.clone(),
        description: req.description.clone().unwrap_or_default(),
        system_tags: req.system_tags.clone(),
        user_tags: req.user_tags.clone(),
        created: now,
        chunk_size,
        volumes: entries,
    };
    let bytes = manifest.encode().map_err(|e| AgentError::new(ErrorKind::Internal, format!("manifest: {e}")))?;
    if job.cancel.is_cancelled() {
        let _ = client.close_session(session).await;
        return Err(AgentError::new(ErrorKind::Cancelled, "cancelled before commit; no group was created"));
    }
    client.commit(&session, bytes).await?;
    let _ = client.close_session(session).await;
    let (c, r) = (catalog.clone(), records.clone());
    blocking(move || Ok(c.insert_volume_backups(&r)?)).await?;
    tracing::info!(group = %req.group_uuid, vm = %req.vm.uuid, storage = %req.storage.uuid, "backup committed");
    Ok(records)
}

fn uuid_bytes(u: &str) -> [u8; 16] {
    uuid::Uuid::try_parse(u).map(|u| *u.as_bytes()).unwrap_or([0; 16])
}
