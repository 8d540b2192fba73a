//! Volume backup records: one per volume of a backup group, with one ref per backup storage
//! that holds it. The stores' manifests are the source of truth; these rows make queries
//! fast and are rebuilt by SyncVmBackup.

use rusqlite::params;

use super::query::{Field, FieldType, QueryParams, QueryResult, Schema, run_query};
use super::{Catalog, CatalogError};
use crate::model::{BackupStatus, VolumeKind};

/// Where a volume backup is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Backup storage uuid.
    pub backup_storage_uuid: String,
    /// Index name on that storage.
    pub install_path: String,
    /// Ready, or Damaged.
    pub status: BackupStatus,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
}

/// A volume backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBackupRecord {
    /// Volume backup uuid.
    pub uuid: String,
    /// Group (VM backup) uuid.
    pub group_uuid: String,
    /// Volume uuid.
    pub volume_uuid: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Root or Data.
    pub kind: VolumeKind,
    /// `Enabled`.
    pub state: String,
    /// Ready, or Damaged (on every storage).
    pub status: BackupStatus,
    /// Virtual size, bytes.
    pub size: i64,
    /// JSON: format, virtual size, chunk size, stored and deduplicated bytes.
    pub metadata: String,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
    /// Storages holding it.
    pub refs: Vec<StorageRef>,
    /// The systemTags its group was created with.
    pub system_tags: Vec<String>,
    /// The userTags its group was created with.
    pub user_tags: Vec<String>,
}

const USER_TAGS: &str = "volume_backup_user_tag";
const SYSTEM_TAGS: &str = "volume_backup_system_tag";

/// Queryable fields of VolumeBackupInventory; the tags also under ZStack's own query names,
/// `__userTag__` and `__systemTag__`.
pub const SCHEMA: Schema = Schema {
    table: "volume_backup",
    key: "uuid",
    default_sort: "createDate",
    fields: &[
        Field { name: "uuid", column: "uuid", ty: FieldType::Text },
        Field { name: "groupUuid", column: "group_uuid", ty: FieldType::Text },
        Field { name: "volumeUuid", column: "volume_uuid", ty: FieldType::Text },
        Field { name: "name", column: "name", ty: FieldType::Text },
        Field { name: "description", column: "description", ty: FieldType::Text },
        Field { name: "type", column: "type", ty: FieldType::Text },
        Field { name: "state", column: "state", ty: FieldType::Text },
        Field { name: "status", column: "status", ty: FieldType::Text },
        Field { name: "size", column: "size", ty: FieldType::Int },
        Field { name: "createDate", column: "create_date", ty: FieldType::Time },
        Field { name: "lastOpDate", column: "last_op_date", ty: FieldType::Time },
        Field {
            name: "backupStorageUuid",
            column: "backup_storage_uuid",
            ty: FieldType::TextList { table: "volume_backup_ref", fk: "volume_backup_uuid" },
        },
        tag_field("userTags", USER_TAGS),
        tag_field("__userTag__", USER_TAGS),
        tag_field("systemTags", SYSTEM_TAGS),
        tag_field("__systemTag__", SYSTEM_TAGS),
    ],
};

/// A tag list field named `name`, held in `table`.
const fn tag_field(name: &'static str, table: &'static str) -> Field {
    Field { name, column: "tag", ty: FieldType::TextList { table, fk: "volume_backup_uuid" } }
}

const COLUMNS: &str =
    "uuid, group_uuid, volume_uuid, name, description, type, state, status, size, metadata, create_date, last_op_date";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeBackupRecord> {
    Ok(VolumeBackupRecord {
        uuid: r.get(0)?,
        group_uuid: r.get(1)?,
        volume_uuid: r.get(2)?,
        name: r.get(3)?,
        description: r.get(4)?,
        kind: r.get(5)?,
        state: r.get(6)?,
        status: r.get(7)?,
        size: r.get(8)?,
        metadata: r.get(9)?,
        create_date: r.get(10)?,
        last_op_date: r.get(11)?,
        refs: Vec::new(),
        system_tags: Vec::new(),
        user_tags: Vec::new(),
    })
}

