//! `vmbackupctl export start | list | stop`: a volume backup served as a read-only NBD disk,
//! at once, for `qemu-img`, `qemu-nbd --connect`, `nbdcopy` or a VM to read.

use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient;

use crate::{Auth, rpc_error};

#[derive(Debug, Subcommand)]
pub(crate) enum ExportCommand {
    /// Serve one volume backup of a group; prints its nbd+unix:// (or, with --listen,
    /// nbds://) URI.
    Start {
        /// Backup group uuid.
        #[arg(long)]
        group: String,
        /// Volume uuid.
        #[arg(long)]
        volume: String,
        /// Backup storage to read it from.
        #[arg(long)]
        storage: String,
        /// NBD export name (default: the volume uuid).
        #[arg(long, default_value = "")]
        name: String,
        /// Seconds it serves (default an hour, at most a week).
        #[arg(long, default_value_t = 0)]
        lifetime: u32,
        /// Serve over TCP on ip:port (port 0: any), TLS with client certificates only
        /// (the agent's [exports] settings); default: a Unix socket.
        #[arg(long, default_value = "")]
        listen: String,
    },
    /// List running exports.
    List,
    /// Stop an export.
    Stop {
        /// Export uuid.
        uuid: String,
    },
}

fn table(exports: &[pb::VmBackupExportInventory]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["EXPORT", "GROUP", "VOLUME", "SIZE", "URI"]);
    for e in exports {
        t.add_row([e.uuid.clone(), e.group_uuid.clone(), e.volume_uuid.clone(), crate::bytes(e.size), e.uri.clone()]);
    }
    t
}

/// Runs one `export` command.
pub(crate) async fn run(cmd: ExportCommand, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    match cmd {
        ExportCommand::Start { group, volume, storage, name, lifetime, listen } => {
            let req = pb::ExportVmBackupRequest {
                group_uuid: group,
                volume_uuid: volume,
                backup_storage_uuid: storage,
                export_name: name,
                lifetime_seconds: lifetime,
                listen_address: listen,
            };
            let e = c.export_vm_backup(req).await.map_err(rpc_error)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!("{}", e.uri);
            }
        }
        ExportCommand::List => {
            let list = c
                .query_vm_backup_export(pb::QueryVmBackupExportRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .inventories;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{}", table(&list));
            }
        }
        ExportCommand::Stop { uuid } => {
            c.stop_vm_backup_export(pb::StopVmBackupExportRequest { uuid: uuid.clone() }).await.map_err(rpc_error)?;
            if json {
                println!("{{}}");
            } else {
                println!("export {uuid} stopped");
            }
        }
    }
    Ok(())
}
