//! `vmbackupctl vm …`, `backup …` and `job …`: register VMs, back them up with a progress
//! bar fed by WatchJob, list backups, watch or cancel jobs (the rest of a backup's life is
//! in `lifecycle.rs`).

use anyhow::{Context, bail};
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient;
use vmbackup_proto::agent::v1::vm_service_client::VmServiceClient;

use crate::{Auth, Command, bytes, rpc_error};

type Backups = VmBackupServiceClient<InterceptedService<Channel, Auth>>;

#[derive(Debug, Subcommand)]
pub(crate) enum VmCommand {
    /// Record a VM's layout: `--volume uuid=U,path=P,format=qcow2,type=Root,device=0` per volume.
    Register {
        /// VM uuid.
        #[arg(long)]
        uuid: String,
        /// VM name.
        #[arg(long, default_value = "")]
        name: String,
        /// QMP socket of the running VM.
        #[arg(long, default_value = "")]
        qmp_socket: String,
        /// A volume, as comma-separated key=value (uuid, name, path, format, type, device).
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
    },
    /// List registered VMs.
    List,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Back up a VM (found by its root volume) to a backup storage, showing progress.
    Create {
        /// Root volume uuid.
        #[arg(long)]
        root_volume: String,
        /// Backup storage uuid.
        #[arg(long)]
        storage: String,
        /// Backup name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Uuid of the backup group (default: a new one; reuse it to retry).
        #[arg(long)]
        resource_uuid: Option<String>,
        /// Reader workers.
        #[arg(long)]
        parallelism: Option<u32>,
        /// Volume read limit, bytes per second.
        #[arg(long)]
        volume_read_bandwidth: Option<i64>,
        /// Network write limit, bytes per second.
        #[arg(long)]
        network_write_bandwidth: Option<i64>,
        /// A ZStack system tag, e.g. `backup::network::cidr::10.0.2.0/24`; repeatable.
        #[arg(long = "system-tag")]
        system_tags: Vec<String>,
    },
    /// List volume backups, optionally filtered by ZStack conditions.
    List {
        /// Conditions, e.g. `groupUuid=…`.
        conditions: Vec<String>,
    },
    /// Restore a group's volumes to new raw or qcow2 files, or over the stopped VM's own.
    Restore(crate::lifecycle::RestoreArgs),
    /// Copy a group from one backup storage to another (only the chunks it lacks).
    Recover(crate::lifecycle::RecoverArgs),
    /// Delete a group from some or all of its storages.
    Delete(crate::lifecycle::DeleteArgs),
    /// Rebuild the catalog of one backup storage from its groups.
    Sync(crate::lifecycle::SyncArgs),
    /// Apply a retention policy to a backup storage's groups (per VM); --dry-run lists only.
    Prune(crate::lifecycle::PruneArgs),
    /// List and extract files inside a volume backup (ext2/3/4, XFS), without restoring it.
    #[command(subcommand)]
    Files(crate::files::FilesCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum JobCommand {
    /// Follow a job until it ends.
    Watch {
        /// Job uuid (a backup's resource uuid).
        uuid: String,
    },
    /// Cancel a running job.
    Cancel {
        /// Job uuid.
        uuid: String,
    },
}

fn parse_volume(spec: &str) -> anyhow::Result<pb::VolumeSpec> {
    let mut v = pb::VolumeSpec::default();
    for kv in spec.split(',') {
        let (k, val) = kv.split_once('=').with_context(|| format!("{kv:?} in --volume is not key=value"))?;
        match k {
            "uuid" => v.uuid = val.into(),
            "name" => v.name = val.into(),
            "path" => v.install_path = val.into(),
            "format" => v.format = val.into(),
            "type" => v.r#type = val.into(),
            "device" => v.device_id = val.parse().with_context(|| format!("device {val:?} is not a number"))?,
            other => bail!("unknown --volume key {other:?} (uuid, name, path, format, type, device)"),
        }
    }
    Ok(v)
}

pub(crate) async fn run(command: Command, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Vm(cmd) => {
            let mut c = VmServiceClient::with_interceptor(channel, auth);
            let vms = match cmd {
                VmCommand::Register { uuid, name, qmp_socket, volumes } => {
                    let volumes = volumes.iter().map(|v| parse_volume(v)).collect::<anyhow::Result<_>>()?;
                    let r = c
                        .register_vm(pb::RegisterVmRequest { uuid, name, qmp_socket, volumes, ..Default::default() })
                        .await
                        .map_err(rpc_error)?;
                    r.into_inner().inventory.into_iter().collect::<Vec<_>>()
                }
                VmCommand::List => {
                    c.query_vm(pb::QueryVmRequest::default()).await.map_err(rpc_error)?.into_inner().inventories
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
                return Ok(());
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["VM", "NAME", "VOLUME", "TYPE", "FORMAT", "PATH"]);
            for vm in vms {
                for v in vm.volumes {
                    t.add_row([vm.uuid.clone(), vm.name.clone(), v.uuid, v.r#type, v.format, v.install_path]);
                }
            }
            println!("{t}");
        }
        Command::Backup(BackupCommand::Create {
            root_volume,
            storage,
            name,
            description,
            resource_uuid,
            parallelism,
            volume_read_bandwidth,
            network_write_bandwidth,
            system_tags,
        }) => {
            let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
            let resource = resource_uuid.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
            let req = pb::CreateVmBackupRequest {
                root_volume_uuid: root_volume,
                backup_storage_uuid: storage,
                name,
                description,
                resource_uuid: resource.clone(),
                volume_read_bandwidth,
                network_write_bandwidth,
                system_tags: parallelism
                    .map(|p| format!("volumeLiveBackup::parallelismDegree::{p}"))
                    .into_iter()
                    .chain(system_tags)
                    .collect(),
                ..Default::default()
            };
            let mut creator = c.clone();
            let create = tokio::spawn(async move { creator.create_vm_backup(req).await });
            if !json {
                // The job appears once the agent has validated the request.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let _ = watch(&mut c, &resource).await;
            }
            let inventories = create.await?.map_err(rpc_error)?.into_inner().inventories;
            print_backups(json, inventories)?;
        }
        Command::Backup(BackupCommand::List { conditions }) => {
            let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
            let r = c
                .query_volume_backup(pb::QueryVolumeBackupRequest { conditions, ..Default::default() })
                .await
                .map_err(rpc_error)?;
            print_backups(json, r.into_inner().inventories)?;
        }
        Command::Backup(BackupCommand::Restore(a)) => crate::lifecycle::restore(a, channel, auth, json).await?,
        Command::Backup(BackupCommand::Recover(a)) => crate::lifecycle::recover(a, channel, auth, json).await?,
        Command::Backup(BackupCommand::Delete(a)) => crate::lifecycle::delete(a, channel, auth, json).await?,
        Command::Backup(BackupCommand::Sync(a)) => crate::lifecycle::sync(a, channel, auth, json).await?,
        Command::Backup(BackupCommand::Prune(a)) => crate::lifecycle::prune(a, channel, auth, json).await?,
        Command::Backup(BackupCommand::Files(cmd)) => crate::files::run(cmd, channel, auth, json).await?,
        Command::Job(JobCommand::Watch { uuid }) => {
            let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
            let last = watch(&mut c, &uuid).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&last)?);
            }
            if last.state != "Succeeded" {
                bail!("job {uuid} {}: {}", last.state, last.error.map(|e| e.details).unwrap_or(last.message));
            }
        }
        Command::Job(JobCommand::Cancel { uuid }) => {
            let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
            c.cancel_job(pb::CancelJobRequest { job_uuid: uuid.clone() }).await.map_err(rpc_error)?;
            println!("cancelling job {uuid}");
        }
        Command::Storage(_)
        | Command::Store { .. }
        | Command::Status
        | Command::SnapshotGroup(_)
        | Command::Export(_)
        | Command::Key(_)
        | Command::Completions { .. }
        | Command::Man => {}
    }
    Ok(())
}

/// Follows a job with a progress bar; returns its last progress.
pub(crate) async fn watch(c: &mut Backups, uuid: &str) -> anyhow::Result<pb::JobProgress> {
    let mut stream =
        c.watch_job(pb::WatchJobRequest { job_uuid: uuid.to_string() }).await.map_err(rpc_error)?.into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut last = pb::JobProgress::default();
    while let Some(p) = stream.message().await.map_err(rpc_error)? {
        bar.set_length(u64::try_from(p.bytes_planned).unwrap_or(0));
        bar.set_position(u64::try_from(p.bytes_read + p.bytes_zero + p.bytes_written).unwrap_or(0));
        bar.set_message(format!("{} sent, {} deduplicated", bytes(p.bytes_sent), bytes(p.bytes_deduplicated)));
        last = p;
    }
    bar.finish_with_message(format!(
        "{}: {} sent, {} deduplicated",
        last.state,
        bytes(last.bytes_sent),
        bytes(last.bytes_deduplicated)
    ));
    Ok(last)
}

pub(crate) fn print_backups(json: bool, rows: Vec<pb::VolumeBackupInventory>) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "inventories": rows }))?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["GROUP", "VOLUME BACKUP", "VOLUME", "TYPE", "NAME", "SIZE", "STATUS"]);
    for r in rows {
        t.add_row([r.group_uuid, r.uuid, r.volume_uuid, r.r#type, r.name, bytes(r.size), r.status]);
    }
    println!("{t}");
    Ok(())
}
