//! Backup storage records: one row per registered Image Storage (or Ceph pool), its
//! attached zones in a side table.

use rusqlite::{OptionalExtension, params};

use super::query::{Field, FieldType, QueryParams, QueryResult, Schema, run_query};
use super::{Catalog, CatalogError};

/// A registered backup storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupStorageRecord {
    /// Uuid (32 lowercase hex).
    pub uuid: String,
    /// Name given by the operator.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// `ImageStoreBackupStorage` or `Ceph`.
    pub kind: String,
    /// Endpoint URL of the store, e.g. `http://10.0.0.5:7871`.
    pub url: String,
    /// Host of the store.
    pub hostname: String,
    /// gRPC port of the store.
    pub port: u16,
    /// `Enabled` or `Disabled`.
    pub state: String,
    /// `Connected` or `Disconnected`.
    pub status: String,
    /// Bytes, from the store's last Status.
    pub total_capacity: i64,
    /// Bytes, from the store's last Status.
    pub available_capacity: i64,
    /// The store's own uuid.
    pub store_uuid: String,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
    /// Zones the storage is attached to.
    pub attached_zone_uuids: Vec<String>,
    /// Concurrent backups allowed on it (`volumeLiveBackup::parallelismDegree::N` on the
    /// storage record, ZStack's meaning there); None: the agent's default.
    pub max_backups: Option<u32>,
    /// Ceph only: the cluster's fsid.
    pub fsid: String,
    /// Ceph only: the pool backups are written to.
    pub pool_name: String,
    /// Ceph only: bytes the pool can still take, from the last probe.
    pub pool_available_capacity: i64,
    /// Ceph only: bytes the pool uses, from the last probe.
    pub pool_used_capacity: i64,
    /// Ceph only: the pool's replica count.
    pub pool_replicated_size: i32,
    /// Ceph only: the cephx client name (`client.admin`).
    pub ceph_client: String,
    /// Ceph only: the keyring file (empty: librados's default paths).
    pub keyring_path: String,
    /// Ceph only: the monitors, in the order they were given.
    pub mons: Vec<CephMonRecord>,
    /// Name of the configured key (`[keys.<name>]`) everything written here is sealed
    /// with; empty: not encrypted.
    pub encryption_key: String,
    /// Id of that key when the storage was added; the configured key must still have it.
    pub encryption_key_id: String,
}

/// A monitor of a Ceph backup storage (ZStack's CephBackupStorageMonInventory, without the
/// SSH password, which the agent never keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephMonRecord {
    /// Uuid of this monitor record.
    pub mon_uuid: String,
    /// Host as given.
    pub hostname: String,
    /// Address the monitor is reached at.
    pub mon_addr: String,
    /// Monitor port.
    pub mon_port: u16,
    /// SSH port of the monUrl (kept for the inventory; the agent never uses SSH).
    pub ssh_port: u16,
    /// SSH user of the monUrl (same).
    pub ssh_username: String,
    /// `Connected` or `Disconnected`, from the last check.
    pub status: String,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
}

/// Queryable fields of BackupStorageInventory.
pub const SCHEMA: Schema = Schema {
    table: "backup_storage",
    key: "uuid",
    default_sort: "createDate",
    fields: &[
        Field { name: "uuid", column: "uuid", ty: FieldType::Text },
        Field { name: "name", column: "name", ty: FieldType::Text },
        Field { name: "description", column: "description", ty: FieldType::Text },
        Field { name: "type", column: "type", ty: FieldType::Text },
        Field { name: "url", column: "url", ty: FieldType::Text },
        Field { name: "hostname", column: "hostname", ty: FieldType::Text },
        Field { name: "port", column: "port", ty: FieldType::Int },
        Field { name: "state", column: "state", ty: FieldType::Text },
        Field { name: "status", column: "status", ty: FieldType::Text },
        Field { name: "totalCapacity", column: "total_capacity", ty: FieldType::Int },
        Field { name: "availableCapacity", column: "available_capacity", ty: FieldType::Int },
        Field { name: "storeUuid", column: "store_uuid", ty: FieldType::Text },
        Field { name: "createDate", column: "create_date", ty: FieldType::Time },
        Field { name: "lastOpDate", column: "last_op_date", ty: FieldType::Time },
        Field { name: "fsid", column: "fsid", ty: FieldType::Text },
        Field { name: "poolName", column: "pool_name", ty: FieldType::Text },
        Field { name: "poolAvailableCapacity", column: "pool_available_capacity", ty: FieldType::Int },
        Field { name: "poolUsedCapacity", column: "pool_used_capacity", ty: FieldType::Int },
        Field { name: "poolReplicatedSize", column: "pool_replicated_size", ty: FieldType::Int },
        Field { name: "encryptionKeyId", column: "encryption_key_id", ty: FieldType::Text },
        Field {
            name: "attachedZoneUuids",
            column: "zone_uuid",
            ty: FieldType::TextList { table: "backup_storage_zone", fk: "backup_storage_uuid" },
        },
    ],
};

