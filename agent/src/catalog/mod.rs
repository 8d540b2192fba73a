//! The agent's local state in SQLite (`<data-dir>/catalog.sqlite`): backup storages, and
//! (as later features land) VMs, volumes, volume backups and jobs.
//!
//! The catalog is a cache of facts whose source of truth is elsewhere (the stores' group
//! manifests, the control plane's registrations): SyncVmBackup can rebuild backup records
//! from the stores alone. It is opened in WAL mode with `synchronous=FULL`, so a committed
//! change survives a crash of the agent or the host.
//!
//! Access is serialised by one mutex around the connection; every call is short (no I/O to
//! other processes while it is held). Async code reaches the catalog through a
//! [`CatalogHandle`], whose every call runs on a blocking thread, never on the async
//! runtime.

pub mod backup_storage;
mod ceph;
pub use ceph::CephProbe;
pub mod job;
pub mod query;
pub mod snapshot_group;
mod values;
pub mod vm;
pub mod volume_backup;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite failed.
    #[error("catalog database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A query was malformed.
    #[error(transparent)]
    Query(#[from] query::QueryError),
    /// The blocking task running a call failed (panicked or was cancelled).
    #[error("a catalog call did not complete")]
    Task(#[from] tokio::task::JoinError),
    /// The database file is from a newer agent.
    #[error("catalog schema version {found} is newer than this agent understands ({known})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: backup storages and volume backups.
    "CREATE TABLE backup_storage (
        uuid TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        type TEXT NOT NULL,
        url TEXT NOT NULL,
        hostname TEXT NOT NULL,
        port INTEGER NOT NULL,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        total_capacity INTEGER NOT NULL,
        available_capacity INTEGER NOT NULL,
        store_uuid TEXT NOT NULL,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL
     );
     CREATE TABLE backup_storage_zone (
        backup_storage_uuid TEXT NOT NULL REFERENCES backup_storage(uuid) ON DELETE CASCADE,
        zone_uuid TEXT NOT NULL,
        PRIMARY KEY (backup_storage_uuid, zone_uuid)
     );
     CREATE TABLE volume_backup (
        uuid TEXT PRIMARY KEY NOT NULL,
        group_uuid TEXT NOT NULL,
        volume_uuid TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        type TEXT NOT NULL,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        size INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL
     );
     CREATE INDEX volume_backup_group ON volume_backup(group_uuid);
     CREATE TABLE volume_backup_ref (
        volume_backup_uuid TEXT NOT NULL REFERENCES volume_backup(uuid) ON DELETE CASCADE,
        backup_storage_uuid TEXT NOT NULL,
        install_path TEXT NOT NULL,
        status TEXT NOT NULL,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL,
        PRIMARY KEY (volume_backup_uuid, backup_storage_uuid)
     );
     CREATE INDEX volume_backup_ref_storage ON volume_backup_ref(backup_storage_uuid);",
    // 2: VMs and their volumes.
    "CREATE TABLE vm (
        uuid TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        qmp_socket TEXT,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL
     );
     CREATE TABLE volume (
        uuid TEXT PRIMARY KEY NOT NULL,
        vm_uuid TEXT NOT NULL REFERENCES vm(uuid) ON DELETE CASCADE,
        name TEXT NOT NULL,
        install_path TEXT NOT NULL,
        format TEXT NOT NULL,
        type TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        UNIQUE (vm_uuid, device_id)
     );
     CREATE INDEX volume_vm ON volume(vm_uuid);",
    // 3: jobs (long-running operations), kept after they end so their outcome can be asked.
    "CREATE TABLE job (
        uuid TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL,
        resource_uuid TEXT,
        target_uuid TEXT,
        state TEXT NOT NULL,
        progress TEXT NOT NULL,
        started INTEGER NOT NULL,
        finished INTEGER
     );
     CREATE INDEX job_state ON job(state);",
    // 4: volume snapshot groups: one external snapshot of every volume of a VM.
    "CREATE TABLE snapshot_group (
        uuid TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        vm_uuid TEXT NOT NULL,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL
     );
     CREATE TABLE volume_snapshot (
        uuid TEXT PRIMARY KEY NOT NULL,
        group_uuid TEXT NOT NULL REFERENCES snapshot_group(uuid) ON DELETE CASCADE,
        volume_uuid TEXT NOT NULL,
        volume_name TEXT NOT NULL,
        volume_type TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        install_path TEXT NOT NULL,
        install_format TEXT NOT NULL,
        overlay_path TEXT NOT NULL,
        deleted INTEGER NOT NULL,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL
     );
     CREATE INDEX volume_snapshot_group ON volume_snapshot(group_uuid);",
    // 5: a backup storage's own cap on concurrent backups (its parallelismDegree tag).
    "ALTER TABLE backup_storage ADD COLUMN max_backups INTEGER;",
    // 6: Ceph backup storages: the cluster, the pool, the client identity, the monitors.
    "ALTER TABLE backup_storage ADD COLUMN fsid TEXT NOT NULL DEFAULT '';
     ALTER TABLE backup_storage ADD COLUMN pool_name TEXT NOT NULL DEFAULT '';
     ALTER TABLE backup_storage ADD COLUMN pool_available_capacity INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE backup_storage ADD COLUMN pool_used_capacity INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE backup_storage ADD COLUMN pool_replicated_size INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE backup_storage ADD COLUMN ceph_client TEXT NOT NULL DEFAULT '';
     ALTER TABLE backup_storage ADD COLUMN keyring_path TEXT NOT NULL DEFAULT '';
     CREATE TABLE ceph_mon (
        mon_uuid TEXT PRIMARY KEY,
        backup_storage_uuid TEXT NOT NULL,
        position INTEGER NOT NULL,
        hostname TEXT NOT NULL,
        mon_addr TEXT NOT NULL,
        mon_port INTEGER NOT NULL,
        ssh_port INTEGER NOT NULL,
        ssh_username TEXT NOT NULL,
        status TEXT NOT NULL,
        create_date INTEGER NOT NULL,
        last_op_date INTEGER NOT NULL
     );
     CREATE INDEX ceph_mon_storage ON ceph_mon(backup_storage_uuid);",
    // 7: the tags a volume backup was created with (its group's systemTags and userTags).
    "CREATE TABLE volume_backup_user_tag (
        volume_backup_uuid TEXT NOT NULL REFERENCES volume_backup(uuid) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (volume_backup_uuid, tag)
     );
     CREATE TABLE volume_backup_system_tag (
        volume_backup_uuid TEXT NOT NULL REFERENCES volume_backup(uuid) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (volume_backup_uuid, tag)
     );",
    // 8: client-side encryption: the configured key a storage seals with, and its id.
    "ALTER TABLE backup_storage ADD COLUMN encryption_key TEXT NOT NULL DEFAULT '';
     ALTER TABLE backup_storage ADD COLUMN encryption_key_id TEXT NOT NULL DEFAULT '';",
    // 9: the queries a control plane makes of 100,000 volume backups: a volume's backups
    // newest first, and anything by date (benches/catalog_scale.rs).
    "CREATE INDEX volume_backup_volume ON volume_backup(volume_uuid, create_date);
     CREATE INDEX volume_backup_created ON volume_backup(create_date);",
    // 10: deletes asked of a store whose outcome the catalog has not recorded yet (the agent
    // may stop between the two); finished at the next start.
    "CREATE TABLE pending_delete (
        group_uuid TEXT NOT NULL,
        backup_storage_uuid TEXT NOT NULL,
        PRIMARY KEY (group_uuid, backup_storage_uuid)
     );",
    // 11: commits asked of a store whose outcome the catalog has not recorded yet; the next
    // start asks the store and records the group if it was committed.
    "CREATE TABLE pending_commit (
        group_uuid TEXT NOT NULL,
        backup_storage_uuid TEXT NOT NULL,
        PRIMARY KEY (group_uuid, backup_storage_uuid)
     );",
];

