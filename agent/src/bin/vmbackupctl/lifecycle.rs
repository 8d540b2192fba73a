//! `vmbackupctl backup restore | recover | delete | sync`: the rest of a backup's life.
//! Restores show a progress bar fed by WatchJob; every command prints a table or `--json`.

use anyhow::{Context, bail};
use clap::Args;
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient;

use crate::Auth;
use crate::backup::{print_backups, watch};

/// `backup restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// Backup group uuid.
    #[arg(long)]
    group: String,
    /// Backup storage to restore from.
    #[arg(long)]
    storage: String,
    /// Where a volume goes: `volume=U,path=/abs/path,format=raw|qcow2`; repeat per volume.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Write over the VM's own registered volumes (the VM must be stopped); with no
    /// `--target`, every volume of the group.
    #[arg(long)]
    revert: bool,
    /// Download streams in flight.
    #[arg(long)]
    parallelism: Option<u32>,
    /// Volume write limit, bytes per second.
    #[arg(long)]
    volume_write_bandwidth: Option<i64>,
    /// Network read limit, bytes per second.
    #[arg(long)]
    network_read_bandwidth: Option<i64>,
}

/// `backup recover`.
#[derive(Debug, Args)]
pub(crate) struct RecoverArgs {
    /// Backup group uuid.
    #[arg(long)]
    group: String,
    /// Backup storage holding the group.
    #[arg(long)]
    from: String,
    /// Backup storage to copy it to.
    #[arg(long)]
    to: String,
}

/// `backup delete`.
#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Backup group uuid.
    #[arg(long)]
    group: String,
    /// Storages to delete it from (default: every storage holding it).
    #[arg(long = "storage")]
    storages: Vec<String>,
    /// Permissive refuses while a job uses the group; Enforcing does not.
    #[arg(long, default_value = "Permissive")]
    mode: String,
}

/// `backup sync`.
#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// Backup storage whose groups rebuild the catalog.
    #[arg(long)]
    storage: String,
}

fn parse_target(spec: &str) -> anyhow::Result<pb::RestoreTarget> {
    let mut t = pb::RestoreTarget::default();
    for kv in spec.split(',') {
        let (k, v) = kv.split_once('=').with_context(|| format!("{kv:?} in --target is not key=value"))?;
        match k {
            "volume" => t.volume_uuid = v.into(),
            "path" => t.install_path = v.into(),
            "format" => t.format = v.into(),
            other => bail!("unknown --target key {other:?} (volume, path, format)"),
        }
    }
    Ok(t)
}

pub(crate) async fn restore(a: RestoreArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let resource = uuid::Uuid::new_v4().simple().to_string();
    let req = pb::RestoreVmBackupRequest {
        group_uuid: a.group,
        backup_storage_uuid: a.storage,
        targets: a.targets.iter().map(|t| parse_target(t)).collect::<anyhow::Result<_>>()?,
        revert: a.revert,
        volume_write_bandwidth: a.volume_write_bandwidth,
        network_read_bandwidth: a.network_read_bandwidth,
        resource_uuid: resource.clone(),
        system_tags: a.parallelism.map(|p| format!("volumeLiveBackup::parallelismDegree::{p}")).into_iter().collect(),
        ..Default::default()
    };
    let mut restorer = c.clone();
    let call = tokio::spawn(async move { restorer.restore_vm_backup(req).await });
    if !json {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = watch(&mut c, &resource).await;
    }
    let reply = call.await?.map_err(crate::rpc_error)?.into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    print_backups(false, reply.inventories)
}

pub(crate) async fn recover(a: RecoverArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let job = vmbackup_agent::jobs::recover_job_uuid(&a.group, &a.to);
    let req = pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
        group_uuid: a.group,
        src_backup_storage_uuid: a.from,
        dst_backup_storage_uuid: a.to,
        ..Default::default()
    };
    let mut recoverer = c.clone();
    let call = tokio::spawn(async move { recoverer.recover_vm_backup_from_image_store_backup_storage(req).await });
    if !json {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = watch(&mut c, &job).await;
    }
    let r = call.await?.map_err(crate::rpc_error)?;
    print_backups(json, r.into_inner().inventories)
}

pub(crate) async fn delete(a: DeleteArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let group = a.group.clone();
    c.delete_vm_backup(pb::DeleteVmBackupRequest {
        group_uuid: a.group,
        backup_storage_uuids: a.storages,
        delete_mode: a.mode,
        ..Default::default()
    })
    .await
    .map_err(crate::rpc_error)?;
    if json {
        println!("{{}}");
    } else {
        println!("deleted backup group {group}; its chunks are reclaimed by the store's next GC");
    }
    Ok(())
}

pub(crate) async fn sync(a: SyncArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let storage = a.storage.clone();
    c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: a.storage, ..Default::default() })
        .await
        .map_err(crate::rpc_error)?;
    if json {
        println!("{{}}");
    } else {
        println!("catalog of backup storage {storage} rebuilt from its groups");
    }
    Ok(())
}