const COLUMNS: &str = "uuid, name, description, type, url, hostname, port, state, status, total_capacity, \
                       available_capacity, store_uuid, create_date, last_op_date, max_backups, fsid, pool_name, \
                       pool_available_capacity, pool_used_capacity, pool_replicated_size, ceph_client, keyring_path, \
                       encryption_key, encryption_key_id";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<BackupStorageRecord> {
    Ok(BackupStorageRecord {
        uuid: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        kind: row.get(3)?,
        url: row.get(4)?,
        hostname: row.get(5)?,
        port: row.get(6)?,
        state: row.get(7)?,
        status: row.get(8)?,
        total_capacity: row.get(9)?,
        available_capacity: row.get(10)?,
        store_uuid: row.get(11)?,
        create_date: row.get(12)?,
        last_op_date: row.get(13)?,
        attached_zone_uuids: Vec::new(),
        max_backups: row.get(14)?,
        fsid: row.get(15)?,
        pool_name: row.get(16)?,
        pool_available_capacity: row.get(17)?,
        pool_used_capacity: row.get(18)?,
        pool_replicated_size: row.get(19)?,
        ceph_client: row.get(20)?,
        keyring_path: row.get(21)?,
        mons: Vec::new(),
        encryption_key: row.get(22)?,
        encryption_key_id: row.get(23)?,
    })
}

