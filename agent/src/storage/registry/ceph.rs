//! Ceph backup storages in the registry: AddCephBackupStorage, opening a pool's store for
//! the engines, and ReconnectBackupStorage's checks of the monitors and the pool.
//!
//! Add connects, opens (or creates) the store in the pool and asks the monitors for the
//! inventory's facts before it records anything: a wrong keyring, a missing pool or
//! unreachable monitors fail the call with one clear error and leave no record. The pool is
//! never created by the agent: creating pools needs monitor write capabilities a backup
//! client should not hold, and placement-group counts are the cluster operator's choice.

use std::sync::Arc;

use vmbackup_store::backend::rados::RadosBackend;
use vmbackup_store::backend::rados::report::ClusterReport;

use super::{CONNECTED, DISCONNECTED, Registry};
use crate::catalog::backup_storage::{BackupStorageRecord, CephMonRecord};
use crate::catalog::now_millis;
use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::ceph::{CEPH_TYPE, CEPH_URL, CephTarget, MonUrl, Probe};
use crate::storage::local::LocalStore;

/// A validated AddCephBackupStorage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCeph {
    /// Requested uuid (resourceUuid), or a new one.
    pub uuid: Option<String>,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Monitors, pool and client identity.
    pub target: CephTarget,
    /// Attached zones, sorted and deduplicated.
    pub zones: Vec<String>,
    /// Its cap on concurrent backups (parallelismDegree system tag).
    pub max_backups: Option<u32>,
    /// The configured key to seal everything written there with.
    pub encryption_key: Option<String>,
}

/// A connected pool and the store in it.
#[derive(Debug, Clone)]
pub(super) struct CephOpen {
    backend: Arc<RadosBackend>,
    store: LocalStore,
}

/// The target a record describes.
fn target_of(r: &BackupStorageRecord) -> CephTarget {
    CephTarget {
        mons: r
            .mons
            .iter()
            .map(|m| MonUrl {
                hostname: m.hostname.clone(),
                mon_port: m.mon_port,
                ssh_username: m.ssh_username.clone(),
                ssh_port: m.ssh_port,
            })
            .collect(),
        pool: r.pool_name.clone(),
        client: r.ceph_client.clone(),
        keyring: (!r.keyring_path.is_empty()).then(|| r.keyring_path.clone().into()),
    }
}

/// The cluster's raw (total, available) bytes as the catalog keeps them.
fn capacity_of(r: &ClusterReport) -> (i64, i64) {
    (i64::try_from(r.total_bytes).unwrap_or(i64::MAX), i64::try_from(r.available_bytes).unwrap_or(i64::MAX))
}

/// The pool's (used, available, replicas) as the catalog keeps them.
fn pool_of(r: &ClusterReport) -> (i64, i64, i32) {
    (
        i64::try_from(r.pool_used_bytes).unwrap_or(i64::MAX),
        i64::try_from(r.pool_available_bytes).unwrap_or(i64::MAX),
        i32::try_from(r.pool_replicated_size).unwrap_or(i32::MAX),
    )
}

fn status_name(up: bool) -> &'static str {
    if up { CONNECTED } else { DISCONNECTED }
}

/// "10.0.0.1:6789 Connected, 10.0.0.2:6789 Disconnected".
fn mon_summary(target: &CephTarget, up: &[bool]) -> String {
    let each: Vec<String> =
        target.mons.iter().zip(up).map(|(m, u)| format!("{}:{} {}", m.hostname, m.mon_port, status_name(*u))).collect();
    each.join(", ")
}

impl Registry {
    /// Connects to the pool and opens its store (blocking work on a blocking thread).
    async fn open_ceph(&self, target: CephTarget) -> Result<(CephOpen, Probe)> {
        let config = self.ceph_config.clone();
        tokio::task::spawn_blocking(move || {
            let backend = target.connect(&config)?;
            let store = target.open_store(backend.clone(), vmbackup_store::identity::DEFAULT_CHUNK_SIZE, &config)?;
            let probe = target.probe(Some(&backend));
            let location = format!("pool {:?}", target.pool);
            Ok((CephOpen { backend, store: LocalStore::ceph(Arc::new(store), location) }, probe))
        })
        .await?
    }