/// The tags of `table` (`volume_backup_user_tag` or `volume_backup_system_tag`).
fn tags(conn: &rusqlite::Connection, table: &str, uuid: &str) -> Result<Vec<String>, CatalogError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT tag FROM {table} WHERE volume_backup_uuid = ?1 ORDER BY rowid"))?;
    let rows = stmt.query_map([uuid], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn refs(conn: &rusqlite::Connection, uuid: &str) -> Result<Vec<StorageRef>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT backup_storage_uuid, install_path, status, create_date, last_op_date FROM volume_backup_ref
         WHERE volume_backup_uuid = ?1 ORDER BY create_date, backup_storage_uuid",
    )?;
    let rows = stmt.query_map([uuid], |r| {
        Ok(StorageRef {
            backup_storage_uuid: r.get(0)?,
            install_path: r.get(1)?,
            status: r.get(2)?,
            create_date: r.get(3)?,
            last_op_date: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Catalog {
    /// Records the volume backups of a committed group (one transaction).
    pub fn insert_volume_backups(&self, backups: &[VolumeBackupRecord]) -> Result<(), CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for b in backups {
            tx.execute(
                &format!("INSERT OR REPLACE INTO volume_backup ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    b.uuid,
                    b.group_uuid,
                    b.volume_uuid,
                    b.name,
                    b.description,
                    b.kind,
                    b.state,
                    b.status,
                    b.size,
                    b.metadata,
                    b.create_date,
                    b.last_op_date
                ],
            )?;
            for (table, list) in [(USER_TAGS, &b.user_tags), (SYSTEM_TAGS, &b.system_tags)] {
                tx.execute(&format!("DELETE FROM {table} WHERE volume_backup_uuid = ?1"), [&b.uuid])?;
                for t in list {
                    tx.execute(
                        &format!("INSERT OR IGNORE INTO {table} (volume_backup_uuid, tag) VALUES (?1, ?2)"),
                        params![b.uuid, t],
                    )?;
                }
            }
            for r in &b.refs {
                tx.execute(
                    "INSERT OR REPLACE INTO volume_backup_ref (volume_backup_uuid, backup_storage_uuid, install_path, status, create_date, last_op_date)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![b.uuid, r.backup_storage_uuid, r.install_path, r.status, r.create_date, r.last_op_date],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The volume backups of a group, root first.
    pub fn group_volume_backups(&self, group_uuid: &str) -> Result<Vec<VolumeBackupRecord>, CatalogError> {
        let q = QueryParams {
            conditions: vec![format!("groupUuid={group_uuid}")],
            limit: Some(1000),
            ..Default::default()
        };
        let mut rows = self.query_volume_backups(&q)?.rows;
        rows.sort_by_key(|r| (r.kind != VolumeKind::Root, r.name.clone()));
        Ok(rows)
    }

    /// The newest volume backup of `volume_uuid` stored on `backup_storage_uuid`.
    pub fn latest_volume_backup(
        &self,
        volume_uuid: &str,
        backup_storage_uuid: &str,
    ) -> Result<Option<VolumeBackupRecord>, CatalogError> {
        let q = QueryParams {
            conditions: vec![
                format!("volumeUuid={volume_uuid}"),
                format!("backupStorageUuid={backup_storage_uuid}"),
                "status=Ready".into(),
            ],
            sort_by: "createDate".into(),
            sort_direction: "desc".into(),
            limit: Some(1),
            ..Default::default()
        };
        Ok(self.query_volume_backups(&q)?.rows.into_iter().next())
    }

    /// Removes a group's refs to `storages` (all when empty); volume backups left with no
    /// storage are removed too. Returns how many refs went.
    pub fn remove_group_refs(&self, group_uuid: &str, storages: &[String]) -> Result<usize, CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut removed = 0;
        let sql = "DELETE FROM volume_backup_ref WHERE volume_backup_uuid IN (SELECT uuid FROM volume_backup WHERE group_uuid = ?1)";
        if storages.is_empty() {
            removed += tx.execute(sql, [group_uuid])?;
        } else {
            for s in storages {
                removed += tx.execute(&format!("{sql} AND backup_storage_uuid = ?2"), params![group_uuid, s])?;
            }
        }
        tx.execute(
            "DELETE FROM volume_backup WHERE group_uuid = ?1 AND uuid NOT IN (SELECT volume_backup_uuid FROM volume_backup_ref)",
            [group_uuid],
        )?;
        tx.commit()?;
        Ok(removed)
    }

    /// Records that `group_uuid` is being deleted from `storage` (before the store is asked).
    pub fn begin_delete(&self, group_uuid: &str, storage: &str) -> Result<(), CatalogError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO pending_delete (group_uuid, backup_storage_uuid) VALUES (?1, ?2)",
            params![group_uuid, storage],
        )?;
        Ok(())
    }

    /// The store no longer has `group_uuid`: its refs to `storage` and the pending mark go.
    pub fn finish_delete(&self, group_uuid: &str, storage: &str) -> Result<(), CatalogError> {
        self.remove_group_refs(group_uuid, &[storage.to_string()])?;
        self.conn().execute(
            "DELETE FROM pending_delete WHERE group_uuid = ?1 AND backup_storage_uuid = ?2",
            params![group_uuid, storage],
        )?;
        Ok(())
    }

    /// Records that `group_uuid` is about to be committed on `storage`.
    pub fn begin_commit(&self, group_uuid: &str, storage: &str) -> Result<(), CatalogError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO pending_commit (group_uuid, backup_storage_uuid) VALUES (?1, ?2)",
            params![group_uuid, storage],
        )?;
        Ok(())
    }

    /// The commit of `group_uuid` on `storage` has an outcome: `records` when it committed
    /// (inserted in the same transaction as the mark goes), none when it did not.
    pub fn finish_commit(
        &self,
        group_uuid: &str,
        storage: &str,
        records: &[VolumeBackupRecord],
    ) -> Result<(), CatalogError> {
        if !records.is_empty() {
            self.insert_volume_backups(records)?;
        }
        self.conn().execute(
            "DELETE FROM pending_commit WHERE group_uuid = ?1 AND backup_storage_uuid = ?2",
            params![group_uuid, storage],
        )?;
        Ok(())
    }

    /// Commits asked of a store whose outcome was not recorded: (group, storage).
    pub fn pending_commits(&self) -> Result<Vec<(String, String)>, CatalogError> {
        self.pending("SELECT group_uuid, backup_storage_uuid FROM pending_commit ORDER BY group_uuid")
    }

    /// The (group, storage) rows of a pending-work table.
    fn pending(&self, select: &str) -> Result<Vec<(String, String)>, CatalogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(select)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The store refused to delete `group_uuid` (a lock, a role): it stays, and so do its refs.
    pub fn cancel_delete(&self, group_uuid: &str, storage: &str) -> Result<(), CatalogError> {
        self.conn().execute(
            "DELETE FROM pending_delete WHERE group_uuid = ?1 AND backup_storage_uuid = ?2",
            params![group_uuid, storage],
        )?;
        Ok(())
    }

    /// Deletes asked of a store whose outcome was not recorded: (group, storage).
    pub fn pending_deletes(&self) -> Result<Vec<(String, String)>, CatalogError> {
        self.pending("SELECT group_uuid, backup_storage_uuid FROM pending_delete ORDER BY group_uuid")
    }

    /// Groups with a volume backup on `storage`.
    pub fn groups_on_storage(&self, storage: &str) -> Result<Vec<String>, CatalogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT b.group_uuid FROM volume_backup b JOIN volume_backup_ref r ON r.volume_backup_uuid = b.uuid
             WHERE r.backup_storage_uuid = ?1 ORDER BY b.group_uuid",
        )?;
        let rows = stmt.query_map([storage], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs a ZStack query over volume backups.
    pub fn query_volume_backups(&self, q: &QueryParams) -> Result<QueryResult<VolumeBackupRecord>, CatalogError> {
        let conn = self.conn();
        let mut result = run_query(&conn, &SCHEMA, COLUMNS, q, from_row)?;
        for r in &mut result.rows {
            r.refs = refs(&conn, &r.uuid)?;
            r.user_tags = tags(&conn, USER_TAGS, &r.uuid)?;
            r.system_tags = tags(&conn, SYSTEM_TAGS, &r.uuid)?;
        }
        Ok(result)
    }
}
