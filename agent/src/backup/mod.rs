//! Backing up a VM: every volume into one group on one Image Storage.
//!
//! Per volume an allocation map says which fixed-size chunks hold data; only those are
//! read. `parallelism` workers take chunks in turn: read (volume-read limit) -> all zero?
//! -> BLAKE3 (keyed on an encrypted storage) -> known from the previous backup of the
//! volume or this job, or asked with MissingChunks -> zstd (-> AES-256-GCM on an encrypted
//! storage) -> upload (network-write limit). Hashing and compression run on
//! blocking threads; memory is bounded by the workers plus an upload queue of the same
//! depth, whatever the volume size. Indexes go up once every chunk has; the group becomes
//! visible with one atomic commit, so a failed or cancelled backup leaves none.

pub mod incremental;
pub mod lifecycle;
pub(crate) mod outage;
mod pipeline;
mod slots;
pub(crate) use pipeline::ZSTD_LEVEL;
pub mod recover;
mod rekey;
pub mod restore;

use std::sync::Arc;

use vmbackup_proto::index::{SparseIndex, VolumeFormat as IndexFormat};
use vmbackup_proto::manifest::{FORMAT_VERSION, GroupManifest, VolumeEntry};

use crate::catalog::backup_storage::BackupStorageRecord;
use crate::catalog::now_millis;
use crate::catalog::vm::VmRecord;
use crate::catalog::volume_backup::{StorageRef, VolumeBackupRecord};
use crate::error::{AgentError, ErrorKind, Result, blocking};
use crate::jobs::Job;
use crate::model::{BackupStatus, VolumeKind};
use crate::storage::metered::Metered;
use crate::storage::registry::Registry;
use crate::storage::{ChunkWriter, Session};
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
    /// Bytes per second at which a live backup merges the guest's writes back into its
    /// disks (volumeWriteBandwidth, and the host's cap); None: unlimited.
    pub merge_speed: Option<u64>,
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
    /// Unix seconds until which the store must refuse to delete the group (0: no lock).
    pub retain_until: u64,
    /// The volume roots when the job started: every file a volume's image names (backing
    /// chain, data file) must lie beneath them before its data is read.
    pub roots: Arc<crate::roots::VolumeRoots>,
    /// How long the job waits for its Image Storage to answer again after an outage.
    pub store_outage: std::time::Duration,
}

/// One volume being backed up.
#[derive(Debug)]
pub(crate) struct VolumeJob {
    pub(crate) source: Arc<dyn VolumeSource>,
    /// The volume's uuid, as its index records it.
    pub(crate) volume_uuid: [u8; 16],
    pub(crate) stored_bytes: std::sync::atomic::AtomicU64,
    pub(crate) dedup_bytes: std::sync::atomic::AtomicU64,
    /// Chunks an incremental may take from the previous index without reading.
    pub(crate) reuse: Option<incremental::Reuse>,
    /// The chunks that may hold data, their digests and which are done (so an attempt
    /// after a store outage resumes); set by the first attempt's plan.
    pub(crate) slots: std::sync::OnceLock<slots::Slots>,
    /// The store's chunk size.
    pub(crate) chunk_size: u32,
}

impl VolumeJob {
    /// The planned slots (an internal error before the plan).
    pub(crate) fn slots(&self) -> Result<&slots::Slots> {
        self.slots.get().ok_or_else(|| AgentError::new(ErrorKind::Internal, "the volume's chunks were not planned"))
    }

    /// The volume's index as the job has it now.
    pub(crate) fn index(&self) -> Result<SparseIndex> {
        let size = self.source.virtual_size();
        Ok(self.slots()?.index(self.volume_uuid, size, self.chunk_size, index_format(self.source.format())))
    }