impl Catalog {
    /// Inserts a new backup storage.
    pub fn insert_backup_storage(&self, r: &BackupStorageRecord) -> Result<(), CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            &format!("INSERT INTO backup_storage ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)"),
            params![
                r.uuid,
                r.name,
                r.description,
                r.kind,
                r.url,
                r.hostname,
                r.port,
                r.state,
                r.status,
                r.total_capacity,
                r.available_capacity,
                r.store_uuid,
                r.create_date,
                r.last_op_date,
                r.max_backups,
                r.fsid,
                r.pool_name,
                r.pool_available_capacity,
                r.pool_used_capacity,
                r.pool_replicated_size,
                r.ceph_client,
                r.keyring_path,
                r.encryption_key,
                r.encryption_key_id
            ],
        )?;
        super::ceph::insert_mons(&tx, &r.uuid, &r.mons)?;
        for z in &r.attached_zone_uuids {
            tx.execute(
                "INSERT OR IGNORE INTO backup_storage_zone (backup_storage_uuid, zone_uuid) VALUES (?1, ?2)",
                params![r.uuid, z],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The backup storage with this uuid, if any.
    pub fn get_backup_storage(&self, uuid: &str) -> Result<Option<BackupStorageRecord>, CatalogError> {
        let conn = self.conn();
        let rec = conn
            .query_row(&format!("SELECT {COLUMNS} FROM backup_storage WHERE uuid = ?1"), [uuid], from_row)
            .optional()?;
        match rec {
            None => Ok(None),
            Some(mut r) => {
                r.attached_zone_uuids = zones(&conn, &r.uuid)?;
                r.mons = super::ceph::mons(&conn, &r.uuid)?;
                Ok(Some(r))
            }
        }
    }

    /// The backup storage backed by the store with this store uuid, if any.
    pub fn find_backup_storage_by_store(&self, store_uuid: &str) -> Result<Option<BackupStorageRecord>, CatalogError> {
        let uuid: Option<String> = self
            .conn()
            .query_row("SELECT uuid FROM backup_storage WHERE store_uuid = ?1", [store_uuid], |r| r.get(0))
            .optional()?;
        match uuid {
            Some(u) => self.get_backup_storage(&u),
            None => Ok(None),
        }
    }

    /// Runs a ZStack query over backup storages.
    pub fn query_backup_storages(&self, q: &QueryParams) -> Result<QueryResult<BackupStorageRecord>, CatalogError> {
        let conn = self.conn();
        let mut result = run_query(&conn, &SCHEMA, COLUMNS, q, from_row)?;
        for r in &mut result.rows {
            r.attached_zone_uuids = zones(&conn, &r.uuid)?;
            r.mons = super::ceph::mons(&conn, &r.uuid)?;
        }
        Ok(result)
    }

    /// Records the outcome of a probe: status, capacities, and the time of the operation.
    pub fn update_backup_storage_status(
        &self,
        uuid: &str,
        status: &str,
        capacity: Option<(i64, i64)>,
        now: i64,
    ) -> Result<bool, CatalogError> {
        let conn = self.conn();
        let n = match capacity {
            Some((total, available)) => conn.execute(
                "UPDATE backup_storage SET status = ?2, total_capacity = ?3, available_capacity = ?4, last_op_date = ?5 WHERE uuid = ?1",
                params![uuid, status, total, available, now],
            )?,
            None => conn.execute("UPDATE backup_storage SET status = ?2, last_op_date = ?3 WHERE uuid = ?1", params![uuid, status, now])?,
        };
        Ok(n == 1)
    }

    /// Points a record at a new endpoint (the embedded store's address changed).
    pub fn update_backup_storage_endpoint(
        &self,
        uuid: &str,
        url: &str,
        hostname: &str,
        port: u16,
        now: i64,
    ) -> Result<(), CatalogError> {
        self.conn().execute(
            "UPDATE backup_storage SET url = ?2, hostname = ?3, port = ?4, last_op_date = ?5 WHERE uuid = ?1",
            params![uuid, url, hostname, port, now],
        )?;
        Ok(())
    }

    /// Volume backups stored on this backup storage (what a Permissive delete must respect).
    pub fn backup_storage_references(&self, uuid: &str) -> Result<i64, CatalogError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM volume_backup_ref WHERE backup_storage_uuid = ?1",
            [uuid],
            |r| r.get(0),
        )?)
    }

    /// Removes a backup storage record (and its zone rows). Returns whether it existed.
    pub fn delete_backup_storage(&self, uuid: &str) -> Result<bool, CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM volume_backup_ref WHERE backup_storage_uuid = ?1", [uuid])?;
        tx.execute("DELETE FROM ceph_mon WHERE backup_storage_uuid = ?1", [uuid])?;
        let n = tx.execute("DELETE FROM backup_storage WHERE uuid = ?1", [uuid])?;
        tx.commit()?;
        Ok(n == 1)
    }
}

