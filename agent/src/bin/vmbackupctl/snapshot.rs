//! `vmbackupctl snapshot-group …`: take, list, rename and delete volume snapshot groups.

use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient;

use crate::{Auth, rpc_error};

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Snapshot every volume of a VM at one instant (live through QMP when it runs).
    Create {
        /// Root volume uuid.
        #[arg(long)]
        root_volume: String,
        /// Group name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List snapshot groups, optionally filtered by ZStack conditions.
    List {
        /// Conditions, e.g. `vmInstanceUuid=…`.
        conditions: Vec<String>,
    },
    /// Rename or redescribe a group.
    Update {
        /// Group uuid.
        uuid: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Merge every snapshot of a group back; prints one result per snapshot.
    Delete {
        /// Group uuid.
        uuid: String,
    },
}

pub(crate) async fn run(cmd: SnapshotCommand, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VolumeSnapshotGroupServiceClient::with_interceptor(channel, auth);
    let groups = match cmd {
        SnapshotCommand::Create { root_volume, name, description } => c
            .create_volume_snapshot_group(pb::CreateVolumeSnapshotGroupRequest {
                root_volume_uuid: root_volume,
                name,
                description,
                ..Default::default()
            })
            .await
            .map_err(rpc_error)?
            .into_inner()
            .inventory
            .into_iter()
            .collect(),
        SnapshotCommand::List { conditions } => {
            c.query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest { conditions, ..Default::default() })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .inventories
        }
        SnapshotCommand::Update { uuid, name, description } => c
            .update_volume_snapshot_group(pb::UpdateVolumeSnapshotGroupRequest {
                uuid,
                name,
                description,
                ..Default::default()
            })
            .await
            .map_err(rpc_error)?
            .into_inner()
            .inventory
            .into_iter()
            .collect(),
        SnapshotCommand::Delete { uuid } => {
            let results = c
                .delete_volume_snapshot_group(pb::DeleteVolumeSnapshotGroupRequest { uuid, ..Default::default() })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .results;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?);
            } else {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED);
                t.set_header(["SNAPSHOT", "VOLUME", "MERGED", "ERROR"]);
                for r in &results {
                    let err = r.error.as_ref().map(|e| format!("{}: {}", e.code, e.details)).unwrap_or_default();
                    t.add_row([r.snapshot_uuid.clone(), r.volume_uuid.clone(), r.success.to_string(), err]);
                }
                println!("{t}");
            }
            if results.iter().any(|r| !r.success) {
                anyhow::bail!("some snapshots were not merged back");
            }
            return Ok(());
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "inventories": groups }))?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["GROUP", "NAME", "VM", "DEVICE", "VOLUME", "SNAPSHOT FILE", "MERGED"]);
    for g in groups {
        for r in g.volume_snapshot_refs {
            t.add_row([
                g.uuid.clone(),
                g.name.clone(),
                g.vm_instance_uuid.clone(),
                r.device_id.to_string(),
                r.volume_uuid,
                r.volume_snapshot_install_path,
                r.snapshot_deleted.to_string(),
            ]);
        }
    }
    println!("{t}");
    Ok(())
}
