//! The Ceph side of backup storage records: the monitors of a Ceph backup storage (one row
//! each, in the order given) and the probe results a Reconnect writes.

use rusqlite::params;

use super::backup_storage::CephMonRecord;
use super::{Catalog, CatalogError};

/// Inserts the monitors of backup storage `uuid`.
pub(super) fn insert_mons(
    tx: &rusqlite::Transaction<'_>,
    uuid: &str,
    mons: &[CephMonRecord],
) -> Result<(), CatalogError> {
    for (i, m) in mons.iter().enumerate() {
        tx.execute(
            "INSERT INTO ceph_mon (mon_uuid, backup_storage_uuid, position, hostname, mon_addr, mon_port, ssh_port, \
             ssh_username, status, create_date, last_op_date) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                m.mon_uuid,
                uuid,
                i64::try_from(i).unwrap_or(i64::MAX),
                m.hostname,
                m.mon_addr,
                m.mon_port,
                m.ssh_port,
                m.ssh_username,
                m.status,
                m.create_date,
                m.last_op_date
            ],
        )?;
    }
    Ok(())
}

/// The monitors of backup storage `uuid` (none for an Image Storage).
pub(super) fn mons(conn: &rusqlite::Connection, uuid: &str) -> Result<Vec<CephMonRecord>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT mon_uuid, hostname, mon_addr, mon_port, ssh_port, ssh_username, status, create_date, last_op_date \
         FROM ceph_mon WHERE backup_storage_uuid = ?1 ORDER BY position",
    )?;
    let rows = stmt.query_map([uuid], |r| {
        Ok(CephMonRecord {
            mon_uuid: r.get(0)?,
            hostname: r.get(1)?,
            mon_addr: r.get(2)?,
            mon_port: r.get(3)?,
            ssh_port: r.get(4)?,
            ssh_username: r.get(5)?,
            status: r.get(6)?,
            create_date: r.get(7)?,
            last_op_date: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// What a probe of a Ceph backup storage found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephProbe {
    /// Raw bytes of the cluster, when it answered.
    pub capacity: Option<(i64, i64)>,
    /// (used, available, replicas) of the pool, when it answered.
    pub pool: Option<(i64, i64, i32)>,
    /// Status of each monitor, by mon uuid.
    pub mons: Vec<(String, &'static str)>,
}

impl Catalog {
    /// Records the outcome of probing Ceph backup storage `uuid`: its status, what the
    /// cluster reported (kept from the last probe where it did not answer), and each
    /// monitor's status.
    pub fn update_ceph_probe(&self, uuid: &str, status: &str, probe: &CephProbe, now: i64) -> Result<(), CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE backup_storage SET status = ?2, last_op_date = ?3 WHERE uuid = ?1",
            params![uuid, status, now],
        )?;
        if let Some((total, available)) = probe.capacity {
            tx.execute(
                "UPDATE backup_storage SET total_capacity = ?2, available_capacity = ?3 WHERE uuid = ?1",
                params![uuid, total, available],
            )?;
        }
        if let Some((used, available, size)) = probe.pool {
            tx.execute(
                "UPDATE backup_storage SET pool_used_capacity = ?2, pool_available_capacity = ?3, \
                 pool_replicated_size = ?4 WHERE uuid = ?1",
                params![uuid, used, available, size],
            )?;
        }
        for (mon, st) in &probe.mons {
            tx.execute(
                "UPDATE ceph_mon SET status = ?3, last_op_date = ?4 WHERE backup_storage_uuid = ?1 AND mon_uuid = ?2",
                params![uuid, mon, st, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