fn zones(conn: &rusqlite::Connection, uuid: &str) -> Result<Vec<String>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT zone_uuid FROM backup_storage_zone WHERE backup_storage_uuid = ?1 ORDER BY zone_uuid",
    )?;
    let zones = stmt.query_map([uuid], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
    Ok(zones)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uuid: &str, name: &str, total: i64) -> BackupStorageRecord {
        BackupStorageRecord {
            uuid: uuid.into(),
            name: name.into(),
            description: None,
            kind: "ImageStoreBackupStorage".into(),
            url: "http://127.0.0.1:1".into(),
            hostname: "127.0.0.1".into(),
            port: 1,
            state: "Enabled".into(),
            status: "Connected".into(),
            total_capacity: total,
            available_capacity: total / 2,
            store_uuid: format!("s{uuid}"),
            create_date: total,
            last_op_date: total,
            attached_zone_uuids: vec!["z1".into()],
            ..Default::default()
        }
    }

    fn query(c: &Catalog, conds: &[&str]) -> Vec<String> {
        let q = QueryParams { conditions: conds.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        c.query_backup_storages(&q).expect("query").rows.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn insert_get_query_delete_round_trip() {
        let c = Catalog::open_in_memory().expect("catalog");
        c.insert_backup_storage(&record("a", "alpha", 100)).expect("insert a");
        c.insert_backup_storage(&record("b", "beta", 200)).expect("insert b");
        assert_eq!(c.get_backup_storage("a").expect("get").expect("exists"), record("a", "alpha", 100));
        assert_eq!(query(&c, &["totalCapacity>150"]), vec!["beta"]);
        assert_eq!(query(&c, &["attachedZoneUuids=z1"]), vec!["alpha", "beta"]);
        assert_eq!(query(&c, &["description is null", "name~=%lph%"]), vec!["alpha"]);
        assert!(c.delete_backup_storage("a").expect("delete"));
        assert!(!c.delete_backup_storage("a").expect("delete again"));
        assert_eq!(query(&c, &[]), vec!["beta"]);
    }

    #[test]
    fn ceph_records_keep_their_monitors_and_probe_results() {
        let c = Catalog::open_in_memory().expect("catalog");
        let mon = |u: &str, h: &str| CephMonRecord {
            mon_uuid: u.into(),
            hostname: h.into(),
            mon_addr: h.into(),
            mon_port: 6789,
            ssh_port: 22,
            ssh_username: "root".into(),
            status: "Connected".into(),
            create_date: 1,
            last_op_date: 1,
        };
        let mut r = record("c", "ceph", 300);
        r.kind = "Ceph".into();
        r.fsid = "f-1".into();
        r.pool_name = "backups".into();
        r.pool_replicated_size = 3;
        r.mons = vec![mon("m2", "10.0.0.2"), mon("m1", "10.0.0.1")];
        c.insert_backup_storage(&r).expect("insert");
        c.insert_backup_storage(&record("i", "image", 100)).expect("insert image store");
        assert_eq!(c.get_backup_storage("c").expect("get").expect("exists"), r, "monitors come back in order");
        assert_eq!(query(&c, &["poolReplicatedSize=3"]), vec!["ceph"]);
        assert_eq!(query(&c, &["fsid=f-1", "poolName=backups"]), vec!["ceph"]);

        let probe = crate::catalog::CephProbe {
            capacity: None,
            pool: Some((10, 20, 2)),
            mons: vec![("m1".into(), "Disconnected")],
        };
        c.update_ceph_probe("c", "Disconnected", &probe, 9).expect("probe");
        let got = c.get_backup_storage("c").expect("get").expect("exists");
        assert_eq!((got.status.as_str(), got.total_capacity, got.pool_used_capacity), ("Disconnected", 300, 10));
        assert_eq!((got.pool_available_capacity, got.pool_replicated_size, got.last_op_date), (20, 2, 9));
        let st: Vec<(&str, &str, i64)> =
            got.mons.iter().map(|m| (m.mon_uuid.as_str(), m.status.as_str(), m.last_op_date)).collect();
        assert_eq!(st, vec![("m2", "Connected", 1), ("m1", "Disconnected", 9)]);
        assert!(c.delete_backup_storage("c").expect("delete"));
        let left: i64 = c.conn().query_row("SELECT COUNT(*) FROM ceph_mon", [], |r| r.get(0)).expect("count");
        assert_eq!(left, 0, "the monitors go with the record");
    }

    #[test]
    fn references_count_volume_backups_on_the_storage() {
        let c = Catalog::open_in_memory().expect("catalog");
        c.insert_backup_storage(&record("a", "alpha", 100)).expect("insert");
        assert_eq!(c.backup_storage_references("a").expect("refs"), 0);
        c.conn()
            .execute_batch(
                "INSERT INTO volume_backup VALUES ('vb', 'g', 'v', 'n', NULL, 'Root', 'Enabled', 'Ready', 1, '{}', 0, 0);
                 INSERT INTO volume_backup_ref VALUES ('vb', 'a', 'p', 'Ready', 0, 0);",
            )
            .expect("seed a backup");
        assert_eq!(c.backup_storage_references("a").expect("refs"), 1);
    }
}
