//! VMs and their volumes: the layout the agent backs up, as registered by the control plane.

use rusqlite::{OptionalExtension, params};

use super::query::{Field, FieldType, QueryParams, QueryResult, Schema, run_query};
use super::{Catalog, CatalogError};
use crate::model::VolumeKind;
use crate::volume::VolumeFormat;

/// A volume of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Volume uuid.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// File or block device on this host.
    pub install_path: String,
    /// Format of the file or device.
    pub format: VolumeFormat,
    /// Root or Data.
    pub kind: VolumeKind,
    /// Device order in the VM (0 for the root volume).
    pub device_id: i32,
}

/// A registered VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// VM uuid.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// QMP socket of the running VM, if any.
    pub qmp_socket: Option<String>,
    /// Volumes, ordered by device id (root first).
    pub volumes: Vec<VolumeRecord>,
    /// Unix milliseconds.
    pub create_date: i64,
    /// Unix milliseconds.
    pub last_op_date: i64,
}

/// Queryable fields of VmInventory.
pub const SCHEMA: Schema = Schema {
    table: "vm",
    key: "uuid",
    default_sort: "createDate",
    fields: &[
        Field { name: "uuid", column: "uuid", ty: FieldType::Text },
        Field { name: "name", column: "name", ty: FieldType::Text },
        Field { name: "qmpSocket", column: "qmp_socket", ty: FieldType::Text },
        Field { name: "createDate", column: "create_date", ty: FieldType::Time },
        Field { name: "lastOpDate", column: "last_op_date", ty: FieldType::Time },
        Field { name: "volumeUuid", column: "uuid", ty: FieldType::TextList { table: "volume", fk: "vm_uuid" } },
        Field {
            name: "volumeInstallPath",
            column: "install_path",
            ty: FieldType::TextList { table: "volume", fk: "vm_uuid" },
        },
    ],
};

const COLUMNS: &str = "uuid, name, qmp_socket, create_date, last_op_date";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<VmRecord> {
    Ok(VmRecord {
        uuid: row.get(0)?,
        name: row.get(1)?,
        qmp_socket: row.get(2)?,
        volumes: Vec::new(),
        create_date: row.get(3)?,
        last_op_date: row.get(4)?,
    })
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterConflict {
    /// The volume already belongs to another VM.
    VolumeOfAnotherVm {
        /// Volume uuid.
        volume: String,
        /// The VM it belongs to.
        vm: String,
    },
}

impl Catalog {
    /// Registers a VM or replaces its layout, atomically. The create date of a known VM is
    /// kept. Refused (nothing changed) when a volume belongs to another VM.
    pub fn register_vm(&self, vm: &VmRecord) -> Result<Result<(), RegisterConflict>, CatalogError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for v in &vm.volumes {
            let owner: Option<String> =
                tx.query_row("SELECT vm_uuid FROM volume WHERE uuid = ?1", [&v.uuid], |r| r.get(0)).optional()?;
            if let Some(owner) = owner
                && owner != vm.uuid
            {
                return Ok(Err(RegisterConflict::VolumeOfAnotherVm { volume: v.uuid.clone(), vm: owner }));
            }
        }
        tx.execute(
            "INSERT INTO vm (uuid, name, qmp_socket, create_date, last_op_date) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(uuid) DO UPDATE SET name = excluded.name, qmp_socket = excluded.qmp_socket, last_op_date = excluded.last_op_date",
            params![vm.uuid, vm.name, vm.qmp_socket, vm.create_date, vm.last_op_date],
        )?;
        tx.execute("DELETE FROM volume WHERE vm_uuid = ?1", [&vm.uuid])?;
        for v in &vm.volumes {
            tx.execute(
                "INSERT INTO volume (uuid, vm_uuid, name, install_path, format, type, device_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![v.uuid, vm.uuid, v.name, v.install_path, v.format, v.kind, v.device_id],
            )?;
        }
        tx.commit()?;
        Ok(Ok(()))
    }

    /// The VM with this uuid.
    pub fn get_vm(&self, uuid: &str) -> Result<Option<VmRecord>, CatalogError> {
        let conn = self.conn();
        let vm = conn.query_row(&format!("SELECT {COLUMNS} FROM vm WHERE uuid = ?1"), [uuid], from_row).optional()?;
        match vm {
            None => Ok(None),
            Some(mut vm) => {
                vm.volumes = volumes(&conn, &vm.uuid)?;
                Ok(Some(vm))
            }
        }
    }

    /// The VM owning this volume.
    pub fn vm_of_volume(&self, volume_uuid: &str) -> Result<Option<VmRecord>, CatalogError> {
        let vm: Option<String> = self
            .conn()
            .query_row("SELECT vm_uuid FROM volume WHERE uuid = ?1", [volume_uuid], |r| r.get(0))
            .optional()?;
        match vm {
            Some(u) => self.get_vm(&u),
            None => Ok(None),
        }
    }

    /// Removes a VM and its volumes. Returns whether it existed.
    pub fn unregister_vm(&self, uuid: &str) -> Result<bool, CatalogError> {
        Ok(self.conn().execute("DELETE FROM vm WHERE uuid = ?1", [uuid])? == 1)
    }

    /// Runs a ZStack query over VMs.
    pub fn query_vms(&self, q: &QueryParams) -> Result<QueryResult<VmRecord>, CatalogError> {
        let conn = self.conn();
        let mut result = run_query(&conn, &SCHEMA, COLUMNS, q, from_row)?;
        for vm in &mut result.rows {
            vm.volumes = volumes(&conn, &vm.uuid)?;
        }
        Ok(result)
    }
}