    /// Length of chunk `i` (the last one may be short).
    pub(crate) fn chunk_len(&self, i: usize) -> u64 {
        let cs = u64::from(self.chunk_size);
        let offset = u64::try_from(i).unwrap_or(u64::MAX).saturating_mul(cs);
        cs.min(self.source.virtual_size().saturating_sub(offset))
    }
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
    let mut snapshot = crate::qemu::live::LiveSnapshot::take(qmp, &req.vm.volumes, &tag, Some(&new_bitmap)).await?;
    snapshot.limit_merge(req.merge_speed);
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
        // A committed backup is complete and consistent whatever happens to the VM's
        // chain: the call reports it (a retry would only return the same group), and the
        // merge failure is logged and left in the job's message for the operator.
        tracing::error!(job = %job.uuid, error = %e, "merging the live snapshot back failed; the VM's disks stay on their overlays");
        job.set_message(format!("merging the snapshot back failed: {e}"));
        return result.inspect_err(|_| tracing::warn!(error = %e, "and the backup itself failed"));
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

/// Backs up the VM's volume files as they are on disk: open every volume, write the chunks
/// the store lacks in one session, then the indexes and, last, the manifest. The session
/// is closed on every path (its guard closes it when an error drops it). When the store
/// stops answering, the job waits for it and resumes (see [`outage`]).
async fn run_files(registry: &Registry, job: &Arc<Job>, req: BackupRequest) -> Result<Vec<VolumeBackupRecord>> {
    if let Some(src) = &req.source {
        tracing::info!(job = %job.uuid, source = %src, "backup network: connecting to the store from this address");
        job.set_message(format!("backup network: {src}"));
    }
    let key = registry.chunk_key(&req.storage).await?;
    let mut prepared = None;
    let mut outage_since: Option<std::time::Instant> = None;
    let mut attempt = 0u32;
    loop {
        let done_before = job.counters.done();
        let err = match attempt_files(registry, job, &req, key.clone(), &mut prepared, attempt).await {
            Ok(records) => return Ok(records),
            Err(e) => e,
        };
        if !err.is_store_outage() || job.cancel.is_cancelled() {
            return Err(err);
        }
        // The clock runs from the start of an outage; an attempt that got work done ends it.
        if job.counters.done() > done_before {
            outage_since = None;
        }
        let since = *outage_since.get_or_insert_with(std::time::Instant::now);
        let waited = since.elapsed();
        if waited >= req.store_outage {
            return Err(AgentError::new(
                err.kind(),
                format!("{err} (the store did not answer again within {} s)", req.store_outage.as_secs()),
            )
            .from_store());
        }
        attempt += 1;
        let pause = outage::backoff(attempt).min(req.store_outage - waited);
        tracing::warn!(job = %job.uuid, error = %err, attempt, pause_ms = pause.as_millis(), "Image Storage unavailable; the backup waits and resumes");
        job.set_message(format!(
            "waiting for the Image Storage (attempt {attempt}, next in {} s): {err}",
            pause.as_secs()
        ));
        tokio::select! {
            _ = job.cancel.cancelled() => {
                return Err(AgentError::new(ErrorKind::Cancelled, "cancelled while waiting for the Image Storage; no group was created"));
            }
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// What the first attempt opened and later attempts keep: the volumes with their ledgers,
/// the previous backup's digests and the store's chunk size.
struct Prepared {
    volumes: Vec<Arc<VolumeJob>>,
    known: Arc<std::collections::HashSet<vmbackup_proto::Digest>>,
    chunk_size: u32,
}

/// One attempt at the store part of a backup (attempt 0 opens the volumes; later ones
/// resume from the ledger).
async fn attempt_files(
    registry: &Registry,
    job: &Arc<Job>,
    req: &BackupRequest,
    key: Option<Arc<vmbackup_proto::seal::ChunkKey>>,
    prepared: &mut Option<Prepared>,
    attempt: u32,
) -> Result<Vec<VolumeBackupRecord>> {
    let (store, status) = registry.open_store(&req.storage, req.source.as_ref()).await?;
    let p = match prepared {
        Some(p) => {
            if p.chunk_size != status.chunk_size {
                return Err(AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "the Image Storage at {} came back with chunk size {} instead of {}",
                        store.location(),
                        status.chunk_size,
                        p.chunk_size
                    ),
                ));
            }
            p
        }
        None => {
            let chunk_size = status.chunk_size;
            let previous = incremental::previous_indexes(registry.catalog(), &*store, req).await;
            let known = incremental::known(&previous);
            let volumes = open_volumes(req, job, chunk_size, previous).await?;
            prepared.insert(Prepared { volumes, known, chunk_size })
        }
    };
    if attempt > 0
        && let Some(records) =
            outage::committed_before(&*store, &req.storage.uuid, &req.group_uuid, key.as_deref()).await?
    {
        tracing::info!(group = %req.group_uuid, "the commit had reached the store before the outage");
        let (r, g, s) = (records.clone(), req.group_uuid.clone(), req.storage.uuid.clone());
        registry.catalog().run(move |c| c.finish_commit(&g, &s, &r)).await?;
        return Ok(records);
    }

    let session = Session::open(store.clone(), &format!("vmbackup-agent group {}", req.group_uuid)).await?;
    if attempt > 0 {
        let lacking = outage::recheck(&session, &p.volumes, &p.known).await?;
        tracing::info!(job = %job.uuid, attempt, lacking, "resuming after the store outage");
        job.set_message(format!("resumed after the store outage: {lacking} chunks to send again"));
    }
    write_chunks(req, job, &session, p, key.clone(), attempt > 0).await?;
    let (manifest, records) = put_indexes(req, &session, &p.volumes, p.chunk_size, key.as_deref()).await?;
    if job.cancel.is_cancelled() {
        if let Err(e) = session.close().await {
            tracing::warn!(error = %e, "closing the store session of a cancelled backup failed; it expires with its TTL");
        }
        return Err(AgentError::new(ErrorKind::Cancelled, "cancelled before commit; no group was created"));
    }
    // Recorded before the store is asked: an agent that stops before the catalog has the
    // group finds out at its next start whether the store committed it.
    let (g, s) = (req.group_uuid.clone(), req.storage.uuid.clone());
    registry.catalog().run(move |c| c.begin_commit(&g, &s)).await?;
    if let Err(e) = session.commit(manifest, req.retain_until).await {
        // A refusal has an outcome (not committed); an outage does not, and stays pending.
        if !e.is_store_outage() {
            let (g, s) = (req.group_uuid.clone(), req.storage.uuid.clone());
            registry.catalog().run(move |c| c.finish_commit(&g, &s, &[])).await?;
        }
        return Err(e);
    }
    if let Err(e) = session.close().await {
        tracing::warn!(error = %e, "closing the store session after the commit failed; it expires with its TTL");
    }
    let (r, g, s) = (records.clone(), req.group_uuid.clone(), req.storage.uuid.clone());
    registry.catalog().run(move |c| c.finish_commit(&g, &s, &r)).await?;
    tracing::info!(group = %req.group_uuid, vm = %req.vm.uuid, storage = %req.storage.uuid, "backup committed");
    Ok(records)
}

/// Opens every volume first: a missing or unreadable one fails the job before anything
/// is sent.
async fn open_volumes(
    req: &BackupRequest,
    job: &Arc<Job>,
    chunk_size: u32,
    previous: std::collections::HashMap<String, (String, SparseIndex)>,
) -> Result<Vec<Arc<VolumeJob>>> {
    let (vm, dirty, job, roots) = (req.vm.clone(), req.dirty.clone(), job.clone(), req.roots.clone());
    blocking(move || {
        vm.volumes
            .iter()
            .map(|v| {
                let format = Some(v.format);
                let source: Arc<dyn VolumeSource> = Arc::from(
                    volume::open(std::path::Path::new(&v.install_path), format, &volume::Limits::default())
                        .map_err(|e| AgentError::from(e).with_field("volumes"))?,
                );
                for file in source.files().iter().skip(1) {
                    roots.check(file, crate::roots::Access::Volume).map_err(|why| {
                        AgentError::invalid("rootVolumeUuid", format!("volume {}: its image names {why}", v.uuid))
                    })?;
                }
                vmbackup_proto::index::check_chunk_size(chunk_size)
                    .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("volume {}: {e}", v.uuid)))?;
                let reuse =
                    incremental::reuse_for(&v.uuid, source.virtual_size(), chunk_size, dirty.as_ref(), &previous)
                        .unwrap_or_else(|why| {
                            tracing::warn!(volume = %v.uuid, reason = %why, "reading the volume in full");
                            job.set_message(format!("full read: {why}"));
                            None
                        });
                Ok(Arc::new(VolumeJob {
                    source,
                    volume_uuid: uuid_bytes(&v.uuid),
                    stored_bytes: Default::default(),
                    dedup_bytes: Default::default(),
                    reuse,
                    slots: std::sync::OnceLock::new(),
                    chunk_size,
                }))
            })
            .collect()
    })
    .await
}

