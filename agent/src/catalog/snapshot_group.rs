//! Volume snapshot groups. A snapshot is external: the file the volume was on is frozen as
//! the snapshot (`install_path`) and the volume continues on a new qcow2 overlay backed by
//! it (`overlay_path`, which becomes the volume's registered install path). Deleting the
//! snapshot merges the overlay back and the volume returns to `install_path`.

use rusqlite::{OptionalExtension, params};

use super::query::{Field, FieldType, QueryParams, QueryResult, Schema, run_query};
use super::{Catalog, CatalogError};
use crate::model::VolumeKind;
use crate::volume::VolumeFormat;

/// One volume's snapshot in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Snapshot uuid.
    pub uuid: String,
    /// Volume uuid.
    pub volume_uuid: String,
    /// Volume name.
    pub volume_name: String,
    /// Root or Data.
    pub volume_type: VolumeKind,
    /// Device order when taken.
    pub device_id: i32,
    /// Snapshot name.
    pub name: String,
    /// The frozen file (the snapshot).
    pub install_path: String,
    /// Format of the frozen file.
    pub install_format: VolumeFormat,
    /// The overlay the volume continues on.
    pub overlay_path: String,
    /// Merged back already.
    pub deleted: bool,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
}

/// A snapshot group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotGroupRecord {
    /// Group uuid.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// VM uuid.
    pub vm_uuid: String,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
    /// Its snapshots, by device id.
    pub snapshots: Vec<SnapshotRecord>,
}

/// Queryable fields of VolumeSnapshotGroupInventory.
pub const SCHEMA: Schema = Schema {
    table: "snapshot_group",
    key: "uuid",
    default_sort: "createDate",
    fields: &[
        Field { name: "uuid", column: "uuid", ty: FieldType::Text },
        Field { name: "name", column: "name", ty: FieldType::Text },
        Field { name: "description", column: "description", ty: FieldType::Text },
        Field { name: "vmInstanceUuid", column: "vm_uuid", ty: FieldType::Text },
        Field { name: "createDate", column: "create_date", ty: FieldType::Time },
        Field { name: "lastOpDate", column: "last_op_date", ty: FieldType::Time },
        Field {
            name: "volumeUuid",
            column: "volume_uuid",
            ty: FieldType::TextList { table: "volume_snapshot", fk: "group_uuid" },
        },
    ],
};

const COLUMNS: &str = "uuid, name, description, vm_uuid, create_date, last_op_date";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotGroupRecord> {
    Ok(SnapshotGroupRecord {
        uuid: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        vm_uuid: row.get(3)?,
        create_date: row.get(4)?,
        last_op_date: row.get(5)?,
        snapshots: Vec::new(),
    })
}

fn snapshots(conn: &rusqlite::Connection, group: &str) -> Result<Vec<SnapshotRecord>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT uuid, volume_uuid, volume_name, volume_type, device_id, name, install_path, install_format,
                overlay_path, deleted, create_date, last_op_date
         FROM volume_snapshot WHERE group_uuid = ?1 ORDER BY device_id",
    )?;
    let rows = stmt.query_map([group], |r| {
        Ok(SnapshotRecord {
            uuid: r.get(0)?,
            volume_uuid: r.get(1)?,
            volume_name: r.get(2)?,
            volume_type: r.get(3)?,
            device_id: r.get(4)?,
            name: r.get(5)?,
            install_path: r.get(6)?,
            install_format: r.get(7)?,
            overlay_path: r.get(8)?,
            deleted: r.get::<_, i64>(9)? != 0,
            create_date: r.get(10)?,
            last_op_date: r.get(11)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Catalog {
    /// Records a new group and moves each volume onto its overlay, atomically.
    pub fn insert_snapshot_group(&self, g: &SnapshotGroupRecord) -> Result<(), CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO snapshot_group (uuid, name, description, vm_uuid, create_date, last_op_date)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![g.uuid, g.name, g.description, g.vm_uuid, g.create_date, g.last_op_date],
        )?;
        for s in &g.snapshots {
            tx.execute(
                "INSERT INTO volume_snapshot (uuid, group_uuid, volume_uuid, volume_name, volume_type, device_id, name,
                    install_path, install_format, overlay_path, deleted, create_date, last_op_date)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, ?11, ?12)",
                params![
                    s.uuid,
                    g.uuid,
                    s.volume_uuid,
                    s.volume_name,
                    s.volume_type,
                    s.device_id,
                    s.name,
                    s.install_path,
                    s.install_format,
                    s.overlay_path,
                    s.create_date,
                    s.last_op_date
                ],
            )?;
            tx.execute(
                "UPDATE volume SET install_path = ?1, format = 'qcow2' WHERE uuid = ?2",
                params![s.overlay_path, s.volume_uuid],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The group with this uuid.
    pub fn get_snapshot_group(&self, uuid: &str) -> Result<Option<SnapshotGroupRecord>, CatalogError> {
        let conn = self.conn();
        let g = conn
            .query_row(&format!("SELECT {COLUMNS} FROM snapshot_group WHERE uuid = ?1"), [uuid], from_row)
            .optional()?;
        match g {
            None => Ok(None),
            Some(mut g) => {
                g.snapshots = snapshots(&conn, &g.uuid)?;
                Ok(Some(g))
            }
        }
    }

    /// Renames or redescribes a group. Returns whether it exists.
    pub fn update_snapshot_group(
        &self,
        uuid: &str,
        name: Option<&str>,
        description: Option<&str>,
        now: i64,
    ) -> Result<bool, CatalogError> {
        let n = self.conn().execute(
            "UPDATE snapshot_group SET name = COALESCE(?2, name), description = COALESCE(?3, description),
                last_op_date = ?4 WHERE uuid = ?1",
            params![uuid, name, description, now],
        )?;
        Ok(n == 1)
    }

    /// A snapshot was merged back: the volume returns to the frozen file.
    pub fn snapshot_merged(&self, s: &SnapshotRecord, now: i64) -> Result<(), CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("UPDATE volume_snapshot SET deleted = 1, last_op_date = ?2 WHERE uuid = ?1", params![s.uuid, now])?;
        tx.execute(
            "UPDATE volume SET install_path = ?1, format = ?2 WHERE uuid = ?3 AND install_path = ?4",
            params![s.install_path, s.install_format, s.volume_uuid, s.overlay_path],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a group whose snapshots are all merged.
    pub fn remove_snapshot_group(&self, uuid: &str) -> Result<(), CatalogError> {
        self.conn().execute("DELETE FROM snapshot_group WHERE uuid = ?1", [uuid])?;
        Ok(())
    }

    /// Runs a ZStack query over snapshot groups.
    pub fn query_snapshot_groups(&self, q: &QueryParams) -> Result<QueryResult<SnapshotGroupRecord>, CatalogError> {
        let conn = self.conn();
        let mut result = run_query(&conn, &SCHEMA, COLUMNS, q, from_row)?;
        for g in &mut result.rows {
            g.snapshots = snapshots(&conn, &g.uuid)?;
        }
        Ok(result)
    }
}