    fn cached_ceph(&self, uuid: &str) -> Option<CephOpen> {
        self.ceph.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(uuid).cloned()
    }

    /// Forgets a Ceph storage's connection (its record was deleted).
    pub(super) fn forget_ceph(&self, uuid: &str) {
        self.ceph.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(uuid);
    }

    /// Keeps `open` for `record` unless its pool holds another store than the record's.
    fn remember_ceph(&self, record: &BackupStorageRecord, open: CephOpen) -> Result<LocalStore> {
        if open.store.store_uuid() != record.store_uuid {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "Ceph pool {:?} now holds store {} instead of {} of backup storage {}",
                    record.pool_name,
                    open.store.store_uuid(),
                    record.store_uuid,
                    record.uuid
                ),
            ));
        }
        let mut map = self.ceph.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(map.entry(record.uuid.clone()).or_insert(open).store.clone())
    }

    /// The store in a Ceph backup storage's pool, connected on first use.
    pub(super) async fn ceph_store(&self, record: &BackupStorageRecord) -> Result<LocalStore> {
        if let Some(open) = self.cached_ceph(&record.uuid) {
            return Ok(open.store);
        }
        let (open, _) = self.open_ceph(target_of(record)).await?;
        self.remember_ceph(record, open)
    }

    /// Collects the garbage of every Ceph backup storage's pool once. A pool whose lease
    /// another collector holds is skipped (it is being collected); a pool that cannot be
    /// reached is logged and tried at the next round.
    pub async fn collect_ceph_garbage(&self, margin: std::time::Duration) -> Result<()> {
        let q =
            crate::catalog::query::QueryParams { conditions: vec![format!("type={CEPH_TYPE}")], ..Default::default() };
        let records = self.catalog.run(move |c| c.query_backup_storages(&q)).await?.rows;
        for record in records {
            let outcome = match self.ceph_store(&record).await {
                Ok(store) => store.garbage_collect(margin).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(r) => tracing::info!(
                    target: "audit",
                    principal = "agent",
                    storage = %record.uuid,
                    pool = %record.pool_name,
                    chunks_removed = r.chunks_removed,
                    bytes_removed = r.bytes_removed,
                    chunks_kept = r.chunks_kept,
                    seconds = r.seconds,
                    "garbage collected"
                ),
                Err(e) if e.kind() == ErrorKind::FailedPrecondition => {
                    tracing::info!(storage = %record.uuid, pool = %record.pool_name, reason = %e, "garbage collection skipped: another collector runs");
                }
                Err(e) => {
                    tracing::warn!(storage = %record.uuid, pool = %record.pool_name, error = %e, "garbage collection failed; trying again next round");
                }
            }
        }
        Ok(())
    }

    /// AddCephBackupStorage.
    pub async fn add_ceph(&self, req: NewCeph) -> Result<BackupStorageRecord> {
        if let Some(uuid) = &req.uuid
            && let Some(existing) = self.get(uuid).await?
        {
            let same = existing.kind == CEPH_TYPE
                && existing.name == req.name
                && existing.description == req.description
                && target_of(&existing) == req.target
                && existing.attached_zone_uuids == req.zones
                && existing.max_backups == req.max_backups
                && existing.encryption_key == req.encryption_key.clone().unwrap_or_default();
            if same {
                return Ok(existing);
            }
            return Err(AgentError::new(
                ErrorKind::AlreadyExists,
                format!("resourceUuid {uuid} is already backup storage {:?} with other parameters", existing.name),
            )
            .with_field("resourceUuid"));
        }
        let (open, probe) = self.open_ceph(req.target.clone()).await?;
        let report = probe.report?;
        let ((total_capacity, available_capacity), (pool_used, pool_available, replicas)) =
            (capacity_of(&report), pool_of(&report));
        let now = now_millis();
        let mons = req
            .target
            .mons
            .iter()
            .zip(&probe.mons)
            .map(|(m, up)| CephMonRecord {
                mon_uuid: uuid::Uuid::new_v4().simple().to_string(),
                hostname: m.hostname.clone(),
                mon_addr: m.hostname.clone(),
                mon_port: m.mon_port,
                ssh_port: m.ssh_port,
                ssh_username: m.ssh_username.clone(),
                status: status_name(*up).to_string(),
                create_date: now,
                last_op_date: now,
            })
            .collect();
        let mut record = BackupStorageRecord {
            uuid: req.uuid.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            name: req.name,
            description: req.description,
            kind: CEPH_TYPE.to_string(),
            url: CEPH_URL.to_string(),
            state: "Enabled".to_string(),
            status: CONNECTED.to_string(),
            total_capacity,
            available_capacity,
            store_uuid: open.store.store_uuid().to_string(),
            create_date: now,
            last_op_date: now,
            attached_zone_uuids: req.zones,
            max_backups: req.max_backups,
            fsid: report.fsid,
            pool_name: req.target.pool.clone(),
            pool_available_capacity: pool_available,
            pool_used_capacity: pool_used,
            pool_replicated_size: replicas,
            ceph_client: req.target.client.clone(),
            keyring_path: req.target.keyring.as_ref().map(|k| k.display().to_string()).unwrap_or_default(),
            mons,
            ..Default::default()
        };
        self.bind_key(&mut record, req.encryption_key.as_deref()).await?;
        let record = self.insert_new(record, None).await?;
        self.remember_ceph(&record, open)?;
        Ok(record)
    }

    /// ReconnectBackupStorage of a Ceph storage: checks every monitor and the pool, records
    /// each monitor's status, the pool's figures and Connected or Disconnected; fails, naming
    /// the monitors' states, when the cluster does not answer.
    pub(super) async fn reconnect_ceph(&self, record: BackupStorageRecord) -> Result<BackupStorageRecord> {
        let target = target_of(&record);
        let outcome = match self.cached_ceph(&record.uuid) {
            Some(open) => {
                let (t, b) = (target.clone(), open.backend.clone());
                let probe = tokio::task::spawn_blocking(move || t.probe(Some(&b))).await?;
                Ok((open, probe))
            }
            None => self.open_ceph(target.clone()).await,
        };
        // What the cluster reported, each monitor's state, and why the storage is down.
        let (report, up, failure) = match outcome {
            Ok((open, Probe { report, mons })) => {
                let kept = self.remember_ceph(&record, open).err();
                match report {
                    Ok(r) => (Some(r), mons, kept),
                    Err(e) => (None, mons, kept.or(Some(e))),
                }
            }
            Err(e) => {
                let t = target.clone();
                let probe = tokio::task::spawn_blocking(move || t.probe(None)).await?;
                (None, probe.mons, Some(e))
            }
        };
        let facts = crate::catalog::CephProbe {
            capacity: report.as_ref().map(capacity_of),
            pool: report.as_ref().map(pool_of),
            mons: record.mons.iter().zip(&up).map(|(m, u)| (m.mon_uuid.clone(), status_name(*u))).collect(),
        };
        let status = status_name(failure.is_none());
        let (u, now) = (record.uuid.clone(), now_millis());
        self.catalog.run(move |c| c.update_ceph_probe(&u, status, &facts, now)).await?;
        match failure {
            None => self.require(&record.uuid).await,
            Some(e) => {
                let monitors = mon_summary(&target, &up);
                tracing::warn!(uuid = %record.uuid, pool = %record.pool_name, %monitors, error = %e, "Ceph backup storage disconnected");
                Err(AgentError::new(e.kind(), format!("{} (monitors: {monitors})", e.message())))
            }
        }
    }
}