/// Runs the chunk pipeline in `session`: chunks go up the session's upload stream, or, with
/// fsInfo, straight into the store's directory mounted for the job (mounted after the
/// session opens, so GC already spares what is written; unmounted whatever the outcome).
async fn write_chunks(
    req: &BackupRequest,
    job: &Arc<Job>,
    session: &Session,
    p: &Prepared,
    key: Option<Arc<vmbackup_proto::seal::ChunkKey>>,
    resume: bool,
) -> Result<()> {
    let mounted = match &req.fs_info {
        Some(info) => {
            let tag: String = req.group_uuid.chars().take(12).collect();
            let m = crate::storage::fsinfo::MountedStore::mount(info, &req.runtime_dir, &tag, &req.storage.store_uuid)
                .await?;
            job.set_message(format!("writing chunks through {} ({})", info.url, info.fs_type));
            Some(Arc::new(m))
        }
        None => None,
    };
    let writer: Box<dyn ChunkWriter> = match &mounted {
        Some(m) => Box::new(crate::storage::fsinfo::MountedWriter::new(m.clone())),
        None => session.writer().await?,
    };
    let sent = job.counters.count_into(|c| &c.sent);
    let outcome = pipeline::run(pipeline::Inputs {
        writer: Box::new(Metered::new(writer, req.network_limit.clone(), sent)),
        asker: pipeline::Asker::spawn(session.store().clone(), session.id().to_string()),
        volumes: p.volumes.clone(),
        known: p.known.clone(),
        parallelism: req.parallelism,
        read_limit: req.read_limit.clone(),
        job: job.clone(),
        chunk_size: p.chunk_size,
        key,
        resume,
    })
    .await;
    if let Some(m) = mounted {
        // Every chunk is durable in the store directory; the commit checks them there.
        match Arc::try_unwrap(m) {
            Ok(mut m) => m.unmount().await,
            Err(_) => tracing::warn!("the mounted store is still in use; it stays mounted"),
        }
    }
    outcome.map(|_| ())
}