fn volumes(conn: &rusqlite::Connection, vm_uuid: &str) -> Result<Vec<VolumeRecord>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT uuid, name, install_path, format, type, device_id FROM volume WHERE vm_uuid = ?1 ORDER BY device_id",
    )?;
    let rows = stmt.query_map([vm_uuid], |r| {
        Ok(VolumeRecord {
            uuid: r.get(0)?,
            name: r.get(1)?,
            install_path: r.get(2)?,
            format: r.get(3)?,
            kind: r.get(4)?,
            device_id: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(uuid: &str, volumes: &[(&str, i32)]) -> VmRecord {
        VmRecord {
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            qmp_socket: None,
            volumes: volumes
                .iter()
                .map(|(v, d)| VolumeRecord {
                    uuid: (*v).into(),
                    name: format!("vol-{v}"),
                    install_path: format!("/images/{v}.qcow2"),
                    format: VolumeFormat::Qcow2,
                    kind: if *d == 0 { VolumeKind::Root } else { VolumeKind::Data },
                    device_id: *d,
                })
                .collect(),
            create_date: 1,
            last_op_date: 1,
        }
    }

    #[test]
    fn register_replaces_layout_and_keeps_create_date() {
        let c = Catalog::open_in_memory().expect("catalog");
        c.register_vm(&vm("a", &[("r", 0), ("d", 1)])).expect("sql").expect("registered");
        let mut again = vm("a", &[("r", 0)]);
        again.create_date = 99;
        again.last_op_date = 99;
        c.register_vm(&again).expect("sql").expect("re-registered");
        let got = c.get_vm("a").expect("get").expect("exists");
        assert_eq!(got.volumes.len(), 1);
        assert_eq!((got.create_date, got.last_op_date), (1, 99));
        assert_eq!(c.vm_of_volume("r").expect("owner").map(|v| v.uuid), Some("a".into()));
        assert!(c.vm_of_volume("d").expect("owner").is_none());
    }

    #[test]
    fn a_volume_cannot_belong_to_two_vms() {
        let c = Catalog::open_in_memory().expect("catalog");
        c.register_vm(&vm("a", &[("r", 0)])).expect("sql").expect("registered");
        let conflict = c.register_vm(&vm("b", &[("r", 0)])).expect("sql").expect_err("conflict");
        assert_eq!(conflict, RegisterConflict::VolumeOfAnotherVm { volume: "r".into(), vm: "a".into() });
        assert!(c.get_vm("b").expect("get").is_none(), "nothing recorded");
    }

    #[test]
    fn query_by_volume_uuid() {
        let c = Catalog::open_in_memory().expect("catalog");
        c.register_vm(&vm("a", &[("r1", 0)])).expect("sql").expect("ok");
        c.register_vm(&vm("b", &[("r2", 0), ("d2", 1)])).expect("sql").expect("ok");
        let q = QueryParams { conditions: vec!["volumeUuid=d2".into()], ..Default::default() };
        let r = c.query_vms(&q).expect("query");
        assert_eq!(r.rows.iter().map(|v| v.uuid.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(c.unregister_vm("b").expect("delete"));
        assert!(c.vm_of_volume("d2").expect("owner").is_none(), "volumes go with their VM");
    }
}