/// The agent's catalog.
#[derive(Debug)]
pub struct Catalog {
    conn: Mutex<Connection>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        Self::init(Connection::open(path)?)
    }

    /// An in-memory catalog (tests).
    pub fn open_in_memory() -> Result<Self, CatalogError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, CatalogError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        if version > known {
            return Err(CatalogError::TooNew { found: version, known });
        }
        let tx = conn.transaction()?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX))?;
        }
        tx.commit()?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    /// The connection, for one short operation.
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The catalog for async code: cheap to clone; each call runs on a blocking thread.
#[derive(Debug, Clone)]
pub struct CatalogHandle(Arc<Catalog>);

impl CatalogHandle {
    /// A handle of `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        Self(Arc::new(catalog))
    }

    /// Runs `f` on the catalog on a blocking thread. `f` may return any error a
    /// [`CatalogError`] converts into (the agent's own, for calls that also check).
    pub async fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Catalog) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<CatalogError> + Send + 'static,
    {
        let catalog = self.0.clone();
        tokio::task::spawn_blocking(move || f(&catalog)).await.map_err(|e| E::from(CatalogError::Task(e)))?
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_schema_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.sqlite");
        drop(Catalog::open(&p).expect("create"));
        let c = Catalog::open(&p).expect("reopen");
        let v: i64 = c.conn().pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
        assert_eq!(v, i64::try_from(MIGRATIONS.len()).expect("fits"));
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.sqlite");
        Connection::open(&p).expect("open").pragma_update(None, "user_version", 999).expect("set");
        assert!(matches!(Catalog::open(&p), Err(CatalogError::TooNew { found: 999, .. })));
    }
}