/// Stores every volume's index and builds the group manifest (to commit) and the catalog
/// records (to insert once it is committed).
async fn put_indexes(
    req: &BackupRequest,
    session: &Session,
    volumes: &[Arc<VolumeJob>],
    chunk_size: u32,
    key: Option<&vmbackup_proto::seal::ChunkKey>,
) -> Result<(Vec<u8>, Vec<VolumeBackupRecord>)> {
    let now = now_millis();
    let mut entries = Vec::new();
    for (v, vj) in req.vm.volumes.iter().zip(volumes) {
        let vb_uuid = uuid::Uuid::new_v4().simple().to_string();
        let index_name = format!("{vb_uuid}.vidx");
        let digest = session.put_index(&index_name, vj.index()?).await?;
        let entry = VolumeEntry {
            volume_backup_uuid: vb_uuid,
            volume_uuid: v.uuid.clone(),
            name: format!("{}-{}", req.name, v.name),
            kind: v.kind.to_string(),
            device_id: v.device_id,
            virtual_size: vj.source.virtual_size(),
            format: vj.source.format().as_str().to_string(),
            index_name,
            index_digest: digest.to_hex(),
            stored_bytes: vj.stored_bytes.load(std::sync::atomic::Ordering::Relaxed),
            deduplicated_bytes: vj.dedup_bytes.load(std::sync::atomic::Ordering::Relaxed),
        };
        entries.push(entry);
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
        key_id: None,
        sealed: None,
    };
    let committed = Committed {
        group_uuid: &req.group_uuid,
        description: req.description.clone(),
        chunk_size,
        storage_uuid: &req.storage.uuid,
        status: BackupStatus::Ready,
        when: now,
        system_tags: &manifest.system_tags,
        user_tags: &manifest.user_tags,
    };
    let records = manifest.volumes.iter().map(|e| volume_record(e, &committed)).collect::<Result<Vec<_>>>()?;
    let manifest = match key {
        Some(k) => {
            manifest.seal(k).map_err(|e| AgentError::new(ErrorKind::Internal, format!("sealing the manifest: {e}")))?
        }
        None => manifest,
    };
    let bytes = manifest.encode().map_err(|e| AgentError::new(ErrorKind::Internal, format!("manifest: {e}")))?;
    Ok((bytes, records))
}

/// Where and how a group was committed, for the catalog records of its volumes.
pub(crate) struct Committed<'a> {
    /// The group.
    pub group_uuid: &'a str,
    /// Its description.
    pub description: Option<String>,
    /// The store's chunk size.
    pub chunk_size: u32,
    /// The backup storage holding it.
    pub storage_uuid: &'a str,
    /// Ready, or Damaged (the store's verify says so).
    pub status: BackupStatus,
    /// Unix milliseconds.
    pub when: i64,
    /// The group's systemTags.
    pub system_tags: &'a [String],
    /// The group's userTags.
    pub user_tags: &'a [String],
}

/// The catalog records of a committed group's volumes, from its (opened) manifest.
pub(crate) fn records_of(
    manifest: &GroupManifest,
    storage_uuid: &str,
    damaged: bool,
) -> Result<Vec<VolumeBackupRecord>> {
    let committed = Committed {
        group_uuid: &manifest.group_uuid,
        description: Some(manifest.description.clone()).filter(|d| !d.is_empty()),
        chunk_size: manifest.chunk_size,
        storage_uuid,
        status: if damaged { BackupStatus::Damaged } else { BackupStatus::Ready },
        when: manifest.created,
        system_tags: &manifest.system_tags,
        user_tags: &manifest.user_tags,
    };
    manifest.volumes.iter().map(|v| volume_record(v, &committed)).collect()
}

/// The catalog record of one committed volume backup, from its manifest entry.
pub(crate) fn volume_record(e: &VolumeEntry, c: &Committed<'_>) -> Result<VolumeBackupRecord> {
    let kind = VolumeKind::parse(&e.kind).ok_or_else(|| {
        AgentError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "manifest of group {}: volume {} has type {:?}, not Root or Data",
                c.group_uuid, e.volume_uuid, e.kind
            ),
        )
    })?;
    let metadata = serde_json::json!({
        "format": e.format,
        "virtualSize": e.virtual_size,
        "chunkSize": c.chunk_size,
        "storedBytes": e.stored_bytes,
        "deduplicatedBytes": e.deduplicated_bytes,
    });
    Ok(VolumeBackupRecord {
        uuid: e.volume_backup_uuid.clone(),
        group_uuid: c.group_uuid.to_string(),
        volume_uuid: e.volume_uuid.clone(),
        name: e.name.clone(),
        description: c.description.clone(),
        kind,
        state: "Enabled".into(),
        status: c.status,
        size: i64::try_from(e.virtual_size).unwrap_or(i64::MAX),
        metadata: metadata.to_string(),
        create_date: c.when,
        last_op_date: c.when,
        refs: vec![StorageRef {
            backup_storage_uuid: c.storage_uuid.to_string(),
            install_path: e.index_name.clone(),
            status: c.status,
            create_date: c.when,
            last_op_date: c.when,
        }],
        system_tags: c.system_tags.to_vec(),
        user_tags: c.user_tags.to_vec(),
    })
}

fn uuid_bytes(u: &str) -> [u8; 16] {
    uuid::Uuid::try_parse(u).map(|u| *u.as_bytes()).unwrap_or([0; 16])
}
